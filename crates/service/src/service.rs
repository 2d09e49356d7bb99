//! The service builder: serve, register, heartbeat, consume events, deregister.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use serde::Serialize;
use switchboard_bus::middleware::idempotency::{Idempotent, InboxStore, MemoryInbox};
use switchboard_bus::{Bus, Event, EventBuilder, HandlerError, SubscribeOptions, Subscription};
use switchboard_registry::client::{ClientError, Membership, RegistryClient, RemoteDiscovery};
use switchboard_registry::{CheckSpec, Discovery, Registration, Registry, RegistryOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientConfig};
use crate::correlation::{Correlation, CorrelationLayer};

/// Why a service could not start or publish.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The builder was given an impossible setting.
    #[error("invalid service config: {0}")]
    Config(String),
    /// The listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The registry refused or failed.
    #[error("registry: {0}")]
    Registry(#[from] switchboard_registry::RegistryError),
    /// The remote registry (`http://`) refused or failed.
    #[error("remote registry: {0}")]
    RemoteRegistry(#[from] ClientError),
    /// The bus refused or failed.
    #[error("bus: {0}")]
    Bus(#[from] switchboard_bus::BusError),
    /// The service has no bus.
    #[error("service {0} has no bus")]
    NoBus(String),
    /// An event could not be built.
    #[error("event: {0}")]
    Event(String),
}

type BoxHandler = Arc<
    dyn Fn(Context, Event) -> futures::future::BoxFuture<'static, Result<(), HandlerError>>
        + Send
        + Sync,
>;

type MakeRouter = Box<dyn FnOnce(&Context) -> Router + Send>;

enum Source<H> {
    Url(String),
    Handle(H),
}

/// Builds a service; see [`Service::builder`].
pub struct ServiceBuilder {
    name: String,
    version: String,
    instance_id: Option<String>,
    listen: SocketAddr,
    advertise: Option<IpAddr>,
    registry: Option<Source<Registry>>,
    bus: Option<Source<Bus>>,
    router: Option<MakeRouter>,
    handlers: Vec<(String, BoxHandler)>,
    inbox: Option<Arc<dyn InboxStore>>,
    subscribe: SubscribeOptions,
    ttl: Duration,
    client: ClientConfig,
    tags: Vec<String>,
}

impl std::fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("listen", &self.listen)
            .field("handlers", &self.handlers.len())
            .finish_non_exhaustive()
    }
}

/// A Switchboard service: an axum router served on its own port, registered in
/// the registry, consuming events from the bus.
///
/// ```no_run
/// # async fn run() -> Result<(), switchboard_service::ServiceError> {
/// use axum::{Router, routing::get};
/// use switchboard_service::Service;
///
/// let service = Service::builder("hello-service")
///     .version("1.0.0")
///     .registry_url("memory://")
///     .bus_url("memory://")
///     .router(Router::new().route("/hello", get(|| async { "hi" })))
///     .on("greeting.sent", |_ctx, event| async move {
///         tracing::info!(id = event.id(), "greeting seen");
///         Ok(())
///     })
///     .start()
///     .await?;
/// println!("listening on {}", service.addr());
/// service.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Service;

impl Service {
    /// Starts building a service named `name`.
    pub fn builder(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            name: name.into(),
            version: "0.1.0".into(),
            instance_id: None,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise: None,
            registry: None,
            bus: None,
            router: None,
            handlers: Vec::new(),
            inbox: None,
            subscribe: SubscribeOptions::default(),
            ttl: Duration::from_secs(6),
            client: ClientConfig::default(),
            tags: Vec::new(),
        }
    }
}

impl ServiceBuilder {
    /// Sets the semantic version registered (default `0.1.0`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the instance id (default: `<name>-<random>`). Reusing the id of a
    /// crashed instance makes the bus hand its pending events to the new one at once.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Sets the listen address (default `127.0.0.1:0`, a free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Sets the address registered for others to call (default: the listen
    /// address, or 127.0.0.1 when listening on all interfaces).
    pub fn advertise(mut self, ip: IpAddr) -> Self {
        self.advertise = Some(ip);
        self
    }

    /// Adds a tag to the registration.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Uses the registry at `url`: a registry server (`http://HOST:PORT`, e.g.
    /// `switchboard registry`), joined over its HTTP API; or a store opened in
    /// this process (`memory://`, or `redis://HOST:PORT`, which processes share).
    pub fn registry_url(mut self, url: impl Into<String>) -> Self {
        self.registry = Some(Source::Url(url.into()));
        self
    }

    /// Uses an open registry (e.g. the one embedded in the gateway of this process).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(Source::Handle(registry));
        self
    }

    /// Uses the bus at `url` (see `switchboard_bus::Bus::open`).
    pub fn bus_url(mut self, url: impl Into<String>) -> Self {
        self.bus = Some(Source::Url(url.into()));
        self
    }

    /// Uses an open bus.
    pub fn bus(mut self, bus: Bus) -> Self {
        self.bus = Some(Source::Handle(bus));
        self
    }

    /// Serves `router` (plus `/health`).
    pub fn router(mut self, router: Router) -> Self {
        self.router = Some(Box::new(move |_| router));
        self
    }

    /// Serves the router `make` builds from the service's [`Context`] (plus `/health`).
    pub fn router_with(mut self, make: impl FnOnce(&Context) -> Router + Send + 'static) -> Self {
        self.router = Some(Box::new(make));
        self
    }

    /// Handles events of type `topic`. The service's instances form one
    /// consumer group (named after the service), so each event is handled once
    /// per service; the handler runs in the event's correlation context, behind
    /// the inbox (an event already handled is acknowledged without running it).
    pub fn on<F, Fut>(mut self, topic: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Context, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.push((
            topic.into(),
            Arc::new(move |ctx, event| Box::pin(handler(ctx, event))),
        ));
        self
    }

    /// Sets the inbox store shared by the service's instances (default: one in
    /// memory per instance). Give every service its own: keys are per event, not per group.
    pub fn inbox(mut self, inbox: Arc<dyn InboxStore>) -> Self {
        self.inbox = Some(inbox);
        self
    }

    /// Sets the subscription options (the consumer name is always the instance id).
    pub fn subscribe_options(mut self, options: SubscribeOptions) -> Self {
        self.subscribe = options;
        self
    }

    /// Sets the TTL of the registration's check (default 6 s); the service
    /// heartbeats every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the configuration of the service's [`Client`].
    pub fn client(mut self, config: ClientConfig) -> Self {
        self.client = config;
        self
    }

    /// Binds, serves, subscribes, registers; returns once the instance is
    /// registered and ready.
    pub async fn start(self) -> Result<RunningService, ServiceError> {
        let version = semver::Version::parse(&self.version)
            .map_err(|e| ServiceError::Config(format!("version {:?}: {e}", self.version)))?;
        if self.ttl < Duration::from_millis(300) {
            return Err(ServiceError::Config("ttl must be at least 300ms".into()));
        }
        let instance_id = self.instance_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                self.name,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        let mut remote = None;
        let registry = match self.registry {
            Some(Source::Handle(r)) => Some(r),
            Some(Source::Url(url)) if url.starts_with("http://") => {
                remote = Some(RegistryClient::new(&url)?);
                None
            }
            Some(Source::Url(url)) => Some(Registry::open(&url, RegistryOptions::default()).await?),
            None => None,
        };
        let bus = match self.bus {
            Some(Source::Handle(b)) => Some(b),
            Some(Source::Url(url)) => Some(Bus::open(&url).await?),
            None => None,
        };
        if !self.handlers.is_empty() && bus.is_none() {
            return Err(ServiceError::NoBus(self.name));
        }
        let discovery: Option<Arc<dyn Discovery>> = match (&registry, &remote) {
            (Some(r), _) => Some(Arc::new(r.clone())),
            (None, Some(c)) => Some(Arc::new(RemoteDiscovery::new(c.clone()))),
            (None, None) => None,
        };
        let client = Client::new(discovery, self.client);
        let ctx = Context {
            inner: Arc::new(ContextInner {
                source: format!("/{}", self.name),
                name: self.name.clone(),
                instance_id: instance_id.clone(),
                bus,
                client,
            }),
        };

        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: self.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServiceError::Bind {
            addr: self.listen,
            source,
        })?;
        let user = self.router.map_or_else(Router::new, |make| make(&ctx));
        let health = HealthBody {
            status: "passing",
            service: self.name.clone(),
            instance: instance_id.clone(),
            version: self.version.clone(),
        };
        let app = user
            .route(
                "/health",
                get(move || async move { axum::Json(health.clone()) }),
            )
            .layer(CorrelationLayer::for_service(&self.name));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, stop.clone()));

        let mut subscriptions = Vec::new();
        if let Some(bus) = ctx.bus() {
            let inbox: Arc<dyn InboxStore> = self.inbox.unwrap_or_else(|| {
                Arc::new(MemoryInbox::new(1_000_000, Duration::from_secs(24 * 3600)))
            });
            let options = self.subscribe.consumer_name(instance_id.clone());
            for (topic, handler) in self.handlers {
                let h = EventHandler {
                    ctx: ctx.clone(),
                    handler,
                };
                let h = Idempotent::new(h, Arc::new(DynInbox(inbox.clone())))
                    .lease(Duration::from_secs(5));
                let sub = bus.subscribe(&topic, &self.name, h, options.clone()).await;
                match sub {
                    Ok(sub) => subscriptions.push(sub),
                    Err(e) => {
                        stop.cancel();
                        return Err(e.into());
                    }
                }
            }
        }

        let advertise = self.advertise.unwrap_or(if addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            addr.ip()
        });
        let mut registration = Registration::new(advertise.to_string(), addr.port())
            .version(version)
            .check(CheckSpec::ttl(self.ttl));
        for tag in self.tags {
            registration = registration.tag(tag);
        }
        let mut membership = None;
        if let Some(remote) = &remote {
            // The membership heartbeats (re-registering when forgotten) until left.
            membership = Some(
                remote
                    .join(&self.name, &instance_id, registration.clone())
                    .await?,
            );
        }
        let heartbeat = match &registry {
            Some(registry) => {
                registry
                    .register(&self.name, &instance_id, registration.clone())
                    .await?;
                registry.heartbeat(&self.name, &instance_id).await?;
                Some(tokio::spawn(heartbeat_loop(
                    registry.clone(),
                    self.name.clone(),
                    instance_id.clone(),
                    registration,
                    self.ttl / 3,
                    stop.clone(),
                )))
            }
            None => None,
        };
        tracing::info!(service = %self.name, instance = %instance_id, %addr, "service started");
        Ok(RunningService {
            ctx,
            addr,
            registry,
            membership,
            stop,
            server: Some(server),
            heartbeat,
            subscriptions,
        })
    }
}

/// Serves `app` until `stop`, then lets open requests finish (up to 10 s).
///
/// Connections run in a `JoinSet` owned by this task, so aborting the task
/// (a kill) drops every connection at once, as a crashed process would.
async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: back off a little.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let svc = TowerToHyperService::new(app.clone());
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                conns.spawn(graceful.watch(conn));
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}

async fn heartbeat_loop(
    registry: Registry,
    service: String,
    id: String,
    registration: Registration,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = registry.heartbeat(&service, &id).await {
            // Deregistered behind our back (or the store lost it): register again.
            tracing::warn!(%service, %id, %error, "heartbeat failed; registering again");
            if let Err(error) = registry.register(&service, &id, registration.clone()).await {
                tracing::warn!(%service, %id, %error, "re-registration failed");
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct HealthBody {
    status: &'static str,
    service: String,
    instance: String,
    version: String,
}

struct DynInbox(Arc<dyn InboxStore>);

impl InboxStore for DynInbox {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        lease: Duration,
    ) -> futures::future::BoxFuture<
        'a,
        Result<
            switchboard_bus::middleware::idempotency::Claim,
            switchboard_bus::middleware::idempotency::StoreError,
        >,
    > {
        self.0.claim(key, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> futures::future::BoxFuture<
        'a,
        Result<(), switchboard_bus::middleware::idempotency::StoreError>,
    > {
        self.0.complete(key, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<(), switchboard_bus::middleware::idempotency::StoreError>,
    > {
        self.0.release(key)
    }
}

struct EventHandler {
    ctx: Context,
    handler: BoxHandler,
}

impl switchboard_bus::Handler for EventHandler {
    fn handle(
        &self,
        event: Event,
    ) -> futures::future::BoxFuture<'static, Result<(), HandlerError>> {
        let correlation = Correlation::of_event(&event);
        let ty = event.ty().to_owned();
        let fut = (self.handler)(self.ctx.clone(), event);
        Box::pin(correlation.scope_in(Some(self.ctx.name()), async move {
            let result = fut.await;
            if let Err(error) = &result {
                tracing::warn!(event = %ty, %error, "event handler failed; it will be redelivered");
            }
            result
        }))
    }
}

struct ContextInner {
    name: String,
    instance_id: String,
    source: String,
    bus: Option<Bus>,
    client: Client,
}

/// What a service's handlers use: its name, its bus, its client.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .field("instance_id", &self.inner.instance_id)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The bus, if the service has one.
    pub fn bus(&self) -> Option<&Bus> {
        self.inner.bus.as_ref()
    }

    /// The client for calling other services by name.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// An event builder with `source` = `/<service name>` and type `ty`.
    pub fn event(&self, ty: &str) -> EventBuilder {
        Event::builder().source(self.inner.source.clone()).ty(ty)
    }

    /// Publishes an event of type `ty` with `data` and the given `id` (use a
    /// deterministic id when a retry may publish the same fact again, so that
    /// consumers' inboxes drop the copy). The current correlation context is
    /// stamped on it.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        ty: &str,
        id: impl Into<String>,
        data: &T,
    ) -> Result<(), ServiceError> {
        let event = self
            .event(ty)
            .id(id)
            .data(data)
            .build()
            .map_err(|e| ServiceError::Event(e.to_string()))?;
        self.publish_event(event).await
    }

    /// Publishes a built event (see [`Context::publish`]).
    pub async fn publish_event(&self, event: Event) -> Result<(), ServiceError> {
        let bus = self
            .bus()
            .ok_or_else(|| ServiceError::NoBus(self.inner.name.clone()))?;
        bus.publish(event).await?;
        Ok(())
    }
}

/// A started service instance.
#[derive(Debug)]
pub struct RunningService {
    ctx: Context,
    addr: SocketAddr,
    registry: Option<Registry>,
    membership: Option<Membership>,
    stop: CancellationToken,
    server: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
    subscriptions: Vec<Subscription>,
}

impl RunningService {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service name.
    pub fn name(&self) -> &str {
        self.ctx.name()
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        self.ctx.instance_id()
    }

    /// The service's context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Stops cleanly: deregisters (so callers stop picking it), stops consuming
    /// (in-flight handlers finish and are acknowledged), then lets in-flight
    /// HTTP requests finish and closes the listener.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let (name, id) = (
            self.ctx.name().to_owned(),
            self.ctx.instance_id().to_owned(),
        );
        if let Some(registry) = &self.registry
            && let Err(error) = registry.deregister(&name, &id).await
        {
            tracing::warn!(service = %name, %id, %error, "deregistration failed");
        }
        if let Some(membership) = self.membership.take()
            && let Err(error) = membership.leave().await
        {
            tracing::warn!(service = %name, %id, %error, "deregistration failed");
        }
        for sub in std::mem::take(&mut self.subscriptions) {
            sub.shutdown().await;
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
        if let Some(hb) = self.heartbeat.take() {
            let _ = hb.await;
        }
        tracing::info!(service = %self.ctx.name(), instance = %self.ctx.instance_id(), "service stopped");
    }

    /// Stops like a crash: no deregistration, in-flight events unacknowledged
    /// (the bus redelivers them), connections dropped. For tests and demos.
    /// (With an `http://` registry the membership still deregisters, best
    /// effort, as the registry client does when dropped.)
    pub fn kill(mut self) {
        for sub in std::mem::take(&mut self.subscriptions) {
            drop(sub);
        }
        for task in [self.server.take(), self.heartbeat.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        tracing::warn!(service = %self.ctx.name(), instance = %self.ctx.instance_id(), "service killed");
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        for task in [self.server.take(), self.heartbeat.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}
