"""A Redis that refuses the configuration stops the start (and a reload); one that does not answer does not.

A wrong password, a database number the server does not have and a TLS
handshake with a plain port never heal by themselves: the server refuses to
start with them, located at the store's line, and a reload to them keeps the
old pipeline.  A Redis that does not answer may come up later: the server
starts, says so, and /readyz reports why the store is not ready.  Against a
real redis-server (an ACL user gives a password to get wrong).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from conftest import REFUSALS_THAT_PASS, RedisServer, free_port, redis_command
from webtest import TestApp

from config import ConfigError
from config.live import LiveStack

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
STACK = """app: {{factory: "stack_support:echo_app"}}
stores:
  shared: "{url}"
pipeline:
  - errors: {{}}
  - health: {{}}
  - ratelimit: {{store: shared, limits: ["100/minute"]}}
"""


@pytest.fixture
def server(redis_url: str) -> Iterator[str]:
    """``host:port`` of the test Redis, with an ACL user ``app`` whose password is ``right``."""
    client = redis.Redis.from_url(redis_url)
    redis_command(client, "ACL", "SETUSER", "app", "on", ">right", "~*", "+@all")
    # Users Redis lets in, whose ACL denies what the layers do: writes, scripts, the store's keys.
    redis_command(client, "ACL", "SETUSER", "reader", "on", ">right", "~*", "+@read", "+ping", "+select", "+role")
    redis_command(client, "ACL", "SETUSER", "noscript", "on", ">right", "~*", "+@all", "-@scripting")
    redis_command(client, "ACL", "SETUSER", "elsewhere", "on", ">right", "~other:*", "+@all")
    redis_command(client, "ACL", "SETUSER", "noeval", "on", ">right", "~*", "+@all", "-eval")  # EVALSHA is enough
    redis_command(client, "ACL", "SETUSER", "notx", "on", ">right", "~*", "+@read", "+@write", "+@scripting", "+ping")
    redis_command(client, "ACL", "SETUSER", "writer", "on", ">right", "~*", "+@write", "+@scripting", "+@transaction",
                  "+ping")
    yield urlsplit(redis_url).netloc
    redis_command(client, "ACL", "DELUSER", "app", "reader", "noscript", "elsewhere", "noeval", "notx", "writer")
    client.close()


def _write(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(url=url))
    return path


#: What every refusal of an ACL says the layers need.
NEEDS = ("it needs reads, writes, scripts (EVALSHA, SCRIPT LOAD) and transactions (MULTI, EXEC) on the store's "
         "keys, and PING: ACL ~<key_prefix>* +@read +@write +@scripting +@transaction +ping (and +select for a "
         "database other than 0)")

REFUSED = [
    pytest.param("redis://app:notthis@{server}/0", "redis://app:***@{server}/0",
                 "authentication failed (a wrong or missing user name or password)", id="wrong password"),
    pytest.param("redis://{server}/99", "redis://{server}/99", "no database of that number on the server",
                 id="no such database"),
    pytest.param("rediss://{server}/0", "rediss://{server}/0",
                 "TLS handshake failed (rediss:// to a port without TLS, or a certificate that does not verify)",
                 id="TLS to a plain port"),
    pytest.param("redis://reader:right@{server}/0", "redis://reader:***@{server}/0",
                 "the Redis user may not do what the layers need (NOPERM: this user has no permissions to run the "
                 "'set' command); " + NEEDS, id="a user that may not write"),
    pytest.param("redis://writer:right@{server}/0", "redis://writer:***@{server}/0",
                 "the Redis user may not do what the layers need (NOPERM: this user has no permissions to run the "
                 "'get' command); " + NEEDS, id="a user that may not read"),
    pytest.param("redis://noscript:right@{server}/0", "redis://noscript:***@{server}/0",
                 "the Redis user may not do what the layers need (NOPERM: this user has no permissions to run the "
                 "'evalsha' command); " + NEEDS, id="a user that may not run scripts"),
    pytest.param("redis://elsewhere:right@{server}/0", "redis://elsewhere:***@{server}/0",
                 "the Redis user may not do what the layers need (NOPERM: this user has no permissions to access "
                 "one of the keys used as arguments); " + NEEDS, id="a user of other keys"),
    # Logout, the refresh family sweep and the cache's invalidation write in MULTI/EXEC: refused, the
    # commands between would run one by one and every logout answer 503.
    pytest.param("redis://notx:right@{server}/0", "redis://notx:***@{server}/0",
                 "the Redis user may not do what the layers need (NOPERM: this user has no permissions to run the "
                 "'multi' command); " + NEEDS, id="a user that may not run transactions"),
]


@pytest.mark.parametrize(("url", "shown", "why"), REFUSED)
def test_a_store_that_refuses_the_configuration_stops_the_start(tmp_path: Path, server: str, url: str,
                                                                 shown: str, why: str) -> None:
    path = _write(tmp_path, url.format(server=server))
    with pytest.raises(ConfigError) as info:
        LiveStack(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:11 stores.shared: store 'shared' ({shown.format(server=server)}): {why}"]


def test_a_user_that_may_run_only_loaded_scripts_starts(tmp_path: Path, server: str) -> None:
    """The layers run their scripts with EVALSHA (loaded with SCRIPT LOAD): a user denied EVAL itself is fine."""
    live = LiveStack(_write(tmp_path, f"redis://noeval:right@{server}/0"))
    try:
        assert TestApp(live).get("/readyz").json["status"] == "ok"
    finally:
        live.close()


@pytest.mark.parametrize(("db", "more"), [
    pytest.param("0", (), id="database 0"),
    pytest.param("1", ("+select",), id="another database: +select"),
])
def test_the_documented_acl_serves_the_default_stack(tmp_path: Path, redis_url: str, db: str,
                                                     more: tuple[str, ...]) -> None:
    """docs/stores.md's least-privilege user: the shipped stack starts, logs in, caches, refreshes and logs out.

    It may not ask ROLE or INFO (the start then skips the replica and the eviction checks), and Redis
    denies nothing else it is sent.
    """
    from app.users import UserStore

    user = f"least{os.getpid()}x{db}"
    admin = redis.Redis.from_url(redis_url)
    seven = int(str(admin.info("server")["redis_version"]).split(".")[0]) >= 7
    more = (*more, "-function") if seven else more
    redis_command(admin, "ACL", "SETUSER", user, "reset", "on", ">right", *documented_acl(), *more)
    UserStore(str(tmp_path / "users.sqlite3")).add("alice", "correct horse battery", roles=["user"])
    env = {"REDIS_URL": f"redis://{user}:right@{urlsplit(redis_url).netloc}/{db}", "SESSION_SECRET": "s" * 43,
           "JWT_SECRET": "j" * 43, "WSGISTACK_VAR_DIR": str(tmp_path)}
    live = LiveStack(ROOT / "stack.yaml", env=env)
    try:
        client = TestApp(live, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        assert client.get("/readyz").json["status"] == "ok"
        assert [client.get("/api/v1/search?q=yaml").headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
        tokens = client.post_json("/auth/login", {"username": "alice", "password": "correct horse battery"}).json
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert client.get("/api/v1/search?q=json", headers=bearer).status_int == 200
        renewed = client.post_json("/auth/refresh", {"refresh_token": tokens["refresh_token"]}).json
        bearer = {"Authorization": f"Bearer {renewed['access_token']}"}
        assert client.post_json("/auth/logout", {"refresh_token": renewed["refresh_token"]},
                                headers=bearer).status_int == 204
        client.get("/api/v1/search?q=json", headers=bearer, status=401)
        client.post_json("/auth/refresh", {"refresh_token": renewed["refresh_token"]}, status=401)
        assert client.get("/readyz").json["status"] == "ok"
        # (redis-py gives the entries' values as bytes before 8.1, as text since)
        denied = {(_text(entry["reason"]), _text(entry["object"])) for entry in admin.acl_log()
                  if _text(entry["username"]) == user}
        assert denied == {("command", "role"), ("command", "info")}, denied
        # The key pattern binds only commands that name keys: the rest of the server is out of reach too.
        with redis.Redis.from_url(env["REDIS_URL"]) as own:
            for command in [("FLUSHALL",), ("FLUSHDB",), ("SWAPDB", "0", "1"), ("KEYS", "*"),
                            *([("FUNCTION", "FLUSH")] if seven else [])]:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    redis_command(own, *command)
    finally:
        live.current.close()
        redis_command(admin, "ACL", "DELUSER", user)
        admin.close()


@pytest.mark.parametrize(("url", "shown", "why"), [REFUSED[0], REFUSED[-1]])
def test_serve_exits_2_and_says_why(tmp_path: Path, server: str, url: str, shown: str, why: str) -> None:
    path = _write(tmp_path, url.format(server=server))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "serve"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"stores.shared: store 'shared' ({shown.format(server=server)}): {why}" in done.stderr
    assert "notthis" not in done.stderr  # the password never appears


def test_a_reload_to_a_refused_store_keeps_the_old_pipeline(tmp_path: Path, server: str) -> None:
    path = _write(tmp_path, f"redis://app:right@{server}/0")
    live = LiveStack(path)
    client = TestApp(live)
    assert client.get("/readyz").json["status"] == "ok"
    path.write_text(STACK.format(url=f"redis://app:notthis@{server}/0"))
    result = live.reload()
    assert not result.ok and live.generation == 1
    assert [p.message for p in result.problems] == [
        f"store 'shared' (redis://app:***@{server}/0): authentication failed (a wrong or missing user name or "
        "password)"]
    assert client.get("/readyz").json["status"] == "ok"  # the old pipeline, on the right password
    assert client.get("/x").status_int == 200
    live.current.close()


def test_a_store_that_does_not_answer_is_waited_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="wsgistack.stores"):
        live = LiveStack(_write(tmp_path, url))
    assert f"store 'shared' ({url}) does not answer yet: not reachable;" in caplog.text
    client = TestApp(live)
    ready = client.get("/readyz", status=503).json
    assert (ready["status"], ready["stores"]["shared"]["error"]) == ("degraded", "not reachable")
    for _ in range(4):  # traffic opens the store's breaker: the pings are not even tried then
        assert client.get("/x").status_int == 200  # the rate limiter fails open, as configured
    shared = client.get("/readyz", status=503).json["stores"]["shared"]
    assert (shared["breaker"], shared["error"]) == ("open", "not reachable")
    live.current.close()


@pytest.fixture
def sentinel(redis_url: str, tmp_path: Path) -> Iterator[int]:
    """A real redis-sentinel watching the test Redis, with the password ``rightpw``; its port."""
    import shutil
    import time

    port = free_port()
    master = urlsplit(redis_url)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster {master.hostname} {master.port} 1\n"
                    "requirepass rightpw\n")
    binary = shutil.which("redis-server")
    assert binary
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="rightpw", socket_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-sentinel did not start"
            time.sleep(0.05)
    client.close()
    yield port
    proc.kill()
    proc.wait(timeout=10)


@pytest.mark.parametrize(("password", "why"), [
    ("rightpw", None),
    ("notthis", ("a sentinel refuses it: authentication failed (a wrong or missing user name or password)", True)),
])
def test_a_sentinel_that_refuses_the_password_is_a_refusal(sentinel: int, password: str,
                                                           why: tuple[str, bool] | None) -> None:
    """redis-py reports it as "master not found", which would read as an outage."""
    from stores.redis import RedisStore

    store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0", sentinel_kwargs={"password": password})
    try:
        assert store.probe() == why
    finally:
        store.close()


@pytest.mark.parametrize("url", ["unix:///tmp/no-such-dir/redis-ssl.sock", "redis://sslcache.invalid:6379/0"])
def test_an_outage_named_like_tls_is_still_an_outage(url: str) -> None:
    """Only OpenSSL's own words mean a TLS failure: host names and socket paths are not read."""
    from stores.redis import RedisStore

    store = RedisStore(url, socket_connect_timeout=0.5)
    try:
        assert store.probe() == ("not reachable", False)
    finally:
        store.close()


def test_readyz_says_why_after_traffic_opened_the_breaker(tmp_path: Path) -> None:
    """The rate limiter's round trips fail first and open the breaker: the first /readyz, which then
    does not even ping, still says why."""
    live = LiveStack(_write(tmp_path, f"redis://127.0.0.1:{free_port()}/0"))
    client = TestApp(live)
    for _ in range(4):
        assert client.get("/x").status_int == 200
    shared = client.get("/readyz", status=503).json["stores"]["shared"]
    assert (shared["breaker"], shared["error"]) == ("open", "not reachable")
    live.current.close()


def test_a_replica_is_refused_at_the_start(tmp_path: Path, own_redis: RedisServer) -> None:
    """A replica answers PING, but refuses every write the layers make."""
    redis.Redis.from_url(own_redis.url).replicaof("127.0.0.1", str(free_port()))
    path = _write(tmp_path, own_redis.url)
    with pytest.raises(ConfigError) as info:
        LiveStack(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:11 stores.shared: store 'shared' ({own_redis.url}): a read-only replica: every write is refused "
        "(give the primary's URL, or redis+sentinel://)"]


@pytest.mark.parametrize("user", [
    pytest.param("", id="no handshake: Redis speaks first"),
    pytest.param("app:right@", id="AUTH reads the error"),
])
def test_a_redis_at_maxclients_is_named_so(tmp_path: Path, own_redis: RedisServer,
                                          caplog: pytest.LogCaptureFixture, user: str) -> None:
    """Redis accepts the connection, answers ``ERR max number of clients reached`` and closes it: it is up,
    so "not reachable" sent the operator to the network; it may free connections, so the start waits."""
    full = "Redis refuses new connections (maxclients reached)"
    admin = redis.Redis.from_url(own_redis.url)
    redis_command(admin, "ACL", "SETUSER", "app", "on", ">right", "~*", "+@all")
    admin.config_set("maxclients", 1)  # this connection is the one
    url = own_redis.url.replace("redis://", f"redis://{user}")
    try:
        with caplog.at_level(logging.WARNING, logger="wsgistack.stores"):
            live = LiveStack(_write(tmp_path, url))
        shown = url.replace(":right@", ":***@")
        assert f"store 'shared' ({shown}) does not answer yet: {full};" in caplog.text
        client = TestApp(live)
        assert client.get("/readyz", status=503).json["stores"]["shared"]["error"] == full
        admin.config_set("maxclients", 10000)
        time.sleep(2.1)  # the breaker's reset_timeout, should the probe have opened it
        assert client.get("/readyz").json["status"] == "ok"
        live.current.close()
    finally:
        admin.close()


@pytest.mark.parametrize(("refuse", "allow", "why"), REFUSALS_THAT_PASS)
def test_readyz_fails_while_redis_refuses_writes(tmp_path: Path, own_redis: RedisServer,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 refuse: tuple[str, ...], allow: tuple[str, ...], why: str) -> None:
    """Redis still answers PING, so only the refused writes tell: /readyz fails, with why, until they pass."""
    monkeypatch.setattr("stores.redis.REFUSED_FRESH", 1.0)
    live = LiveStack(_write(tmp_path, own_redis.url))
    client, admin = TestApp(live), redis.Redis.from_url(own_redis.url)
    try:
        assert client.get("/readyz").json["status"] == "ok"
        redis_command(admin, *refuse)
        assert client.get("/x").status_int == 200  # the limiter cannot count: on_store_error open
        shared = client.get("/readyz", status=503).json["stores"]["shared"]
        assert (shared["ok"], shared["error"]) == (False, why)
        redis_command(admin, *allow)
        time.sleep(1.1)
        assert client.get("/x").status_int == 200
        assert client.get("/readyz").json["status"] == "ok"
    finally:
        admin.close()
        live.current.close()


class ListPreview:
    """A custom layer whose preview_environ returns a list (a bug): named in the log, never a 500."""

    def __init__(self, app: object) -> None:
        self.app = app

    def preview_environ(self, environ: dict[str, object]) -> list[str]:
        return ["oops"]

    def __call__(self, environ: dict[str, object], start_response: object) -> object:
        return self.app(environ, start_response)  # type: ignore[operator]


def test_a_preview_that_returns_no_dict_is_named(tmp_path: Path, server: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(url=f"redis://app:right@{server}/0")
                    + "  - test_store_startup:ListPreview: {}\n  - cache: {store: shared}\n")
    live = LiveStack(path)
    with caplog.at_level(logging.WARNING, logger="wsgistack.ratelimit"):
        assert TestApp(live).get("/x").status_int == 200
    assert "test_store_startup:ListPreview.preview_environ returned list; return a dict of environ entries, " \
           "or None" in caplog.text
    live.current.close()


def test_explain_refuses_what_serve_refuses(tmp_path: Path, server: str) -> None:
    import serve

    path = _write(tmp_path, f"redis://app:notthis@{server}/0")
    with pytest.raises(ConfigError) as info:
        serve.explain(str(path), "GET", "/x")
    assert [p.message for p in info.value.problems] == [
        f"store 'shared' (redis://app:***@{server}/0): authentication failed (a wrong or missing user name or "
        "password)"]


EVICTING = """app: {{factory: "stack_support:echo_app"}}
stores:
  shared: "{url}"
  cache: "{cache_url}"
pipeline:
  - errors: {{}}
  - ratelimit: {{store: shared, limits: ["100/minute"]}}
  - cache: {{store: {cache}}}
"""


@pytest.mark.parametrize(("maxmemory", "policy", "cache", "warned"), [
    pytest.param("0", "allkeys-lru", "shared", None, id="no maxmemory: nothing is evicted"),
    pytest.param("100mb", "allkeys-lru", "shared", "evicts keys when Redis is full (maxmemory-policy allkeys-lru): "
                 "ratelimit would lose state", id="an evicting policy under the rate limiter"),
    pytest.param("100mb", "volatile-ttl", "shared", "evicts keys when Redis is full (maxmemory-policy volatile-ttl)",
                 id="a volatile policy: every key the layers write has a TTL"),
    pytest.param("100mb", "noeviction", "shared", "holds the cache beside ratelimit, with maxmemory-policy noeviction",
                 id="noeviction, the cache beside state"),
    pytest.param("100mb", "noeviction", "cache", "shares its server, and maxmemory, with store 'cache', which holds "
                 "the cache; it holds ratelimit", id="noeviction, the cache in another database of the server"),
    pytest.param("0", "noeviction", "cache", None, id="the cache in another database, no maxmemory"),
])
def test_a_redis_that_would_lose_state_or_fill_up_is_named_at_the_start(
        tmp_path: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture, maxmemory: str, policy: str,
        cache: str, warned: str | None) -> None:
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory", maxmemory)
    client.config_set("maxmemory-policy", policy)
    client.close()
    path = tmp_path / "stack.yaml"
    path.write_text(EVICTING.format(url=own_redis.url, cache_url=own_redis.url.replace("/0", "/1"), cache=cache))
    with caplog.at_level(logging.WARNING, logger="wsgistack.stores"):
        LiveStack(path).close()
    found = [r.getMessage() for r in caplog.records if r.name == "wsgistack.stores"]
    if warned is None:
        assert found == []
    else:
        assert len(found) == 1 and warned in found[0], found


def documented_acl() -> list[str]:
    """The rules of docs/stores.md's least-privilege user (production.md gives the same), from the key pattern on."""
    lines = [line for page in ("stores.md", "production.md")
             for line in (ROOT / "docs" / page).read_text().splitlines()
             if "ACL SETUSER wsgistack reset on >PASSWORD " in line]
    rules = {line.strip("` ").split(">PASSWORD ", 1)[1] for line in lines}
    assert len(lines) == 2 and len(rules) == 1, lines
    return rules.pop().split()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
