//! [`ServiceWatch`]: a lock-free snapshot of one service plus change notifications,
//! the same for an in-process, Redis-shared or remote registry.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::ServiceView;

/// Watches one service. Cheap to clone; each clone tracks which changes it has seen.
#[derive(Debug, Clone)]
pub struct ServiceWatch {
    view: Arc<ArcSwap<ServiceView>>,
    rx: watch::Receiver<u64>,
}

impl ServiceWatch {
    /// Wraps a snapshot cell and the channel that announces its changes (the index).
    ///
    /// Used by the registry and by [`crate::client::RemoteDiscovery`]; custom
    /// discovery sources can build one too.
    pub fn new(view: Arc<ArcSwap<ServiceView>>, rx: watch::Receiver<u64>) -> Self {
        ServiceWatch { view, rx }
    }

    /// The current snapshot. Lock-free: one atomic load and a reference count increment.
    pub fn load(&self) -> Arc<ServiceView> {
        self.view.load_full()
    }

    /// A borrowed snapshot without touching the reference count (the fastest read;
    /// keep the guard short-lived).
    pub fn peek(&self) -> arc_swap::Guard<Arc<ServiceView>> {
        self.view.load()
    }

    /// Waits for the next change and returns the new snapshot; `None` once the
    /// registry behind the watch is gone.
    pub async fn changed(&mut self) -> Option<Arc<ServiceView>> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update();
        Some(self.load())
    }

    /// Consul-style blocking read: returns as soon as the snapshot's index is
    /// greater than `index`, or when `wait` ends, with the snapshot at that time.
    pub async fn wait_past(&mut self, index: u64, wait: Duration) -> Arc<ServiceView> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let view = self.load();
            if view.index > index {
                return view;
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.load(),
            }
        }
    }
}
