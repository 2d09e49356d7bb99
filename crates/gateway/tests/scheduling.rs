//! The worker threads run under the configured scheduling policy
//! (`gateway.worker_scheduling`), read back from `/proc`. One test in this
//! binary, so the only `gateway-worker-*` threads are its gateways'.

mod support;

use support::{Backend, Harness, service};

/// `(thread name, policy)` of this process's gateway worker threads; the
/// policy is field 41 of `/proc/self/task/TID/stat` (0 `SCHED_OTHER`, 3 `SCHED_BATCH`).
fn worker_policies() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !name.starts_with("gateway-worker") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the ")" that ends the name start at field 3.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = rest.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        out.push((name.trim().to_owned(), policy));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_batch_by_default_and_normal_when_asked() {
    let backend = Backend::start("a").await;
    let body = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"svc\"\n",
        service("svc", &[backend.addr])
    );
    for (extra, want) in [("", 3), ("worker_scheduling = \"normal\"", 0)] {
        let h = Harness::start_with(&body, &format!("access_log = false\n{extra}")).await;
        // The workers serve under the policy they were given.
        let res = h.client.get(h.url("/x")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let got = worker_policies();
        assert_eq!(got.len(), 2, "{extra:?}: {got:?}");
        assert!(got.iter().all(|(_, p)| *p == want), "{extra:?}: {got:?}");
        h.gw.shutdown().await;
    }
}
