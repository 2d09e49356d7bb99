//! `switchboard services`: lists services, instances and health as a table.
//!
//! LAST CHECK is [`switchboard_registry::Instance::last_seen`], the dashboard's
//! rule: the later of the last active check and the last heartbeat, both
//! from `GET /v1/services/{service}`.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use switchboard_registry::RegistryClient;

/// Arguments of `switchboard services`.
#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// Base URL of a registry (standalone, or a gateway's admin listener).
    #[arg(
        long,
        default_value = "http://127.0.0.1:9900",
        env = "SWITCHBOARD_REGISTRY"
    )]
    registry: String,
}

/// Prints the table.
pub fn run(args: ServicesArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ServicesArgs { registry } = args;
    let rows = runtime.block_on(rows(&registry))?;
    print!("{}", table(&rows));
    Ok(())
}

async fn rows(url: &str) -> anyhow::Result<Vec<[String; 6]>> {
    let client = RegistryClient::new(url)?;
    let services = client
        .services()
        .await
        .with_context(|| format!("listing services at {url}"))?;
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for summary in services {
        let view = client
            .service(&summary.service, None, Duration::ZERO)
            .await
            .with_context(|| format!("reading service {}", summary.service))?;
        for i in &view.instances {
            rows.push([
                summary.service.clone(),
                i.id.clone(),
                i.host_port(),
                i.version
                    .as_ref()
                    .map_or_else(|| "-".into(), ToString::to_string),
                i.status.to_string(),
                i.last_seen().map_or_else(|| "-".into(), |t| ago(now, t)),
            ]);
        }
    }
    Ok(rows)
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0 => "just now".into(),
        1..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn table(rows: &[[String; 6]]) -> String {
    const HEADER: [&str; 6] = [
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "VERSION",
        "STATUS",
        "LAST CHECK",
    ];
    if rows.is_empty() {
        return "no services registered\n".into();
    }
    let mut widths = HEADER.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(HEADER);
    for row in rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = [[
            "user-service".to_owned(),
            "u1".to_owned(),
            "127.0.0.1:4001".to_owned(),
            "1.4.0".to_owned(),
            "passing".to_owned(),
            "2s ago".to_owned(),
        ]];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("INSTANCE"), lines[1].find("u1"));
        assert_eq!(lines[0].find("STATUS"), lines[1].find("passing"));
        assert_eq!(table(&[]), "no services registered\n");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(ago(t0, t0 - Duration::from_secs(5)), "5s ago");
        assert_eq!(ago(t0, t0 - Duration::from_secs(600)), "10m ago");
    }
}
