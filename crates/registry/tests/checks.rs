//! Real HTTP and TCP checks against local backends (real time, short intervals).

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use switchboard_registry::{CheckSpec, Registration, Registry, RegistryOptions, Status};

#[derive(Clone)]
struct Backend {
    code: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

async fn backend() -> (Backend, u16) {
    let b = Backend {
        code: Arc::new(AtomicU16::new(200)),
        hits: Arc::new(AtomicUsize::new(0)),
        connections: Arc::new(AtomicUsize::new(0)),
    };
    let app = axum::Router::new()
        .route(
            "/health",
            axum::routing::get(|State(b): State<Backend>| async move {
                b.hits.fetch_add(1, Ordering::SeqCst);
                StatusCode::from_u16(b.code.load(Ordering::SeqCst)).unwrap()
            }),
        )
        .with_state(b.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let conns = Arc::clone(&b.connections);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            conns.fetch_add(1, Ordering::SeqCst);
            let app = app.clone();
            tokio::spawn(async move {
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (b, port)
}

async fn wait_for(r: &Registry, service: &str, want: Status) {
    let mut w = r.watch(service);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if w.load().instances.first().map(|i| i.status) == Some(want) {
                return;
            }
            w.changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{service} never became {want}: {:?}", w.load().instances));
}

#[tokio::test]
async fn http_check_follows_the_backend() {
    let (b, port) = backend().await;
    let r = Registry::open("memory://", RegistryOptions::default())
        .await
        .unwrap();
    let check = CheckSpec::http("/health")
        .interval(Duration::from_millis(100))
        .timeout(Duration::from_millis(90))
        .thresholds(2, 2);
    r.register(
        "web",
        "w1",
        Registration::new("127.0.0.1", port).check(check),
    )
    .await
    .unwrap();
    wait_for(&r, "web", Status::Passing).await;
    b.code.store(429, Ordering::SeqCst);
    wait_for(&r, "web", Status::Warning).await;
    b.code.store(503, Ordering::SeqCst);
    wait_for(&r, "web", Status::Critical).await;
    b.code.store(204, Ordering::SeqCst);
    wait_for(&r, "web", Status::Passing).await;
    let (hits, conns) = (
        b.hits.load(Ordering::SeqCst),
        b.connections.load(Ordering::SeqCst),
    );
    assert!(hits >= 7);
    // one keep-alive connection carries the checks (a timed-out check on a loaded
    // machine drops it, so allow a reconnect or two)
    assert!(conns <= 3, "{conns} connections for {hits} checks");
    assert!(r.snapshot("web").instances[0].last_check.is_some());
}

#[tokio::test]
async fn tcp_check_and_unreachable_instances() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = Registry::open("memory://", RegistryOptions::default())
        .await
        .unwrap();
    let check = CheckSpec::tcp()
        .interval(Duration::from_millis(50))
        .thresholds(1, 1);
    r.register(
        "db",
        "d1",
        Registration::new("127.0.0.1", port).check(check.clone()),
    )
    .await
    .unwrap();
    wait_for(&r, "db", Status::Passing).await;
    drop(listener);
    wait_for(&r, "db", Status::Critical).await;

    // an HTTP check of a closed port never becomes passing
    let http = CheckSpec::http("/health").interval(Duration::from_millis(50));
    r.register(
        "gone",
        "g1",
        Registration::new("127.0.0.1", port).check(http),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        r.view("gone").unwrap().instances[0].status,
        Status::Critical
    );
    assert!(r.view("gone").unwrap().passing.is_empty());
}
