//! A soak of the whole shop under faults (issue 8): concurrent clients send
//! mixed traffic through the gateway while service instances are killed like
//! a crash and restarted, payments decline in bursts and, given a [`Broker`],
//! the bus's redis-server gets SIGKILL and a restart. Then the shop settles
//! and [`soak`] counts: every order the API accepted must have ended
//! `confirmed` or `cancelled`, no order may be stuck, and stock and money
//! must add up.
//!
//! `switchboard bench chaos shop` runs it for minutes;
//! `demo/shop/tests/soak.rs` runs the short version in CI.
//!
//! ```text
//! clients (POST /users, POST /orders with Idempotency-Key and retries,
//!          GET /orders/{id}, GET /inventory/{sku})
//!     -> gateway -> 2 instances of each service (one killed every ~kill_every)
//!                   -> bus (redis-server killed every broker_kill_every)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

use crate::DemoHandle;
use crate::inventory::CATALOGUE;
use crate::orders::{Order, Status};
use crate::payments::{Faults, Payment};

/// The message broker behind the bus, which the soak kills and restarts.
pub trait Broker: Send {
    /// Kills the broker like a crash (SIGKILL).
    fn kill(&mut self);
    /// Starts it again on the same address and data; returns once it accepts connections.
    fn restart(&mut self) -> anyhow::Result<()>;
}

/// What the soak does.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the traffic runs.
    pub duration: Duration,
    /// Concurrent closed-loop clients.
    pub clients: usize,
    /// Pause of each client between two requests.
    pub think: Duration,
    /// Mean time between two instance kills (each kill waits 0.5 to 1.5 times this).
    pub kill_every: Duration,
    /// How long a killed instance stays down before its restart.
    pub down_for: Duration,
    /// Time between two broker kills (`None`: the broker is never killed).
    pub broker_kill_every: Option<Duration>,
    /// How long the broker stays down.
    pub broker_down_for: Duration,
    /// Time between two payment-decline bursts (`payments` fails every
    /// payment for one second), so that some orders end cancelled after
    /// their stock was reserved.
    pub decline_every: Duration,
    /// Share of orders asking for more than the stock (cancelled by inventory), 0 to 1.
    pub out_of_stock_share: f64,
    /// Share of orders placed without `Idempotency-Key`, 0 to 1: sent once,
    /// never retried (neither the client nor the gateway may repeat them).
    pub keyless_share: f64,
    /// Longest wait, after the traffic stops, for every order to end.
    pub settle: Duration,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(60),
            clients: 8,
            think: Duration::from_millis(5),
            kill_every: Duration::from_secs(3),
            down_for: Duration::from_secs(1),
            broker_kill_every: Some(Duration::from_secs(20)),
            broker_down_for: Duration::from_secs(1),
            decline_every: Duration::from_secs(5),
            out_of_stock_share: 0.1,
            keyless_share: 0.1,
            settle: Duration::from_secs(60),
        }
    }
}

/// What the soak measured. `passed` is the verdict; `problems` says why not.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// Seconds of traffic.
    pub seconds: f64,
    /// Concurrent clients.
    pub clients: usize,
    /// Users created (201).
    pub users_created: u64,
    /// Orders the API accepted (201), counted once per Idempotency-Key.
    pub orders_accepted: u64,
    /// Order attempts retried after a 5xx, 409 or transport error (same key).
    pub order_retries: u64,
    /// Orders given up after every retry failed (not accepted: they do not count).
    pub orders_given_up: u64,
    /// Orders without a key that failed (5xx or transport error; not accepted, not retried).
    pub keyless_failed: u64,
    /// Order placements answered 4xx other than 409 (a bug in the client or the shop).
    pub orders_refused: u64,
    /// Reads (`GET /orders/{id}`, `GET /inventory/{sku}`) answered 200.
    pub reads_ok: u64,
    /// Reads that failed (5xx or transport errors, during kills).
    pub reads_failed: u64,
    /// `GET /orders/{id}` of an accepted order answered 404.
    pub accepted_order_not_found: u64,
    /// Service instances killed and restarted.
    pub instance_kills: u64,
    /// Broker SIGKILLs.
    pub broker_kills: u64,
    /// Payment-decline bursts.
    pub decline_bursts: u64,
    /// Seconds from the end of the traffic until every check passed (or the settle limit).
    pub settled_after_s: f64,
    /// Accepted orders that ended `confirmed`.
    pub confirmed: u64,
    /// Accepted orders that ended `cancelled`.
    pub cancelled: u64,
    /// ... of which inventory rejected (out of stock).
    pub cancelled_out_of_stock: u64,
    /// ... of which payments declined (stock given back).
    pub cancelled_payment_failed: u64,
    /// Accepted orders in any other status after settling.
    pub stuck: u64,
    /// Accepted orders the store does not know.
    pub missing: u64,
    /// Orders in the store, accepted or not.
    pub orders_in_store: u64,
    /// Orders in the store per status.
    pub store_by_status: BTreeMap<String, u64>,
    /// Orders in the store that no client got a 201 for (a request cut by a kill).
    pub unaccepted_in_store: u64,
    /// Extra orders for one Idempotency-Key (one client intent placed twice).
    pub duplicate_orders: u64,
    /// Whether every check passed.
    pub passed: bool,
    /// The first problems found (empty when passed).
    pub problems: Vec<String>,
}

/// One accepted order, as its client saw it.
#[derive(Debug, Clone)]
struct Accepted {
    id: String,
    key: String,
}

#[derive(Default)]
struct Shared {
    users: Mutex<Vec<String>>,
    accepted: Mutex<Vec<Accepted>>,
    users_created: AtomicU64,
    order_retries: AtomicU64,
    orders_given_up: AtomicU64,
    keyless_failed: AtomicU64,
    orders_refused: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    not_found: AtomicU64,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One request; `Err` for transport errors and timeouts.
async fn call(
    http: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(b.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let req = req.body(body).map_err(|e| format!("request: {e}"))?;
    let fut = async {
        let res = http.request(req).await.map_err(|e| format!("{e}"))?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body after {status}: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "timed out after 10 s".to_owned())?
}

fn random_key() -> String {
    format!("soak-{:016x}", rand::random::<u64>())
}

/// Creates a user; `None` when the attempt failed (a kill).
async fn create_user(http: &HttpClient, base: &str) -> Option<String> {
    let body = json!({"name": "Soak", "email": "soak@example.com"});
    match call(
        http,
        Method::POST,
        &format!("{base}/users"),
        &[],
        Some(&body),
    )
    .await
    {
        Ok((s, b)) if s == StatusCode::CREATED => serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|u| u["id"].as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Places one order with an Idempotency-Key, retrying with the same key (as a
/// careful client does) until it is accepted, refused, or `until` passes.
/// `keyless`: no key, one attempt (a POST without a key is never repeated).
async fn place_order(
    http: &HttpClient,
    base: &str,
    shared: &Shared,
    user: &str,
    items: serde_json::Value,
    until: Instant,
    keyless: bool,
) {
    let key = random_key();
    // The key doubles as the request id, which the order keeps: the final
    // count finds orders placed twice for one key by it.
    let keyed = [
        ("idempotency-key", key.as_str()),
        ("x-request-id", key.as_str()),
    ];
    let headers = if keyless { &keyed[1..] } else { &keyed[..] };
    let body = json!({"user_id": user, "items": items});
    let url = format!("{base}/orders");
    loop {
        match call(http, Method::POST, &url, headers, Some(&body)).await {
            Ok((s, b)) if s == StatusCode::CREATED => {
                let order: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                if let Some(id) = order["id"].as_str() {
                    shared.accepted.lock().push(Accepted {
                        id: id.to_owned(),
                        key,
                    });
                } else {
                    shared.orders_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(body = %String::from_utf8_lossy(&b), "201 without an order id");
                }
                return;
            }
            Ok((s, b)) if s.is_client_error() && s != StatusCode::CONFLICT => {
                shared.orders_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(status = %s, body = %String::from_utf8_lossy(&b), "order refused");
                return;
            }
            _ if keyless => {
                shared.keyless_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ if Instant::now() >= until => {
                shared.orders_given_up.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ => {
                shared.order_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One closed-loop client until `stop`.
async fn client(
    http: HttpClient,
    base: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    options: SoakOptions,
    huge_qty: u64,
) {
    while !stop.load(Ordering::Relaxed) {
        let dice: f64 = rand::random();
        if dice < 0.05 {
            if let Some(u) = create_user(&http, &base).await {
                shared.users_created.fetch_add(1, Ordering::Relaxed);
                shared.users.lock().push(u);
            }
        } else if dice < 0.55 {
            let user = {
                let users = shared.users.lock();
                users[rand::random_range(0..users.len())].clone()
            };
            let (sku, _) = CATALOGUE[rand::random_range(0..CATALOGUE.len())];
            let qty = if rand::random::<f64>() < options.out_of_stock_share {
                huge_qty
            } else {
                rand::random_range(1..=3)
            };
            let items = json!([{"sku": sku, "qty": qty}]);
            // Retries stop a while after the traffic does.
            let until = Instant::now() + Duration::from_secs(15);
            let keyless = rand::random::<f64>() < options.keyless_share;
            place_order(&http, &base, &shared, &user, items, until, keyless).await;
        } else {
            let path = if dice < 0.8 {
                let id = {
                    let acc = shared.accepted.lock();
                    (!acc.is_empty()).then(|| acc[rand::random_range(0..acc.len())].id.clone())
                };
                match id {
                    Some(id) => format!("/orders/{id}"),
                    None => continue,
                }
            } else {
                let (sku, _) = CATALOGUE[rand::random_range(0..CATALOGUE.len())];
                format!("/inventory/{sku}")
            };
            match call(&http, Method::GET, &format!("{base}{path}"), &[], None).await {
                Ok((s, _)) if s == StatusCode::OK => {
                    shared.reads_ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok((s, _)) if s == StatusCode::NOT_FOUND && path.starts_with("/orders/") => {
                    shared.not_found.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    shared.reads_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !options.think.is_zero() {
            tokio::time::sleep(options.think).await;
        }
    }
}

/// Runs the soak against `shop` (started with a gateway; a durable bus when
/// `broker` is given), calling `progress` with one line per phase.
///
/// Returns an error only when the soak itself could not run (an instance
/// or the broker did not restart); lost or stuck orders are in the report.
#[allow(clippy::too_many_lines)]
pub async fn soak(
    shop: &mut DemoHandle,
    options: &SoakOptions,
    mut broker: Option<&mut dyn Broker>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<SoakReport> {
    for (name, share) in [
        ("out_of_stock_share", options.out_of_stock_share),
        ("keyless_share", options.keyless_share),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "soak option {name} is {share}: it must be a share between 0 and 1"
        );
    }
    anyhow::ensure!(
        options.clients > 0,
        "soak option clients must be at least 1"
    );
    let gateway: SocketAddr = shop
        .gateway_addr()
        .ok_or_else(|| anyhow::anyhow!("the soak needs the shop's gateway"))?;
    let base = format!("http://{gateway}");
    let http: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http();
    let stock = shop.options().stock;
    let shared = Arc::new(Shared::default());
    for _ in 0..4 {
        let user = create_user(&http, &base)
            .await
            .ok_or_else(|| anyhow::anyhow!("could not create a user through {base}"))?;
        shared.users.lock().push(user);
    }
    shared.users_created.store(4, Ordering::Relaxed);

    progress(&format!(
        "shop soak: {} clients for {:.0} s through {gateway}; one instance killed every ~{:.1} s, \
         broker killed every {}, payments decline 1 s in every {:.0} s",
        options.clients,
        options.duration.as_secs_f64(),
        options.kill_every.as_secs_f64(),
        options
            .broker_kill_every
            .map_or("never".to_owned(), |d| format!("{:.0} s", d.as_secs_f64())),
        options.decline_every.as_secs_f64(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..options.clients {
        clients.spawn(client(
            http.clone(),
            base.clone(),
            shared.clone(),
            stop.clone(),
            options.clone(),
            stock + 1,
        ));
    }

    // The fault schedule, one fault at a time.
    let started = Instant::now();
    let until = started + options.duration;
    let jitter = |d: Duration| d.mul_f64(0.5 + rand::random::<f64>());
    let mut next_kill = started + jitter(options.kill_every);
    let mut next_broker = options.broker_kill_every.map(|d| started + d);
    let mut next_decline = started + options.decline_every;
    let (mut kills, mut broker_kills, mut declines) = (0u64, 0u64, 0u64);
    let payments = shop.data().payments.clone();
    loop {
        let next = [Some(next_kill), next_broker, Some(next_decline)]
            .into_iter()
            .flatten()
            .min()
            .expect("at least one fault");
        if next >= until {
            tokio::time::sleep_until(until.into()).await;
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        if next == next_decline {
            payments.set_faults(Faults {
                fail: true,
                delay_ms: 0,
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
            payments.set_faults(Faults::default());
            declines += 1;
            next_decline = Instant::now() + options.decline_every;
        } else if Some(next) == next_broker {
            let Some(b) = broker.as_deref_mut() else {
                next_broker = None;
                continue;
            };
            tokio::task::block_in_place(|| b.kill());
            broker_kills += 1;
            tokio::time::sleep(options.broker_down_for).await;
            tokio::task::block_in_place(|| b.restart())?;
            next_broker = options.broker_kill_every.map(|d| Instant::now() + d);
        } else {
            let instances = shop.instances();
            let (_, victim, _) = instances[rand::random_range(0..instances.len())].clone();
            shop.kill_instance(&victim)?;
            kills += 1;
            tokio::time::sleep(options.down_for).await;
            restart(shop, &victim).await?;
            next_kill = Instant::now() + jitter(options.kill_every);
        }
    }
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    payments.set_faults(Faults::default());
    let accepted = shared.accepted.lock().clone();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    progress(&format!(
        "traffic: {} orders accepted ({} retries, {} given up, {} refused, {} keyless failed), {} users, \
         {} reads ok, {} reads failed; {kills} instance kills, {broker_kills} broker kills, \
         {declines} decline bursts in {seconds:.1} s",
        accepted.len(),
        load(&shared.order_retries),
        load(&shared.orders_given_up),
        load(&shared.orders_refused),
        load(&shared.keyless_failed),
        load(&shared.users_created),
        load(&shared.reads_ok),
        load(&shared.reads_failed),
    ));

    // Settle: poll until every check passes, or give up after `settle`.
    let settle_start = Instant::now();
    let mut report = loop {
        let report = check(shop, &accepted, stock);
        if report.passed || settle_start.elapsed() >= options.settle {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report.settled_after_s = settle_start.elapsed().as_secs_f64();
    report.seconds = seconds;
    report.clients = options.clients;
    report.users_created = load(&shared.users_created);
    report.order_retries = load(&shared.order_retries);
    report.orders_given_up = load(&shared.orders_given_up);
    report.keyless_failed = load(&shared.keyless_failed);
    report.orders_refused = load(&shared.orders_refused);
    report.reads_ok = load(&shared.reads_ok);
    report.reads_failed = load(&shared.reads_failed);
    report.accepted_order_not_found = load(&shared.not_found);
    report.instance_kills = kills;
    report.broker_kills = broker_kills;
    report.decline_bursts = declines;
    if report.orders_refused > 0 {
        report.problems.push(format!(
            "{} order placements refused",
            report.orders_refused
        ));
    }
    if report.accepted_order_not_found > 0 {
        report.problems.push(format!(
            "{} reads of an accepted order answered 404",
            report.accepted_order_not_found
        ));
    }
    report.passed = report.problems.is_empty();
    progress(&format!(
        "settled after {:.1} s: {} accepted = {} confirmed + {} cancelled ({} out of stock, \
         {} payment failed), {} stuck, {} missing; {} orders in the store ({} never accepted), \
         {} duplicates{}",
        report.settled_after_s,
        report.orders_accepted,
        report.confirmed,
        report.cancelled,
        report.cancelled_out_of_stock,
        report.cancelled_payment_failed,
        report.stuck,
        report.missing,
        report.orders_in_store,
        report.unaccepted_in_store,
        report.duplicate_orders,
        if report.passed {
            "; stock and payments add up".to_owned()
        } else {
            format!("; problems: {}", report.problems.join("; "))
        },
    ));
    Ok(report)
}

/// Restarts a killed instance, retrying for a few seconds (the broker may be
/// restarting too).
async fn restart(shop: &mut DemoHandle, instance: &str) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match shop.start_instance(instance).await {
            Ok(()) => return Ok(()),
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::warn!(%instance, error = %format!("{e:#}"), "restart failed; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The final count and the invariants, from the services' stores.
fn check(shop: &DemoHandle, accepted: &[Accepted], stock: u64) -> SoakReport {
    let data = shop.data();
    let orders: HashMap<String, Order> = data
        .orders
        .all()
        .into_iter()
        .map(|o| (o.id.clone(), o))
        .collect();
    let payments = data.payments.all();
    let mut r = SoakReport {
        orders_accepted: accepted.len() as u64,
        orders_in_store: orders.len() as u64,
        ..SoakReport::default()
    };
    let mut problems = Vec::new();
    let mut note = |p: String| {
        if problems.len() < 10 {
            problems.push(p);
        }
    };
    for a in accepted {
        let Some(o) = orders.get(&a.id) else {
            r.missing += 1;
            note(format!("accepted order {} is not in the store", a.id));
            continue;
        };
        if o.request_id != a.key {
            note(format!(
                "accepted order {} carries request id {:?}, not its key {}",
                a.id, o.request_id, a.key
            ));
        }
        match o.status {
            Status::Confirmed => r.confirmed += 1,
            Status::Cancelled => {
                r.cancelled += 1;
                let cause = o.history.last().map(|s| s.cause.as_str());
                if cause == Some(crate::events::INVENTORY_REJECTED) {
                    r.cancelled_out_of_stock += 1;
                } else {
                    r.cancelled_payment_failed += 1;
                }
            }
            s => {
                r.stuck += 1;
                note(format!("accepted order {} stuck in {s:?}", a.id));
            }
        }
    }
    let accepted_ids: std::collections::HashSet<&str> =
        accepted.iter().map(|a| a.id.as_str()).collect();
    let mut per_key: HashMap<&str, u64> = HashMap::new();
    let mut confirmed_qty: HashMap<&str, u64> = HashMap::new();
    for o in orders.values() {
        *r.store_by_status
            .entry(format!("{:?}", o.status).to_lowercase())
            .or_default() += 1;
        if !accepted_ids.contains(o.id.as_str()) {
            r.unaccepted_in_store += 1;
        }
        if !o.status.is_final() && !accepted_ids.contains(o.id.as_str()) {
            note(format!(
                "order {} (never accepted, request {}) stuck in {:?}",
                o.id, o.request_id, o.status
            ));
        }
        *per_key.entry(o.request_id.as_str()).or_default() += 1;
        // Money: a confirmed order was charged its total once; a cancelled one never.
        let paid = match payments.get(&o.id) {
            Some(Payment::Completed { amount_cents, .. }) => Some(*amount_cents),
            _ => None,
        };
        match (o.status, paid) {
            (Status::Confirmed, Some(a)) if a == o.total_cents => {}
            (Status::Confirmed, other) => note(format!(
                "confirmed order {} charged {other:?}, total {}",
                o.id, o.total_cents
            )),
            (Status::Cancelled, Some(a)) => {
                note(format!("cancelled order {} was charged {a}", o.id));
            }
            _ => {}
        }
        if o.status == Status::Confirmed {
            for i in &o.items {
                *confirmed_qty.entry(i.sku.as_str()).or_default() += u64::from(i.qty);
            }
        }
    }
    r.duplicate_orders = per_key.values().map(|n| n.saturating_sub(1)).sum();
    if r.duplicate_orders > 0 {
        note(format!(
            "{} orders placed twice for one Idempotency-Key",
            r.duplicate_orders
        ));
    }
    for (order_id, p) in &payments {
        if matches!(p, Payment::Completed { .. }) && !orders.contains_key(order_id) {
            note(format!("payment for unknown order {order_id}: {p:?}"));
        }
    }
    // Stock: nothing created or lost; what is held is what confirmed orders hold.
    for (sku, s) in data.inventory.stock() {
        let want = confirmed_qty.get(sku.as_str()).copied().unwrap_or(0);
        if s.available + s.reserved != stock || s.reserved != want {
            note(format!(
                "{sku}: {} available + {} reserved (want {} in all, {want} reserved by confirmed orders)",
                s.available, s.reserved, stock
            ));
        }
    }
    let in_store_stuck = orders.values().filter(|o| !o.status.is_final()).count();
    if in_store_stuck > 0 && r.stuck == 0 {
        note(format!("{in_store_stuck} orders in the store not final"));
    }
    if r.confirmed + r.cancelled != r.orders_accepted {
        note(format!(
            "{} accepted != {} confirmed + {} cancelled",
            r.orders_accepted, r.confirmed, r.cancelled
        ));
    }
    r.passed = problems.is_empty();
    r.problems = problems;
    r
}
