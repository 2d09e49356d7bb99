//! The `redis://` store: one shared view for every process on the same Redis.
//!
//! # Keys (prefix `P`, default `switchboard:registry`)
//! - `P:services`: SET of service names.
//! - `P:svc:{service}`: HASH id -> registration record (JSON, with its generation).
//! - `P:status:{service}`: HASH id -> `generation|status|last_check_ms`.
//! - `P:deadlines`: ZSET `{service}/{id}` -> when the TTL instance expires (Redis
//!   `TIME`, ms), written by the registration and every heartbeat in the same
//!   script; after it turned critical, when it is deregistered
//!   (`deregister_critical_after`), or absent.
//! - `P:ttls`: HASH `{service}/{id}` -> `ttl_ms|deregister_after_ms` of every TTL
//!   instance (the after part empty for never).
//! - `P:beats`: ZSET `{service}/{id}` -> when a process last accepted a
//!   heartbeat from the TTL instance (Redis `TIME`, ms), written by the
//!   heartbeat script; removed by a new registration (a new body) and a
//!   deregistration. Absent: no heartbeat since it registered, or last
//!   heartbeated through an older version (shown as unknown). Older versions
//!   do not remove it either: while they run, an instance re-registered
//!   through one may show the previous body's last heartbeat.
//! - `P:lease:{service}:{id}`: which process runs an active check, `SET NX PX`.
//! - `P:epoch`: a random value created when the registry first meets an empty
//!   Redis. A process that finds a different epoch than the one it last saw
//!   knows Redis lost its data and writes back (`HSETNX`) every instance it knows.
//!   A restored TTL instance keeps its status: a passing one gets one TTL of
//!   grace, a critical one stays critical until it heartbeats.
//! - `P:hb:{service}:{id}`: the heartbeat key of earlier versions; only deleted.
//! - `P:gone:{service}:{id}`: a deregistration's tombstone (10 resync intervals,
//!   at least 60 s): a restore leaves that instance out, so a process that had
//!   not heard of the deregistration yet cannot bring it back. Only a
//!   deregistration within a notification's delay before the loss (its
//!   tombstone lost with the rest) can still come back.
//! - channel `P:changes`: the name of a service that changed.
//!
//! # Consistency
//! Every process mirrors Redis in memory (readers never wait on Redis). A
//! change is written, then announced on the channel; each process re-reads the
//! named service. A full resynchronisation runs on every (re)connection and
//! every `resync_interval`, so a lost notification delays a change but never
//! loses it. Status writes carry the instance's generation, so a check of a
//! replaced registration cannot overwrite the new one.
//!
//! # Check ownership
//! Active checks: every process runs a checker task per instance, but only the
//! holder of the instance's lease probes it. The owner renews the lease every
//! interval for 1.5 intervals; others retry every half interval, so when the
//! owner dies another process takes over within two intervals.
//!
//! TTL checks have no task and no lease: a heartbeat moves the instance's
//! deadline in `P:deadlines` (and turns a critical instance passing) in one
//! script, and every process runs one scanner every [`SCAN_EVERY`] whose script
//! takes the expired deadlines (`ZRANGEBYSCORE -inf now`), turns those
//! instances critical (or deregisters those critical for their
//! `deregister_critical_after`) and announces each changed service once. The
//! scripts run atomically, so two scanners never both act on an instance, and a
//! heartbeat that lands first moves the deadline out of the scan's reach. Redis
//! work is a few scans per second per process plus one write per change, not
//! per instance; a dead instance turns critical within its TTL plus
//! [`SCAN_EVERY`] plus the notification's delay, on every process.
//!
//! # Heartbeat times
//! The heartbeat script also records its time in `P:beats`, without a
//! notification (heartbeats are frequent and are not a change of the view).
//! The first scan call of every round also reads, in the same script, the
//! times recorded since the previous round (`ZRANGEBYSCORE` from that round's
//! `TIME`) and moves the mirror's times forward. So
//! [`Registry::heartbeats`](crate::Registry::heartbeats) and the instances'
//! `last_heartbeat` on every process show a heartbeat accepted by any process
//! within [`SCAN_EVERY`] plus a round trip, read from memory. Every full
//! resync makes the next round read all the times again, which covers an
//! instance a process learned of only after the round that carried its
//! heartbeat (and a Redis clock that went back): that case is bounded by
//! `resync_interval`. Each process reads each heartbeat about once: the cost
//! grows with the heartbeat rate, plus the whole set once per resync.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::model::{Registration, Status};
use crate::registry::{
    Inner, Known, Registry, RegistryError, RegistryOptions, Store, initial_status,
};

/// Bound on every Redis round trip: a dead Redis must not stall checks or writes.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// How often each process scans for expired TTL deadlines.
pub(crate) const SCAN_EVERY: Duration = Duration::from_millis(250);

/// Expired deadlines handled per scan script call (the scan repeats at once while full).
const SCAN_BATCH: usize = 500;

pub(crate) struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    node: String,
    leases: Mutex<HashMap<(String, String), tokio::time::Instant>>,
    epoch: Mutex<Option<String>>,
    /// Serialises "read Redis, apply to the mirror" against local writes, so an
    /// older read is never applied over a newer write.
    sync: tokio::sync::Mutex<()>,
    lease_script: redis::Script,
    release_script: redis::Script,
    status_script: redis::Script,
    delete_script: redis::Script,
    ensure_script: redis::Script,
    put_script: redis::Script,
    heartbeat_script: redis::Script,
    scan_script: redis::Script,
    /// How long a deregistration's tombstone keeps restores from bringing the instance back.
    tombstone: Duration,
    /// Redis `TIME` (ms) of the last scan that read `P:beats`: the next one
    /// reads the heartbeats recorded since. 0 (read them all) after every full resync.
    beats_since: Mutex<u64>,
}

/// What one call of the scan script found.
pub(crate) struct Scan {
    /// Expired deadlines handled.
    due: usize,
    /// Redis `TIME` (ms) when the script ran.
    now: u64,
    /// Heartbeats recorded since the given time: service, id, when.
    beats: Vec<(String, String, SystemTime)>,
}

/// An instance as stored in `P:svc:{service}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    registration: Registration,
    generation: String,
}

/// One instance read back from Redis.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    registration: Registration,
    generation: u64,
    status: Status,
    last_check: Option<SystemTime>,
}

impl Record {
    pub(crate) fn into_known(self) -> Known {
        Known {
            reg: self.registration,
            generation: self.generation,
            status: self.status,
            last_check: self.last_check,
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Store(e.to_string())
}

async fn bounded<T>(fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, RegistryError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(r) => r.map_err(store_err),
        Err(_) => Err(RegistryError::Store("redis did not answer in time".into())),
    }
}

fn millis(t: SystemTime) -> u64 {
    u64::try_from(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

fn status_value(generation: u64, status: Status, last_check: Option<SystemTime>) -> String {
    format!(
        "{generation}|{status}|{}",
        last_check
            .map(millis)
            .map(|m| m.to_string())
            .unwrap_or_default()
    )
}

impl RedisStore {
    pub(crate) async fn connect(url: &str, opts: &RegistryOptions) -> Result<Self, RegistryError> {
        // Errors name the store without its password.
        let shown = super::redact_url(url);
        let client = redis::Client::open(url)
            .map_err(|e| RegistryError::UnsupportedStore(format!("{shown}: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| RegistryError::Store(format!("{shown}: connect timed out")))?
        .map_err(|e| RegistryError::Store(format!("{shown}: {e}")))?;
        // Unique per store, not just per process: two stores opened in one
        // process within a millisecond got the same name (the stack address
        // of `conn` repeats), and then both held every lease.
        static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let random = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            (n, millis(SystemTime::now())),
        );
        let node = format!("{}-{n}-{random:016x}", std::process::id());
        Ok(RedisStore {
            client,
            conn,
            prefix: opts.redis_prefix.clone(),
            node,
            leases: Mutex::new(HashMap::new()),
            epoch: Mutex::new(None),
            sync: tokio::sync::Mutex::new(()),
            lease_script: redis::Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
                  if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
                  return 0",
            ),
            release_script: redis::Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
                  return 0",
            ),
            tombstone: (opts.resync_interval * 10).max(Duration::from_secs(60)),
            beats_since: Mutex::new(0),
            status_script: redis::Script::new(
                r"local cur = redis.call('HGET', KEYS[1], ARGV[1])
                  if not cur then return 0 end
                  local gen = ARGV[2] .. '|'
                  if string.sub(cur, 1, #gen) ~= gen then return 0 end
                  local last = ARGV[4]
                  if last == '' then last = string.match(cur, '[^|]*|[^|]*|(.*)') or '' end
                  redis.call('HSET', KEYS[1], ARGV[1], gen .. ARGV[3] .. '|' .. last)
                  if ARGV[6] == '1' then redis.call('PUBLISH', KEYS[2], ARGV[5]) end
                  return 1",
            ),
            delete_script: redis::Script::new(
                r"local cur = redis.call('HGET', KEYS[2], ARGV[1])
                  if ARGV[2] ~= '' then
                    if not cur or string.sub(cur, 1, #ARGV[2] + 1) ~= ARGV[2] .. '|' then return 0 end
                  end
                  local n = redis.call('HDEL', KEYS[1], ARGV[1])
                  redis.call('HDEL', KEYS[2], ARGV[1])
                  redis.call('DEL', KEYS[3], KEYS[4])
                  redis.call('ZREM', KEYS[7], ARGV[5])
                  redis.call('HDEL', KEYS[8], ARGV[5])
                  redis.call('ZREM', KEYS[9], ARGV[5])
                  redis.call('SET', KEYS[6], '1', 'PX', ARGV[4])
                  redis.call('PUBLISH', KEYS[5], ARGV[3])
                  return n",
            ),
            ensure_script: redis::Script::new(
                r"if ARGV[6] == '1' then redis.call('DEL', KEYS[5])
                  elseif redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
                  local created = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
                  redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3])
                  redis.call('SADD', KEYS[3], ARGV[4])
                  if created == 1 then
                    if ARGV[7] ~= '' then redis.call('HSET', KEYS[8], ARGV[9], ARGV[7]) end
                    if ARGV[5] ~= '' then
                      local t = redis.call('TIME')
                      local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                      redis.call('ZADD', KEYS[7], 'NX', now + tonumber(ARGV[5]), ARGV[9])
                    end
                    redis.call('PUBLISH', KEYS[6], ARGV[4])
                  elseif ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[8], ARGV[9]) == 1 then
                    -- a re-registration with the same body: a passing instance that
                    -- lost its deadline gets one TTL (never renews an existing one)
                    local t = redis.call('TIME')
                    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                    redis.call('ZADD', KEYS[7], 'NX', now + tonumber(ARGV[8]), ARGV[9])
                  end
                  return created",
            ),
            put_script: redis::Script::new(
                r"redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
                  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
                  redis.call('SADD', KEYS[3], ARGV[4])
                  redis.call('DEL', KEYS[4], KEYS[5])
                  redis.call('ZREM', KEYS[9], ARGV[7])
                  if ARGV[5] ~= '' then
                    local t = redis.call('TIME')
                    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                    redis.call('HSET', KEYS[7], ARGV[7], ARGV[6])
                    redis.call('ZADD', KEYS[8], now + tonumber(ARGV[5]), ARGV[7])
                  else
                    redis.call('HDEL', KEYS[7], ARGV[7])
                    redis.call('ZREM', KEYS[8], ARGV[7])
                  end
                  redis.call('PUBLISH', KEYS[6], ARGV[4])
                  return 1",
            ),
            heartbeat_script: redis::Script::new(
                r"local meta = redis.call('HGET', KEYS[3], ARGV[2])
                  local cur = redis.call('HGET', KEYS[2], ARGV[1])
                  local gen, status, last
                  if cur then gen, status, last = string.match(cur, '^([^|]*)|([^|]*)|(.*)$') end
                  if not meta then
                    -- written by an older version (or lost): only for the generation we know
                    if gen ~= ARGV[4] or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0, 0} end
                    meta = ARGV[5]
                    redis.call('HSET', KEYS[3], ARGV[2], meta)
                  end
                  local ttl = tonumber(string.match(meta, '^([^|]*)'))
                  local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  redis.call('ZADD', KEYS[4], now + ttl, ARGV[2])
                  redis.call('ZADD', KEYS[6], now, ARGV[2])
                  if gen and status == 'critical' then
                    redis.call('HSET', KEYS[2], ARGV[1], gen .. '|passing|' .. last)
                    redis.call('PUBLISH', KEYS[5], ARGV[3])
                    return {2, now}
                  end
                  return {1, now}",
            ),
            // Touches the status, registration and tombstone keys of the
            // instances it finds (built from the prefix): fine on one Redis,
            // not on a Redis Cluster (the registry does not support one).
            scan_script: redis::Script::new(
                r"local p = ARGV[1]
                  local dl, meta_key = KEYS[1], KEYS[2]
                  local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  local due = redis.call('ZRANGEBYSCORE', dl, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
                  local beats = {}
                  if ARGV[4] ~= '' then
                    beats = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[4], '+inf', 'WITHSCORES')
                  end
                  local changed = {}
                  for _, m in ipairs(due) do
                    local svc, id = string.match(m, '^([^/]*)/(.*)$')
                    local meta = redis.call('HGET', meta_key, m)
                    local st, cur, gen, status, last
                    if svc and meta then
                      st = p .. ':status:' .. svc
                      cur = redis.call('HGET', st, id)
                      if cur then gen, status, last = string.match(cur, '^([^|]*)|([^|]*)|(.*)$') end
                    end
                    if not gen then
                      redis.call('ZREM', dl, m)
                    else
                      local after = tonumber(string.match(meta, '|(.*)$'))
                      if status ~= 'critical' then
                        redis.call('HSET', st, id, gen .. '|critical|' .. last)
                        if after then redis.call('ZADD', dl, now + after, m) else redis.call('ZREM', dl, m) end
                        changed[svc] = true
                      elseif after then
                        redis.call('HDEL', p .. ':svc:' .. svc, id)
                        redis.call('HDEL', st, id)
                        redis.call('ZREM', dl, m)
                        redis.call('HDEL', meta_key, m)
                        redis.call('ZREM', KEYS[4], m)
                        redis.call('SET', p .. ':gone:' .. svc .. ':' .. id, '1', 'PX', ARGV[2])
                        changed[svc] = true
                      else
                        redis.call('ZREM', dl, m)
                      end
                    end
                  end
                  for svc, _ in pairs(changed) do redis.call('PUBLISH', KEYS[3], svc) end
                  return {#due, now, beats}",
            ),
        })
    }

    /// Held around "write Redis, apply to the mirror" and "read Redis, apply to the mirror".
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.sync.lock().await
    }

    fn k_services(&self) -> String {
        format!("{}:services", self.prefix)
    }
    fn k_svc(&self, service: &str) -> String {
        format!("{}:svc:{service}", self.prefix)
    }
    fn k_status(&self, service: &str) -> String {
        format!("{}:status:{service}", self.prefix)
    }
    fn k_hb(&self, service: &str, id: &str) -> String {
        format!("{}:hb:{service}:{id}", self.prefix)
    }
    fn k_deadlines(&self) -> String {
        format!("{}:deadlines", self.prefix)
    }
    fn k_ttls(&self) -> String {
        format!("{}:ttls", self.prefix)
    }
    fn k_beats(&self) -> String {
        format!("{}:beats", self.prefix)
    }
    /// The member of an instance in `P:deadlines`, `P:ttls` and `P:beats` (`/` is in neither name).
    fn member(service: &str, id: &str) -> String {
        format!("{service}/{id}")
    }
    fn k_lease(&self, service: &str, id: &str) -> String {
        format!("{}:lease:{service}:{id}", self.prefix)
    }
    fn k_gone(&self, service: &str, id: &str) -> String {
        format!("{}:gone:{service}:{id}", self.prefix)
    }
    fn k_epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn stored_json(known: &Known) -> Result<String, RegistryError> {
        serde_json::to_string(&Stored {
            registration: known.reg.clone(),
            generation: known.generation.to_string(),
        })
        .map_err(store_err)
    }

    fn ttl_of(reg: &Registration) -> Option<Duration> {
        match reg.check.as_ref().map(|c| &c.kind) {
            Some(crate::model::CheckKind::Ttl { ttl }) => Some(*ttl),
            _ => None,
        }
    }

    /// `ttl_ms|deregister_after_ms` of a TTL instance (`P:ttls`); `None` for other checks.
    pub(crate) fn ttl_meta(reg: &Registration) -> Option<String> {
        let ttl = Self::ttl_of(reg)?;
        let after = reg
            .check
            .as_ref()
            .and_then(|c| c.deregister_critical_after)
            .map(|a| millis_u64(a).to_string())
            .unwrap_or_default();
        Some(format!("{}|{after}", millis_u64(ttl).max(1)))
    }

    /// Writes a (new generation of an) instance and announces it.
    pub(crate) async fn put(
        &self,
        service: &str,
        id: &str,
        known: &Known,
    ) -> Result<(), RegistryError> {
        let ttl_ms = Self::ttl_of(&known.reg)
            .map(|t| millis_u64(t).max(1).to_string())
            .unwrap_or_default();
        let mut inv = self.put_script.prepare_invoke();
        inv.key(self.k_svc(service))
            .key(self.k_status(service))
            .key(self.k_services())
            .key(self.k_gone(service, id))
            .key(self.k_hb(service, id))
            .key(self.channel())
            .key(self.k_ttls())
            .key(self.k_deadlines())
            .key(self.k_beats())
            .arg(id)
            .arg(Self::stored_json(known)?)
            .arg(status_value(
                known.generation,
                known.status,
                known.last_check,
            ))
            .arg(service)
            .arg(ttl_ms)
            .arg(Self::ttl_meta(&known.reg).unwrap_or_default())
            .arg(Self::member(service, id));
        let _: i64 = bounded(inv.invoke_async(&mut self.conn())).await?;
        Ok(())
    }

    /// Re-creates an instance if Redis lost it (data loss repair); keeps what is there otherwise.
    ///
    /// A restore (`force` false) leaves out an instance deregistered since the
    /// loss (its tombstone is still there) and returns false for it; a client's
    /// re-registration (`force` true) removes the tombstone and always writes.
    pub(crate) async fn ensure(
        &self,
        service: &str,
        id: &str,
        known: &Known,
        force: bool,
    ) -> Result<bool, RegistryError> {
        // A deadline is only re-created for an instance that was passing (a grace
        // of one TTL), and never moved: a restore or a re-registration with the
        // same body is not a heartbeat, and must not turn a dead TTL instance
        // passing again (as the memory store does not either). A restored
        // critical instance with `deregister_critical_after` gets that long.
        let after = known
            .reg
            .check
            .as_ref()
            .and_then(|c| c.deregister_critical_after);
        let hb_ms = match Self::ttl_of(&known.reg) {
            Some(ttl) if known.status == Status::Passing => millis_u64(ttl).max(1).to_string(),
            Some(_) => after
                .map(|a| millis_u64(a).max(1).to_string())
                .unwrap_or_default(),
            None => String::new(),
        };
        let renew_ms = match Self::ttl_of(&known.reg) {
            Some(ttl) if known.status == Status::Passing => millis_u64(ttl).max(1).to_string(),
            _ => String::new(),
        };
        let mut inv = self.ensure_script.prepare_invoke();
        inv.key(self.k_svc(service))
            .key(self.k_status(service))
            .key(self.k_services())
            .key(self.k_hb(service, id))
            .key(self.k_gone(service, id))
            .key(self.channel())
            .key(self.k_deadlines())
            .key(self.k_ttls())
            .arg(id)
            .arg(Self::stored_json(known)?)
            .arg(status_value(
                known.generation,
                known.status,
                known.last_check,
            ))
            .arg(service)
            .arg(hb_ms)
            .arg(if force { "1" } else { "0" })
            .arg(Self::ttl_meta(&known.reg).unwrap_or_default())
            .arg(renew_ms)
            .arg(Self::member(service, id));
        let n: i64 = bounded(inv.invoke_async(&mut self.conn())).await?;
        Ok(n >= 0)
    }

    /// Removes an instance (only the given generation when one is given).
    pub(crate) async fn delete(
        &self,
        service: &str,
        id: &str,
        generation: Option<u64>,
    ) -> Result<bool, RegistryError> {
        let mut inv = self.delete_script.prepare_invoke();
        inv.key(self.k_svc(service))
            .key(self.k_status(service))
            .key(self.k_hb(service, id))
            .key(self.k_lease(service, id))
            .key(self.channel())
            .key(self.k_gone(service, id))
            .key(self.k_deadlines())
            .key(self.k_ttls())
            .key(self.k_beats())
            .arg(id)
            .arg(generation.map(|g| g.to_string()).unwrap_or_default())
            .arg(service)
            .arg(millis_u64(self.tombstone).max(1))
            .arg(Self::member(service, id));
        let n: i64 = bounded(inv.invoke_async(&mut self.conn())).await?;
        Ok(n > 0)
    }

    /// Stores a status decided by this process's check (if the generation still matches).
    pub(crate) async fn set_status(
        &self,
        service: &str,
        id: &str,
        generation: u64,
        status: Status,
        at: Option<SystemTime>,
    ) -> Result<(), RegistryError> {
        let mut inv = self.status_script.prepare_invoke();
        inv.key(self.k_status(service))
            .key(self.channel())
            .arg(id)
            .arg(generation.to_string())
            .arg(status.as_str())
            .arg(at.map(millis).map(|m| m.to_string()).unwrap_or_default())
            .arg(service)
            .arg("1");
        let _: i64 = bounded(inv.invoke_async(&mut self.conn())).await?;
        Ok(())
    }

    /// Records the time of the latest check without announcing a change: the
    /// other processes pick it up with their next resync (it is not a change of the view).
    pub(crate) async fn touch(
        &self,
        service: &str,
        id: &str,
        generation: u64,
        status: Status,
        at: SystemTime,
    ) -> Result<(), RegistryError> {
        let mut inv = self.status_script.prepare_invoke();
        inv.key(self.k_status(service))
            .key(self.channel())
            .arg(id)
            .arg(generation.to_string())
            .arg(status.as_str())
            .arg(millis(at).to_string())
            .arg(service)
            .arg("0");
        let _: i64 = bounded(inv.invoke_async(&mut self.conn())).await?;
        Ok(())
    }

    /// Renews a TTL heartbeat: moves the deadline, records the heartbeat's
    /// time in `P:beats` (not announced), and turns a critical instance
    /// passing (announced). Returns the recorded time (Redis `TIME`), `None`
    /// when Redis does not hold the instance.
    pub(crate) async fn heartbeat(
        &self,
        service: &str,
        id: &str,
        generation: u64,
        meta: &str,
    ) -> Result<Option<SystemTime>, RegistryError> {
        let mut inv = self.heartbeat_script.prepare_invoke();
        inv.key(self.k_svc(service))
            .key(self.k_status(service))
            .key(self.k_ttls())
            .key(self.k_deadlines())
            .key(self.channel())
            .key(self.k_beats())
            .arg(id)
            .arg(Self::member(service, id))
            .arg(service)
            .arg(generation.to_string())
            .arg(meta);
        let (code, at): (i64, u64) = bounded(inv.invoke_async(&mut self.conn())).await?;
        Ok((code > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(at)))
    }

    /// Handles every expired TTL deadline (see the module docs). With
    /// `beats_since` (Redis `TIME`, ms), also reads the heartbeat times
    /// recorded since then, in the same call.
    pub(crate) async fn scan_expired(
        &self,
        beats_since: Option<u64>,
    ) -> Result<Scan, RegistryError> {
        let mut inv = self.scan_script.prepare_invoke();
        inv.key(self.k_deadlines())
            .key(self.k_ttls())
            .key(self.channel())
            .key(self.k_beats())
            .arg(&self.prefix)
            .arg(millis_u64(self.tombstone).max(1))
            .arg(SCAN_BATCH)
            .arg(beats_since.map(|ms| ms.to_string()).unwrap_or_default());
        let (due, now, flat): (i64, u64, Vec<String>) =
            bounded(inv.invoke_async(&mut self.conn())).await?;
        let beats = flat
            .chunks_exact(2)
            .filter_map(|pair| {
                let (service, id) = pair[0].split_once('/')?;
                // Scores are whole milliseconds; Redis may print them as floats.
                let ms = pair[1].parse::<f64>().ok()?;
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0.0) as u64);
                Some((service.to_owned(), id.to_owned(), at))
            })
            .collect();
        Ok(Scan {
            due: usize::try_from(due).unwrap_or(0),
            now,
            beats,
        })
    }

    /// Scans expired deadlines and, on the first call of a round, applies the
    /// heartbeats recorded since the previous round to the mirror; returns
    /// how many deadlines were due.
    async fn scan_round(&self, inner: &Inner, first: bool) -> Result<usize, RegistryError> {
        if !first {
            return Ok(self.scan_expired(None).await?.due);
        }
        // Held from the read to the cursor's move: a full resync resets the
        // cursor under it, so that reset is never overwritten by an older
        // scan, and a time read before a re-registration (which removes it)
        // is applied before the mirror learns of the new registration, never
        // onto it.
        let _sync = self.sync.lock().await;
        let since = *self.beats_since.lock();
        let scan = self.scan_expired(Some(since)).await?;
        inner.apply_heartbeats(scan.beats);
        *self.beats_since.lock() = scan.now;
        Ok(scan.due)
    }

    /// Acquires or renews the lease on an instance's check.
    pub(crate) async fn lease(&self, service: &str, id: &str, hold: Duration) -> bool {
        let mut inv = self.lease_script.prepare_invoke();
        inv.key(self.k_lease(service, id))
            .arg(&self.node)
            .arg(millis_u64(hold).max(1));
        let owned = matches!(
            bounded(inv.invoke_async::<i64>(&mut self.conn())).await,
            Ok(1)
        );
        let key = (service.to_owned(), id.to_owned());
        let mut leases = self.leases.lock();
        if owned {
            leases.insert(key, tokio::time::Instant::now() + hold);
        } else {
            leases.remove(&key);
        }
        owned
    }

    pub(crate) fn leases_held(&self) -> usize {
        let now = tokio::time::Instant::now();
        self.leases
            .lock()
            .values()
            .filter(|&&until| until > now)
            .count()
    }

    pub(crate) async fn release_leases(&self) {
        let held: Vec<(String, String)> = self.leases.lock().drain().map(|(k, _)| k).collect();
        for (service, id) in held {
            let mut inv = self.release_script.prepare_invoke();
            inv.key(self.k_lease(&service, &id)).arg(&self.node);
            let _ = bounded(inv.invoke_async::<i64>(&mut self.conn())).await;
        }
    }

    async fn read_service(&self, service: &str) -> Result<BTreeMap<String, Record>, RegistryError> {
        // The epoch is read in the same transaction: a read from a Redis that lost
        // its data (and was not restored yet) must not empty the mirror.
        let (epoch, regs, statuses): (
            Option<String>,
            HashMap<String, String>,
            HashMap<String, String>,
        ) = bounded(
            redis::pipe()
                .atomic()
                .get(self.k_epoch())
                .hgetall(self.k_svc(service))
                .hgetall(self.k_status(service))
                .query_async(&mut self.conn()),
        )
        .await?;
        if epoch != *self.epoch.lock() {
            return Err(RegistryError::Store(
                "redis epoch changed (data lost?); waiting for the full resync".into(),
            ));
        }
        let mut out = BTreeMap::new();
        for (id, json) in regs {
            let stored: Stored = match serde_json::from_str(&json) {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(service, id, %error, "skipping unreadable instance record");
                    continue;
                }
            };
            let Ok(generation) = stored.generation.parse::<u64>() else {
                continue;
            };
            let mut status = initial_status(&stored.registration);
            let mut last_check = None;
            if let Some(value) = statuses.get(&id) {
                let mut parts = value.splitn(3, '|');
                let g = parts.next().and_then(|g| g.parse::<u64>().ok());
                let s = parts.next();
                let l = parts.next().and_then(|l| l.parse::<u64>().ok());
                if g == Some(generation) {
                    status = match s {
                        Some("passing") => Status::Passing,
                        Some("warning") => Status::Warning,
                        _ => Status::Critical,
                    };
                    last_check = l.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
                }
            }
            out.insert(
                id,
                Record {
                    registration: stored.registration,
                    generation,
                    status,
                    last_check,
                },
            );
        }
        Ok(out)
    }

    /// Re-reads one service and applies it to the mirror.
    pub(crate) async fn resync_service(
        &self,
        inner: &Arc<Inner>,
        service: &str,
    ) -> Result<(), RegistryError> {
        if crate::validate::service_name(service).is_err() {
            return Ok(());
        }
        let _sync = self.sync.lock().await;
        let records = self.read_service(service).await?;
        inner.apply_records(service, records);
        Ok(())
    }

    /// Re-reads everything; repairs Redis from the mirror if Redis lost its data.
    pub(crate) async fn resync_all(&self, inner: &Arc<Inner>) -> Result<(), RegistryError> {
        let candidate = format!("{}-{}", self.node, millis(SystemTime::now()));
        let created: bool = bounded(self.conn().set_nx(self.k_epoch(), &candidate)).await?;
        let current: Option<String> = if created {
            Some(candidate)
        } else {
            bounded(self.conn().get(self.k_epoch())).await?
        };
        let previous = self.epoch.lock().clone();
        // A different epoch than the one we saw means Redis lost its data since
        // (whoever noticed first created a new one); every process restores what it knows.
        if previous.is_some() && previous != current {
            // Redis is empty (first start, or it restarted without our data): put back what we know.
            let mut restored = 0usize;
            for service in inner.slot_names() {
                if let Some(slot) = inner.existing_slot(&service) {
                    for (id, known) in inner.known(&slot) {
                        if self.ensure(&service, &id, &known, false).await? {
                            restored += 1;
                        }
                    }
                }
            }
            if restored > 0 {
                tracing::warn!(
                    restored,
                    "redis lost the registry; restored it from this process's view"
                );
            }
        }
        // Only now: a restore that failed half-way is retried by the next resync.
        *self.epoch.lock() = current;
        let names: Vec<String> = bounded(self.conn().smembers(self.k_services())).await?;
        let mut all: Vec<String> = inner.slot_names();
        all.extend(names);
        all.sort();
        all.dedup();
        for service in all {
            self.resync_service(inner, &service).await?;
        }
        // The next scan re-reads every heartbeat time: one this process missed
        // (it did not know the instance yet, or Redis's clock went back) shows
        // up within a resync interval.
        let _sync = self.sync.lock().await;
        *self.beats_since.lock() = 0;
        Ok(())
    }
}

fn millis_u64(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Starts the mirror: an initial full read, the notification subscriber and the periodic resync.
pub(crate) async fn start(registry: &Registry) -> Result<(), RegistryError> {
    let inner = Arc::clone(&registry.inner);
    let Store::Redis(store) = &inner.store else {
        return Ok(());
    };
    store.resync_all(&inner).await?;
    let weak = Arc::downgrade(&inner);
    let cancel = inner.cancel.clone();
    let client = store.client.clone();
    let channel = store.channel();
    let every = inner.opts.resync_interval;
    let sub_weak = weak.clone();
    let sub_cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = sub_cancel.cancelled() => {}
            () = subscriber(sub_weak, client, channel) => {}
        }
    });
    let scan_weak = weak.clone();
    let scan_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SCAN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = scan_cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(inner) = scan_weak.upgrade() else {
                return;
            };
            let Store::Redis(store) = &inner.store else {
                return;
            };
            // A full batch: more are due, scan again at once.
            let mut first = true;
            loop {
                let round = store.scan_round(&inner, first).await;
                first = false;
                match round {
                    Ok(n) if n >= SCAN_BATCH => {}
                    Ok(_) => break,
                    Err(error) => {
                        tracing::debug!(%error, "registry ttl scan failed; will retry");
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            if let Store::Redis(store) = &inner.store
                && let Err(error) = store.resync_all(&inner).await
            {
                tracing::warn!(%error, "registry resync failed; will retry");
            }
        }
    });
    Ok(())
}

/// Follows change notifications; after every (re)subscription, resynchronises everything.
async fn subscriber(weak: std::sync::Weak<Inner>, client: redis::Client, channel: String) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let pubsub = async {
            let mut ps = tokio::time::timeout(OP_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(store_err)?
                .map_err(store_err)?;
            tokio::time::timeout(OP_TIMEOUT, ps.subscribe(&channel))
                .await
                .map_err(store_err)?
                .map_err(store_err)?;
            Ok::<_, RegistryError>(ps)
        }
        .await;
        match pubsub {
            Ok(ps) => {
                backoff = Duration::from_millis(50);
                {
                    let Some(inner) = weak.upgrade() else { return };
                    if let Store::Redis(store) = &inner.store
                        && let Err(error) = store.resync_all(&inner).await
                    {
                        tracing::warn!(%error, "registry resync after subscribe failed");
                    }
                }
                let mut messages = ps.into_on_message();
                while let Some(msg) = messages.next().await {
                    // Coalesce: every notification already waiting is read
                    // first, and each named service is re-read once (a burst
                    // of changes to one service costs one read, not one each).
                    let mut services = std::collections::BTreeSet::new();
                    services.extend(msg.get_payload::<String>().ok());
                    while let Some(Some(more)) = messages.next().now_or_never() {
                        services.extend(more.get_payload::<String>().ok());
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    let Store::Redis(store) = &inner.store else {
                        return;
                    };
                    for service in services {
                        if let Err(error) = store.resync_service(&inner, &service).await {
                            tracing::warn!(service, %error, "registry resync of one service failed");
                        }
                    }
                }
                tracing::warn!("registry lost its redis subscription; reconnecting");
            }
            Err(error) => {
                tracing::debug!(%error, "registry cannot subscribe to redis yet");
            }
        }
        if weak.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
