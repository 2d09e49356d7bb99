//! The access log: one structured `tracing` event per request, emitted off the
//! request path.
//!
//! A request pushes a small [`AccessRecord`] into an unbounded channel (no
//! syscall: the log thread never parks on the channel, it polls every few
//! milliseconds). The log thread turns records into `tracing` events under its
//! own dispatcher, which by default writes JSON lines to stdout through a
//! buffer flushed once per batch, so logging costs one `write` per batch, not
//! one per request.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
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
    /// Index of the matched route, if any.
    pub route: Option<usize>,
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

/// Handle to the log thread; cheap to clone into request state.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
}

/// A `MakeWriter` over a shared buffered writer, flushed by the log thread.
#[derive(Clone)]
struct Buffered(Arc<Mutex<std::io::BufWriter<std::io::Stdout>>>);

impl Write for &Buffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::ErrorKind::Other)?
            .write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0
            .lock()
            .map_err(|_| std::io::ErrorKind::Other)?
            .flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffered {
    type Writer = &'a Buffered;
    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl AccessLog {
    /// Logging switched off: records are dropped at once.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Starts the log thread. `dispatch` receives the events; `None` writes
    /// JSON lines to stdout, buffered.
    pub fn spawn(labels: Vec<RouteLabels>, dispatch: Option<Dispatch>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<AccessRecord>();
        let (dispatch, buffer) = match dispatch {
            Some(d) => (d, None),
            None => {
                let buf = Buffered(Arc::new(Mutex::new(std::io::BufWriter::with_capacity(
                    64 * 1024,
                    std::io::stdout(),
                ))));
                let sub = tracing_subscriber::fmt()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(buf.clone())
                    .finish();
                (Dispatch::new(sub), Some(buf))
            }
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || run(&rx, &labels, &dispatch, buffer.as_ref()))?;
        Ok(Self { tx: Some(tx) })
    }

    /// Queues one record; never blocks.
    pub fn log(&self, rec: AccessRecord) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(rec);
        }
    }
}

fn run(
    rx: &mpsc::Receiver<AccessRecord>,
    labels: &[RouteLabels],
    dispatch: &Dispatch,
    buffer: Option<&Buffered>,
) {
    loop {
        let mut wrote = false;
        let mut disconnected = false;
        tracing::dispatcher::with_default(dispatch, || {
            loop {
                match rx.try_recv() {
                    Ok(rec) => {
                        emit(&rec, labels);
                        wrote = true;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
        });
        if wrote && let Some(b) = buffer {
            let _ = (&*b).flush();
        }
        if disconnected {
            return;
        }
        // A dedicated thread: sleeping here keeps senders from ever paying
        // for a wake-up syscall.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn emit(rec: &AccessRecord, labels: &[RouteLabels]) {
    let (route, service) = rec
        .route
        .and_then(|i| labels.get(i))
        .map_or(("", ""), |l| (l.route.as_str(), l.service.as_str()));
    let instance = rec.instance.map(tracing::field::display);
    tracing::info!(
        target: TARGET,
        request_id = rec.request_id.to_str().unwrap_or(""),
        method = rec.method.as_str(),
        route,
        service,
        instance,
        status = rec.status,
        duration_ms = rec.duration.as_secs_f64() * 1e3,
        attempts = rec.attempts,
        complete = rec.complete,
        "request"
    );
}
