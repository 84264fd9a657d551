"""The stack under another WSGI server (``serve:app``, ``LiveStack(path, hosted=True)``), in-process.

Such a server builds the stack in every process it starts, and one that fails
to build stops it altogether (gunicorn's workers): what may stop a hosted start
is a configuration that never works, not a moment's trouble.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisServer
from webtest import TestApp

from config import ConfigError
from config.live import LiveStack

ECHO = 'app: {factory: "stack_support:echo_app"}\n'
REDIS_STACK = ECHO.replace("{", "{{").replace("}", "}}") + """stores:
  shared: "{url}"
pipeline:
  - errors: {{}}
  - health: {{}}
  - ratelimit: {{store: shared, limits: ["100/minute"]}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: made a replica or filled up without touching the shared one."""
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------- a Redis refusing for a while


@pytest.mark.redis
@pytest.mark.parametrize(("refuse", "allow", "why"), [
    pytest.param(("REPLICAOF", "127.0.0.1", "1"), ("REPLICAOF", "NO", "ONE"),
                 "a read-only replica: every write is refused (give the primary's URL, or redis+sentinel://)",
                 id="during a failover: still a replica"),
    pytest.param(("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0"),
                 "out of memory: writes are refused (maxmemory reached, eviction policy noeviction)",
                 id="out of memory"),
])
def test_a_hosted_start_goes_on_while_redis_refuses_for_a_reason_that_passes(
        tmp_path: Path, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        refuse: tuple[str, ...], allow: tuple[str, ...], why: str) -> None:
    """serve.py keeps its pipeline through a failover; a gunicorn worker that refused to boot would stop gunicorn."""
    monkeypatch.setattr("stores.redis.REFUSED_FRESH", 1.0)
    admin = redis.Redis.from_url(own_redis.url)
    admin.execute_command(*refuse)
    path = _write(tmp_path, REDIS_STACK.format(url=own_redis.url))
    try:
        with caplog.at_level(logging.WARNING, logger="wsgistack.stores"):
            live = LiveStack(path, hosted=True)
        said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "wsgistack.stores"]
        assert said == [("ERROR", f"store 'shared' ({own_redis.url}): {why}; started anyway, since under another "
                                  "WSGI server a process that fails to start can stop it altogether (a failover, "
                                  "or Redis freeing memory or connections, ends this): its layers follow their "
                                  "on_store_error, and /readyz fails while Redis refuses them")]
        client = TestApp(live)
        assert client.get("/x").status_int == 200  # the limiter cannot count: on_store_error open
        shared = client.get("/readyz", status=503).json["stores"]["shared"]
        assert (shared["ok"], shared["error"]) == (False, why)
        admin.execute_command(*allow)
        time.sleep(1.1)
        assert client.get("/x").status_int == 200
        assert client.get("/readyz").json["status"] == "ok"
        live.current.close()
    finally:
        admin.close()


@pytest.mark.redis
def test_a_replica_still_stops_serve_py_which_keeps_the_pipeline_it_runs(tmp_path: Path,
                                                                         own_redis: RedisServer) -> None:
    redis.Redis.from_url(own_redis.url).replicaof("127.0.0.1", "1")
    path = _write(tmp_path, REDIS_STACK.format(url=own_redis.url))
    with pytest.raises(ConfigError) as info:
        LiveStack(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:11 stores.shared: store 'shared' ({own_redis.url}): a read-only replica: every write is refused "
        "(give the primary's URL, or redis+sentinel://)"]


@pytest.mark.redis
@pytest.mark.parametrize(("user", "why"), [
    pytest.param("app:wrong@", "authentication failed (a wrong or missing user name or password)",
                 id="a wrong password"),
    pytest.param("app:right@", "the Redis user may not do what the layers need (NOPERM: ",
                 id="a user without the commands the layers send"),
])
def test_a_hosted_start_still_stops_on_a_refusal_that_never_passes(tmp_path: Path, own_redis: RedisServer,
                                                                   user: str, why: str) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    admin.execute_command("ACL", "SETUSER", "app", "on", ">right", "~*", "+ping", "+get")
    admin.close()
    url = own_redis.url.replace("redis://", f"redis://{user}")
    path = _write(tmp_path, REDIS_STACK.format(url=url))
    with pytest.raises(ConfigError) as info:
        LiveStack(path, hosted=True)
    shown = url.replace(user.split(":")[1].rstrip("@"), "***")
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith(f"{path}:3:11 stores.shared: store 'shared' ({shown}): {why}"), problem


@pytest.mark.redis
def test_a_hosted_start_still_stops_on_a_database_the_server_does_not_have(tmp_path: Path,
                                                                           own_redis: RedisServer) -> None:
    url = own_redis.url.removesuffix("/0") + "/99"
    path = _write(tmp_path, REDIS_STACK.format(url=url))
    with pytest.raises(ConfigError) as info:
        LiveStack(path, hosted=True)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:11 stores.shared: store 'shared' ({url}): no database of that number on the server"]
