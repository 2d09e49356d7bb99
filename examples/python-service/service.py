"""receipt-service: a Python service in the demo shop with no Switchboard library.

It registers with the registry over HTTP, asks the gateway's event bridge to
push it every `payment.completed` event, and publishes `receipt.issued` back
with the CloudEvents SDK (structured mode). Standard library HTTP only.

    GATEWAY_ADMIN=http://127.0.0.1:9900 PORT=5002 python3 service.py
"""

import json
import os
import signal
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

ADMIN = os.environ.get("GATEWAY_ADMIN", "http://127.0.0.1:9900")
TOKEN = os.environ.get("GATEWAY_TOKEN")  # only when the gateway has one
SERVICE = "receipt-service"
ID = f"{SERVICE}-{os.environ.get('INSTANCE', os.getpid())}"


def admin(method, path, body=b"", headers=None):
    headers = dict(headers or {})
    if TOKEN:
        headers["authorization"] = f"Bearer {TOKEN}"
    if isinstance(body, dict):
        body, headers["content-type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(ADMIN + path, data=body or None, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as res:  # raises on 4xx/5xx
        return res.status


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:  # binary mode from the bridge
            event = from_http_event(HTTPMessage(dict(self.headers.items()), body))
        except Exception as e:  # not retried: the bridge dead-letters it
            return self.answer(400, f"not a CloudEvent: {e}")
        payment = event.get_data() or {}
        print(f"{SERVICE}: payment {payment.get('payment_id')} for order {payment.get('order_id')}: "
              f"issuing a receipt (correlation {event.get_extension('correlationid')})", flush=True)
        receipt = CloudEvent(
            {"type": "receipt.issued", "source": f"/{SERVICE}",
             "correlationid": event.get_extension("correlationid") or event.get_id()},
            {"order_id": payment.get("order_id"), "payment_id": payment.get("payment_id"),
             "amount_cents": payment.get("amount_cents"), "receipt_for": event.get_id()},
        )
        message = to_structured_event(receipt)
        try:
            admin("POST", "/v1/events", message.body, message.headers)
        except Exception as e:
            return self.answer(503, f"publishing failed: {e}")  # retried with backoff
        self.answer(204, "")  # 2xx acks the pushed event

    def answer(self, status, text):
        self.send_response(status)
        self.send_header("content-length", str(len(text.encode())))
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)
    port = server.server_address[1]
    admin("PUT", f"/v1/services/{SERVICE}/instances/{ID}", {
        "address": "127.0.0.1", "port": port, "version": "0.1.0",
        "check": {"http": "/health", "interval": "2s"}})
    admin("PUT", f"/v1/subscriptions/{SERVICE}", {
        "topic": "payment.completed", "service": SERVICE, "path": "/events", "max_deliveries": 5})
    print(f"{SERVICE}: listening on 127.0.0.1:{port}, subscribed to payment.completed", flush=True)

    def stop(*_):
        # Deregister the instance; the subscription stays, so events published
        # meanwhile wait in its consumer group for the next start.
        try:
            admin("DELETE", f"/v1/services/{SERVICE}/instances/{ID}")
        finally:
            sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
