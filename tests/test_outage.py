"""A Redis outage under load: every layer keeps its declared on_store_error, then recovers by itself.

serve.py runs the full stack with every store on a private redis-server while
four clients send a mix of requests.  The test kills redis-server, waits, and
starts it again on the same port.  What each kind of request may get:

| request | Redis up | Redis down |
|---|---|---|
| anonymous API call | 200 | 200 (ratelimit ``open``: let through) |
| search | 200, ``X-Cache`` HIT/MISS | 200, ``X-Cache: BYPASS`` (cache ``open``) |
| with a bearer token | 200 | 503 + ``Retry-After`` (auth blocklist ``closed``) |
| with a session cookie | 200 | 503 + ``Retry-After`` (session ``closed``) |
| ``/healthz`` | 200 | 200 (liveness never asks a store) |
| ``/readyz`` | 200 | 503 (readiness reports the store) |

Never a 500, never a dropped connection, no traceback in the server's output,
and every request answers 200 again within 5 s of Redis coming back, without a restart.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import RedisServer, free_port, wait_for_port
from loadgen import Load, Req, Result, ServeProcess, full_stack, request

from app.users import UserStore

pytestmark = pytest.mark.redis

#: name -> the statuses it may ever get
ALLOWED = {
    "anonymous": {200},
    "search": {200},
    "bearer": {200, 503},
    "session": {200, 503},
    "healthz": {200},
    "readyz": {200, 503},
}


def login(port: int) -> tuple[str, str]:
    """Log alice in; return her access token and session cookie (name=value)."""
    body = json.dumps({"username": "alice", "password": "correct horse battery"}).encode()
    status, headers, data = request(port, "POST", "/auth/login", [("Content-Type", "application/json")], body)
    assert status == 200, data
    cookie = headers["set-cookie"].split(";", 1)[0]
    assert cookie.startswith("wsgistack_session=")
    return json.loads(data)["access_token"], cookie


def plan(token: str, cookie: str) -> list[Req]:
    return [
        Req("GET", "/api/v1/health", name="anonymous"),
        Req("GET", "/api/v1/search?q=json", name="search"),
        Req("GET", "/api/v1/health", (("Authorization", f"Bearer {token}"),), name="bearer"),
        Req("GET", "/api/v1/health", (("Cookie", cookie),), name="session"),
        Req("GET", "/healthz", name="healthz"),
        Req("GET", "/readyz", name="readyz"),
    ]


def describe(results: list[Result]) -> str:
    counts: dict[tuple[str, object, str], int] = {}
    for r in results:
        key = (r.name, r.status or r.error, r.headers.get("x-cache", ""))
        counts[key] = counts.get(key, 0) + 1
    return "\n".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str))


def test_redis_outage_under_load(tmp_path: Path, redis_server: RedisServer | None, redis_url: str) -> None:
    if redis_server is None or os.environ.get("REDIS_URL"):
        pytest.skip("needs the private redis-server to stop and start it (REDIS_URL is set)")
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(full_stack(port, tmp_path / "var", store=redis_url))
    UserStore(str(tmp_path / "var" / "users.sqlite3")).add("alice", "correct horse battery", ["admin"])
    server = ServeProcess(path).start()
    try:
        wait_for_port(port)
        token, cookie = login(port)
        assert request(port, "GET", "/api/v1/search?q=json")[0] == 200  # index built, response cached
        with Load(port, plan(token, cookie), threads=4, max_seconds=40, pause=0.002) as load:
            load.wait_for(200)
            stopped_at = time.monotonic()
            redis_server.stop()
            time.sleep(2.5)
            restart_begun = time.monotonic()
            redis_server.start()
            back_at = time.monotonic()
            deadline = back_at + 8
            recovered_at = None
            while time.monotonic() < deadline:  # recovered: a full second of nothing but 200s
                time.sleep(0.25)
                recent = load.between(time.monotonic() - 1.0)
                if recent and all(r.status == 200 for r in recent) and {r.name for r in recent} == set(ALLOWED):
                    recovered_at = min(r.started for r in recent)
                    break
            load.wait_for(100)
    finally:
        if not redis_server.running:
            redis_server.start()
        code = server.stop()
    results = load.snapshot()
    summary = describe(results)
    assert code == 0
    assert load.failures([r for r in results if r.error]) == [], summary  # no dropped connection
    for r in results:
        assert r.status in ALLOWED[r.name], (r, summary)
        if r.status == 503:
            assert r.headers.get("retry-after", "").isdigit() or r.name == "readyz", (r, summary)

    before = [r for r in load.between(0, stopped_at) if r.started + r.elapsed < stopped_at]  # answered in time
    assert before and all(r.status == 200 for r in before), describe(before)
    assert {r.headers.get("x-cache") for r in before if r.name == "search"} <= {"HIT", "MISS"}

    # Well inside the outage (the first requests may still be in flight when Redis dies):
    down = load.between(stopped_at + 0.5, restart_begun)
    by_name = {name: [r for r in down if r.name == name] for name in ALLOWED}
    assert all(by_name.values()), describe(down)
    assert {r.status for r in by_name["anonymous"]} == {200}
    assert {(r.status, r.headers.get("x-cache")) for r in by_name["search"]} == {(200, "BYPASS")}
    assert {r.status for r in by_name["bearer"]} == {503}
    assert {r.status for r in by_name["session"]} == {503}
    assert {r.status for r in by_name["healthz"]} == {200}
    assert {r.status for r in by_name["readyz"]} == {503}

    assert recovered_at is not None, "not every request answered 200 again within 8 s\n" + describe(
        load.between(back_at))
    assert recovered_at - back_at < 5, f"recovery took {recovered_at - back_at:.1f} s"
    after = load.between(recovered_at)
    assert all(r.status == 200 for r in after), describe(after)
    assert {r.headers.get("x-cache") for r in after if r.name == "search"} <= {"HIT", "MISS"}

    output = server.output()
    assert "Traceback" not in output
    assert " 500 " not in output
