//! Redis Streams: a stream per topic (key `sb:{topic}`, one field `e` holding
//! the CloudEvents JSON), a consumer group per group.
//!
//! - **Publish**: `XADD`, pipelined for batches; `publish` returns after the
//!   reply, i.e. after Redis accepted (and, with `appendfsync always`, fsynced) it.
//! - **Consume**: `XREADGROUP ... BLOCK` on a connection of its own whose
//!   response timeout is longer than the block (redis-rs would otherwise cut
//!   every blocking read at its 500 ms default); acks are batched `XACK`s on
//!   the shared connection. A new group starts at `0`: it sees retained events.
//! - **Crashed consumers**: every consumer runs `XAUTOCLAIM` with
//!   `min-idle-time` = ack wait when it starts and then every ack wait / 2
//!   (at most every second), then reads the claimed entries' delivery
//!   counts with `XPENDING`; an entry delivered more than `max_deliveries`
//!   times is dead-lettered without running the handler (a poison event that
//!   kills its consumers still ends in the dead-letter topic).
//! - **Retries**: a failed entry stays pending; after its backoff the same
//!   consumer takes it again with `XCLAIM` (which bumps the delivery count and
//!   resets the idle time, so nobody else reclaims it meanwhile).
//! - **Handing back** at shutdown: entries fetched but not handled (and
//!   failed ones still waiting for their backoff) get
//!   `XCLAIM key group <self> 0 <ids> IDLE <ms> RETRYCOUNT <n> JUSTID`: the
//!   idle time makes them due for every consumer's next `XAUTOCLAIM` at once
//!   (a failed entry: when its backoff ends), and the delivery count is set
//!   back to what it was before the unhandled delivery (`XAUTOCLAIM` adds one).
//! - **Trimming**: every `trim_interval` the bus trims each stream it used with
//!   `XTRIM MINID ~`, below the oldest entry that any group has pending or not
//!   yet read, and older than `retention`: unacknowledged entries are never trimmed.
//! - **Reconnects**: the shared connection is a `ConnectionManager`; the
//!   reading connection is re-opened with backoff after an error. Failed acks
//!   are retried (an `XACK` is idempotent), so nothing is lost or double-acked.
//!
//! URL options: `redis://HOST:PORT[/DB]?retention=1h&trim_interval=5s&block=500ms`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio::time::Instant;

use crate::codec;
use crate::driver::{Consumer, Delivery, Malformed};
use crate::{BusError, Capabilities, Event, SubscribeOptions};

pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    backend: "redis",
    durable: true,
    replay_for_new_groups: true,
    ordered_per_topic: true,
    competing_consumers: true,
    redelivery_after_crash: true,
};

/// The stream field holding the encoded event.
const FIELD: &str = "e";

pub(crate) fn stream_key(topic: &str) -> String {
    format!("sb:{topic}")
}

pub(crate) fn redis_error(e: &redis::RedisError) -> BusError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(e.code(), Some("LOADING" | "TRYAGAIN"));
    if transient {
        BusError::Unavailable(e.to_string())
    } else {
        BusError::Backend(e.to_string())
    }
}

#[derive(Debug, Clone)]
struct Settings {
    retention: Duration,
    trim_interval: Duration,
    block: Duration,
}

/// Splits our options off the URL, leaving what redis-rs understands.
fn parse_url(url: &str) -> Result<(String, Settings), String> {
    let mut s = Settings {
        retention: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(5),
        block: Duration::from_millis(500),
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dur = || humantime::parse_duration(v).map_err(|e| format!("{k}={v:?}: {e}"));
        match k {
            "retention" => s.retention = dur()?,
            "trim_interval" => s.trim_interval = dur()?.max(Duration::from_millis(100)),
            "block" => s.block = dur()?.max(Duration::from_millis(10)),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, s))
}

pub(crate) struct RedisStreams {
    shared: Arc<Shared>,
    trimmer: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStreams {
    fn drop(&mut self) {
        self.trimmer.abort();
    }
}

struct Shared {
    client: redis::Client,
    conn: ConnectionManager,
    settings: Settings,
    /// Streams this bus wrote or read, for the trimmer.
    topics: Mutex<HashSet<String>>,
}

impl RedisStreams {
    pub(crate) async fn open(url: &str) -> Result<Self, BusError> {
        let (url, settings) = parse_url(url).map_err(|reason| BusError::InvalidUrl {
            url: url.to_owned(),
            reason,
        })?;
        let client = redis::Client::open(url.as_str()).map_err(|e| BusError::InvalidUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| redis_error(&e))?;
        let shared = Arc::new(Shared {
            client,
            conn,
            settings,
            topics: Mutex::default(),
        });
        let trimmer = tokio::spawn(trim_loop(Arc::downgrade(&shared)));
        Ok(RedisStreams { shared, trimmer })
    }

    pub(crate) async fn publish(&self, topic: &str, events: &[Event]) -> Result<(), BusError> {
        self.shared.note_topic(topic);
        publish(&self.shared.conn, &stream_key(topic), events).await
    }

    pub(crate) async fn peek(
        &self,
        topic: &str,
        limit: usize,
    ) -> Result<Vec<Result<Event, String>>, BusError> {
        let mut conn = self.shared.conn.clone();
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream_key(topic))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(parse_entries(&reply)
            .into_iter()
            .map(|(_, payload)| payload.map_err(|m| m.error))
            .collect())
    }

    /// The group's `lag` from `XINFO GROUPS` (Redis 7+; `None` before, or
    /// when Redis cannot tell after deletions).
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        let mut conn = self.shared.conn.clone();
        let reply: Result<redis::streams::StreamInfoGroupsReply, _> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream_key(topic))
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(r) => Ok(r
                .groups
                .into_iter()
                .find(|g| g.name == group)
                .and_then(|g| g.lag)
                .map(|l| l as u64)),
            // No such stream yet: nothing is waiting.
            Err(e) if e.code() == Some("ERR") => Ok(None),
            Err(e) => Err(redis_error(&e)),
        }
    }

    pub(crate) async fn delete_group(&self, topic: &str, group: &str) -> Result<(), BusError> {
        let mut conn = self.shared.conn.clone();
        let _: Value = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(stream_key(topic))
            .arg(group)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(())
    }

    pub(crate) async fn consumer(
        &self,
        topic: &str,
        group: &str,
        opts: &SubscribeOptions,
    ) -> Result<RedisConsumer, BusError> {
        self.shared.note_topic(topic);
        let key = stream_key(topic);
        let start = if opts.start_at_latest { "$" } else { "0" };
        create_group(&self.shared.conn, &key, group, start).await?;
        let name = opts
            .consumer_name
            .clone()
            .unwrap_or_else(|| format!("c-{}", uuid::Uuid::new_v4().simple()));
        // Often enough that entries a stopping peer handed back are taken soon.
        let reclaim_every =
            (opts.ack_wait / 2).clamp(Duration::from_millis(20), Duration::from_secs(1));
        Ok(RedisConsumer {
            shared: Arc::clone(&self.shared),
            key,
            group: group.to_owned(),
            name,
            ack_wait: opts.ack_wait,
            reclaim_every,
            reader: tokio::sync::Mutex::new(None),
            state: Mutex::new(ConsumerState {
                retries: BinaryHeap::new(),
                next_reclaim: Instant::now(),
                reclaim_cursor: "0-0".to_owned(),
            }),
        })
    }
}

impl Shared {
    fn note_topic(&self, topic: &str) {
        let mut topics = self.topics.lock();
        if !topics.contains(topic) {
            topics.insert(topic.to_owned());
        }
    }
}

async fn publish(conn: &ConnectionManager, key: &str, events: &[Event]) -> Result<(), BusError> {
    let mut conn = conn.clone();
    if let [event] = events {
        let _: Value = redis::cmd("XADD")
            .arg(key)
            .arg("*")
            .arg(FIELD)
            .arg(codec::encode(event))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
        return Ok(());
    }
    // One round trip per chunk; chunks keep a single reply bounded.
    let mut buf = Vec::with_capacity(1024);
    for chunk in events.chunks(1024) {
        let mut pipe = redis::pipe();
        for event in chunk {
            buf.clear();
            codec::encode_into(event, &mut buf);
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg(FIELD)
                .arg(&buf[..])
                .ignore();
        }
        let () = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
    }
    Ok(())
}

async fn create_group(
    conn: &ConnectionManager,
    key: &str,
    group: &str,
    start: &str,
) -> Result<(), BusError> {
    let mut conn = conn.clone();
    let created: Result<Value, _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(redis_error(&e)),
    }
}

pub(crate) struct RedisConsumer {
    shared: Arc<Shared>,
    key: String,
    group: String,
    name: String,
    ack_wait: Duration,
    reclaim_every: Duration,
    /// The blocking-read connection, opened lazily and dropped after an error.
    reader: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    state: Mutex<ConsumerState>,
}

struct ConsumerState {
    /// Failed entries waiting for their backoff: (due, id, deliveries so far).
    retries: BinaryHeap<Reverse<(Instant, StreamId, u32)>>,
    next_reclaim: Instant,
    reclaim_cursor: String,
}

/// A stream entry id `MS-SEQ`, kept as numbers: a delivery token that costs
/// no allocation and is written into `XACK`/`XCLAIM` without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    fn parse(b: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(b).ok()?;
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl redis::ToRedisArgs for StreamId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        // Two u64s and a dash fit in 41 bytes.
        let mut buf = [0u8; 41];
        let mut rest = &mut buf[..];
        let _ = write!(rest, "{}-{}", self.ms, self.seq);
        let len = 41 - rest.len();
        out.write_arg(&buf[..len]);
    }
}

type Entry = (StreamId, Result<Event, Malformed>);

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

/// Parses `[[id, [field, value, ...]], ...]`, decoding each entry's event.
fn parse_entries(v: &Value) -> Vec<Entry> {
    let mut out = Vec::new();
    for entry in items(v) {
        let [id, fields] = items(entry) else { continue };
        let Some(id) = bytes(id).and_then(StreamId::parse) else {
            continue;
        };
        out.push((id, decode_fields(fields)));
    }
    out
}

fn decode_fields(fields: &Value) -> Result<Event, Malformed> {
    let fields: Vec<&[u8]> = match fields {
        Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| [bytes(k).unwrap_or_default(), bytes(v).unwrap_or_default()])
            .collect(),
        other => items(other)
            .iter()
            .map(|x| bytes(x).unwrap_or_default())
            .collect(),
    };
    let value = fields
        .chunks(2)
        .find(|kv| kv.len() == 2 && kv[0] == FIELD.as_bytes())
        .map(|kv| kv[1]);
    match value {
        Some(raw) => codec::decode(raw).map_err(|e| Malformed {
            error: e.to_string(),
            raw: raw.to_vec(),
        }),
        None => {
            let names: Vec<String> = fields
                .chunks(2)
                .map(|kv| String::from_utf8_lossy(kv[0]).into_owned())
                .collect();
            Err(Malformed {
                error: format!("stream entry has no `{FIELD}` field (fields: {names:?})"),
                raw: fields.join(&b' '),
            })
        }
    }
}

impl RedisConsumer {
    async fn reader(&self) -> Result<MultiplexedConnection, BusError> {
        let mut guard = self.reader.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // Longer than any BLOCK we send, so a quiet stream is not a timeout.
            .set_response_timeout(Some(self.shared.settings.block + Duration::from_secs(5)));
        let conn = self
            .shared
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| redis_error(&e))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn on_error(&self, e: &redis::RedisError) -> BusError {
        if e.code() == Some("NOGROUP") {
            // The stream or group vanished (a broker restarted without persistence).
            if let Err(err) = create_group(&self.shared.conn, &self.key, &self.group, "0").await {
                return err;
            }
        } else {
            *self.reader.lock().await = None;
        }
        redis_error(e)
    }

    async fn claim_retries(&self, max: usize) -> Result<Vec<Delivery<StreamId>>, BusError> {
        let now = Instant::now();
        let due: Vec<(StreamId, u32)> = {
            let mut st = self.state.lock();
            let mut due = Vec::new();
            while due.len() < max
                && let Some(Reverse((at, _, _))) = st.retries.peek()
                && *at <= now
            {
                let Some(Reverse((_, id, attempts))) = st.retries.pop() else {
                    break;
                };
                due.push((id, attempts));
            }
            due
        };
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.shared.conn.clone();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.key).arg(&self.group).arg(&self.name).arg(0);
        for (id, _) in &due {
            cmd.arg(id);
        }
        let reply: Value = match cmd.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => {
                // Put them back; they are still pending for us.
                {
                    let mut st = self.state.lock();
                    for (id, attempts) in due {
                        st.retries.push(Reverse((now, id, attempts)));
                    }
                }
                return Err(self.on_error(&e).await);
            }
        };
        let claimed = parse_entries(&reply);
        Ok(claimed
            .into_iter()
            .filter_map(|(id, payload)| {
                let attempts = due.iter().find(|(d, _)| *d == id)?.1;
                Some(Delivery {
                    token: id,
                    attempt: attempts + 1,
                    payload,
                })
            })
            .collect())
    }

    /// Takes over entries other consumers left unacknowledged for longer than the ack wait.
    async fn reclaim(&self, max: usize) -> Result<Vec<Delivery<StreamId>>, BusError> {
        let cursor = {
            let st = self.state.lock();
            if Instant::now() < st.next_reclaim {
                return Ok(Vec::new());
            }
            st.reclaim_cursor.clone()
        };
        let mut conn = self.shared.conn.clone();
        let reply: Value = match redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.name)
            .arg(u64::try_from(self.ack_wait.as_millis()).unwrap_or(u64::MAX))
            .arg(&cursor)
            .arg("COUNT")
            .arg(max)
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            Err(e) => return Err(self.on_error(&e).await),
        };
        let parts = items(&reply);
        let next = parts
            .first()
            .and_then(bytes)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("0-0")
            .to_owned();
        let claimed = parts.get(1).map(parse_entries).unwrap_or_default();
        {
            let mut st = self.state.lock();
            if next == "0-0" {
                st.next_reclaim = Instant::now() + self.reclaim_every;
            }
            st.reclaim_cursor = next;
        }
        // Entries deleted from the stream while pending (third element) are
        // removed from the PEL by XAUTOCLAIM itself.
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        {
            // Our own failed entries whose backoff outlasted the ack wait come
            // back here; do not also retry them from the heap.
            let mut st = self.state.lock();
            if !st.retries.is_empty() {
                let ids: HashSet<StreamId> = claimed.iter().map(|(id, _)| *id).collect();
                st.retries.retain(|Reverse((_, id, _))| !ids.contains(id));
            }
        }
        let counts = self.delivery_counts(&claimed).await?;
        Ok(claimed
            .into_iter()
            .map(|(id, payload)| {
                let attempt = counts.iter().find(|(i, _)| *i == id).map_or(2, |(_, n)| *n);
                Delivery {
                    token: id,
                    attempt,
                    payload,
                }
            })
            .collect())
    }

    /// Delivery counts of entries pending for this consumer (XAUTOCLAIM does not return them).
    async fn delivery_counts(&self, claimed: &[Entry]) -> Result<Vec<(StreamId, u32)>, BusError> {
        let (Some(first), Some(last)) = (claimed.first(), claimed.last()) else {
            return Ok(Vec::new());
        };
        let mut conn = self.shared.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(&self.group)
            .arg(first.0)
            .arg(last.0)
            // Our other pending entries may lie in the range too.
            .arg(claimed.len() + 10_000)
            .arg(&self.name)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(items(&reply)
            .iter()
            .filter_map(|row| {
                let [id, _consumer, _idle, count] = items(row) else {
                    return None;
                };
                let id = StreamId::parse(bytes(id)?)?;
                Some((id, u32::try_from(int(count)?).ok()?))
            })
            .collect())
    }

    /// `XCLAIM` of `ids` to ourselves that makes them idle for `idle` and
    /// sets their delivery count to `deliveries`, without bumping it (`JUSTID`).
    fn hand_back(&self, ids: &[StreamId], idle: Duration, deliveries: u32) -> redis::Cmd {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.key)
            .arg(&self.group)
            .arg(&self.name)
            .arg(0)
            .arg(ids)
            .arg("IDLE")
            .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX))
            .arg("RETRYCOUNT")
            .arg(deliveries)
            .arg("JUSTID");
        cmd
    }

    async fn read_new(&self, max: usize) -> Result<Vec<Delivery<StreamId>>, BusError> {
        let block = {
            let st = self.state.lock();
            let now = Instant::now();
            let mut until = st.next_reclaim;
            if let Some(Reverse((at, _, _))) = st.retries.peek() {
                until = until.min(*at);
            }
            until
                .saturating_duration_since(now)
                .min(self.shared.settings.block)
                .max(Duration::from_millis(1))
        };
        let mut conn = self.reader().await?;
        let reply: Result<Value, _> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(1))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Ok(v) => v,
            Err(e) => return Err(self.on_error(&e).await),
        };
        let streams: Vec<&Value> = match &reply {
            Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
            other => items(other)
                .iter()
                .filter_map(|s| items(s).get(1))
                .collect(),
        };
        Ok(streams
            .into_iter()
            .flat_map(parse_entries)
            .map(|(id, payload)| Delivery {
                token: id,
                attempt: 1,
                payload,
            })
            .collect())
    }
}

impl Consumer for RedisConsumer {
    type Token = StreamId;
    // A dropped XREADGROUP reply would strand its entries until the ack wait.
    const CANCEL_SAFE_FETCH: bool = false;

    async fn fetch(&self, max: usize) -> Result<Vec<Delivery<StreamId>>, BusError> {
        let mut out = self.claim_retries(max).await?;
        if out.len() < max {
            out.extend(self.reclaim(max - out.len()).await?);
        }
        if out.is_empty() {
            out = self.read_new(max).await?;
        }
        Ok(out)
    }

    async fn ack(&self, ids: &[StreamId]) -> Result<(), BusError> {
        let mut conn = self.shared.conn.clone();
        for chunk in ids.chunks(4096) {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.key).arg(&self.group).arg(chunk);
            let _: Value = cmd
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
        }
        Ok(())
    }

    async fn release(&self, tokens: Vec<(StreamId, u32)>) -> Result<(), BusError> {
        let mut by_count: std::collections::BTreeMap<u32, Vec<StreamId>> = Default::default();
        for (id, counted) in tokens {
            by_count.entry(counted).or_default().push(id);
        }
        let mut pipe = redis::pipe();
        for (counted, ids) in by_count {
            // Idle for the whole ack wait: due for the next XAUTOCLAIM.
            pipe.add_command(self.hand_back(&ids, self.ack_wait, counted))
                .ignore();
        }
        let mut conn = self.shared.conn.clone();
        let () = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(())
    }

    async fn release_held(&self) -> Result<u64, BusError> {
        let held = std::mem::take(&mut self.state.lock().retries).into_vec();
        if held.is_empty() {
            return Ok(0);
        }
        let n = held.len() as u64;
        let now = Instant::now();
        let mut pipe = redis::pipe();
        for Reverse((due, id, deliveries)) in held {
            // Due for XAUTOCLAIM when its backoff ends: idle for the ack wait
            // less what is left of the backoff.
            let idle = self
                .ack_wait
                .saturating_sub(due.saturating_duration_since(now));
            pipe.add_command(self.hand_back(&[id], idle, deliveries))
                .ignore();
        }
        let mut conn = self.shared.conn.clone();
        let () = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(n)
    }

    async fn retry(&self, id: StreamId, attempt: u32, delay: Duration) -> Result<(), BusError> {
        self.state
            .lock()
            .retries
            .push(Reverse((Instant::now() + delay, id, attempt)));
        Ok(())
    }

    async fn publish_dead_letter(&self, topic: &str, letter: &Event) -> Result<(), BusError> {
        self.shared.note_topic(topic);
        publish(
            &self.shared.conn,
            &stream_key(topic),
            std::slice::from_ref(letter),
        )
        .await
    }
}

/// Trims every known stream now and then; ends when the bus is dropped.
async fn trim_loop(shared: Weak<Shared>) {
    loop {
        let Some(interval) = shared.upgrade().map(|s| s.settings.trim_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(s) = shared.upgrade() else { return };
        let topics: Vec<String> = s.topics.lock().iter().cloned().collect();
        for topic in topics {
            if let Err(error) = trim(&s, &stream_key(&topic)).await {
                tracing::debug!(%topic, %error, "trimming failed");
            }
        }
    }
}

/// A stream id as (ms, seq) for comparison.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// `XTRIM MINID ~` below every group's oldest unacknowledged entry and below the retention horizon.
async fn trim(s: &Shared, key: &str) -> Result<(), BusError> {
    let mut conn = s.conn.clone();
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let horizon = now_ms.saturating_sub(s.settings.retention.as_millis());
    let mut floor = (u64::try_from(horizon).unwrap_or(0), 0u64);
    let groups: Value = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(&mut conn)
        .await
    {
        Ok(v) => v,
        Err(e) if e.code() == Some("ERR") => return Ok(()), // no such stream yet
        Err(e) => return Err(redis_error(&e)),
    };
    for g in items(&groups) {
        let fields: Vec<(&[u8], &Value)> = match g {
            Value::Map(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| Some((bytes(k)?, v)))
                .collect(),
            other => items(other)
                .chunks(2)
                .filter_map(|kv| Some((bytes(kv.first()?)?, kv.get(1)?)))
                .collect(),
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == name.as_bytes())
                .map(|(_, v)| *v)
        };
        let Some(name) = field("name").and_then(bytes) else {
            continue;
        };
        let last = field("last-delivered-id")
            .and_then(bytes)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(parse_id)
            .unwrap_or((0, 0));
        floor = floor.min(last);
        if field("pending").and_then(int).unwrap_or(0) > 0 {
            let summary: Value = redis::cmd("XPENDING")
                .arg(key)
                .arg(name)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            if let Some(min) = items(&summary)
                .get(1)
                .and_then(bytes)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(parse_id)
            {
                floor = floor.min(min);
            }
        }
    }
    if floor == (0, 0) {
        return Ok(());
    }
    let _: Value = redis::cmd("XTRIM")
        .arg(key)
        .arg("MINID")
        .arg("~")
        .arg(format!("{}-{}", floor.0, floor.1))
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_split_off() {
        let (url, s) = parse_url("redis://h:1/2?retention=10s&block=50ms&protocol=resp3").unwrap();
        assert_eq!(url, "redis://h:1/2?protocol=resp3");
        assert_eq!(s.retention, Duration::from_secs(10));
        assert_eq!(s.block, Duration::from_millis(50));
        assert!(parse_url("redis://h:1?retention=forever").is_err());
    }

    proptest::proptest! {
        /// Stream ids survive the trip to numbers and back into a command
        /// argument; arbitrary bytes never panic the parser.
        #[test]
        fn stream_ids_round_trip(ms in proptest::prelude::any::<u64>(), seq in proptest::prelude::any::<u64>(),
                                 junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48)) {
            let id = StreamId { ms, seq };
            let text = format!("{ms}-{seq}");
            proptest::prop_assert_eq!(StreamId::parse(text.as_bytes()), Some(id));
            proptest::prop_assert_eq!(id.to_string(), text.clone());
            let args = redis::ToRedisArgs::to_redis_args(&id);
            proptest::prop_assert_eq!(args, vec![text.into_bytes()]);
            let _ = StreamId::parse(&junk);
        }
    }

    #[test]
    fn stream_id_parse_rejects_garbage() {
        assert_eq!(StreamId::parse(b"5"), Some(StreamId { ms: 5, seq: 0 }));
        for bad in [
            &b""[..],
            b"-",
            b"1-",
            b"x-1",
            b"1-2-3",
            b"18446744073709551616-0",
        ] {
            assert_eq!(
                StreamId::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn entries_without_our_field_are_malformed() {
        let v = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-1".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"x".to_vec()),
                Value::BulkString(b"y".to_vec()),
            ]),
        ])]);
        let parsed = parse_entries(&v);
        let err = parsed[0].1.as_ref().unwrap_err();
        assert!(err.error.contains("no `e` field"), "{}", err.error);
    }
}
