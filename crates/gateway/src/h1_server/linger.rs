//! Lingering close (RFC 9112 §9.6; nginx's `lingering_close`).
//!
//! When the gateway answers before it has read all the client sent (a `413`
//! for a declared length over the limit, an upstream that answered before
//! the upload ended, a refused head), closing the socket at once leaves
//! those bytes unread in the kernel's receive buffer, and Linux then closes
//! with a reset instead of a FIN. The reset throws away whatever of the
//! response still waits in the gateway's send buffer, makes the client's
//! next write fail (`EPIPE`/`ECONNRESET`), and a client that uploads before
//! it reads never gets to the response; some stacks also drop received but
//! unread data on a reset.
//!
//! So such a connection closes in two steps: [`close`] shuts down the write
//! half (the client sees the response and then a FIN), then reads and
//! discards what the client still sends until it closes its side (then the
//! close is clean), and gives up after [`Linger::timeout`] without a byte,
//! after [`Linger::time`] in all, after [`Linger::max_bytes`], or
//! [`ON_SHUTDOWN`] after shutdown was asked for. A connection that lingers
//! holds its task and its socket for a bounded time, and no buffer: the
//! discarded bytes are read into one scratch buffer per worker thread. It
//! counts against no other limit.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::watch;

use super::after;

/// Once shutdown is asked for, a lingering connection closes within this:
/// time for the response in flight to be acknowledged, short enough not to
/// hold up the drain.
pub const ON_SHUTDOWN: Duration = Duration::from_millis(500);

/// Bytes read at most per read while discarding.
const CHUNK: usize = 64 * 1024;

thread_local! {
    /// Where every lingering connection of this thread reads to: a read
    /// that is pending leaves nothing in it, so none needs its own.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; CHUNK]);
}

/// Reads what is there into the thread's scratch buffer: how many bytes.
fn poll_discard<S: AsyncRead + Unpin>(io: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut rb = ReadBuf::new(scratch);
        Pin::new(io)
            .poll_read(cx, &mut rb)
            .map_ok(|()| rb.filled().len())
    })
}

/// How long a lingering close may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linger {
    /// The whole linger, from the end of the response
    /// (`gateway.lingering_time`, nginx's `lingering_time`).
    pub time: Duration,
    /// Longest wait for the client's next bytes
    /// (`gateway.lingering_timeout`, nginx's `lingering_timeout`); zero
    /// turns lingering off (the close follows the response at once).
    pub timeout: Duration,
    /// Most bytes discarded: past them the connection closes anyway.
    pub max_bytes: u64,
}

impl Linger {
    /// nginx's times (30 s in all, 5 s between reads), and 16 MiB: the rest
    /// of an upload a little over the default `max_body_bytes` (10 MiB),
    /// about a second and a half at 100 Mbit/s.
    pub const DEFAULT: Linger = Linger {
        time: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
        max_bytes: 16 * 1024 * 1024,
    };
}

impl Default for Linger {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a lingering close ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed its side: nothing was left unread.
    Eof,
    /// Nothing came for [`Linger::timeout`].
    Idle,
    /// [`Linger::time`] passed.
    Time,
    /// [`Linger::max_bytes`] were discarded.
    Bytes,
    /// Shutdown was asked for and [`ON_SHUTDOWN`] passed.
    Shutdown,
    /// Shutting down the write half or reading failed (the client reset).
    Failed,
    /// Lingering is off.
    Off,
}

/// Shuts down `io`'s write half after a response, then reads and discards
/// what the client still sends, within `linger`'s bounds and
/// [`ON_SHUTDOWN`] after `shutdown` turns true. The caller drops `io`
/// afterwards (and its buffers before).
pub async fn close<S>(io: &mut S, mut shutdown: watch::Receiver<bool>, linger: Linger) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if io.shutdown().await.is_err() {
        return Ended::Failed;
    }
    if linger.timeout.is_zero() || linger.time.is_zero() {
        return Ended::Off;
    }
    let mut deadline = after(linger.time);
    let mut stopping = false;
    let mut discarded: u64 = 0;
    loop {
        let wait = after(linger.timeout).min(deadline);
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| poll_discard(io, cx)) => match r {
                Ok(0) => return Ended::Eof,
                Ok(n) => {
                    discarded = discarded.saturating_add(n as u64);
                    if discarded >= linger.max_bytes {
                        return Ended::Bytes;
                    }
                }
                Err(_) => return Ended::Failed,
            },
            () = tokio::time::sleep_until(wait) => {
                return match (wait < deadline, stopping) {
                    (true, _) => Ended::Idle,
                    (false, true) => Ended::Shutdown,
                    (false, false) => Ended::Time,
                };
            }
            // A dropped sender means the server is gone: stop as well.
            _ = shutdown.wait_for(|v| *v), if !stopping => {
                stopping = true;
                deadline = deadline.min(after(ON_SHUTDOWN));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, DuplexStream, duplex};
    use tokio::time::Instant;

    const L: Linger = Linger {
        time: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
        max_bytes: 1024,
    };

    /// A server side after a response, and the client's side.
    fn pair() -> (DuplexStream, DuplexStream) {
        duplex(64 * 1024)
    }

    async fn run(
        mut server: DuplexStream,
        rx: watch::Receiver<bool>,
        linger: Linger,
    ) -> (Ended, Duration) {
        let t = Instant::now();
        let ended = close(&mut server, rx, linger).await;
        (ended, t.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_closes_ends_it_cleanly_after_its_fin_and_the_servers() {
        let (server, mut client) = pair();
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(server, rx, L));
        client.write_all(b"rest of the body").await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "the server's write half is shut");
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.shutdown().await.unwrap();
        let (ended, took) = task.await.unwrap();
        assert_eq!(ended, Ended::Eof);
        assert_eq!(took, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_the_timeout() {
        let (server, _client) = pair();
        let (_tx, rx) = watch::channel(false);
        assert_eq!(run(server, rx, L).await, (Ended::Idle, L.timeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_client_is_dropped_after_the_whole_time() {
        let (server, mut client) = pair();
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(server, rx, L));
        let trickle = tokio::spawn(async move {
            while client.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        });
        assert_eq!(task.await.unwrap(), (Ended::Time, L.time));
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn discarding_stops_at_the_byte_cap() {
        let (server, mut client) = pair();
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(server, rx, L));
        let flood = tokio::spawn(async move { while client.write_all(&[0; 100]).await.is_ok() {} });
        assert_eq!(task.await.unwrap(), (Ended::Bytes, Duration::ZERO));
        flood.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cuts_it_short_whether_asked_before_or_during() {
        let (server, _client) = pair();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(server, rx, L));
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send(true).unwrap();
        assert_eq!(
            task.await.unwrap(),
            (Ended::Shutdown, Duration::from_millis(2500))
        );

        let (server, _client) = pair();
        let (_tx, rx) = watch::channel(true);
        assert_eq!(run(server, rx, L).await, (Ended::Shutdown, ON_SHUTDOWN));

        let (server, _client) = pair();
        let (tx, rx) = watch::channel(false);
        drop(tx);
        assert_eq!(run(server, rx, L).await, (Ended::Shutdown, ON_SHUTDOWN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_closes_at_once_after_the_fin() {
        let (server, mut client) = pair();
        let (_tx, rx) = watch::channel(false);
        let off = Linger {
            timeout: Duration::ZERO,
            ..L
        };
        assert_eq!(run(server, rx, off).await, (Ended::Off, Duration::ZERO));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_time_past_the_clock_still_lingers() {
        let (server, _client) = pair();
        let (_tx, rx) = watch::channel(false);
        let forever = Linger {
            time: Duration::MAX,
            ..L
        };
        assert_eq!(run(server, rx, forever).await, (Ended::Idle, L.timeout));
    }
}
