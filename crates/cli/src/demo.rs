//! `switchboard demo`: the shop (see `switchboard_shop::demo`) with a printed walkthrough.

use std::fmt::Write as _;

use anyhow::Context as _;
use switchboard_shop::{DemoHandle, DemoOptions};

/// `switchboard demo [--bus URL] [--store URL] [--only SERVICE] [--listen ADDR] [--admin ADDR]`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Event bus: memory://, redis://HOST:PORT, nats://HOST:PORT.
    #[arg(long, default_value = "memory://")]
    bus: String,
    /// Registry store: memory:// or redis://HOST:PORT (share it to spread the shop over processes).
    #[arg(long, default_value = "memory://")]
    store: String,
    /// Run only this part: users, orders, inventory or payments (two instances,
    /// no gateway), or gateway; against a shared --store and --bus (redis://...).
    #[arg(long, value_name = "SERVICE")]
    only: Option<String>,
    /// Gateway listener (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Admin listener: registry API, metrics and the dashboard (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9900")]
    admin: std::net::SocketAddr,
}

/// Runs the demo until Ctrl-C.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(async move {
        let options = DemoOptions {
            bus: args.bus,
            store: args.store,
            only: args.only,
            listen: args.listen,
            admin: args.admin,
            ..DemoOptions::default()
        };
        let shop = switchboard_shop::run(options.clone()).await?;
        println!("{}", walkthrough(&shop, &options));
        tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
        eprintln!("stopping: draining the gateway, deregistering the services...");
        shop.shutdown().await;
        eprintln!("stopped");
        Ok(())
    })
}

/// The text printed once the shop runs.
fn walkthrough(shop: &DemoHandle, options: &DemoOptions) -> String {
    let mut out = String::new();
    let mut by_service: Vec<(String, Vec<String>)> = Vec::new();
    for (service, _, addr) in shop.instances() {
        match by_service.iter_mut().find(|(s, _)| *s == service) {
            Some((_, addrs)) => addrs.push(addr.to_string()),
            None => by_service.push((service, vec![addr.to_string()])),
        }
    }
    let _ = writeln!(out, "Switchboard demo shop is running.\n");
    if let (Some(gw), Some(admin)) = (shop.gateway_addr(), shop.admin_addr()) {
        let _ = writeln!(
            out,
            "  gateway   http://{gw}   (admin, registry API, metrics: http://{admin})"
        );
        let _ = writeln!(out, "  dashboard http://{admin}/dashboard");
    }
    let _ = writeln!(out, "  bus       {}", options.bus);
    let _ = writeln!(out, "  registry  {}", options.store);
    for (service, addrs) in &by_service {
        let _ = writeln!(out, "  {service:<18} {}", addrs.join("  "));
    }
    let (Some(gw), Some(admin)) = (shop.gateway_addr(), shop.admin_addr()) else {
        let _ = writeln!(
            out,
            "\nThis process runs only the service above. Start the other services and the \
             gateway (--only gateway) with the same --store and --bus. Ctrl-C stops it."
        );
        return out;
    };
    let gw = format!("http://{gw}");
    let admin = format!("http://{admin}");
    let json = "-H 'content-type: application/json'";
    let id = r#"sed -E 's/^\{"id":"([^"]+)".*/\1/'"#;
    let _ = write!(
        out,
        r#"
Walkthrough (in another terminal; every command works as printed):

1. The services registered themselves, two instances each:
   curl -s {admin}/v1/services

2. Create a user:
   USER_ID=$(curl -s {gw}/users {json} -d '{{"name":"Ada","email":"ada@example.com"}}' | {id}); echo $USER_ID

3. Place an order. Orders checks the user with users over HTTP, publishes
   order.created; inventory reserves, payments charges, orders confirms:
   ORDER_ID=$(curl -s {gw}/orders {json} -H 'idempotency-key: order-1' -H 'x-request-id: demo-1' \
     -d "{{\"user_id\":\"$USER_ID\",\"items\":[{{\"sku\":\"widget\",\"qty\":2}}]}}" | {id}); echo $ORDER_ID
   curl -s {gw}/orders/$ORDER_ID
   -> "status":"confirmed", history pending, inventory_confirmed, payment_confirmed, confirmed.
   Every service's log line about it carries request_id=demo-1 (stderr of this process).
   Sending the same command again returns the same order (Idempotency-Key): no second order.

4. Break payments: every payment now fails, and /payments answers 500:
   curl -s {gw}/payments/admin/faults {json} -d '{{"fail":true}}'
   ORDER2=$(curl -s {gw}/orders {json} -H 'idempotency-key: order-2' \
     -d "{{\"user_id\":\"$USER_ID\",\"items\":[{{\"sku\":\"widget\",\"qty\":5}}]}}" | {id})
   curl -s {gw}/orders/$ORDER2
   -> "status":"cancelled", reason "card declined (injected fault)".
   curl -s {gw}/inventory/widget
   -> {{"available":998,"reserved":2}}: the 5 widgets were reserved, then given back (compensation).

5. Watch the gateway's breaker open (live on {admin}/dashboard: the payments
   breakers turn red, then amber when they half-open, then green): after enough
   500s it answers 503 at once, without calling payments, until it half-opens 10 s later:
   for i in $(seq 30); do curl -s -o /dev/null -w '%{{http_code}} ' {gw}/payments/$ORDER_ID; done; echo
   -> 20 x 500 (10 calls per instance fill each breaker's window), then 503 (problem+json, Retry-After).
   curl -s {admin}/v1/breakers
   -> the two /payments instances "state":"open", "failure_rate":1.0; the other routes "closed".

6. Read the metrics (Prometheus text) while the breakers are open:
   curl -s {admin}/metrics | grep 'route="/payments"' | grep -E '5xx|state="open"'
   -> switchboard_gateway_requests_total{{route="/payments",...,status_class="5xx"}} 30
      switchboard_gateway_breaker_state{{route="/payments",...,state="open"}} 1   (one line per instance)

7. Heal payments; new orders confirm again, and /payments answers once the breakers half-open:
   curl -s {gw}/payments/admin/faults {json} -d '{{}}'
   After 10 s, run the loop of step 5 again: on the dashboard the payments breakers
   turn half-open, then closed.

Ctrl-C stops everything cleanly.
"#
    );
    out
}
