//! The embedded backend: a retained log per topic with consumer groups, in
//! this process.
//!
//! Semantics match the durable backends except surviving a restart: each
//! group has a cursor and a pending list; a delivery not acked within the ack
//! wait goes back to the group; a failed one comes back after its backoff; a
//! new group starts at the oldest retained event. The log keeps at least
//! `max_len` events (default 100,000; `memory://NAME?max_len=N`) and never
//! drops an event some group has not acked. A handed-back delivery
//! ([`Consumer::release`]) is due at once with its delivery count as before,
//! so the group's next fetch takes it ahead of new events.
//!
//! Timing uses `tokio::time`, so tests drive it with virtual time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::driver::{Consumer, Delivery};
use crate::{BusError, Capabilities, Event, SubscribeOptions};

pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    backend: "memory",
    durable: false,
    replay_for_new_groups: true,
    ordered_per_topic: true,
    competing_consumers: true,
    redelivery_after_crash: true,
};

const DEFAULT_MAX_LEN: usize = 100_000;

/// Brokers by name, so that `memory://x` opened twice in a process is one bus.
fn registry() -> &'static Mutex<HashMap<String, Arc<Broker>>> {
    static BROKERS: OnceLock<Mutex<HashMap<String, Arc<Broker>>>> = OnceLock::new();
    BROKERS.get_or_init(Default::default)
}

pub(crate) struct Memory {
    broker: Arc<Broker>,
}

struct Broker {
    max_len: usize,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

struct Topic {
    state: Mutex<TopicState>,
    /// Woken on publish and on retry scheduling.
    notify: Notify,
}

struct TopicState {
    log: VecDeque<Event>,
    /// Sequence number of `log[0]`.
    first_seq: u64,
    groups: HashMap<String, Group>,
}

struct Group {
    /// The next never-delivered sequence number.
    cursor: u64,
    /// Delivered, unacknowledged events by sequence number: slot `i` is
    /// `pending_base + i`. Deliveries of new events are in sequence order, so
    /// this is a ring that grows at the back and shrinks at the front as acks
    /// arrive (an ack in the middle leaves a `None` hole): O(1) per delivery
    /// and per ack, where a map would hash and allocate per event.
    pending: VecDeque<Option<Pending>>,
    /// Sequence number of `pending[0]`.
    pending_base: u64,
    /// No pending deadline is earlier than this (it may be stale-early).
    next_deadline: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Pending {
    /// Ack deadline while in flight; visibility time while waiting for a retry.
    deadline: Instant,
    /// Deliveries so far.
    attempts: u32,
}

impl Group {
    fn new(cursor: u64) -> Self {
        Group {
            cursor,
            pending: VecDeque::new(),
            pending_base: cursor,
            next_deadline: None,
        }
    }

    fn pending_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        let i = usize::try_from(seq.checked_sub(self.pending_base)?).ok()?;
        self.pending.get_mut(i)?.as_mut()
    }

    fn ack(&mut self, seq: u64) {
        if let Some(i) = seq
            .checked_sub(self.pending_base)
            .and_then(|i| usize::try_from(i).ok())
            && let Some(slot) = self.pending.get_mut(i)
        {
            *slot = None;
        }
        while let Some(None) = self.pending.front() {
            self.pending.pop_front();
            self.pending_base += 1;
        }
        if self.pending.is_empty() {
            // Nothing in flight: the ring restarts at the cursor.
            self.pending_base = self.cursor;
            self.next_deadline = None;
        }
    }

    /// The lowest sequence number this group still needs.
    fn floor(&self) -> u64 {
        if self.pending.is_empty() {
            self.cursor
        } else {
            self.pending_base.min(self.cursor)
        }
    }
}

/// Events dropped per publish at most by trimming, so that a log that grew
/// while a group lagged is cut back a slice at a time instead of in one long
/// stall under the lock.
const TRIM_STEP: usize = 4096;

impl TopicState {
    #[cfg(test)]
    fn end_seq(&self) -> u64 {
        self.first_seq + self.log.len() as u64
    }

    #[cfg(test)]
    fn get(&self, seq: u64) -> Option<&Event> {
        self.log
            .get(usize::try_from(seq.checked_sub(self.first_seq)?).ok()?)
    }

    /// Takes up to `step` events below every group's cursor and pending
    /// entries off the front, down to `max_len`. The caller drops them after
    /// releasing the lock.
    fn trim(&mut self, max_len: usize, step: usize) -> Vec<Event> {
        if self.log.len() <= max_len {
            return Vec::new();
        }
        let floor = self
            .groups
            .values()
            .map(Group::floor)
            .min()
            .unwrap_or(u64::MAX);
        let below_floor =
            usize::try_from(floor.saturating_sub(self.first_seq)).unwrap_or(usize::MAX);
        let n = (self.log.len() - max_len).min(below_floor).min(step);
        self.first_seq += n as u64;
        self.log.drain(..n).collect()
    }
}

impl Memory {
    /// `rest` is what follows `memory://`: `[NAME][?max_len=N]`.
    pub(crate) fn open(rest: &str) -> Result<Self, String> {
        let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut max_len = DEFAULT_MAX_LEN;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("max_len", v)) => {
                    max_len = v
                        .parse()
                        .map_err(|_| format!("max_len={v:?} is not a number"))?;
                }
                _ => return Err(format!("unknown option {pair:?} (known: max_len)")),
            }
        }
        let name = if name.is_empty() { "default" } else { name };
        let broker = Arc::clone(registry().lock().entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Broker {
                max_len,
                topics: Mutex::default(),
            })
        }));
        Ok(Memory { broker })
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.broker.topics.lock();
        if let Some(t) = topics.get(name) {
            return Arc::clone(t);
        }
        Arc::clone(topics.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Topic {
                state: Mutex::new(TopicState {
                    log: VecDeque::new(),
                    first_seq: 0,
                    groups: HashMap::new(),
                }),
                notify: Notify::new(),
            })
        }))
    }

    pub(crate) fn publish(&self, topic: &str, events: &[Event]) {
        let t = self.topic(topic);
        let trimmed = {
            let mut s = t.state.lock();
            s.log.extend(events.iter().cloned());
            // Amortized: trim when an eighth over the bound, at most a step
            // (and twice what was added) per publish.
            if s.log.len() > self.broker.max_len + self.broker.max_len / 8 + 1 {
                s.trim(self.broker.max_len, TRIM_STEP.max(2 * events.len()))
            } else {
                Vec::new()
            }
        };
        t.notify.notify_waiters();
        // Freeing events is the costly part of trimming: not under the lock.
        drop(trimmed);
    }

    pub(crate) fn delete_group(&self, topic: &str, group: &str) {
        self.topic(topic).state.lock().groups.remove(group);
    }

    /// Events after the group's cursor (not yet delivered to it).
    pub(crate) fn lag(&self, topic: &str, group: &str) -> Option<u64> {
        let t = self.topic(topic);
        let s = t.state.lock();
        let end = s.first_seq + s.log.len() as u64;
        s.groups.get(group).map(|g| end.saturating_sub(g.cursor))
    }

    pub(crate) fn peek(&self, topic: &str, limit: usize) -> Vec<Event> {
        let t = self.topic(topic);
        let s = t.state.lock();
        s.log.iter().take(limit).cloned().collect()
    }

    pub(crate) fn consumer(
        &self,
        topic: &str,
        group: &str,
        opts: &SubscribeOptions,
    ) -> MemoryConsumer {
        let t = self.topic(topic);
        {
            let mut s = t.state.lock();
            let first = if opts.start_at_latest {
                s.first_seq + s.log.len() as u64
            } else {
                s.first_seq
            };
            s.groups
                .entry(group.to_owned())
                .or_insert_with(|| Group::new(first));
        }
        MemoryConsumer {
            memory: Memory {
                broker: Arc::clone(&self.broker),
            },
            topic: t,
            group: group.to_owned(),
            ack_wait: opts.ack_wait,
        }
    }
}

pub(crate) struct MemoryConsumer {
    memory: Memory,
    topic: Arc<Topic>,
    group: String,
    ack_wait: Duration,
}

impl MemoryConsumer {
    /// Takes what is available now: due redeliveries first, then new events.
    /// Returns the deliveries, or when to look again.
    fn take(&self, max: usize) -> (Vec<Delivery<u64>>, Option<Instant>) {
        let now = Instant::now();
        let mut s = self.topic.state.lock();
        let s = &mut *s;
        let Some(g) = s.groups.get_mut(&self.group) else {
            return (Vec::new(), None);
        };
        let mut out = Vec::new();
        if g.next_deadline.is_some_and(|d| d <= now) {
            let mut next: Option<Instant> = None;
            for (seq, p) in (g.pending_base..).zip(g.pending.iter_mut()) {
                let Some(p) = p else { continue };
                if p.deadline <= now && out.len() < max {
                    p.attempts += 1;
                    p.deadline = now + self.ack_wait;
                    if let Some(event) = seq
                        .checked_sub(s.first_seq)
                        .and_then(|i| s.log.get(usize::try_from(i).ok()?))
                    {
                        out.push(Delivery {
                            token: seq,
                            attempt: p.attempts,
                            payload: Ok(event.clone()),
                        });
                    }
                }
                next = Some(next.map_or(p.deadline, |n| n.min(p.deadline)));
            }
            g.next_deadline = next;
        }
        let end = s.first_seq + s.log.len() as u64;
        let n = usize::try_from(end - g.cursor)
            .unwrap_or(usize::MAX)
            .min(max - out.len());
        if n > 0 {
            let deadline = now + self.ack_wait;
            if g.pending.is_empty() {
                g.pending_base = g.cursor;
            }
            let from = usize::try_from(g.cursor - s.first_seq).unwrap_or(usize::MAX);
            out.reserve(n);
            for (seq, event) in (g.cursor..).zip(s.log.range(from..from + n)) {
                out.push(Delivery {
                    token: seq,
                    attempt: 1,
                    payload: Ok(event.clone()),
                });
            }
            g.pending.extend(std::iter::repeat_n(
                Some(Pending {
                    deadline,
                    attempts: 1,
                }),
                n,
            ));
            g.cursor += n as u64;
            if g.next_deadline.is_none_or(|d| d > deadline) {
                g.next_deadline = Some(deadline);
            }
        }
        (out, g.next_deadline)
    }
}

impl Consumer for MemoryConsumer {
    type Token = u64;
    const CANCEL_SAFE_FETCH: bool = true;

    async fn fetch(&self, max: usize) -> Result<Vec<Delivery<u64>>, BusError> {
        loop {
            // Register for wake-ups before looking, so a publish in between is not missed.
            let notified = self.topic.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (batch, next) = self.take(max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn ack(&self, tokens: &[u64]) -> Result<(), BusError> {
        let mut s = self.topic.state.lock();
        if let Some(g) = s.groups.get_mut(&self.group) {
            for &seq in tokens {
                g.ack(seq);
            }
        }
        Ok(())
    }

    async fn release(&self, tokens: Vec<(u64, u32)>) -> Result<(), BusError> {
        {
            let now = Instant::now();
            let mut s = self.topic.state.lock();
            if let Some(g) = s.groups.get_mut(&self.group) {
                for (seq, counted) in tokens {
                    if let Some(p) = g.pending_mut(seq) {
                        // Due now, as if this delivery had not happened.
                        p.attempts = counted;
                        p.deadline = now;
                    }
                }
                g.next_deadline = Some(g.next_deadline.map_or(now, |n| n.min(now)));
            }
        }
        self.topic.notify.notify_waiters();
        Ok(())
    }

    async fn retry(&self, token: u64, _attempt: u32, delay: Duration) -> Result<(), BusError> {
        {
            let mut s = self.topic.state.lock();
            if let Some(g) = s.groups.get_mut(&self.group)
                && let Some(p) = g.pending_mut(token)
            {
                let at = Instant::now() + delay;
                p.deadline = at;
                g.next_deadline = Some(g.next_deadline.map_or(at, |n| n.min(at)));
            }
        }
        self.topic.notify.notify_waiters();
        Ok(())
    }

    async fn publish_dead_letter(&self, topic: &str, letter: &Event) -> Result<(), BusError> {
        self.memory.publish(topic, std::slice::from_ref(letter));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32) -> Event {
        Event::builder()
            .source("/t")
            .ty("t")
            .id(n.to_string())
            .build()
            .unwrap()
    }

    #[test]
    fn trimming_keeps_unacked_events() {
        let m = Memory::open("trim-test?max_len=4").unwrap();
        let c = m.consumer("t", "g", &SubscribeOptions::default());
        m.publish("t", &(0..3).map(ev).collect::<Vec<_>>());
        let (got, _) = c.take(1);
        assert_eq!(got[0].token, 0);
        m.publish("t", &(3..40).map(ev).collect::<Vec<_>>());
        let s = c.topic.state.lock();
        assert_eq!(s.first_seq, 0, "seq 0 is pending, nothing may be trimmed");
        assert_eq!(s.end_seq(), 40);
        assert!(s.get(0).is_some());
    }

    #[test]
    fn trimming_bounds_an_acked_log() {
        let m = Memory::open("trim-test-2?max_len=4").unwrap();
        m.publish("t", &(0..40).map(ev).collect::<Vec<_>>());
        let s = m.topic("t");
        let s = s.state.lock();
        assert!(s.log.len() <= 5, "{}", s.log.len());
        assert_eq!(s.end_seq(), 40);
    }

    /// A consumer that keeps up keeps the log near `max_len`, and acks in
    /// any order shrink the pending ring.
    #[test]
    fn an_acking_consumer_keeps_the_log_bounded() {
        let m = Memory::open("trim-test-3?max_len=100").unwrap();
        let c = m.consumer("t", "g", &SubscribeOptions::default());
        for round in 0..50u32 {
            m.publish(
                "t",
                &(round * 64..(round + 1) * 64).map(ev).collect::<Vec<_>>(),
            );
            let (got, _) = c.take(64);
            assert_eq!(got.len(), 64);
            // Acked back to front: the ring empties only with the last ack.
            for d in got.iter().rev() {
                futures::executor::block_on(c.ack(&[d.token])).unwrap();
            }
            let s = c.topic.state.lock();
            assert!(s.groups["g"].pending.is_empty());
        }
        let s = c.topic.state.lock();
        assert_eq!(s.end_seq(), 50 * 64);
        assert!(s.log.len() <= 100 + 100 / 8 + 1 + 64, "{}", s.log.len());
    }

    #[test]
    fn bad_options_are_rejected() {
        assert!(Memory::open("x?max_len=lots").is_err());
        assert!(Memory::open("x?colour=red").is_err());
    }
}
