"""Shared fixtures: a private redis-server, store URLs for the contract suites, stacks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

REQUIRE_REDIS = os.environ.get("WSGISTACK_REQUIRE_REDIS") == "1"
# Users the tests make are hashed cheaply, and so are the ones the stacks under test rehash
# (a right password with another method is hashed again): a login costs a millisecond, not a third
# of a second. Tests of the real method name it (app.users.HASH_METHOD). Servers started here inherit it.
os.environ.setdefault("WSGISTACK_PASSWORD_HASH", "pbkdf2:sha256:1000")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def redis_command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``, typed: redis-py leaves ``execute_command`` unannotated."""
    execute: Callable[..., Any] = client.execute_command
    return execute(*args)


class RedisServer:
    """A private redis-server on a free port that tests may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server on the same port and wait until it answers."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait for it to go away."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


#: Redis refusing the layers' writes for a cause that passes: (the command that starts it, the one that ends
#: it, what the stack says of it). With ``own_redis``: a failover, then memory freed.
REFUSALS_THAT_PASS = [
    pytest.param(("REPLICAOF", "127.0.0.1", "1"), ("REPLICAOF", "NO", "ONE"),
                 "a read-only replica: every write is refused (give the primary's URL, or redis+sentinel://)",
                 id="failed over: now a replica"),
    pytest.param(("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0"),
                 "out of memory: writes are refused (maxmemory reached, eviction policy noeviction)",
                 id="out of memory"),
]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: made a replica or filled up without touching the shared one."""
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    """A private redis-server for the session, or None when REDIS_URL is given."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    if shutil.which("redis-server") is None:
        if REQUIRE_REDIS:
            pytest.fail("WSGISTACK_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer | None) -> Iterator[str]:
    """URL of a real, empty Redis database (the private server, or REDIS_URL)."""
    url = os.environ.get("REDIS_URL") or (redis_server.url if redis_server else "")
    if redis_server is not None and not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.RedisError as exc:  # pragma: no cover - environment problem
        if REQUIRE_REDIS:
            pytest.fail(f"Redis at {url} does not answer: {exc}")
        pytest.skip(f"Redis at {url} does not answer: {exc}")
    finally:
        client.close()
    yield url


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each store backend in turn: ``memory://`` and a real Redis."""
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def make_stack(tmp_path: Path) -> Callable[..., Any]:
    """Build a WebTest ``TestApp`` over a pipeline given as a stack.yaml dict or text."""
    from webtest import TestApp

    from config import build_from_dict, build_from_text

    def make(data: dict[str, Any] | str, **extra: Any) -> TestApp:
        if isinstance(data, str):
            built = build_from_text(data, base_dir=tmp_path)
        else:
            data = {"app": {"options": {"var_dir": str(tmp_path / "var")}}, **data}
            built = build_from_dict(data, base_dir=tmp_path)
        test_app = TestApp(built.app, **extra)
        test_app.built = built
        return test_app

    return make


class Served:
    """``serve.py -c CONFIG serve`` in a subprocess, listening on ``port`` once constructed.

    Its stdout (the access log) and stderr go to files beside the config,
    named after ``name``.  ``stop()`` sends SIGTERM and waits.
    """

    def __init__(self, config: Path, env: dict[str, str], port: int, name: str = "serve") -> None:
        root = Path(__file__).resolve().parent.parent
        self.name, self.port = name, port
        self.out = config.parent / f"{name}.out"
        self.err = config.parent / f"{name}.err"
        path = os.pathsep.join([str(root), str(root / "tests")])
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(root / "serve.py"), "-c", str(config), "serve"],
                                         cwd=config.parent, env={**os.environ, **env, "PYTHONPATH": path},
                                         stdout=out, stderr=err)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{name} exited with {self.proc.returncode}: {self.err.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{name} does not listen on {port}: {self.err.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
