"""Settings only a restart applies: reported until the restart, and the ones in force stay in force.

A reload compares the file with the settings the process started with, not
with the file it read last, so a second reload does not forget a pending
``listen`` change; and a worker the supervisor starts after a reload serves
with the settings its siblings run with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_for_port
from loadgen import ServeProcess
from stack_support import ignore_start

from config.live import LiveStack

ECHO = 'app: {factory: "stack_support:echo_app"}\n'


def stack(port: int, threads: int = 4, extra: str = "", pipeline: str = "  - errors: {}\n") -> str:
    return ECHO + f"server:\n  listen: 127.0.0.1:{port}\n  threads: {threads}\n{extra}pipeline:\n{pipeline}"


@pytest.fixture
def live(tmp_path: Path) -> LiveStack:
    """A LiveStack on a stack.yaml listening on port 18101 with 4 threads."""
    path = tmp_path / "stack.yaml"
    path.write_text(stack(18101))
    return LiveStack(path)


def reload_with(live: LiveStack, text: str) -> list[str]:
    Path(live.path).write_text(text)
    result = live.reload()
    assert result.ok, result.problems
    return result.needs_restart


def test_a_pending_restart_is_reported_until_the_restart(live: LiveStack) -> None:
    assert reload_with(live, stack(18102)) == ["listen"]
    # Another reload that leaves listen as the file has it: the server still listens on 18101.
    assert reload_with(live, stack(18102, extra="  generation_header: true\n")) == ["listen"]
    assert live.last.summary() == "generation 3 serving; needs restart to apply: listen"
    assert reload_with(live, stack(18102, threads=12)) == ["listen", "threads"]
    assert reload_with(live, stack(18101, threads=12)) == ["threads"]
    assert reload_with(live, stack(18101)) == []  # back to what is in force: nothing to restart for
    assert live.current.context.settings["last_reload"].needs_restart == []
    assert live.in_force.listen == ["127.0.0.1:18101"] and live.waitress_kwargs["threads"] == 4


def test_a_new_proxy_layer_needs_waitress_to_keep_the_headers(live: LiveStack) -> None:
    """Waitress clears forwarding headers (in force) until a restart lets the new proxy layer read them."""
    proxy = "  - errors: {}\n  - proxy: {x_for: 1}\n"
    assert reload_with(live, stack(18101, pipeline=proxy)) == ["clear_untrusted_proxy_headers"]
    assert live.waitress_kwargs["clear_untrusted_proxy_headers"] is True


def test_a_reload_never_widens_debug_to_a_public_listener(tmp_path: Path) -> None:
    """debug needs loopback only: judged on the sockets in force as well as on the file."""
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + "server: {listen: '0.0.0.0:18103'}\npipeline: [errors: {}]\n")
    live = LiveStack(path)
    path.write_text(ECHO + "server: {listen: '127.0.0.1:18103'}\npipeline: [errors: {debug: true}]\n")
    result = live.reload()
    assert not result.ok
    assert [p.message for p in result.problems] == [
        "debug may be true only when the server listens on loopback only, with no proxy forwarding remote clients "
        "to it (server.trusted_proxy, a proxy layer)"]


def test_the_server_is_created_with_the_settings_in_force(live: LiveStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """What serve.py hands Waitress (also in a worker started after a reload): the settings in force."""
    import waitress.server

    import serve

    assert reload_with(live, stack(18101, threads=12)) == ["threads"]
    created: list[dict[str, Any]] = []

    def create_server(app: Any, **kw: Any) -> object:
        created.append(kw)
        return object()

    monkeypatch.setattr(waitress.server, "create_server", create_server)
    monkeypatch.setattr(serve, "_serve_until", lambda *args, **kw: True)
    handlers = {signum: signal.getsignal(signum) for signum in serve.HANDLED}
    try:
        assert serve._run_waitress(live, []) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert created[0]["threads"] == 4


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_restarted_after_a_reload_runs_with_its_siblings_settings(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(stack(port, threads=2, extra="  workers: 2\n"))
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "2"}).start()
    try:
        wait_for_port(port)
        _wait(lambda: len(_children(server.pid)) == 2, "two workers")
        workers = _children(server.pid)
        path.write_text(stack(port, threads=24, extra="  workers: 2\n"))
        server.signal(signal.SIGHUP)
        server.wait_output("supervisor: generation 2 serving; needs restart to apply: threads")
        for pid in workers:
            server.wait_output(f"worker {pid}: generation 2 serving; needs restart to apply: threads")
        victim, sibling = sorted(workers)
        os.kill(victim, signal.SIGKILL)
        server.wait_output(f"worker {victim} was killed by signal 9")
        _wait(lambda: len(_children(server.pid) - workers) == 1, "a new worker")
        (fresh,) = _children(server.pid) - workers
        _wait(lambda: _threads(fresh) >= 3, "the new worker's server threads")
        time.sleep(0.5)  # all of them
        assert _children(server.pid) == {sibling, fresh}, server.output()
        # Two Waitress threads each, not 24 in one and 2 in the other (give or take a helper thread).
        assert abs(_threads(fresh) - _threads(sibling)) <= 2, (_threads(fresh), _threads(sibling))
        assert _threads(fresh) < 12
    finally:
        server.stop()
    assert "Traceback" not in server.output()


# ---------------------------------------------------------------- the replaced pipeline is closed


def _closing_stack(port: int, name: str, stores: str = "") -> str:
    return stack(port, extra="", pipeline=f"  - errors: {{}}\n  - stack_support:Closing: {{name: {name}}}\n") + stores


def _environ() -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    return EnvironBuilder(path="/x").get_environ()


def test_a_reload_closes_the_pipeline_it_replaced(tmp_path: Path) -> None:
    """Layers that hold resources (threads, files, connections) are closed, not left to the collector."""
    from stack_support import CLOSING_LOG

    CLOSING_LOG.clear()
    path = tmp_path / "stack.yaml"
    path.write_text(_closing_stack(18104, "one"))
    live = LiveStack(path)
    for name in ("two", "three"):
        reload_with(live, _closing_stack(18104, name))
    assert CLOSING_LOG == [("open", "one"), ("open", "two"), ("close", "one"), ("open", "three"), ("close", "two")]


def test_a_reload_closes_the_app_it_replaced(tmp_path: Path) -> None:
    """The app's close() (the Flask core's users database and search index) runs with its pipeline's."""
    from stack_support import CLOSING_LOG

    CLOSING_LOG.clear()
    path = tmp_path / "stack.yaml"
    path.write_text(stack(18108).replace("stack_support:echo_app", "stack_support:closing_app"))
    live = LiveStack(path)
    reload_with(live, stack(18108, threads=5).replace("stack_support:echo_app", "stack_support:closing_app"))
    assert CLOSING_LOG == [("close", "app")]


def test_a_request_in_flight_keeps_its_pipeline_open_until_it_finishes(tmp_path: Path) -> None:
    from stack_support import CLOSING_LOG

    CLOSING_LOG.clear()
    path = tmp_path / "stack.yaml"
    path.write_text(_closing_stack(18105, "old"))
    live = LiveStack(path)
    body = live(_environ(), ignore_start)
    reload_with(live, _closing_stack(18105, "new"))
    assert ("close", "old") not in CLOSING_LOG  # the response is still being sent
    assert b"".join(body)
    body.close()  # type: ignore[attr-defined]
    assert CLOSING_LOG[-1] == ("close", "old")
    live(_environ(), ignore_start).close()  # type: ignore[attr-defined]
    assert ("close", "new") not in CLOSING_LOG


def test_a_failing_request_counts_out_too(tmp_path: Path) -> None:
    from stack_support import CLOSING_LOG

    CLOSING_LOG.clear()
    path = tmp_path / "stack.yaml"
    path.write_text(_closing_stack(18106, "old"))
    live = LiveStack(path)

    def broken(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        raise OSError("the client went away")

    with pytest.raises(OSError):
        live(_environ(), broken)
    reload_with(live, _closing_stack(18106, "new"))
    assert CLOSING_LOG[-1] == ("close", "old")


def test_a_file_handed_to_the_server_counts_its_request_out_at_once(tmp_path: Path) -> None:
    """A ``wsgi.file_wrapper`` goes to the server as it is (to send the file itself): the pipeline is done with
    it, and a reload closes the pipeline it replaced without waiting for a close() that never reaches it."""
    from wsgiref.util import FileWrapper

    from stack_support import CLOSING_LOG

    CLOSING_LOG.clear()
    path = tmp_path / "stack.yaml"
    framing = 'app: {factory: "test_serve_framing:framing_app"}\n'
    path.write_text(_closing_stack(18107, "old").replace(ECHO, framing))
    live = LiveStack(path)
    body = live({**_environ(), "PATH_INFO": "/file", "wsgi.file_wrapper": FileWrapper}, ignore_start)
    assert isinstance(body, FileWrapper)
    reload_with(live, _closing_stack(18107, "new").replace(ECHO, framing))
    assert CLOSING_LOG[-1] == ("close", "old")
    body.close()


def test_a_reload_takes_the_generation_it_is_given(tmp_path: Path) -> None:
    """A worker follows its supervisor's generation (built from the text the supervisor built), not its own count."""
    path = tmp_path / "stack.yaml"
    path.write_text(stack(18109))
    live = LiveStack(path)
    result = live.reload(generation=7, source=stack(18109, threads=5))
    assert (result.ok, result.generation, live.generation) == (True, 7, 7)
    assert live.current.context.settings["generation"] == 7
    assert result.needs_restart == ["threads"]  # built from the text given, not from the file (4 threads)
    assert live.reload().generation == 8


@pytest.mark.redis
def test_a_reload_releases_the_redis_connections_of_the_old_pipeline(tmp_path: Path, redis_url: str) -> None:
    import redis

    base = redis_url.rsplit("/", 1)[0]
    client = redis.Redis.from_url(redis_url)

    def connected(db: int) -> int:
        return sum(1 for c in client.client_list() if c["db"] == str(db) and c["cmd"] != "client|list")

    path = tmp_path / "stack.yaml"
    pipeline = ("  - errors: {}\n  - ratelimit: {store: shared, limits: ['100/minute']}\n")
    for db in (3, 4, 5):
        text = stack(18107, pipeline=pipeline) + f"stores: {{shared: '{base}/{db}'}}\n"
        if db == 3:
            path.write_text(text)
            live = LiveStack(path)
        else:
            reload_with(live, text)
        live(_environ(), ignore_start).close()  # type: ignore[attr-defined]
        assert connected(db) >= 1
    assert connected(3) == connected(4) == 0  # only the pipeline serving now holds connections
    live.current.close()
    client.close()


@pytest.mark.redis
def test_a_reload_cannot_put_per_process_state_under_the_workers_in_force(tmp_path: Path, redis_url: str) -> None:
    """workers: 1 in the file applies at the next restart: the two workers running now would each
    keep their own sessions (a logout on one would not reach the other)."""
    session = "  - errors: {}\n  - session: {store: shared, secret_key: '" + "s" * 40 + "'}\n"
    path = tmp_path / "stack.yaml"
    path.write_text(stack(18109, extra="  workers: 2\n", pipeline=session) + f"stores: {{shared: '{redis_url}'}}\n")
    live = LiveStack(path)
    path.write_text(stack(18109, pipeline=session) + "stores: {shared: 'memory://'}\n")
    result = live.reload()
    assert not result.ok
    assert [p.message for p in result.problems] == [
        "session keeps state in store 'shared' (memory://) but server.workers is 2: each process would have its "
        "own copy; use redis:// (with the server settings in force: a restart applies the file's)"]
    live.current.close()


def test_a_failed_build_closes_the_app_it_made(tmp_path: Path) -> None:
    """A layer that cannot be built: the app made before it is closed, not left open until collected."""
    from stack_support import CLOSING_LOG

    from config import ConfigError, build_from_text

    CLOSING_LOG.clear()
    with pytest.raises(ConfigError):
        build_from_text('app: {factory: "stack_support:closing_app"}\npipeline:\n  - errors: {}\n'
                        "  - access_log: {file: /nonexistent/dir/access.log}\n")
    assert CLOSING_LOG == [("close", "app")]


def test_a_reload_is_linted_against_the_proxy_trust_in_force(tmp_path: Path) -> None:
    """A ProxyFix behind server.trusted_proxy is safe as a fresh start; reloaded into a server started with
    the proxy layer on a public listener, Waitress keeps every client's X-Forwarded-For for ProxyFix to believe."""
    proxy_layer = "  - errors: {}\n  - proxy: {x_for: 1, trusted_proxies: [127.0.0.1/32]}\n"
    proxyfix = "  - errors: {}\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n"
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + "server: {listen: '0.0.0.0:18110'}\npipeline:\n" + proxy_layer)
    live = LiveStack(path)
    assert live.waitress_kwargs["clear_untrusted_proxy_headers"] is False  # the proxy layer reads them
    path.write_text(ECHO + "server:\n  listen: '0.0.0.0:18110'\n  trusted_proxy: 127.0.0.1\n"
                    "  trusted_proxy_headers: [x-forwarded-for]\npipeline:\n" + proxyfix)
    result = live.reload()
    assert not result.ok
    assert [p.message for p in result.problems] == [
        "werkzeug.middleware.proxy_fix:ProxyFix at pipeline[1] believes X-Forwarded-* from every peer, and the "
        "server listens on 0.0.0.0:18110: any client could set its own address (its rate-limit key, allow_from); "
        "use the proxy layer with trusted_proxies, or server.trusted_proxy (with the server settings in force: a "
        "restart applies the file's)"]
    assert live.generation == 1
    live.current.close()


CORE = ("app:\n  factory: app:create_app\n  options:\n    var_dir: var\n"
        "    search: {{stream_interval: 3, max_streams: {streams}}}\n")
IN_FORCE = " (with the server settings in force: a restart applies the file's)"
STREAMS = ("search.max_streams ({streams}) is not below server.threads ({threads}) with search.stream_interval 3: "
           "paced streams can hold every server thread of a process (each for about five intervals), and every other "
           "request, the health probes too, then waits behind them; set max_streams to at most {most}, or raise "
           "server.threads (both count per process, with workers too)")
BODY = ("validation.max_body_bytes (5000) is above server.max_request_body_size (1000): Waitress refuses larger "
        "bodies first, with its own plain-text 413")
HEADERS = ("validation.max_total_header_bytes (20000) is above server.max_request_header_size (10000): Waitress "
           "refuses larger header blocks first")


def _served(threads: int, streams: int, server: str = "", validation: str = "") -> str:
    pipeline = "  - errors: {}\n" + (f"  - validation: {validation}\n" if validation else "")
    return (f"server:\n  listen: 127.0.0.1:18112\n  threads: {threads}\n{server}" + CORE.format(streams=streams)
            + "pipeline:\n" + pipeline)


@pytest.mark.parametrize(("started", "reloaded", "needs", "expected"), [
    pytest.param(_served(4, 3), _served(8, 6), ["threads"],
                 [STREAMS.format(streams=6, threads=4, most=3) + IN_FORCE],
                 id="more streams for threads a restart would add: the 4 running are judged"),
    pytest.param(_served(8, 6), _served(4, 6), ["threads"], [],
                 id="fewer threads in the file, 8 still running: no warning"),
    pytest.param(_served(4, 3), _served(4, 4), [], [STREAMS.format(streams=4, threads=4, most=3)],
                 id="the file's threads are those running: the file's own warning"),
    pytest.param(_served(4, 3, "  max_request_body_size: 1000\n", "{max_body_bytes: 500}"),
                 _served(4, 3, "  max_request_body_size: 10000\n", "{max_body_bytes: 5000}"),
                 ["max_request_body_size"], [BODY + IN_FORCE], id="a body limit above Waitress's in force"),
    pytest.param(_served(4, 3, "  max_request_header_size: 10000\n", "{max_total_header_bytes: 8000}"),
                 _served(4, 3, "  max_request_header_size: 30000\n", "{max_total_header_bytes: 20000}"),
                 ["max_request_header_size"], [HEADERS + IN_FORCE],
                 id="a header limit judged against Waitress's in force, not the file's"),
    pytest.param(_served(4, 3, "  max_request_header_size: 30000\n", "{max_total_header_bytes: 20000}"),
                 _served(4, 3, "  max_request_header_size: 10000\n", "{max_total_header_bytes: 20000}"),
                 ["max_request_header_size"], [], id="a header limit the file lowers, the old one in force"),
])
def test_a_reload_is_linted_against_the_server_settings_in_force(tmp_path: Path, started: str, reloaded: str,
                                                                 needs: list[str], expected: list[str]) -> None:
    """Every rule that reads server settings judges a reload by the ones running (threads, Waitress's limits),
    not by the file's, which apply only after a restart."""
    path = tmp_path / "stack.yaml"
    path.write_text(started)
    live = LiveStack(path)
    try:
        assert live.current.warnings == []
        path.write_text(reloaded)
        result = live.reload()
        assert result.ok and result.needs_restart == needs, result.summary()
        assert [p.message for p in result.problems] == expected
        assert [p.severity for p in result.problems] == ["warning"] * len(expected)
    finally:
        live.close()


def test_a_file_made_readable_again_counts_as_changed(live: LiveStack) -> None:
    # An edit that could not be read (the file was 0600 to another user) is read once the file's
    # mode changes: a chmod changes the ctime, though not the mtime, size or inode.
    path = Path(live.path)
    assert not live.changed()
    before = path.stat()
    os.chmod(path, 0o600)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the mtime as it was
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert live.changed()


def test_a_process_that_writes_no_line_lets_go_of_a_rotated_log(tmp_path: Path) -> None:
    """serve.py's supervisor holds the pipeline but never writes through it: follow_files() reopens."""
    path = tmp_path / "stack.yaml"
    path.write_text(stack(18105, pipeline=f"  - errors: {{}}\n  - access_log: {{file: {tmp_path}/access.log}}\n"))
    live = LiveStack(path)
    try:
        (tmp_path / "access.log").rename(tmp_path / "access.log.1")
        live.follow_files()
        held = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # one closed meanwhile
                held.add(os.readlink(f"/proc/self/fd/{fd}"))
        assert str(tmp_path / "access.log") in held
        assert str(tmp_path / "access.log.1") not in held
    finally:
        live.current.close()


@pytest.mark.redis
def test_a_reload_refused_for_a_store_gives_back_the_stores_it_made(tmp_path: Path, redis_url: str) -> None:
    """Each refused reload held one more share of the Redis pool: the old Redis was never disconnected."""
    from stores.redis import _SHARED

    path = tmp_path / "stack.yaml"
    good = ECHO + f"stores: {{shared: '{redis_url}'}}\npipeline:\n  - errors: {{}}\n"
    path.write_text(good)
    live = LiveStack(path)
    try:
        users = sorted(shared.users for shared in _SHARED.values())
        bad = good.replace("stores: {", "stores: {other: 'redis://127.0.0.1:1/0?socket_timeout=abc', ")
        for _ in range(3):
            path.write_text(bad)
            assert not live.reload().ok
        assert sorted(shared.users for shared in _SHARED.values()) == users
    finally:
        live.current.close()
