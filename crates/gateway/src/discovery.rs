//! Instance sources: each service's instance list arrives through a
//! `tokio::sync::watch` channel, whatever produces it (a static list, the
//! embedded registry, or a registry on a shared Redis store).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::upstream::{Instance, InstanceList, InstanceStatus};

/// Hand-fed sources: one channel per service, updated with [`StaticSources::set`].
#[derive(Debug, Default)]
pub struct StaticSources {
    senders: HashMap<String, watch::Sender<InstanceList>>,
}

impl StaticSources {
    /// Receivers to hand to [`GatewayBuilder::sources`](crate::GatewayBuilder::sources).
    pub fn receivers(&self) -> HashMap<String, watch::Receiver<InstanceList>> {
        self.senders
            .iter()
            .map(|(k, v)| (k.clone(), v.subscribe()))
            .collect()
    }

    /// Replaces `service`'s instance list (creating the service if needed).
    pub fn set(&mut self, service: &str, list: Vec<Instance>) {
        match self.senders.get(service) {
            Some(tx) => {
                tx.send_replace(Arc::new(list));
            }
            None => {
                let (tx, _) = watch::channel(Arc::new(list));
                self.senders.insert(service.to_owned(), tx);
            }
        }
    }

    /// Replaces `service`'s list through a shared reference (the service must exist).
    pub fn update(&self, service: &str, list: Vec<Instance>) -> bool {
        self.senders.get(service).is_some_and(|tx| {
            tx.send_replace(Arc::new(list));
            true
        })
    }
}

/// Sources from the config's `[[services]]`, every instance passing, with the
/// address as instance id (no health checks: use the registry for those).
pub fn static_sources(config: &Config) -> StaticSources {
    let mut s = StaticSources::default();
    for svc in &config.services {
        let list = svc
            .instances
            .iter()
            .map(|a| Instance {
                id: a.to_string(),
                addr: *a,
                status: InstanceStatus::Passing,
                version: None,
            })
            .collect();
        s.set(&svc.name, list);
    }
    s
}

/// Follows `registry`'s view of each service and republishes it as an
/// [`InstanceList`] on every change (runs until the registry shuts down).
///
/// Instances registered with a hostname instead of an IP literal are skipped
/// with a warning: the gateway does not resolve names on the request path.
pub fn registry_sources(
    registry: &switchboard_registry::Registry,
    services: impl IntoIterator<Item = String>,
) -> HashMap<String, watch::Receiver<InstanceList>> {
    let mut out = HashMap::new();
    for service in services {
        if out.contains_key(&service) {
            continue;
        }
        let mut w = registry.watch(&service);
        let (tx, rx) = watch::channel(Arc::new(convert(&service, &w.load())));
        let name = service.clone();
        tokio::spawn(async move {
            while let Some(view) = w.changed().await {
                if tx.send(Arc::new(convert(&name, &view))).is_err() {
                    return;
                }
            }
        });
        out.insert(service, rx);
    }
    out
}

fn convert(service: &str, view: &switchboard_registry::ServiceView) -> Vec<Instance> {
    use switchboard_registry::Status;
    view.instances
        .iter()
        .filter_map(|i| {
            let Some(addr) = i.socket_addr() else {
                tracing::warn!(service, id = %i.id, address = %i.address, "instance address is not an IP literal; skipped");
                return None;
            };
            Some(Instance {
                id: i.id.clone(),
                addr,
                status: match i.status {
                    Status::Passing => InstanceStatus::Passing,
                    Status::Warning => InstanceStatus::Warning,
                    Status::Critical => InstanceStatus::Critical,
                },
                version: i.version.clone(),
            })
        })
        .collect()
}

/// Registers the config's static `[[services]]` instances (with their health
/// check) in `registry`, so static and dynamic instances share one discovery
/// path. Instance ids are the `IP:PORT` strings.
pub async fn register_static(
    registry: &switchboard_registry::Registry,
    config: &Config,
) -> Result<(), switchboard_registry::RegistryError> {
    use switchboard_registry::{CheckSpec, Registration};
    for svc in &config.services {
        for addr in &svc.instances {
            let mut reg = Registration::new(addr.ip().to_string(), addr.port());
            if let Some(h) = &svc.health {
                reg = reg.check(
                    CheckSpec::http(h.path.clone())
                        .interval(h.interval)
                        .timeout(h.timeout)
                        .thresholds(h.healthy_threshold, h.unhealthy_threshold),
                );
            }
            registry.register(&svc.name, &addr.to_string(), reg).await?;
        }
    }
    Ok(())
}

/// Discovery through a [`Registry`](switchboard_registry::Registry): one
/// watch per service (made on first use), and on reload the config's static
/// instances are registered and the ones it dropped deregistered.
#[derive(Debug)]
pub struct RegistryDiscovery {
    registry: switchboard_registry::Registry,
    watches: parking_lot::Mutex<HashMap<String, watch::Receiver<InstanceList>>>,
}

impl RegistryDiscovery {
    /// Follows `registry`.
    pub fn new(registry: switchboard_registry::Registry) -> Self {
        Self {
            registry,
            watches: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

impl crate::reload::Discovery for RegistryDiscovery {
    fn source(&self, service: &str) -> Option<watch::Receiver<InstanceList>> {
        let mut w = self.watches.lock();
        if let Some(rx) = w.get(service) {
            return Some(rx.clone());
        }
        let rx = registry_sources(&self.registry, [service.to_owned()]).remove(service)?;
        w.insert(service.to_owned(), rx.clone());
        Some(rx)
    }

    fn prepare<'a>(&'a self, old: &'a Config, new: &'a Config) -> crate::reload::PrepareFuture<'a> {
        Box::pin(async move {
            register_static(&self.registry, new)
                .await
                .map_err(|e| e.to_string())?;
            for svc in &old.services {
                let kept = new.services.iter().find(|s| s.name == svc.name);
                for addr in &svc.instances {
                    if kept.is_some_and(|k| k.instances.contains(addr)) {
                        continue;
                    }
                    self.registry
                        .deregister(&svc.name, &addr.to_string())
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
    }
}
