"""Store failure as a first-class state: the circuit breaker, a dead Redis, a hung Redis.

The breaker's own rules are tested with plain callables.  The Redis cases kill
the private redis-server (``redis_server.stop()``), check that calls fail fast
and that the same store object recovers by itself after ``start()``; the
``down_redis`` fixture always leaves the server running for later tests.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from conftest import redis_command

from stores import StoreError, store_from_url
from stores.breaker import CircuitBreaker, CircuitOpenError, StoreUnavailable
from stores.redis import RedisStore

LOGGER = "wsgistack.stores"


class Boom(StoreUnavailable):
    """A stand-in backend failure."""


def fail() -> None:
    raise Boom("backend gone", "connection refused")


def trip(breaker: CircuitBreaker) -> None:
    """Fail ``failure_threshold`` calls so the circuit opens."""
    for _ in range(breaker.failure_threshold):
        with pytest.raises(Boom):
            breaker.call(fail)


def timed(fn: Callable[[], Any]) -> tuple[float, BaseException | None]:
    """Run ``fn``; return (seconds, the exception it raised or None)."""
    started = time.perf_counter()
    try:
        fn()
    except BaseException as exc:
        return time.perf_counter() - started, exc
    return time.perf_counter() - started, None


# -- the breaker on its own ------------------------------------------------------------


def test_breaker_opens_after_the_threshold_and_fails_fast() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5, name="test store")
    calls: list[int] = []
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.state == "closed"
    with pytest.raises(Boom):
        breaker.call(fail)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: calls.append(1))
    assert calls == []  # the backend is not touched while open
    assert isinstance(info.value, StoreError)
    assert str(info.value).startswith(
        "circuit open for test store after 3 consecutive failures (last: connection refused); next probe in "
    )


def test_breaker_counts_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5)
    for _ in range(4):
        for _ in range(2):
            with pytest.raises(Boom):
                breaker.call(fail)
        assert breaker.call(lambda: "ok") == "ok"
    assert (breaker.state, breaker.failures) == ("closed", 0)


def test_a_call_that_fails_after_the_circuit_opened_does_not_open_it_again() -> None:
    """A call already in flight when the circuit opened is no new failure: counted, it would open the circuit
    again and start its pause anew (putting the probe off for as long as slow calls keep failing)."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, name="test store")

    def in_flight() -> None:
        with pytest.raises(Boom):
            breaker.call(fail)  # meanwhile, another call opens the circuit
        fail()

    with pytest.raises(Boom):
        breaker.call(in_flight)
    assert (breaker.state, breaker.failures) == ("open", 1)
    with pytest.raises(CircuitOpenError, match=r"^circuit open for test store after 1 consecutive failures "):
        breaker.call(lambda: "ok")


def test_errors_that_are_not_outages_pass_through_and_do_not_count() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5)

    def bad_input() -> None:
        raise ValueError("not an integer")

    for _ in range(3):
        with pytest.raises(ValueError, match="not an integer"):
            breaker.call(bad_input)
    assert breaker.state == "closed"
    with pytest.raises(ConnectionRefusedError):  # OSError counts by default
        breaker.call(lambda: (_ for _ in ()).throw(ConnectionRefusedError("refused")))
    assert breaker.state == "open"


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=0.1)
    trip(breaker)
    time.sleep(0.15)
    calls: list[int] = []
    refused: list[str] = []
    all_refused = threading.Event()
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def probe() -> str:
        calls.append(1)
        all_refused.wait(10)  # hold the probe until every other caller was turned away
        return "ok"

    def worker() -> None:
        barrier.wait()
        try:
            breaker.call(probe)
        except CircuitOpenError as exc:
            with lock:
                refused.append(str(exc))
                if len(refused) == 11:
                    all_refused.set()

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert len(calls) == 1
    assert len(refused) == 11
    assert all(message.endswith("; a probe is in flight") for message in refused)
    assert breaker.state == "closed"


def test_a_failed_probe_opens_the_circuit_for_another_pause() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.1)
    trip(breaker)
    time.sleep(0.15)
    with pytest.raises(Boom):
        breaker.call(fail)  # the probe
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError, match=r"next probe in 0\.\d\d s$"):
        breaker.call(lambda: "ok")
    time.sleep(0.15)
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"


def test_an_interrupted_probe_lets_the_next_call_probe() -> None:
    class Interrupted(BaseException):
        pass

    def interrupted() -> None:
        raise Interrupted

    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.1)
    trip(breaker)
    time.sleep(0.15)
    with pytest.raises(Interrupted):
        breaker.call(interrupted)
    assert breaker.state == "open"
    assert breaker.call(lambda: "ok") == "ok"  # no second pause needed
    assert breaker.state == "closed"


def test_state_changes_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.1, name="test store")
    for _ in range(50):
        with pytest.raises(StoreError):
            breaker.call(fail)
    time.sleep(0.15)
    for _ in range(20):
        breaker.call(lambda: None)
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert records == [
        ("WARNING", "circuit opened for test store after 3 consecutive failures: connection refused; "
                    "failing fast for 0.1 s before probing"),
        ("INFO", "circuit half-open for test store: probing with one call"),
        ("INFO", "circuit closed for test store: the backend answers again"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"failure_threshold": 0}, "failure_threshold must be at least 1, got 0", id="threshold"),
        pytest.param(
            {"reset_timeout": 0}, "reset_timeout must be a positive number of seconds, got 0", id="timeout"
        ),
    ],
)
def test_breaker_refuses_settings_that_cannot_work(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError) as info:
        CircuitBreaker(**kwargs)
    assert str(info.value) == error


# -- a hung Redis (accepts connections, never answers) ------------------------------------------


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A loopback port whose listener never accepts or answers, like a frozen Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def test_threads_do_not_queue_on_a_hung_redis(hung_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{hung_port}/0", failure_threshold=3, reset_timeout=30)
    try:
        for _ in range(3):
            seconds, exc = timed(lambda: store.get("k"))
            assert isinstance(exc, StoreUnavailable), exc
            assert "could not run GET: Timeout" in str(exc)
            assert 0.2 <= seconds < 0.75  # one socket timeout (0.25 s), never a retry loop
        assert store.breaker.state == "open"
        results: list[tuple[float, BaseException | None]] = []
        barrier = threading.Barrier(20)

        def worker() -> None:
            barrier.wait()
            results.append(timed(lambda: store.incr("n", ttl=5)))

        threads = [threading.Thread(target=worker) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(results) == 20
        assert all(isinstance(exc, CircuitOpenError) for _, exc in results)
        assert max(seconds for seconds, _ in results) < 0.25
        seconds, _ = timed(store.ping)
        assert store.ping() is False and seconds < 0.25
    finally:
        store.close()


# -- a dead Redis that comes back -------------------------------------------------------------


@pytest.fixture
def down_redis(redis_url: str, redis_server: Any) -> Iterator[Any]:
    """The private redis-server, for tests that stop it; running again afterwards."""
    if redis_server is None:
        pytest.skip("fault tests stop the private redis-server; REDIS_URL is set instead")
    try:
        yield redis_server
    finally:
        if not redis_server.running:
            redis_server.start()


@pytest.mark.redis
def test_dead_redis_fails_fast_then_recovers_by_itself(
    down_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = RedisStore(down_redis.url)  # default breaker: 3 failures, 2 s pause
    sibling = RedisStore(down_redis.url)  # another layer naming the same store URL
    try:
        store.set("k", b"v")
        down_redis.stop()
        for _ in range(3):
            seconds, exc = timed(lambda: store.get("k"))
            assert isinstance(exc, StoreUnavailable)
            assert str(exc).startswith(f"redis store {down_redis.url} could not run GET: ")
            assert seconds < 0.5
        assert store.breaker.state == "open"
        for call in (lambda: store.get("k"), lambda: store.set("k", b"v"),
                     lambda: store.incr("n", ttl=5), lambda: sibling.add("lock", b"1", ttl=5),
                     lambda: list(sibling.scan("")), lambda: sibling.delete_prefix("")):
            seconds, exc = timed(call)
            assert isinstance(exc, CircuitOpenError), exc
            assert str(exc).startswith(f"circuit open for redis store {down_redis.url} after 3 ")
            assert seconds < 0.25
        assert store.ping() is False
        health = store.health()
        assert (health["ok"], health["breaker"]) == (False, "open")
        assert str(health["error"]).startswith("not reachable")
        # the sibling shares the server and its breaker: readiness says why for it too
        assert {k: sibling.health()[k] for k in ("ok", "breaker", "error")} == \
            {"ok": False, "breaker": "open", "error": health["error"]}

        down_redis.start()
        started = time.monotonic()
        while time.monotonic() - started < 5:
            try:
                store.set("k", b"back")
                break
            except StoreError:
                time.sleep(0.05)
        recovered_in = time.monotonic() - started
        assert recovered_in < 5, "the store did not recover within 5 s of Redis returning"
        assert store.get("k") == b"back"
        assert sibling.get("k") == b"back"
        assert store.health()["breaker"] == "closed"
        opened = [r for r in caplog.records if r.name == LOGGER and "circuit opened" in r.getMessage()]
        closed = [r for r in caplog.records if r.name == LOGGER and "circuit closed" in r.getMessage()]
        assert (len(opened), len(closed)) == (1, 1)
    finally:
        store.breaker.reset()
        store.close()
        sibling.close()


@pytest.mark.redis
def test_readyz_ping_is_the_probe_that_closes_the_circuit(down_redis: Any) -> None:
    store = RedisStore(down_redis.url, failure_threshold=1, reset_timeout=0.2)
    try:
        down_redis.stop()
        assert store.ping() is False
        assert store.breaker.state == "open"
        down_redis.start()
        time.sleep(0.25)
        assert store.health()["ok"] is True  # no request needed to recover
        assert store.breaker.state == "closed"
    finally:
        store.close()


@pytest.mark.redis
def test_an_exhausted_pool_is_not_an_outage(redis_url: str) -> None:
    store = RedisStore(redis_url, max_connections=1, failure_threshold=1)
    try:
        held = store.pool.get_connection()
        with pytest.raises(StoreError) as info:
            store.get("k")
        store.pool.release(held)
        assert not isinstance(info.value, StoreUnavailable)
        assert str(info.value) == f"redis store {redis_url} could not run GET: Too many connections"
        assert store.breaker.state == "closed"
        assert store.get("k") is None  # served again once a connection is free
    finally:
        store.close()


@pytest.mark.redis
def test_readiness_that_meets_an_exhausted_pool_says_so(redis_url: str) -> None:
    """Not the reason of an outage that traffic ended before (only a ping that passes forgets it)."""
    store = RedisStore(redis_url, max_connections=1)
    try:
        store.breaker.failure = "not reachable"  # left by an earlier outage, recovered from by traffic
        held = store.pool.get_connection()
        facts = store.health()
        store.pool.release(held)
        assert (facts["ok"], facts["breaker"], facts["error"]) == (
            False, "closed", "every connection of the pool is in use (max_connections reached)")
        assert "error" not in store.health()
    finally:
        store.close()


@pytest.mark.redis
def test_an_exhausted_pool_does_not_open_the_breaker_through_the_rate_limiter(redis_url: str) -> None:
    """The rate limiter's pipeline meets a busy pool as the store does: a plain StoreError, breaker closed."""
    from webtest import TestApp

    from middleware.base import Context
    from middleware.ratelimit import RateLimitMiddleware

    def ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    store = RedisStore(redis_url, max_connections=1, failure_threshold=1)
    try:
        app = TestApp(RateLimitMiddleware(ok, RateLimitMiddleware.Options(limits=["100/minute"]),
                                          Context(stores={"shared": store})))
        held = store.pool.get_connection()
        assert app.get("/", extra_environ={"REMOTE_ADDR": "10.0.0.1"}).status_int == 200  # fails open
        store.pool.release(held)
        assert store.breaker.state == "closed"
        assert "RateLimit-Limit" in app.get("/", extra_environ={"REMOTE_ADDR": "10.0.0.1"}).headers
    finally:
        store.close()


@pytest.mark.redis
def test_a_probe_that_meets_an_exhausted_pool_leaves_the_circuit_open(down_redis: Any) -> None:
    """Redis was never asked: no verdict, so the circuit stays open and the next call probes again."""
    store = RedisStore(down_redis.url, max_connections=1, failure_threshold=1, reset_timeout=0.2)
    try:
        down_redis.stop()
        with pytest.raises(StoreUnavailable):
            store.get("k")
        assert store.breaker.state == "open"
        down_redis.start()
        time.sleep(0.25)
        held = store.pool.get_connection()  # every connection taken: the probe cannot reach Redis
        try:
            with pytest.raises(StoreError) as info:
                store.get("k")
        finally:
            store.pool.release(held)
        assert not isinstance(info.value, StoreUnavailable)
        assert store.breaker.state == "open"
        assert store.get("k") is None  # the next call is the probe, at once: it reaches Redis
        assert store.breaker.state == "closed"
    finally:
        store.close()


@pytest.mark.redis
def test_an_exhausted_pool_does_not_forget_the_failures_before_it(down_redis: Any) -> None:
    store = RedisStore(down_redis.url, max_connections=1, failure_threshold=2)
    try:
        down_redis.stop()
        with pytest.raises(StoreUnavailable):
            store.get("k")
        down_redis.start()
        held = store.pool.get_connection()
        try:
            with pytest.raises(StoreError):
                store.get("k")
        finally:
            store.pool.release(held)
        assert (store.breaker.state, store.breaker.failures) == ("closed", 1)
        assert store.get("k") is None  # Redis answered: the count starts over
        assert store.breaker.failures == 0
    finally:
        store.close()


@pytest.mark.redis
def test_pooled_connections_survive_a_restart(down_redis: Any) -> None:
    store = RedisStore(down_redis.url, failure_threshold=1)
    try:
        store.set("k", b"v")  # leaves one connection in the pool
        down_redis.stop()
        down_redis.start()
        # The dead pooled connection is replaced on checkout: no error, no breaker trip.
        assert store.get("k") is None
        assert store.breaker.state == "closed"
    finally:
        store.close()


@pytest.mark.redis
def test_scripts_are_loaded_again_after_a_restart(down_redis: Any) -> None:
    """A restarted Redis has no scripts (NOSCRIPT): each of the store's is loaded again by the call that needs
    it, the lock's give-back included, with no error and nothing counted against the breaker."""
    store = RedisStore(down_redis.url, failure_threshold=1)

    def every_script() -> None:
        assert store.incr("n", ttl=60) >= 1
        _, token, seen = store.get_or_lock("entry", "lock", 60, "mark", 60)
        assert token is not None and seen is not None
        assert store.write_unless_marked("mark", seen, [("entry", b"v", 60)], unlock=("lock", token)) is True
        assert store.add_then_write("used", b"1", 60, [("head", b"h", 60)]) is True
        _, token, _ = store.get_or_lock("other", "lock", 60)
        assert token is not None and store.unlock("lock", token) is True
        for key in ("entry", "used"):
            store.delete(key)

    try:
        every_script()  # loaded once
        down_redis.stop()
        down_redis.start()
        every_script()
        assert (store.breaker.state, store.breaker.failures, store.breaker.failure) == ("closed", 0, None)
    finally:
        store.close()


@pytest.mark.redis
def test_readiness_is_a_write_so_a_write_pause_is_not_ready(redis_url: str) -> None:
    """CLIENT PAUSE … WRITE (what a failover does): PING is answered, every write waits: not ready."""
    admin = redis.Redis.from_url(redis_url)
    store = store_from_url(redis_url + "?socket_timeout=0.2")
    try:
        assert store.ping() is True
        redis_command(admin, "CLIENT", "PAUSE", "3000", "WRITE")
        assert admin.ping() is True  # Redis answers a PING all the same
        assert store.ping() is False
        assert store.health()["ok"] is False
        redis_command(admin, "CLIENT", "UNPAUSE")
        deadline = time.monotonic() + 5
        while not store.ping():  # the breaker's next probe closes it
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        redis_command(admin, "CLIENT", "UNPAUSE")
        admin.close()
        store.close()


@pytest.mark.redis
def test_a_script_that_keeps_redis_busy_is_an_outage(redis_url: str) -> None:
    """A script past busy-reply-threshold: every other command gets BUSY. That is not an answer: the store
    fails as when Redis is down (the breaker counts it) and /readyz says why."""
    admin = redis.Redis.from_url(redis_url)
    busy = redis.Redis.from_url(redis_url)
    store = store_from_url(redis_url, failure_threshold=100)  # every failure counted, the breaker stays closed
    assert isinstance(store, RedisStore)
    spin = ("local t = redis.call('TIME') "
            "while true do local n = redis.call('TIME') "
            "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 1500000 then break end end return 1")
    threshold = cast(str, admin.config_get("busy-reply-threshold")["busy-reply-threshold"])
    admin.config_set("busy-reply-threshold", 100)
    runner = threading.Thread(target=lambda: busy.eval(spin, 0))
    try:
        runner.start()
        time.sleep(0.4)
        # Alone, in a transaction (a cache write) and in a pipeline (the rate limiter's round trip),
        # where redis-py words it "Command # 1 (...) of pipeline caused error: BUSY ...".
        def pipeline() -> Any:
            pipe = store.client.pipeline(transaction=False)
            pipe.incr("counted")
            return pipe.execute()

        for call in (lambda: store.get("k"), lambda: store.write([("m", b"1", 1000)], ["k"]),
                     lambda: store.call("count", pipeline, doing="count")):
            with pytest.raises(StoreUnavailable):
                call()
            facts = store.health()
            assert (facts["ok"], facts["error"]) == (False, "busy running a script (BUSY): every command waits "
                                                            "for it to end or be killed")
        # Each call and each readiness ping counted: none read as an answer that would close the breaker.
        assert store.breaker.failures == 6
    finally:
        runner.join(10)
        admin.config_set("busy-reply-threshold", threshold)
        for client in (admin, busy):
            client.close()
        store.close()


@pytest.mark.redis
def test_a_redis_loading_its_data_is_named_so(tmp_path: Any) -> None:
    """A Redis restarted with a large data set answers every command with LOADING until it is read in:
    an outage (the breaker counts it), and /readyz says it is loading, not that it cannot be reached."""
    import shutil
    import subprocess

    from conftest import free_port, wait_for_port

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--dir", str(tmp_path), "--enable-debug-command", "local"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(port=port, socket_timeout=60)
    store = RedisStore(f"redis://127.0.0.1:{port}/0", failure_threshold=1000)
    try:
        wait_for_port(port)
        redis_command(admin, "DEBUG", "POPULATE", "1000000", "k", "64")
        reload = threading.Thread(target=lambda: redis_command(admin, "DEBUG", "RELOAD"))
        reload.start()
        seen: list[object] = []
        while reload.is_alive():
            facts = store.health()
            if not facts["ok"]:
                seen.append(facts["error"])
            time.sleep(0.01)
        reload.join()
        assert "loading its data set (LOADING): it answers once it has read it in" in seen, seen
        assert "not reachable" not in seen
        assert store.health()["ok"] is True
    finally:
        store.close()
        admin.close()
        server.kill()
        server.wait(10)
