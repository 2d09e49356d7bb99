//! The access log: one structured `tracing` event per request, emitted off the
//! request path.
//!
//! A request pushes a small [`AccessRecord`] into its worker's batch, and a
//! full batch goes into an unbounded channel (no syscall: while records come
//! the log thread polls the channel every 2 ms instead of parking on it; its
//! naps lengthen up to 20 ms while none do, and only after such a nap does
//! it block, so an idle gateway's log thread sleeps until the next batch).
//! A worker sends a partial batch 50 ms after its first record, and has no
//! timer running while it logs nothing. The log thread turns records into `tracing` events under its
//! own dispatcher, which by default writes JSON lines to stdout through a
//! buffer flushed once per batch, so logging costs one `write` per batch, not
//! one per request. After formatting, the log thread moves each batch into
//! an [`AccessRing`] of recent records for the dashboard's search and
//! per-instance latency.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use http::{HeaderValue, Method};
use tracing::Dispatch;

use crate::metrics::RouteLabels;

/// Target of the access-log events.
pub const TARGET: &str = "switchboard::access";

/// What is logged about one request.
#[derive(Debug)]
pub struct AccessRecord {
    /// The request id (as forwarded and echoed).
    pub request_id: HeaderValue,
    /// Request method.
    pub method: Method,
    /// Labels of the matched route, if any.
    pub route: Option<&'static RouteLabels>,
    /// The instance that produced the final answer, if any.
    pub instance: Option<SocketAddr>,
    /// Status sent to the client.
    pub status: u16,
    /// Request head to response end.
    pub duration: Duration,
    /// Upstream attempts made.
    pub attempts: u32,
    /// False when the client went away or the upstream body broke mid-stream.
    pub complete: bool,
}

/// Per instance: (requests, summed µs). Keyed with FxHash: addresses are not
/// attacker-chosen, and SipHash cost more than the rest of the update.
pub(crate) type Latency = std::collections::HashMap<
    SocketAddr,
    (u64, u64),
    std::hash::BuildHasherDefault<crate::pool::AddrHasher>,
>;

/// How many recent access records [`AccessRing`] keeps for the dashboard's search.
pub const RING_CAPACITY: usize = 4096;

/// One request as the dashboard sees it: a record with the time it was logged.
#[derive(Debug)]
pub struct RecentAccess {
    /// When the log thread took it, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The record.
    pub record: AccessRecord,
}

/// The latest access records and per-instance latency sums, filled by the log
/// thread (after formatting, so the request path pays nothing for it) and
/// read by the dashboard's sampler and search.
#[derive(Debug, Default)]
pub struct AccessRing {
    inner: Mutex<RingInner>,
}

#[derive(Debug, Default)]
struct RingInner {
    recent: std::collections::VecDeque<RecentAccess>,
    /// Since the last [`AccessRing::take_latency`]: (requests, summed µs) per instance.
    latency: Latency,
}

impl AccessRing {
    /// Moves a logged batch in, dropping the oldest beyond [`RING_CAPACITY`].
    pub fn push(&self, batch: Vec<AccessRecord>) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        for record in batch {
            if let Some(addr) = record.instance {
                let e = inner.latency.entry(addr).or_default();
                e.0 += 1;
                e.1 += u64::try_from(record.duration.as_micros()).unwrap_or(u64::MAX);
            }
            if inner.recent.len() >= RING_CAPACITY {
                inner.recent.pop_front();
            }
            inner.recent.push_back(RecentAccess { time_ms, record });
        }
    }

    /// Per-instance (requests, summed µs) since the previous call.
    pub(crate) fn take_latency(&self) -> Latency {
        self.inner
            .lock()
            .map(|mut i| std::mem::take(&mut i.latency))
            .unwrap_or_default()
    }

    /// Applies `f` to the records, newest first, until it returns false.
    pub fn scan(&self, mut f: impl FnMut(&RecentAccess) -> bool) {
        if let Ok(inner) = self.inner.lock() {
            for r in inner.recent.iter().rev() {
                if !f(r) {
                    break;
                }
            }
        }
    }
}

/// Handle to the log thread; cheap to clone into request state.
///
/// Records are batched per worker thread (64 at a time, or whatever is left
/// when the worker calls [`AccessLog::flush_local`]) so the channel is touched
/// once per batch, not once per request.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Vec<AccessRecord>>>,
    ring: Arc<AccessRing>,
}

const BATCH: usize = 64;

thread_local! {
    static LOCAL: std::cell::RefCell<Vec<AccessRecord>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The task waiting in [`AccessLog::pending`] on this thread, woken when
    /// a record lands in an empty batch.
    static WAITER: std::cell::Cell<Option<Waker>> = const { std::cell::Cell::new(None) };
}

/// A minimal `tracing` subscriber that writes each event as one JSON line
/// into a buffer; the log thread flushes the buffer once per batch.
///
/// `tracing-subscriber`'s JSON formatter costs several microseconds per event
/// (serde, span bookkeeping, per-event writes); at tens of thousands of
/// requests per second that is a tenth of the gateway's CPU. This one formats
/// straight into a reused buffer.
pub struct JsonLines {
    buf: Mutex<Lines>,
}

/// The buffer and the last timestamp formatted into it.
struct Lines {
    buf: Vec<u8>,
    /// Milliseconds since the epoch of `stamp`.
    stamp_ms: u128,
    /// RFC 3339 with milliseconds: the same for every line of a millisecond,
    /// so it is formatted once per millisecond, not once per line.
    stamp: String,
}

impl std::fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLines").finish_non_exhaustive()
    }
}

/// Bytes a JSON string cannot hold as they are: controls, `"` and `\\`.
static ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Writes `s` as the inside of a JSON string.
struct Escape<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Escape<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let bytes = s.as_bytes();
        // One table load per byte (the three comparisons cost ~3x more).
        if !bytes.iter().any(|&b| ESCAPED[usize::from(b)]) {
            self.0.extend_from_slice(bytes);
            return Ok(());
        }
        for &b in bytes {
            match b {
                b'"' => self.0.extend_from_slice(b"\\\""),
                b'\\' => self.0.extend_from_slice(b"\\\\"),
                b'\n' => self.0.extend_from_slice(b"\\n"),
                b'\r' => self.0.extend_from_slice(b"\\r"),
                b'\t' => self.0.extend_from_slice(b"\\t"),
                0..=0x1f => {
                    let _ = write!(self.0, "\\u{b:04x}");
                }
                _ => self.0.push(b),
            }
        }
        Ok(())
    }
}

struct Fields<'a>(&'a mut Vec<u8>);

impl Fields<'_> {
    fn key(&mut self, name: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
    }
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.key(field.name());
        self.0.push(b'"');
        let _ = std::fmt::Write::write_str(&mut Escape(self.0), value);
        self.0.push(b'"');
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.key(field.name());
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.key(field.name());
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.key(field.name());
        self.0
            .extend_from_slice(if value { b"true" } else { b"false" });
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.key(field.name());
        self.0.push(b'"');
        let _ = std::fmt::Write::write_fmt(&mut Escape(self.0), format_args!("{value:?}"));
        self.0.push(b'"');
    }
}

impl JsonLines {
    /// An empty buffer.
    pub fn new() -> Self {
        Self {
            buf: Mutex::new(Lines {
                buf: Vec::with_capacity(64 * 1024),
                stamp_ms: 0,
                stamp: String::new(),
            }),
        }
    }

    /// Takes what was written so far.
    pub fn take(&self) -> Vec<u8> {
        self.buf
            .lock()
            .map(|mut b| std::mem::take(&mut b.buf))
            .unwrap_or_default()
    }

    /// Writes what was buffered to `out` and empties the buffer, keeping its
    /// capacity.
    pub fn drain_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let Ok(mut b) = self.buf.lock() else {
            return Ok(());
        };
        let r = out.write_all(&b.buf).and_then(|()| out.flush());
        b.buf.clear();
        r
    }
}

impl Default for JsonLines {
    fn default() -> Self {
        Self::new()
    }
}

impl tracing::Subscriber for JsonLines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let Ok(mut lines) = self.buf.lock() else {
            return;
        };
        let Lines {
            buf,
            stamp_ms,
            stamp,
        } = &mut *lines;
        let meta = event.metadata();
        let now = std::time::SystemTime::now();
        let ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        if ms != *stamp_ms || stamp.is_empty() {
            *stamp_ms = ms;
            stamp.clear();
            let _ = std::fmt::Write::write_fmt(
                stamp,
                format_args!("{}", humantime::format_rfc3339_millis(now)),
            );
        }
        buf.extend_from_slice(b"{\"timestamp\":\"");
        buf.extend_from_slice(stamp.as_bytes());
        buf.extend_from_slice(b"\",\"level\":\"");
        buf.extend_from_slice(meta.level().as_str().as_bytes());
        buf.extend_from_slice(b"\",\"target\":\"");
        let _ = std::fmt::Write::write_str(&mut Escape(buf), meta.target());
        buf.push(b'"');
        event.record(&mut Fields(buf));
        buf.extend_from_slice(b"}\n");
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl AccessLog {
    /// Logging switched off: records are dropped at once.
    pub fn disabled() -> Self {
        Self {
            tx: None,
            ring: Arc::default(),
        }
    }

    /// The recent records (empty while logging is off).
    pub fn ring(&self) -> &Arc<AccessRing> {
        &self.ring
    }

    /// Starts the log thread. `dispatch` receives the events; `None` writes
    /// JSON lines to stdout, buffered.
    pub fn spawn(dispatch: Option<Dispatch>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<AccessRecord>>();
        let (dispatch, buffer) = match dispatch {
            Some(d) => (d, None),
            None => {
                let lines = Arc::new(JsonLines::new());
                (Dispatch::new(Arc::clone(&lines)), Some(lines))
            }
        };
        let ring = Arc::new(AccessRing::default());
        let tap = Arc::clone(&ring);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || run(&rx, &dispatch, buffer.as_ref(), &tap))?;
        Ok(Self { tx: Some(tx), ring })
    }

    /// Queues one record; never blocks.
    pub fn log(&self, rec: AccessRecord) {
        let Some(tx) = &self.tx else {
            return;
        };
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if l.capacity() == 0 {
                l.reserve_exact(BATCH);
            }
            l.push(rec);
            if l.len() == 1
                && let Some(w) = WAITER.take()
            {
                w.wake();
            }
            if l.len() >= BATCH {
                let batch = std::mem::replace(&mut *l, Vec::with_capacity(BATCH));
                let _ = tx.send(batch);
            }
        });
    }

    /// Resolves once this thread holds records not yet sent to the log
    /// thread: a worker then flushes them a little later, and waits on
    /// nothing while it logs nothing.
    pub fn pending(&self) -> impl Future<Output = ()> + use<> {
        let on = self.tx.is_some();
        std::future::poll_fn(move |cx| {
            if on && LOCAL.with(|l| !l.borrow().is_empty()) {
                return Poll::Ready(());
            }
            WAITER.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }

    /// Sends this thread's pending records (workers call it shortly after
    /// [`AccessLog::pending`] resolves).
    pub fn flush_local(&self) {
        let Some(tx) = &self.tx else {
            return;
        };
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if !l.is_empty() {
                let _ = tx.send(std::mem::take(&mut *l));
            }
        });
    }
}

fn run(
    rx: &mpsc::Receiver<Vec<AccessRecord>>,
    dispatch: &Dispatch,
    buffer: Option<&Arc<JsonLines>>,
    ring: &AccessRing,
) {
    let mut nap = NAP_BUSY;
    // Set after a longest nap with nothing to log: the next turn blocks on
    // the channel instead of napping again.
    let mut idle = false;
    loop {
        let mut wrote = false;
        let mut disconnected = false;
        // Blocking only when idle: the first batch after a pause pays one
        // wake-up in its sender; while the thread naps, senders find no
        // receiver waiting and make no syscall.
        let mut first = None;
        if idle {
            match rx.recv() {
                Ok(batch) => first = Some(batch),
                Err(mpsc::RecvError) => return,
            }
        }
        tracing::dispatcher::with_default(dispatch, || {
            let mut take = |batch: Vec<AccessRecord>| {
                for rec in &batch {
                    emit(rec);
                }
                ring.push(batch);
                wrote = true;
            };
            if let Some(batch) = first.take() {
                take(batch);
            }
            loop {
                match rx.try_recv() {
                    Ok(batch) => take(batch),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
        });
        if wrote && let Some(b) = buffer {
            let _ = b.drain_to(&mut std::io::stdout().lock());
        }
        if disconnected {
            return;
        }
        // A dedicated thread: sleeping here keeps senders from ever paying
        // for a wake-up syscall while records come. Short sleeps keep each
        // burst of formatting short (about 2 ms of records, ~0.1 ms of work
        // at 60k requests/s): on a machine with as many busy threads as
        // cores, a long burst delays the worker it displaces, which shows in
        // the tail latency. With nothing to log the naps lengthen, and after
        // the longest one the thread blocks until the next batch, so an idle
        // gateway's log thread does not wake at all.
        idle = !wrote && nap == NAP_IDLE;
        nap = next_nap(nap, wrote);
        if !idle {
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(nap);
        }
    }
}

/// The log thread's nap while records arrive.
const NAP_BUSY: Duration = Duration::from_millis(2);
/// Its longest nap, when idle: the first burst after a pause then holds at
/// most this long of records.
const NAP_IDLE: Duration = Duration::from_millis(20);

/// The next nap: short after a batch, doubling while there is nothing to
/// log, up to [`NAP_IDLE`].
fn next_nap(prev: Duration, wrote: bool) -> Duration {
    if wrote {
        NAP_BUSY
    } else {
        (prev * 2).min(NAP_IDLE)
    }
}

fn emit(rec: &AccessRecord) {
    let (route, service) = rec
        .route
        .map_or(("", ""), |l| (l.route.as_str(), l.service.as_str()));
    let mut buf = [0u8; 64];
    let instance = rec
        .instance
        .map(|a| crate::headers::format_socket_addr(a, &mut buf));
    emit_with(rec, route, service, instance);
}

fn emit_with(rec: &AccessRecord, route: &str, service: &str, instance: Option<&str>) {
    // `message` as a `&str` field: a format string would be recorded
    // through `Debug` and `core::fmt` on every line.
    tracing::info!(
        target: TARGET,
        message = "request",
        request_id = rec.request_id.to_str().unwrap_or(""),
        method = rec.method.as_str(),
        route,
        service,
        instance,
        status = rec.status,
        duration_us = rec.duration.as_micros() as u64,
        attempts = rec.attempts,
        complete = rec.complete,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naps_are_short_while_busy_and_lengthen_when_idle() {
        assert_eq!(next_nap(NAP_IDLE, true), NAP_BUSY);
        let mut nap = NAP_BUSY;
        let mut naps = Vec::new();
        for _ in 0..6 {
            nap = next_nap(nap, false);
            naps.push(nap.as_millis());
        }
        assert_eq!(naps, [4, 8, 16, 20, 20, 20]);
        assert_eq!(next_nap(nap, true), NAP_BUSY);
    }

    #[test]
    fn json_lines_escape_and_parse() {
        let lines = Arc::new(JsonLines::new());
        let dispatch = Dispatch::new(Arc::clone(&lines));
        let labels: &'static RouteLabels = Box::leak(Box::new(RouteLabels {
            route: "/a\"b".into(),
            service: "svc".into(),
        }));
        tracing::dispatcher::with_default(&dispatch, || {
            emit(&AccessRecord {
                request_id: HeaderValue::from_static("id\\with\"quotes"),
                method: Method::POST,
                route: Some(labels),
                instance: Some("127.0.0.1:80".parse().unwrap()),
                status: 502,
                duration: Duration::from_micros(1234),
                attempts: 2,
                complete: true,
            });
        });
        let text = String::from_utf8(lines.take()).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["request_id"], "id\\with\"quotes");
        assert_eq!(v["route"], "/a\"b");
        assert_eq!(v["instance"], "127.0.0.1:80");
        assert_eq!(v["status"], 502);
        assert_eq!(v["duration_us"], 1234);
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["target"], TARGET);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert_eq!(v["complete"], true);
        let ts = v["timestamp"].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(ts).unwrap();
        let age = std::time::SystemTime::now().duration_since(parsed).unwrap();
        assert!(age < Duration::from_secs(60), "{ts}");
        assert_eq!(ts.len(), "2026-01-01T00:00:00.000Z".len(), "{ts}");
    }

    fn record(status: u16) -> AccessRecord {
        AccessRecord {
            request_id: HeaderValue::from_static("r"),
            method: Method::GET,
            route: None,
            instance: None,
            status,
            duration: Duration::from_micros(1),
            attempts: 1,
            complete: true,
        }
    }

    /// Wakes by raising a flag.
    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn pending_waits_for_a_record_and_is_woken_by_it() {
        // A fresh thread: its batch starts empty.
        std::thread::spawn(|| {
            let (tx, rx) = mpsc::channel();
            let log = AccessLog {
                tx: Some(tx),
                ring: Arc::default(),
            };
            let flag = Arc::new(Flag(false.into()));
            let waker = Waker::from(Arc::clone(&flag));
            let mut cx = std::task::Context::from_waker(&waker);
            let mut wait = std::pin::pin!(log.pending());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            log.log(record(200));
            assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
            assert!(wait.as_mut().poll(&mut cx).is_ready());
            // Flushed, the batch is empty again, and so is the wait.
            log.flush_local();
            assert_eq!(rx.try_recv().unwrap().len(), 1);
            assert!(std::pin::pin!(log.pending()).poll(&mut cx).is_pending());
            // With logging off there is never anything to wait for.
            let off = AccessLog::disabled();
            off.log(record(200));
            assert!(std::pin::pin!(off.pending()).poll(&mut cx).is_pending());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_log_thread_blocks_when_idle_and_still_logs_what_comes_next() {
        let lines = Arc::new(JsonLines::new());
        let log = AccessLog::spawn(Some(Dispatch::new(Arc::clone(&lines)))).unwrap();
        let seen = std::cell::Cell::new(0);
        let logged = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while seen.get() < n {
                seen.set(seen.get() + lines.take().iter().filter(|&&b| b == b'\n').count());
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {} of {n} logged",
                    seen.get()
                );
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                log.log(record(200));
                log.flush_local();
            });
        });
        logged(1);
        // Past the naps' growth (2+4+8+16+20 ms): the thread is blocked.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(150));
        std::thread::scope(|s| {
            s.spawn(|| {
                log.log(record(201));
                log.log(record(202));
                log.flush_local();
            });
        });
        logged(3);
    }
}
