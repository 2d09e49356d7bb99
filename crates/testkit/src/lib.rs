//! Real servers for tests: `redis-server` and `nats-server -js` on free ports.
//!
//! Every Switchboard test that talks to Redis or NATS starts its own server
//! through this crate, so tests never depend on a server the machine happens to
//! run and never share state with each other.
//!
//! ```no_run
//! use switchboard_testkit::{Persistence, RedisServer};
//!
//! let Some(mut redis) = RedisServer::start(Persistence::AofAlways) else {
//!     return; // binary absent and SWITCHBOARD_REQUIRE_SERVERS unset: skipped with a printed reason
//! };
//! let url = redis.url();
//! redis.kill(); // kill -9
//! redis.restart(); // same port, same data directory
//! # let _ = url;
//! ```
//!
//! # Layout
//! - [`RedisServer`]: one `redis-server`, without persistence or with AOF `appendfsync always`.
//! - [`NatsServer`]: one `nats-server -js` with file storage in a temp dir.
//! - [`require_servers`], [`free_port`], [`binary_or_skip`]: the skip policy, port picking
//!   and the binary lookup.
//!
//! A server is stopped with `kill -9` when its handle drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that turns a missing server binary from a skip into a failure.
pub const REQUIRE_ENV: &str = "SWITCHBOARD_REQUIRE_SERVERS";

/// How long a server gets to become ready before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// True when `SWITCHBOARD_REQUIRE_SERVERS` is set to anything but `0` or empty:
/// tests must then fail, not skip, when a server binary is missing (CI sets it).
pub fn require_servers() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and releasing it; another process could
/// take it in between, which is rare enough for tests.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// Finds `name` on `PATH` or in the usual sbin folders (Debian puts nats-server in /usr/sbin).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Resolves a server binary (`redis-server`, `nats-server`), or decides to skip
/// (returns `None` after printing why) or fail (panics) when it is missing.
/// For tests that hand the binary to a program that manages the server itself
/// (`switchboard bench chaos registry --redis-server PATH`).
pub fn binary_or_skip(name: &str) -> Option<PathBuf> {
    if let Some(path) = find_binary(name) {
        return Some(path);
    }
    if require_servers() {
        panic!("{name} not found on PATH and {REQUIRE_ENV} is set: install it (see .ci/run)");
    }
    eprintln!("skipping: {name} not found on PATH (set {REQUIRE_ENV}=1 to fail instead)");
    None
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not become ready within {READY_TIMEOUT:?}"
        );
        #[allow(clippy::disallowed_methods)]
        // testkit is synchronous on purpose: usable from any test
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
}

/// Persistence of a [`RedisServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk: a restart starts empty.
    None,
    /// AOF with `appendfsync always`: every acknowledged write survives `kill -9`.
    AofAlways,
}

/// A `redis-server` child process on a free port with its own data directory.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    persistence: Persistence,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    ///
    /// Returns `None` (after printing the reason) when `redis-server` is absent
    /// and [`require_servers`] is false; panics when it is absent and required.
    pub fn start(persistence: Persistence) -> Option<Self> {
        let binary = binary_or_skip("redis-server")?;
        let dir = tempfile::Builder::new()
            .prefix("sb-redis-")
            .tempdir()
            .expect("temp dir");
        let mut server = Self {
            binary,
            port: free_port(),
            persistence,
            dir,
            child: None,
        };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        match self.persistence {
            Persistence::None => cmd.args(["--appendonly", "no"]),
            Persistence::AofAlways => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let addr = self.addr();
        wait_until("redis-server", || redis_ping(addr));
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port, kept across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The data directory (AOF files live here), kept across restarts.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server cleanly (`SHUTDOWN`, which fsyncs the AOF) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = redis_command(self.addr(), "SHUTDOWN NOSAVE");
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts the server again on the same port and data directory (stopping it first if running).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Sends one inline command and reads the first reply line.
fn redis_command(addr: SocketAddr, command: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

/// Ready means `+PONG`: a server still loading its AOF answers `-LOADING`.
fn redis_ping(addr: SocketAddr) -> bool {
    redis_command(addr, "PING").is_ok_and(|l| l.starts_with("+PONG"))
}

/// A `nats-server -js` child process on a free port with file storage in its own directory.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream enabled and waits until it reports JetStream in its INFO.
    ///
    /// Returns `None` (after printing the reason) when `nats-server` is absent
    /// and [`require_servers`] is false; panics when it is absent and required.
    pub fn start() -> Option<Self> {
        let binary = binary_or_skip("nats-server")?;
        let dir = tempfile::Builder::new()
            .prefix("sb-nats-")
            .tempdir()
            .expect("temp dir");
        let mut server = Self {
            binary,
            port: free_port(),
            dir,
            child: None,
        };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(self.dir.path().join("nats.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr = self.addr();
        wait_until("nats-server", || nats_ready(addr));
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port, kept across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The JetStream store directory, kept across restarts.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server with SIGTERM-like shutdown (SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // std has no SIGTERM; `kill` from procps is on every Debian machine.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts the server again on the same port and store directory (stopping it first if running).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Ready means the server greets with an INFO line that says JetStream is on.
fn nats_ready(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&got);
    line.starts_with("INFO") && line.contains("\"jetstream\":true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_survives_kill_with_aof() {
        let Some(mut redis) = RedisServer::start(Persistence::AofAlways) else {
            return;
        };
        assert!(
            redis_command(redis.addr(), "SET k v")
                .unwrap()
                .starts_with("+OK")
        );
        let port = redis.port();
        redis.kill();
        assert!(!redis_ping(redis.addr()), "killed server still answers");
        redis.restart();
        assert_eq!(redis.port(), port);
        assert_eq!(redis_command(redis.addr(), "GET k").unwrap(), "$1\r\n");
    }

    #[test]
    fn redis_without_persistence_restarts_empty() {
        let Some(mut redis) = RedisServer::start(Persistence::None) else {
            return;
        };
        redis_command(redis.addr(), "SET k v").unwrap();
        redis.stop();
        assert!(!redis.is_running());
        redis.restart();
        assert_eq!(redis_command(redis.addr(), "GET k").unwrap(), "$-1\r\n");
    }

    #[test]
    fn nats_restarts_on_same_port() {
        let Some(mut nats) = NatsServer::start() else {
            return;
        };
        assert!(nats_ready(nats.addr()));
        nats.kill();
        assert!(!nats_ready(nats.addr()));
        nats.restart();
        assert!(nats_ready(nats.addr()));
        nats.stop();
        assert!(!nats.is_running());
    }
}
