//! Once-a-second samples of the gateway's state, and the bounded history of
//! every series the dashboard draws.
//!
//! Counters are cumulative; the sampler keeps the previous reading of each and
//! turns the difference into a rate. Latency quantiles come from the
//! difference of the route's histogram buckets over the last second,
//! interpolated within the bucket like Prometheus' `histogram_quantile`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::Serialize;
use switchboard_bus::stats::{GroupStats, RecentEvent, StatsSnapshot};

use super::{Transition, Transitions};
use crate::metrics::{BUCKETS, RouteTotals};
use crate::proxy::Gateway;

/// Latest events sent in every frame (the search reaches the whole ring).
const TAIL: usize = 25;
/// Points kept per instance latency sparkline (one per second).
const INSTANCE_POINTS: usize = 60;

/// What one sample reads.
pub struct Input<'a> {
    /// The engine.
    pub gw: &'a Gateway,
    /// The registry, when the dashboard was given one.
    pub registry: Option<&'a switchboard_registry::Registry>,
    /// The bus statistics, when the dashboard was given a bus.
    pub bus: Option<StatsSnapshot>,
    /// The bus URL without credentials.
    pub bus_url: Option<String>,
    /// The store URL without credentials.
    pub store_url: Option<String>,
    /// Breaker transitions.
    pub transitions: &'a Transitions,
    /// Whether the stream needs a token (shown on the page).
    pub token_required: bool,
}

/// One frame of the stream: the current state and the newest point of every series.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    /// Sample time, ms since the Unix epoch.
    pub t: u64,
    /// Seconds covered by the rates (time since the previous sample).
    pub dt: f64,
    /// What the page shows in its header.
    pub info: Info,
    /// Services and their instances, by name.
    pub services: Vec<ServiceRow>,
    /// Every breaker (route, instance).
    pub breakers: Vec<BreakerRow>,
    /// Breaker transitions in the history window, oldest first.
    pub transitions: Vec<Transition>,
    /// Per-route traffic over the last second.
    pub routes: Vec<RouteRow>,
    /// The bus, when the dashboard has one.
    pub bus: Option<BusRow>,
}

/// Header facts.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// Bus URL (no credentials).
    pub bus: Option<String>,
    /// Registry store URL (no credentials).
    pub store: Option<String>,
    /// Whether the stream asks for a token.
    pub token_required: bool,
    /// The gateway's version.
    pub version: &'static str,
}

/// A service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    /// Its name.
    pub name: String,
    /// Its instances, by id.
    pub instances: Vec<InstanceRow>,
}

/// An instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceRow {
    /// Registry id.
    pub id: String,
    /// `IP:PORT`.
    pub addr: String,
    /// `passing`, `warning` or `critical`.
    pub status: &'static str,
    /// Registered version, when known.
    pub version: Option<String>,
    /// When the instance last proved alive or not, ms since the Unix epoch:
    /// its latest active check or, for a TTL check, the latest heartbeat the
    /// registry accepted, whichever is later. `None` before either.
    pub last_check: Option<u64>,
    /// What `last_check` is: `probe` (an active check) or `heartbeat` (a TTL
    /// heartbeat).
    pub last_check_by: Option<&'static str>,
    /// Mean latency of the gateway's requests it answered in the last second.
    pub latency_ms: Option<f64>,
    /// Requests per second it answered.
    pub rps: f64,
}

/// A breaker.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerRow {
    /// Route prefix.
    pub route: String,
    /// Service.
    pub service: String,
    /// Instance id.
    pub instance: String,
    /// Instance address.
    pub addr: String,
    /// `closed`, `open`, `half_open`, ...
    pub state: &'static str,
    /// Calls in the window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failed: u64,
    /// Failure rate in the window.
    pub failure_rate: f64,
    /// For an open breaker, ms until it admits probes.
    pub retry_after_ms: Option<u64>,
}

/// A route's traffic over the last second.
#[derive(Debug, Clone, Serialize)]
pub struct RouteRow {
    /// Prefix.
    pub route: String,
    /// Service.
    pub service: String,
    /// Requests per second.
    pub rps: f64,
    /// Share of 5xx answers (0..1).
    pub error_rate: f64,
    /// Median latency in ms (none without requests).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in ms.
    pub p99_ms: Option<f64>,
    /// Requests answered since start.
    pub total: u64,
}

/// The bus.
#[derive(Debug, Clone, Serialize)]
pub struct BusRow {
    /// Per topic: events per second over the last second, and the total.
    pub topics: Vec<TopicRow>,
    /// Per group: counters and lag.
    pub groups: Vec<GroupStats>,
    /// Sum of the groups' redeliveries.
    pub redelivered: u64,
    /// Sum of the groups' dead letters.
    pub dead_lettered: u64,
    /// The latest events, newest first.
    pub recent: Vec<RecentEvent>,
}

/// A topic's rate.
#[derive(Debug, Clone, Serialize)]
pub struct TopicRow {
    /// Topic.
    pub topic: String,
    /// Events per second.
    pub rate: f64,
    /// Events since the tap started.
    pub published: u64,
}

/// A time series bounded in length: `(t ms, value)` points.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Series(VecDeque<(u64, Option<f64>)>);

impl Series {
    fn push(&mut self, cap: usize, t: u64, v: Option<f64>) {
        if self.0.len() >= cap {
            self.0.pop_front();
        }
        self.0.push_back((t, v.map(round3)));
    }

    /// The points, oldest first.
    pub fn points(&self) -> impl Iterator<Item = &(u64, Option<f64>)> {
        self.0.iter()
    }

    /// How many points.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The last `cap` seconds of every series, sent to a client when it connects.
#[derive(Debug, Clone, Default, Serialize)]
pub struct History {
    /// Per route prefix: `rps`, `err`, `p50`, `p99`.
    pub routes: BTreeMap<String, BTreeMap<&'static str, Series>>,
    /// Per topic: events per second.
    pub topics: BTreeMap<String, Series>,
    /// Per `service/instance`: mean latency (last `INSTANCE_POINTS` seconds).
    pub instances: BTreeMap<String, Series>,
}

/// The sampler's memory: previous counter readings and the history.
#[derive(Debug)]
pub struct Sampler {
    cap: usize,
    last_t: Option<u64>,
    /// Previous totals per route series (keyed by its address: series live
    /// as long as the process, and a reload keeps a route's series).
    routes: HashMap<usize, RouteTotals>,
    topics: HashMap<String, u64>,
    history: History,
}

/// The `q` quantile (0..1) in ms of the requests counted in `buckets`
/// (per-bucket counts of [`BUCKETS`]) out of `count`; requests above the
/// last bucket count as its bound. `None` for no requests.
pub fn quantile_ms(q: f64, buckets: &[u64; 14], count: u64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * count as f64;
    let mut cum = 0u64;
    let mut lower = 0.0;
    for (n, bound) in buckets.iter().zip(BUCKETS) {
        let upper = bound * 1000.0;
        if *n > 0 && (cum + n) as f64 >= rank {
            let frac = ((rank - cum as f64) / *n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * frac);
        }
        cum += n;
        lower = upper;
    }
    Some(BUCKETS[BUCKETS.len() - 1] * 1000.0)
}

fn delta(now: &RouteTotals, before: &RouteTotals) -> RouteTotals {
    let mut d = RouteTotals::default();
    for i in 0..5 {
        d.status[i] = now.status[i].saturating_sub(before.status[i]);
    }
    for i in 0..14 {
        d.buckets[i] = now.buckets[i].saturating_sub(before.buckets[i]);
    }
    d.count = now.count.saturating_sub(before.count);
    d
}

impl Sampler {
    /// An empty sampler keeping `cap` seconds of history.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            last_t: None,
            routes: HashMap::new(),
            topics: HashMap::new(),
            history: History::default(),
        }
    }

    /// The history, as the page reads it.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The history as JSON (sent to each new client).
    pub fn history_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.history).unwrap_or(serde_json::Value::Null)
    }

    /// Reads everything once at `now` (ms) and appends to the history.
    pub fn sample(&mut self, input: &Input<'_>, now: u64) -> Frame {
        let dt = self
            .last_t
            .map_or(1.0, |t| (now.saturating_sub(t) as f64 / 1000.0).max(0.001));
        let first = self.last_t.is_none();
        self.last_t = Some(now);
        let gw = input.gw;

        // Routes.
        let routing = gw.routing();
        let mut routes = Vec::new();
        for r in routing.table.routes() {
            let series = routing.states[r.index].series;
            let totals = series.totals();
            let key = std::ptr::from_ref(series) as usize;
            let before = self.routes.insert(key, totals).unwrap_or(totals);
            let d = if first {
                RouteTotals::default()
            } else {
                delta(&totals, &before)
            };
            let answered: u64 = d.status.iter().sum();
            let row = RouteRow {
                route: r.config.prefix.clone(),
                service: r.config.service.clone(),
                rps: round3(answered as f64 / dt),
                error_rate: if answered == 0 {
                    0.0
                } else {
                    round3(d.status[4] as f64 / answered as f64)
                },
                p50_ms: quantile_ms(0.5, &d.buckets, d.count).map(round3),
                p99_ms: quantile_ms(0.99, &d.buckets, d.count).map(round3),
                total: totals.status.iter().sum(),
            };
            let h = self.history.routes.entry(row.route.clone()).or_default();
            for (k, v) in [
                ("rps", Some(row.rps)),
                ("err", Some(row.error_rate)),
                ("p50", row.p50_ms),
                ("p99", row.p99_ms),
            ] {
                h.entry(k).or_default().push(self.cap, now, v);
            }
            routes.push(row);
        }

        // Breakers, and the addresses the gateway knows per service.
        let mut breakers = Vec::new();
        let mut known: BTreeMap<String, BTreeMap<String, (SocketAddr, &'static str)>> =
            BTreeMap::new();
        for r in routing.table.routes() {
            let snap = routing.states[r.index].upstreams.current.load();
            let svc = known.entry(r.config.service.clone()).or_default();
            for i in &snap.all {
                svc.insert(i.id.clone(), (i.addr, i.status.as_str()));
            }
            for u in &snap.passing {
                let b = u.breaker.snapshot();
                breakers.push(BreakerRow {
                    route: r.config.prefix.clone(),
                    service: r.config.service.clone(),
                    instance: u.id.clone(),
                    addr: u.addr.to_string(),
                    state: b.state.as_str(),
                    calls: b.calls,
                    failed: b.failed_calls,
                    failure_rate: round3(b.failure_rate),
                    retry_after_ms: b
                        .retry_after
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                });
            }
        }

        // Services: the registry's view when there is one (versions, last
        // checks, services no route uses), else what discovery gave the routes.
        let latency = gw.access.ring().take_latency();
        let mut services = Vec::new();
        match input.registry {
            Some(reg) => {
                for s in reg.services() {
                    // A fresh snapshot: the lock-free view keeps the check
                    // times of its last change only.
                    let view = reg.snapshot(&s.service);
                    if view.instances.is_empty() {
                        continue;
                    }
                    let heartbeats = reg.heartbeats(&s.service);
                    let instances = view
                        .instances
                        .iter()
                        .map(|i| {
                            let (last_check, last_check_by) =
                                last_check(i.last_check, heartbeats.get(&i.id).copied());
                            InstanceRow {
                                id: i.id.clone(),
                                addr: i.host_port(),
                                status: i.status.as_str(),
                                version: i.version.as_ref().map(ToString::to_string),
                                last_check,
                                last_check_by,
                                latency_ms: None,
                                rps: 0.0,
                            }
                        })
                        .collect();
                    services.push((
                        i_addrs(&view.instances),
                        ServiceRow {
                            name: s.service.clone(),
                            instances,
                        },
                    ));
                }
            }
            None => {
                for (name, list) in &known {
                    let addrs = list.values().map(|(a, _)| Some(*a)).collect();
                    let instances = list
                        .iter()
                        .map(|(id, (addr, status))| InstanceRow {
                            id: id.clone(),
                            addr: addr.to_string(),
                            status,
                            version: None,
                            last_check: None,
                            last_check_by: None,
                            latency_ms: None,
                            rps: 0.0,
                        })
                        .collect();
                    services.push((
                        addrs,
                        ServiceRow {
                            name: name.clone(),
                            instances,
                        },
                    ));
                }
            }
        }
        let services: Vec<ServiceRow> = services
            .into_iter()
            .map(|(addrs, mut row)| {
                for (inst, addr) in row.instances.iter_mut().zip(addrs) {
                    if let Some((n, sum_us)) = addr.and_then(|a| latency.get(&a))
                        && *n > 0
                    {
                        inst.latency_ms = Some(round3(*sum_us as f64 / *n as f64 / 1000.0));
                        inst.rps = round3(*n as f64 / dt);
                    }
                    let key = format!("{}/{}", row.name, inst.id);
                    self.history.instances.entry(key).or_default().push(
                        INSTANCE_POINTS,
                        now,
                        inst.latency_ms,
                    );
                }
                row
            })
            .collect();

        // The bus.
        let bus = input.bus.as_ref().map(|snap| {
            let topics = snap
                .topics
                .iter()
                .map(|t| {
                    let before = self.topics.insert(t.topic.clone(), t.published);
                    let rate = match before {
                        Some(b) if !first => round3(t.published.saturating_sub(b) as f64 / dt),
                        _ => 0.0,
                    };
                    self.history
                        .topics
                        .entry(t.topic.clone())
                        .or_default()
                        .push(self.cap, now, Some(rate));
                    TopicRow {
                        topic: t.topic.clone(),
                        rate,
                        published: t.published,
                    }
                })
                .collect();
            BusRow {
                topics,
                groups: snap.groups.clone(),
                redelivered: snap.groups.iter().map(|g| g.redelivered).sum(),
                dead_lettered: snap.groups.iter().map(|g| g.dead_lettered).sum(),
                recent: snap.recent.iter().take(TAIL).cloned().collect(),
            }
        });

        // Forget series of things that are gone (no point in the window).
        let horizon = now.saturating_sub(self.cap as u64 * 1000);
        self.history.instances.retain(|_, s| {
            s.points()
                .last()
                .is_some_and(|(t, _)| *t >= now.saturating_sub(INSTANCE_POINTS as u64 * 1000))
        });
        self.history
            .topics
            .retain(|_, s| s.points().last().is_some_and(|(t, _)| *t >= horizon));

        Frame {
            t: now,
            dt: round3(dt),
            info: Info {
                bus: input.bus_url.clone(),
                store: input.store_url.clone(),
                token_required: input.token_required,
                version: env!("CARGO_PKG_VERSION"),
            },
            services,
            breakers,
            transitions: input.transitions.since(horizon),
            routes,
            bus,
        }
    }
}

/// The later of an active check and a TTL heartbeat, in ms since the Unix
/// epoch, and which one it was.
fn last_check(
    probe: Option<SystemTime>,
    heartbeat: Option<SystemTime>,
) -> (Option<u64>, Option<&'static str>) {
    let ms = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    };
    match (probe, heartbeat) {
        (Some(p), Some(h)) if h > p => (ms(h), Some("heartbeat")),
        (Some(p), _) => (ms(p), Some("probe")),
        (None, Some(h)) => (ms(h), Some("heartbeat")),
        (None, None) => (None, None),
    }
}

fn i_addrs(list: &[switchboard_registry::Instance]) -> Vec<Option<SocketAddr>> {
    list.iter()
        .map(switchboard_registry::Instance::socket_addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut b = [0u64; 14];
        assert_eq!(quantile_ms(0.5, &b, 0), None);
        // 100 requests between 1 ms and 2.5 ms.
        b[2] = 100;
        let p50 = quantile_ms(0.5, &b, 100).unwrap();
        assert!((p50 - 1.75).abs() < 1e-9, "{p50}");
        let p99 = quantile_ms(0.99, &b, 100).unwrap();
        assert!((p99 - 2.485).abs() < 1e-9, "{p99}");
        // One slow request beyond the last bucket.
        assert_eq!(quantile_ms(0.99, &[0; 14], 1), Some(10_000.0));
    }

    #[test]
    fn last_check_is_the_later_of_probe_and_heartbeat() {
        let at = |ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        assert_eq!(last_check(None, None), (None, None));
        assert_eq!(last_check(Some(at(5)), None), (Some(5), Some("probe")));
        assert_eq!(last_check(None, Some(at(7))), (Some(7), Some("heartbeat")));
        assert_eq!(
            last_check(Some(at(9)), Some(at(7))),
            (Some(9), Some("probe"))
        );
        assert_eq!(
            last_check(Some(at(5)), Some(at(7))),
            (Some(7), Some("heartbeat"))
        );
    }

    #[test]
    fn series_are_bounded() {
        let mut s = Series::default();
        for t in 0..500 {
            s.push(300, t, Some(t as f64));
        }
        assert_eq!(s.len(), 300);
        assert_eq!(s.points().next(), Some(&(200, Some(200.0))));
    }

    proptest! {
        #[test]
        fn quantiles_are_monotone_and_bounded(
            counts in proptest::array::uniform14(0u64..1000),
            over in 0u64..100,
            q1 in 0.0f64..1.0,
            q2 in 0.0f64..1.0,
        ) {
            let count = counts.iter().sum::<u64>() + over;
            let (lo, hi) = if q1 <= q2 { (q1, q2) } else { (q2, q1) };
            match (quantile_ms(lo, &counts, count), quantile_ms(hi, &counts, count)) {
                (None, None) => prop_assert_eq!(count, 0),
                (Some(a), Some(b)) => {
                    prop_assert!(a <= b + 1e-9, "{} > {}", a, b);
                    prop_assert!((0.0..=10_000.0).contains(&a) && b <= 10_000.0);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
