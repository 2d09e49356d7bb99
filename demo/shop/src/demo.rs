//! The whole shop in one process: registry, bus, gateway and two instances of
//! each service — what `switchboard demo` runs, and what the tests drive.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let shop = switchboard_shop::run(switchboard_shop::DemoOptions::for_tests()).await?;
//! let gateway = shop.gateway_addr().expect("the full shop runs a gateway");
//! println!("curl http://{gateway}/users/...");
//! shop.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchboard_bus::middleware::idempotency::{InboxStore, MemoryInbox, RedisInbox};
use switchboard_bus::{Bus, SubscribeOptions};
use switchboard_gateway::{Config, GatewayBuilder, RunningGateway};
use switchboard_registry::{Registry, RegistryOptions};
use switchboard_service::{IdempotencyStore, RunningService, ServiceBuilder};

use crate::inventory::{self, Inventory};
use crate::orders::{self, Orders};
use crate::payments::{self, Payments};
use crate::users::{self, Users};

/// The shop's services in flow order: short name (for `--only`) and registry name.
pub const SERVICES: [(&str, &str); 4] = [
    ("users", users::SERVICE),
    ("orders", orders::SERVICE),
    ("inventory", inventory::SERVICE),
    ("payments", payments::SERVICE),
];

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Gateway proxy listener (`switchboard demo`: 127.0.0.1:3000).
    pub listen: SocketAddr,
    /// Gateway admin listener, which also serves the registry API (127.0.0.1:9900).
    pub admin: SocketAddr,
    /// Bus URL (`memory://`, `redis://HOST:PORT`, `nats://HOST:PORT`).
    pub bus: String,
    /// Registry store URL (`memory://` or `redis://HOST:PORT`).
    pub store: String,
    /// Run only this service (short name: `users`, `orders`, `inventory`,
    /// `payments`), or only the gateway (`gateway`), against a shared store
    /// and bus (neither may be `memory://`). Run each service in one process:
    /// its instances share their data in memory.
    pub only: Option<String>,
    /// Instances per service.
    pub instances: usize,
    /// First service port: users get `base_port+1..`, orders `base_port+11..`,
    /// inventory `+21..`, payments `+31..`. `None`: free ports.
    pub base_port: Option<u16>,
    /// Initial stock of every SKU.
    pub stock: u64,
    /// Gateway worker threads (0: one per core).
    pub gateway_workers: usize,
    /// Gateway access log (one JSON line per request on stdout). Off, the
    /// records still feed the dashboard's search, but are not printed.
    pub access_log: bool,
    /// TTL of the services' registrations.
    pub ttl: Duration,
}

impl Default for DemoOptions {
    /// What `switchboard demo` runs.
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3000),
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9900),
            bus: "memory://".into(),
            store: "memory://".into(),
            only: None,
            instances: 2,
            base_port: Some(4000),
            stock: 1000,
            gateway_workers: 0,
            access_log: false,
            ttl: Duration::from_secs(3),
        }
    }
}

impl DemoOptions {
    /// The default shop on free ports everywhere, with its own memory bus.
    pub fn for_tests() -> Self {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Self {
            listen: any,
            admin: any,
            // A private name: tests in one process must not share topics.
            bus: format!("memory://shop-{}", uuid::Uuid::new_v4().simple()),
            base_port: None,
            ..Self::default()
        }
    }
}

/// The shop's data, one "database" per service, shared by its instances.
#[derive(Debug, Clone, Default)]
pub struct ShopData {
    /// users' data.
    pub users: Users,
    /// orders' data.
    pub orders: Orders,
    /// inventory's data.
    pub inventory: Inventory,
    /// payments' data.
    pub payments: Payments,
    /// orders' `Idempotency-Key` store.
    pub order_keys: IdempotencyStore,
}

/// A running shop.
pub struct DemoHandle {
    options: DemoOptions,
    registry: Registry,
    bus: Bus,
    gateway: Option<RunningGateway>,
    bridge: Option<switchboard_gateway::bridge::Bridge>,
    data: ShopData,
    inboxes: HashMap<&'static str, Arc<dyn InboxStore>>,
    services: Vec<RunningService>,
}

impl std::fmt::Debug for DemoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoHandle")
            .field("gateway", &self.gateway_addr())
            .field("admin", &self.admin_addr())
            .field("instances", &self.instances())
            .finish_non_exhaustive()
    }
}

fn service_name(short: &str) -> anyhow::Result<&'static str> {
    SERVICES
        .iter()
        .find(|(s, full)| *s == short || *full == short)
        .map(|(_, full)| *full)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown service {short:?}: expected users, orders, inventory or payments"
            )
        })
}

/// Starts the shop: the registry (store `options.store`), the bus, the services
/// and, unless `options.only` names a service, the gateway with the registry API on its
/// admin listener. Returns once everything listens and is registered.
pub async fn run(options: DemoOptions) -> anyhow::Result<DemoHandle> {
    let gateway_only = options.only.as_deref() == Some("gateway");
    let only = match options.only.as_deref() {
        None | Some("gateway") => None,
        Some(s) => Some(service_name(s)?),
    };
    if options.only.is_some() {
        anyhow::ensure!(
            !options.store.starts_with("memory://") && !options.bus.starts_with("memory://"),
            "--only runs part of the shop: the others must share its registry store and bus, \
             so give both as redis://HOST:PORT (or the bus as nats://HOST:PORT)"
        );
    }
    let registry = Registry::open(&options.store, RegistryOptions::default())
        .await
        .with_context(|| format!("open the registry store {}", options.store))?;
    let bus = Bus::open(&options.bus)
        .await
        .with_context(|| format!("open the bus {}", options.bus))?;
    let mut inboxes: HashMap<&'static str, Arc<dyn InboxStore>> = HashMap::new();
    for (_, name) in SERVICES {
        let inbox: Arc<dyn InboxStore> = if options.bus.starts_with("redis://") {
            Arc::new(
                RedisInbox::connect(&options.bus, &format!("shop:{name}"))
                    .await
                    .with_context(|| format!("connect the inbox of {name}"))?,
            )
        } else {
            Arc::new(MemoryInbox::new(1_000_000, Duration::from_secs(24 * 3600)))
        };
        inboxes.insert(name, inbox);
    }
    let data = ShopData {
        inventory: Inventory::with_stock(options.stock),
        ..ShopData::default()
    };
    let mut handle = DemoHandle {
        options,
        registry,
        bus,
        gateway: None,
        bridge: None,
        data,
        inboxes,
        services: Vec::new(),
    };
    // Downstream first, so each service finds the ones it calls.
    for (_, name) in SERVICES {
        if !gateway_only && only.is_none_or(|o| o == name) {
            handle.start(name).await?;
        }
    }
    if only.is_none() {
        handle.start_gateway().await?;
    }
    Ok(handle)
}

impl DemoHandle {
    /// The gateway's proxy address (none with `only`).
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(RunningGateway::listen)
    }

    /// The gateway's admin address (none with `only`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(RunningGateway::admin)
    }

    /// Every running instance: service, instance id, address.
    pub fn instances(&self) -> Vec<(String, String, SocketAddr)> {
        self.services
            .iter()
            .map(|s| (s.name().to_owned(), s.instance_id().to_owned(), s.addr()))
            .collect()
    }

    /// The services' data (for tests and the walkthrough).
    pub fn data(&self) -> &ShopData {
        &self.data
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    fn builder(&self, name: &str) -> ServiceBuilder {
        let d = &self.data;
        match name {
            users::SERVICE => users::service(d.users.clone()),
            orders::SERVICE => orders::service(&d.orders, d.order_keys.clone()),
            inventory::SERVICE => inventory::service(d.inventory.clone()),
            _ => payments::service(d.payments.clone()),
        }
    }

    /// The options the shop runs with.
    pub fn options(&self) -> &DemoOptions {
        &self.options
    }

    /// Starts `instances` instances of `service` (registry name or short name).
    /// Restarted instances reuse their ids, so the bus hands them what their
    /// killed predecessors left unacknowledged at once.
    pub async fn start(&mut self, service: &str) -> anyhow::Result<()> {
        let name = service_name(service)?;
        for i in 1..=self.options.instances {
            self.start_one(name, i).await?;
        }
        Ok(())
    }

    /// Starts one instance by id (`<service>-<n>`, as [`DemoHandle::instances`]
    /// lists them), e.g. after [`DemoHandle::kill_instance`].
    pub async fn start_instance(&mut self, instance_id: &str) -> anyhow::Result<()> {
        let (name, i) = self.parse_instance(instance_id)?;
        anyhow::ensure!(
            !self.services.iter().any(|s| s.instance_id() == instance_id),
            "instance {instance_id} is already running"
        );
        self.start_one(name, i).await
    }

    fn parse_instance(&self, instance_id: &str) -> anyhow::Result<(&'static str, usize)> {
        SERVICES
            .iter()
            .flat_map(|(_, name)| (1..=self.options.instances).map(move |i| (*name, i)))
            .find(|(name, i)| format!("{name}-{i}") == instance_id)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown instance {instance_id:?}: expected <service>-<1..={}>",
                    self.options.instances
                )
            })
    }

    async fn start_one(&mut self, name: &'static str, i: usize) -> anyhow::Result<()> {
        let offset = SERVICES
            .iter()
            .position(|(_, n)| *n == name)
            .expect("known service");
        let port = self.options.base_port.map_or(0, |base| {
            base + 10 * u16::try_from(offset).unwrap_or(0) + u16::try_from(i).unwrap_or(0)
        });
        let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let options = SubscribeOptions::default()
            .ack_wait(Duration::from_secs(5))
            .max_deliveries(20)
            .max_in_flight(256);
        let running = self
            .builder(name)
            .instance_id(format!("{name}-{i}"))
            .listen(listen)
            .registry(self.registry.clone())
            .bus(self.bus.clone())
            .inbox(Arc::clone(&self.inboxes[name]))
            .subscribe_options(options)
            .ttl(self.options.ttl)
            .start()
            .await
            .with_context(|| format!("start {name}-{i} on {listen}"))?;
        self.services.push(running);
        Ok(())
    }

    /// Kills every instance of `service` like a crash: no deregistration, no
    /// acknowledgement of events in flight. [`DemoHandle::start`] brings it back.
    pub fn kill(&mut self, service: &str) -> anyhow::Result<()> {
        let name = service_name(service)?;
        let (dead, alive): (Vec<_>, Vec<_>) = std::mem::take(&mut self.services)
            .into_iter()
            .partition(|s| s.name() == name);
        self.services = alive;
        for s in dead {
            s.kill();
        }
        Ok(())
    }

    /// Kills one instance like a crash (see [`DemoHandle::kill`]);
    /// [`DemoHandle::start_instance`] brings it back.
    pub fn kill_instance(&mut self, instance_id: &str) -> anyhow::Result<()> {
        let at = self
            .services
            .iter()
            .position(|s| s.instance_id() == instance_id)
            .ok_or_else(|| anyhow::anyhow!("no running instance {instance_id:?}"))?;
        self.services.swap_remove(at).kill();
        Ok(())
    }

    async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let o = &self.options;
        let toml = gateway_config(o);
        let config = Config::parse("demo.toml".as_ref(), &toml)
            .map_err(|e| anyhow::anyhow!("demo gateway config: {e}"))?;
        let sources = switchboard_gateway::discovery::registry_sources(
            &self.registry,
            SERVICES.iter().map(|(_, name)| (*name).to_owned()),
        );
        let registry_api = switchboard_registry::http::router(
            self.registry.clone(),
            switchboard_registry::http::HttpOptions::default(),
        );
        // The HTTP event bridge on the admin listener: services in any
        // language publish with POST /v1/events and register push
        // subscriptions (examples/node-service, examples/python-service).
        let bridge = switchboard_gateway::bridge::Bridge::start(
            switchboard_gateway::bridge::BridgeOptions::new(
                self.bus.clone(),
                switchboard_gateway::bridge::registry_resolver(self.registry.clone()),
            ),
        )
        .await
        .context("start the event bridge")?;
        let mut builder = GatewayBuilder::new(config)
            .sources(sources)
            .admin_extra(registry_api, switchboard_registry::http::openapi())
            .dashboard_bus(self.bus.clone())
            .dashboard_registry(self.registry.clone())
            .bridge(bridge.clone());
        if !o.access_log {
            // Keep the records for the dashboard's search; print nothing.
            builder = builder.access_log_dispatch(tracing::Dispatch::none());
        }
        let gateway = builder
            .start()
            .await
            .with_context(|| format!("start the gateway on {} (admin {})", o.listen, o.admin))?;
        self.gateway = Some(gateway);
        self.bridge = Some(bridge);
        Ok(())
    }

    /// Stops everything cleanly: the gateway drains, services deregister and
    /// finish their in-flight work, the registry stops its checks.
    pub async fn shutdown(mut self) {
        if let Some(gw) = self.gateway.take() {
            gw.shutdown().await;
        }
        if let Some(b) = self.bridge.take() {
            b.shutdown().await;
        }
        for s in std::mem::take(&mut self.services) {
            s.shutdown().await;
        }
        self.registry.shutdown().await;
    }
}

/// The gateway config of the demo, as TOML.
pub fn gateway_config(o: &DemoOptions) -> String {
    format!(
        r#"[gateway]
listen = "{listen}"
admin = "{admin}"
workers = {workers}
access_log = true

[registry]
store = "{store}"

# Every instance registers itself (switchboard-service); none is static.
[[services]]
name = "{users}"
instances = []

[[services]]
name = "{orders}"
instances = []

[[services]]
name = "{inventory}"
instances = []

[[services]]
name = "{payments}"
instances = []

[[routes]]
prefix = "/users"
service = "{users}"
timeout = "5s"

[[routes]]
prefix = "/orders"
service = "{orders}"
timeout = "5s"

[[routes]]
prefix = "/inventory"
service = "{inventory}"
timeout = "5s"

[[routes]]
prefix = "/payments/admin"
service = "{payments}"
rewrite = "/admin"
timeout = "5s"

[[routes]]
prefix = "/payments"
service = "{payments}"
timeout = "2s"
breaker = {{ failure_rate = 0.5, min_calls = 10, window = "10s", open_for = "10s" }}
"#,
        listen = o.listen,
        admin = o.admin,
        workers = o.gateway_workers,
        store = o.store,
        users = users::SERVICE,
        orders = orders::SERVICE,
        inventory = inventory::SERVICE,
        payments = payments::SERVICE,
    )
}
