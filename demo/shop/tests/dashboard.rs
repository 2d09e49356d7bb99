//! The dashboard in a real browser: Debian's headless Chromium, driven over
//! WebDriver (Debian's `chromedriver`) with the `fantoccini` crate.
//!
//! Why fantoccini: it is a plain WebDriver client on hyper, which the
//! workspace already builds, so the test needs no Node.js toolchain (as
//! playwright-core would) and no browser download: it drives the system's
//! Chromium through the system's chromedriver.
//!
//! Without `/usr/bin/chromium` or `chromedriver` the tests skip with a
//! reason, unless `SWITCHBOARD_REQUIRE_SERVERS` is set (as in CI, whose
//! `.ci/run` installs both).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use switchboard_gateway::{Config, GatewayBuilder};
use switchboard_registry::{Registration, Registry, RegistryOptions};
use switchboard_shop::DemoOptions;

/// One browser at a time: CI has two cores, and one of these tests measures
/// how long the page takes.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    chromium: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Option<Driver> {
        let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
        let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let why = "chromium or chromedriver is not installed (apt-get install chromium chromium-driver)";
            assert!(
                !switchboard_testkit::require_servers(),
                "SWITCHBOARD_REQUIRE_SERVERS is set but {why}"
            );
            eprintln!("skipping the browser test: {why}");
            return None;
        };
        let port = switchboard_testkit::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        Some(Driver {
            child,
            port,
            chromium,
        })
    }

    async fn client(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": self.chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1360,1400"],
            }),
        );
        let url = format!("http://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let conn = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(conn)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver on {url}: {e}"),
            }
        }
    }
}

/// Polls `script` (a JS expression) until it returns true.
async fn wait_js(c: &Client, script: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = c
            .execute(&format!("return Boolean({script});"), vec![])
            .await
            .unwrap();
        if v == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let body = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out after {within:?} waiting for {script}; the page shows:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn js_f64(c: &Client, script: &str) -> f64 {
    c.execute(&format!("return {script};"), vec![])
        .await
        .unwrap()
        .as_f64()
        .unwrap_or_else(|| panic!("{script} is not a number"))
}

fn target_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sends `GET /payments/ord_browser` every `every` until `script` holds on
/// the page (each request may be a breaker's probe; the page samples once a
/// second, so pacing keeps a passing state on screen long enough to see).
async fn request_until(
    c: &Client,
    http: &reqwest::Client,
    gw: SocketAddr,
    every: Duration,
    script: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let _ = http
            .get(format!("http://{gw}/payments/ord_browser"))
            .send()
            .await
            .unwrap();
        let next = Instant::now() + every;
        while Instant::now() < next {
            let v = c
                .execute(&format!("return Boolean({script});"), vec![])
                .await
                .unwrap();
            if v == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if Instant::now() > deadline {
            let body = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out after {within:?} waiting for {script}; the page shows:\n{body}");
        }
    }
}

const PAYMENTS: &str = "[data-breaker^=\"/payments \"]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_dashboard_follows_the_payments_breaker_open_half_open_closed() {
    let _one = ONE_BROWSER.lock().await;
    let Some(driver) = Driver::start() else {
        return;
    };
    let shop = switchboard_shop::run(DemoOptions::for_tests())
        .await
        .unwrap();
    let gw = shop.gateway_addr().unwrap();
    let admin = shop.admin_addr().unwrap();
    let c = driver.client().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // Some traffic, so the routes, instances and bus have something to show.
    let user: Value = http
        .post(format!("http://{gw}/users"))
        .json(&json!({"name": "Ada", "email": "ada@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let order = http
        .post(format!("http://{gw}/orders"))
        .header("idempotency-key", "browser-1")
        .header("x-request-id", "browser-demo-1")
        .json(&json!({"user_id": user["id"], "items": [{"sku": "widget", "qty": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201);

    c.goto(&format!("http://{admin}/dashboard")).await.unwrap();
    wait_js(
        &c,
        "document.body.dataset.connected === 'true'",
        Duration::from_secs(30),
    )
    .await;
    for service in [
        "user-service",
        "order-service",
        "inventory-service",
        "payment-service",
    ] {
        wait_js(
            &c,
            &format!("document.querySelectorAll('[data-service=\"{service}\"] [data-instance]').length === 2"),
            Duration::from_secs(30),
        )
        .await;
    }
    wait_js(
        &c,
        "document.querySelectorAll('[data-breaker^=\"/payments \"][data-state=\"closed\"]').length === 2",
        Duration::from_secs(30),
    )
    .await;
    // The order's events reached the bus section.
    wait_js(
        &c,
        "document.querySelector('[data-topic=\"order.created\"]') !== null",
        Duration::from_secs(30),
    )
    .await;

    // The search finds the order's request id in the access log and its
    // correlation id on the events.
    c.find(Locator::Id("q"))
        .await
        .unwrap()
        .send_keys("browser-demo-1")
        .await
        .unwrap();
    c.find(Locator::Css("#search button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "(document.getElementById('results').innerText || '').includes('requests (1)')",
        Duration::from_secs(30),
    )
    .await;
    // ...and the order's events by their correlation id (the request id).
    wait_js(
        &c,
        "/events \\(([1-9][0-9]*)\\)/.test(document.getElementById('results').innerText) \
         && document.querySelectorAll('#results mark').length >= 2",
        Duration::from_secs(30),
    )
    .await;
    // Each route draws p50 and p99 latency as lines on one chart.
    wait_js(
        &c,
        "(document.querySelector('[data-route=\"/orders\"] path.p50')?.getAttribute('d') || '').length > 0 \
         && (document.querySelector('[data-route=\"/orders\"] path.p99')?.getAttribute('d') || '').length > 0",
        Duration::from_secs(30),
    )
    .await;
    // The instances heartbeat (TTL checks): their last check shows.
    wait_js(
        &c,
        "((tds) => tds.length === 2 && tds.every((td) => td.dataset.lastCheck !== '' && td.textContent.endsWith('ago')))\
         ([...document.querySelectorAll('[data-service=\"payment-service\"] [data-last-check]')])",
        Duration::from_secs(30),
    )
    .await;

    // The walkthrough's fault step, through the API.
    let fault = http
        .post(format!("http://{gw}/payments/admin/faults"))
        .json(&json!({"fail": true}))
        .send()
        .await
        .unwrap();
    assert!(fault.status().is_success());
    for _ in 0..30 {
        let _ = http
            .get(format!("http://{gw}/payments/ord_browser"))
            .send()
            .await
            .unwrap();
    }
    wait_js(
        &c,
        "document.querySelectorAll('[data-breaker^=\"/payments \"][data-state=\"open\"]').length === 2",
        Duration::from_secs(30),
    )
    .await;
    // The rendering of a frame stays far under a second.
    let render = js_f64(&c, "window.__switchboard.lastRenderMs").await;
    assert!(render < 1000.0, "a frame took {render} ms to render");
    let png = c.screenshot().await.unwrap();
    let path = target_dir().join("dashboard-breaker-open.png");
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());

    // Step 7: the fault is cleared. After the open time (10 s) the next
    // request is a probe: half-open. One request at a time, each followed by
    // a look at the page, so the half-open breaker is still half-open when
    // the page samples it (it needs five probes to decide).
    let clear = http
        .post(format!("http://{gw}/payments/admin/faults"))
        .json(&json!({"fail": false}))
        .send()
        .await
        .unwrap();
    assert!(clear.status().is_success());
    request_until(
        &c,
        &http,
        gw,
        Duration::from_millis(1500),
        &format!("document.querySelector('{PAYMENTS}[data-state=\"half_open\"]') !== null"),
        Duration::from_secs(60),
    )
    .await;
    // More probes close both.
    request_until(
        &c,
        &http,
        gw,
        Duration::from_millis(200),
        &format!("document.querySelectorAll('{PAYMENTS}[data-state=\"closed\"]').length === 2"),
        Duration::from_secs(60),
    )
    .await;
    // The transitions list under the breakers tells the same story.
    wait_js(
        &c,
        "['open', 'half-open', 'closed'].every((s) => document.getElementById('breakers').innerText.includes('→ ' + s))",
        Duration::from_secs(30),
    )
    .await;

    // A phone-sized window: everything reflows, nothing scrolls sideways.
    c.set_window_size(420, 900).await.unwrap();
    wait_js(&c, "window.innerWidth < 640", Duration::from_secs(30)).await;
    let seen = js_f64(&c, "window.__switchboard.frames").await;
    wait_js(
        &c,
        &format!("window.__switchboard.frames >= {}", seen + 1.0),
        Duration::from_secs(30),
    )
    .await;
    let width = js_f64(&c, "window.innerWidth").await;
    let scroll = js_f64(&c, "document.documentElement.scrollWidth").await;
    assert!(
        scroll <= width,
        "the page scrolls sideways at {width} px: scrollWidth {scroll}"
    );
    let png = c.screenshot().await.unwrap();
    let path = target_dir().join("dashboard-narrow.png");
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot ({width} px wide): {}", path.display());

    c.close().await.unwrap();
    shop.shutdown().await;
}

/// With an admin token the page asks for it, says when it is wrong, and
/// follows the stream once it is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_the_admin_token() {
    let _one = ONE_BROWSER.lock().await;
    let Some(driver) = Driver::start() else {
        return;
    };
    let text = r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 1
admin_token = "browser-s3cret"
"#;
    let config = Config::parse(Path::new("token.toml"), text).unwrap();
    let gw = GatewayBuilder::new(config).start().await.unwrap();
    let c = driver.client().await;
    c.goto(&format!("http://{}/dashboard", gw.admin()))
        .await
        .unwrap();
    wait_js(
        &c,
        "!document.getElementById('token').hidden && document.getElementById('conn').textContent === 'token needed'",
        Duration::from_secs(20),
    )
    .await;
    let input = c.find(Locator::Id("token-input")).await.unwrap();
    input.send_keys("wrong").await.unwrap();
    c.find(Locator::Css("#token button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "document.getElementById('token-error').textContent === 'that token was refused'",
        Duration::from_secs(20),
    )
    .await;
    input.clear().await.unwrap();
    input.send_keys("browser-s3cret").await.unwrap();
    c.find(Locator::Css("#token button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "document.body.dataset.connected === 'true' && document.getElementById('token').hidden \
         && window.__switchboard.frames >= 1",
        Duration::from_secs(30),
    )
    .await;
    c.close().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_services_and_a_thousand_instances_render_in_under_a_second() {
    let _one = ONE_BROWSER.lock().await;
    let Some(driver) = Driver::start() else {
        return;
    };
    let registry = Registry::memory(RegistryOptions::default());
    for s in 0..100 {
        for i in 0..10 {
            let reg = Registration::new("127.0.0.1", 20_000 + s * 10 + i)
                .version(semver::Version::new(1, u64::from(s % 7), u64::from(i)));
            registry
                .register(&format!("svc-{s:03}"), &format!("svc-{s:03}-{i}"), reg)
                .await
                .unwrap();
        }
    }
    let text = r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 1
access_log = false

[[services]]
name = "svc-000"
instances = []

[[routes]]
prefix = "/svc"
service = "svc-000"
"#;
    let config = Config::parse(Path::new("scale.toml"), text).unwrap();
    let sources =
        switchboard_gateway::discovery::registry_sources(&registry, ["svc-000".to_owned()]);
    let gw = GatewayBuilder::new(config)
        .sources(sources)
        .dashboard_registry(registry.clone())
        .start()
        .await
        .unwrap();
    let admin: SocketAddr = gw.admin();
    let c = driver.client().await;
    c.goto(&format!("http://{admin}/dashboard")).await.unwrap();
    wait_js(
        &c,
        "document.querySelectorAll('[data-instance]').length === 1000 && document.querySelectorAll('[data-service]').length === 100",
        Duration::from_secs(30),
    )
    .await;
    // Two more frames, then read how long the last one took to render.
    let seen = js_f64(&c, "window.__switchboard.frames").await;
    wait_js(
        &c,
        &format!("window.__switchboard.frames >= {}", seen + 2.0),
        Duration::from_secs(30),
    )
    .await;
    let render = js_f64(&c, "window.__switchboard.lastRenderMs").await;
    eprintln!("100 services, 1000 instances: a frame renders in {render:.1} ms");
    assert!(render < 1000.0, "a frame took {render} ms to render");
    // The first frame from its arrival to the screen: parse, render(),
    // style and layout, paint (ms since navigation started).
    wait_js(
        &c,
        "window.__switchboard.firstFrame?.paintedMs != null",
        Duration::from_secs(30),
    )
    .await;
    let first = c
        .execute("return window.__switchboard.firstFrame;", vec![])
        .await
        .unwrap();
    let at = |k: &str| {
        first[k]
            .as_f64()
            .unwrap_or_else(|| panic!("firstFrame.{k} is not a number: {first}"))
    };
    let (arrived, rendered, laid_out, painted) = (
        at("arrivedMs"),
        at("renderedMs"),
        at("laidOutMs"),
        at("paintedMs"),
    );
    eprintln!(
        "100 services, 1000 instances: page load to the first frame painted {painted:.1} ms \
         (frame arrived at {arrived:.1} ms; parsed and rendered {:.1} ms later, laid out \
         {:.1} ms later, painted {:.1} ms later: {:.1} ms from arrival)",
        rendered - arrived,
        laid_out - rendered,
        painted - laid_out,
        painted - arrived,
    );
    assert!(
        painted - arrived < 1000.0,
        "the first frame took {} ms from arrival to the screen",
        painted - arrived
    );
    c.close().await.unwrap();
    gw.shutdown().await;
    registry.shutdown().await;
}
