"""Schemathesis hooks for bench/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

`GET /v1/services/{service}?index=N` is a blocking query: it answers when the
service's index passes N or after `wait` (default 5m, at most 10m). A valid
query with an index and a long or absent `wait` would hold every test case for
minutes, so such a `wait` is shortened to 1s. Invalid `wait` values are left
alone: the registry rejects them (400) before it blocks, which is what the
negative tests check.
"""

import re

import schemathesis

DURATION = re.compile(r"^(0|[1-9][0-9]*)(ms|s|m|h)$")
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def _ms(text):
    m = DURATION.match(text) if isinstance(text, str) else None
    return int(m.group(1)) * UNIT_MS[m.group(2)] if m else None


@schemathesis.hook
def before_call(context, case, kwargs):
    # before_call runs in every phase (coverage, fuzzing, stateful); map_query
    # would miss the coverage phase's cases.
    query = case.query
    if isinstance(query, dict) and "index" in query:
        wait = query.get("wait")
        ms = _ms(wait)
        if wait is None or (ms is not None and ms > 1000):
            query["wait"] = "1s"
