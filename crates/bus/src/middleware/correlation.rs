//! Correlation propagation: a task-local context carrying `traceparent` and
//! `correlationid`.
//!
//! A service sets the context for the duration of a request with [`scope`];
//! [`crate::Bus::publish`] copies it into events that do not carry their own,
//! and every handler runs inside the context of the event it handles, with the
//! span continued (same trace id, new span id), so events it publishes in turn
//! belong to the same trace and correlation.

use std::future::Future;

use crate::Event;

/// The correlation attributes of the current unit of work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Correlation {
    /// W3C `traceparent`, if any.
    pub traceparent: Option<String>,
    /// Correlation id, if any.
    pub correlation_id: Option<String>,
}

tokio::task_local! {
    static CURRENT: Correlation;
}

impl Correlation {
    /// The context an event carries.
    pub fn of(event: &Event) -> Self {
        Correlation {
            traceparent: event.traceparent().map(str::to_owned),
            correlation_id: event.correlation_id().map(str::to_owned),
        }
    }

    /// Whether neither attribute is set.
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_none() && self.correlation_id.is_none()
    }
}

/// Runs `fut` with `correlation` as the current context.
pub async fn scope<F: Future>(correlation: Correlation, fut: F) -> F::Output {
    CURRENT.scope(correlation, fut).await
}

/// Runs `f` with `correlation` as the current context (one poll of a handler).
pub(crate) fn sync_scope<R>(correlation: Correlation, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(correlation, f)
}

/// The current context, if the task runs inside [`scope`].
pub fn current() -> Option<Correlation> {
    CURRENT.try_with(Clone::clone).ok()
}

/// A child `traceparent`: same trace id and flags, a new span id, version
/// `00`; one that is not a valid traceparent is returned as it is.
pub fn child_traceparent(parent: &str) -> String {
    match crate::trace::TraceParent::parse(parent.as_bytes()) {
        Ok(tp) if parent.len() == crate::trace::TRACEPARENT_LEN => {
            String::from_utf8_lossy(&tp.child().to_bytes()).into_owned()
        }
        _ => parent.to_owned(),
    }
}

/// Fills `traceparent` and `correlationid` from the current context where
/// the event has none.
pub(crate) fn apply(event: Event) -> Event {
    let Some(ctx) = current() else {
        return event;
    };
    let missing_tp = event.traceparent().is_none() && ctx.traceparent.is_some();
    let missing_cid = event.correlation_id().is_none() && ctx.correlation_id.is_some();
    if !missing_tp && !missing_cid {
        return event;
    }
    let mut b = event.to_builder();
    if missing_tp && let Some(tp) = ctx.traceparent {
        b = b.traceparent(tp);
    }
    if missing_cid && let Some(cid) = ctx.correlation_id {
        b = b.correlation_id(cid);
    }
    b.build().unwrap_or(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[tokio::test]
    async fn context_flows_into_events_without_their_own() {
        let e = Event::builder().source("/s").ty("t").build().unwrap();
        assert_eq!(apply(e.clone()), e);
        let ctx = Correlation {
            traceparent: Some(TP.into()),
            correlation_id: Some("c-9".into()),
        };
        let got = scope(ctx, async { apply(e.clone()) }).await;
        assert_eq!(got.traceparent(), Some(TP));
        assert_eq!(got.correlation_id(), Some("c-9"));
        assert_eq!(got.id(), e.id());
        let own = Event::builder()
            .source("/s")
            .ty("t")
            .correlation_id("mine")
            .build()
            .unwrap();
        let got = scope(Correlation::of(&got), async { apply(own) }).await;
        assert_eq!(got.correlation_id(), Some("mine"));
    }

    #[test]
    fn child_keeps_trace_and_changes_span() {
        let c = child_traceparent(TP);
        assert!(crate::event::is_traceparent(&c), "{c}");
        assert_eq!(&c[..36], &TP[..36]);
        assert_ne!(&c[36..52], &TP[36..52]);
        assert_eq!(&c[52..], &TP[52..]);
    }
}
