//! `switchboard services` against a registry served on a free port: LAST
//! CHECK shows a TTL instance's last heartbeat (the dashboard's rule: the
//! later of the last active check and the last heartbeat), and "-" for an
//! instance the registry has heard nothing from since it registered.

mod support;

use std::time::Duration;

use support::switchboard;

use switchboard_registry::http::{self, HttpOptions};
use switchboard_registry::{CheckSpec, Registration, Registry, RegistryOptions};

/// Runs `switchboard services --registry URL` and returns its stdout.
async fn services(url: &str) -> String {
    switchboard(&["services", "--registry", url]).await
}

/// The LAST CHECK cell of the row of instance `id`.
fn last_check<'a>(table: &'a str, id: &str) -> &'a str {
    let mut lines = table.lines();
    let column = lines
        .next()
        .and_then(|h| h.find("LAST CHECK"))
        .unwrap_or_else(|| panic!("no LAST CHECK column in {table:?}"));
    let row = lines
        .find(|l| l.split_whitespace().nth(1) == Some(id))
        .unwrap_or_else(|| panic!("no row for {id} in {table:?}"));
    row[column..].trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_check_shows_the_last_heartbeat_of_ttl_instances() {
    let registry = Registry::memory(RegistryOptions::default());
    let ttl =
        || Registration::new("127.0.0.1", 4101).check(CheckSpec::ttl(Duration::from_secs(60)));
    registry.register("orders", "o-beat", ttl()).await.unwrap();
    registry.register("orders", "o-quiet", ttl()).await.unwrap();
    registry.heartbeat("orders", "o-beat").await.unwrap();

    let opts = HttpOptions::default();
    let listener = http::bind("127.0.0.1:0".parse().unwrap(), &opts)
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, registry.clone(), opts, async {
        let _ = stopped.await;
    }));

    let table = services(&url).await;
    let beat = last_check(&table, "o-beat");
    assert!(
        beat == "just now" || beat.ends_with("s ago"),
        "the heartbeat is the last check: {beat:?} in\n{table}"
    );
    assert_eq!(
        last_check(&table, "o-quiet"),
        "-",
        "no check and no heartbeat yet:\n{table}"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    registry.shutdown().await;
}
