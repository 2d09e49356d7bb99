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
            })
            .collect();
        s.set(&svc.name, list);
    }
    s
}
