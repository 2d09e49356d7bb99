// notification-service: a Node.js service in the demo shop with no Switchboard
// library. It registers with the registry over HTTP, asks the gateway's event
// bridge to push it every `order.confirmed` event, and publishes
// `notification.sent` back with the CloudEvents SDK.
//
//   GATEWAY_ADMIN=http://127.0.0.1:9900 PORT=5001 node index.js
"use strict";
const http = require("node:http");
const { HTTP, CloudEvent } = require("cloudevents");

const ADMIN = process.env.GATEWAY_ADMIN || "http://127.0.0.1:9900";
const TOKEN = process.env.GATEWAY_TOKEN; // only when the gateway has one
const SERVICE = "notification-service";
const ID = `${SERVICE}-${process.env.INSTANCE || process.pid}`;

async function admin(method, path, body, headers = {}) {
  if (TOKEN) headers.authorization = `Bearer ${TOKEN}`;
  if (body !== undefined && !headers["content-type"]) headers["content-type"] = "application/json";
  const res = await fetch(ADMIN + path, { method, headers, body: typeof body === "string" || body === undefined ? body : JSON.stringify(body) });
  if (res.status >= 300) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  return res;
}

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/health") return res.end("ok");
  if (req.method !== "POST" || req.url !== "/events") { res.statusCode = 404; return res.end(); }
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", async () => {
    let event;
    try {
      event = HTTP.toEvent({ headers: req.headers, body }); // binary mode from the bridge
    } catch (e) {
      res.statusCode = 400; // not retried: the bridge dead-letters it
      return res.end(`not a CloudEvent: ${e.message}`);
    }
    const order = event.data || {};
    console.log(`${SERVICE}: order ${order.order_id} confirmed, notifying (event ${event.id}, correlation ${event.correlationid})`);
    const sent = new CloudEvent({
      type: "notification.sent",
      source: `/${SERVICE}`,
      data: { order_id: order.order_id, channel: "email", about: event.id },
      correlationid: event.correlationid, // same story in every log line
    });
    const message = HTTP.binary(sent);
    try {
      await admin("POST", "/v1/events", message.body, message.headers);
      res.statusCode = 204; // 2xx acks the pushed event
    } catch (e) {
      console.error(`${SERVICE}: publishing failed: ${e.message}`);
      res.statusCode = 503; // retried by the bridge, with backoff
    }
    res.end();
  });
});

server.listen(Number(process.env.PORT || 0), "127.0.0.1", async () => {
  const port = server.address().port;
  await admin("PUT", `/v1/services/${SERVICE}/instances/${ID}`, {
    address: "127.0.0.1", port, version: "0.1.0", check: { http: "/health", interval: "2s" },
  });
  await admin("PUT", `/v1/subscriptions/${SERVICE}`, {
    topic: "order.confirmed", service: SERVICE, path: "/events", max_deliveries: 5,
  });
  console.log(`${SERVICE}: listening on 127.0.0.1:${port}, subscribed to order.confirmed`);
});

async function stop() {
  // Deregister the instance; the subscription stays, so events published
  // meanwhile wait in its consumer group for the next start.
  await admin("DELETE", `/v1/services/${SERVICE}/instances/${ID}`).catch(() => {});
  server.close(() => process.exit(0));
}
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
