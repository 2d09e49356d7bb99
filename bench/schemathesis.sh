#!/usr/bin/env bash
# API schema testing (issue 8): schemathesis, installed from PyPI into a venv,
# against /openapi.json of a live `switchboard registry` and of a gateway's
# admin listener. Fails on any server error or response that breaks the schema.
#
#   bench/schemathesis.sh                 # 100 examples per operation
#   MAX_EXAMPLES=20 bench/schemathesis.sh
#
# Both servers run with a write token; schemathesis sends it, so the write
# operations are exercised, not just refused. Servers are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXAMPLES=${MAX_EXAMPLES:-100}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
VENV=${VENV:-$CARGO_TARGET_DIR/schemathesis-venv}
TOKEN=schemathesis-token

if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis>=4,<5"
fi
# SWITCHBOARD_BIN: use an existing binary instead of building a release one.
if [ -z "${SWITCHBOARD_BIN:-}" ]; then
  cargo build --release -q -p switchboard
fi
BIN=${SWITCHBOARD_BIN:-$CARGO_TARGET_DIR/release/switchboard}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
wait_up() { for _ in $(seq 100); do curl -fsS "http://$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "$1 did not start" >&2; exit 2; }

REG=127.0.0.1:$(free_port)
SWITCHBOARD_LOG=warn "$BIN" registry --listen "$REG" --token "$TOKEN" >"$WORK/registry.log" 2>&1 &
PIDS+=($!)
UP=127.0.0.1:$(free_port)
ADMIN=127.0.0.1:$(free_port)
cat >"$WORK/gateway.toml" <<TOML
[gateway]
listen = "127.0.0.1:$(free_port)"
admin = "$ADMIN"
access_log = false

[registry]
token = "$TOKEN"

[[services]]
name = "s"
instances = ["$UP"]

[[routes]]
prefix = "/"
service = "s"
TOML
SWITCHBOARD_LOG=warn "$BIN" gateway --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_up "$REG"
wait_up "$ADMIN"

status=0
for target in "registry $REG" "gateway-admin $ADMIN"; do
  set -- $target
  echo "== schemathesis against $1 (http://$2/openapi.json), $MAX_EXAMPLES examples per operation"
  # A blocking query (`?index=`) waits up to `wait` (default 5m):
  # bench/schemathesis_hooks.py shortens a long or absent `wait` to 1s, and
  # --request-timeout stays above that with room for a slow debug build.
  SCHEMATHESIS_HOOKS=bench/schemathesis_hooks.py \
  "$VENV/bin/schemathesis" run "http://$2/openapi.json" \
    --checks all --max-examples "$MAX_EXAMPLES" --request-timeout 40 \
    -H "Authorization: Bearer $TOKEN" --no-color || status=1
done
[ $status -eq 0 ] && echo "schemathesis: no server errors, no schema violations"
exit $status
