//! Active checks over the network, behind a trait so tests can script them.
//!
//! [`NetProber`] keeps one HTTP/1.1 keep-alive connection per checked
//! instance: a check every second for 10,000 instances is then a request on an
//! open socket, not a TCP handshake.

use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::health::CheckResult;
use crate::model::CheckKind;

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// IP address or hostname.
    pub address: String,
    /// TCP port.
    pub port: u16,
    /// HTTP or TCP (TTL checks are never probed).
    pub kind: CheckKind,
}

/// Makes one [`Probe`] per checked instance.
pub trait Prober: Send + Sync + 'static {
    /// A probe for `target`, used for every check of that instance until it is deregistered.
    fn probe(&self, target: &ProbeTarget) -> Box<dyn Probe>;
}

/// Checks one instance; may keep state (a connection) between checks.
pub trait Probe: Send + 'static {
    /// Runs one check; the caller enforces the timeout and counts an elapsed one as [`CheckResult::Fail`].
    fn check(&mut self) -> BoxFuture<'_, CheckResult>;
}

/// The real prober: HTTP/1.1 `GET` with keep-alive, or a TCP connect.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetProber;

impl Prober for NetProber {
    fn probe(&self, target: &ProbeTarget) -> Box<dyn Probe> {
        let authority = match target.address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{}", target.port),
            _ => format!("{}:{}", target.address, target.port),
        };
        match &target.kind {
            CheckKind::Http { path } => Box::new(HttpProbe {
                host: target.address.clone(),
                port: target.port,
                authority,
                path: path.clone(),
                conn: None,
            }),
            _ => Box::new(TcpProbe {
                host: target.address.clone(),
                port: target.port,
            }),
        }
    }
}

struct TcpProbe {
    host: String,
    port: u16,
}

impl Probe for TcpProbe {
    fn check(&mut self) -> BoxFuture<'_, CheckResult> {
        Box::pin(async move {
            match TcpStream::connect((self.host.as_str(), self.port)).await {
                Ok(_) => CheckResult::Pass,
                Err(_) => CheckResult::Fail,
            }
        })
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>;

struct HttpProbe {
    host: String,
    port: u16,
    authority: String,
    path: String,
    conn: Option<Sender>,
}

impl HttpProbe {
    async fn connect(&self) -> Option<Sender> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .ok()?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        // The connection task ends when the sender is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(sender)
    }

    async fn once(&mut self) -> Option<u16> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender.ready().await.ok()?;
        let req = http::Request::get(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::USER_AGENT, "switchboard-health/1")
            .body(Empty::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let code = resp.status().as_u16();
        // Read the (small) body so the connection can carry the next check.
        if resp.into_body().collect().await.is_ok() {
            self.conn = Some(sender);
        }
        Some(code)
    }
}

impl Probe for HttpProbe {
    fn check(&mut self) -> BoxFuture<'_, CheckResult> {
        Box::pin(async move {
            match self.once().await {
                Some(code) => CheckResult::from_http_status(code),
                None => CheckResult::Fail,
            }
        })
    }
}

/// Runs one check with a timeout; an elapsed timeout drops the probe's connection.
pub(crate) async fn run_check(probe: &mut Box<dyn Probe>, timeout: Duration) -> CheckResult {
    tokio::time::timeout(timeout, probe.check())
        .await
        .unwrap_or(CheckResult::Fail)
}
