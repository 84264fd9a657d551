"""Hot reload under steady load: SIGHUP and polling, valid and invalid files, no failed request.

A real serve.py serves the full stack while three keep-alive clients send
requests without pause.  stack.yaml is rewritten 20 times, valid and invalid
in turn.  Every valid write must raise ``X-Stack-Generation`` by one, every
invalid one must leave it alone, and no request may fail.
"""

from __future__ import annotations

import io
import json
import re
import signal
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from loadgen import SECRETS, Load, Req, ServeProcess, full_stack, request
from stack_support import ignore_start
from webtest import TestApp

from app.users import UserStore
from config.live import LiveStack

PLAN = [
    Req("GET", "/api/v1/health"),
    Req("GET", "/api/v1/search?q=json"),
    Req("GET", "/api/v2/search?q=decode", (("Origin", "http://localhost:3000"),)),
    Req("GET", "/healthz"),
    Req("GET", "/api/v1/nope"),
    Req("POST", "/auth/refresh", (("Content-Type", "application/json"),), b'{"refresh_token": "x"}'),
]

#: Invalid rewrites: each must be refused with the old pipeline still serving.
BROKEN: list[tuple[str, Callable[[str], str], str]] = [
    ("yaml syntax", lambda text: text + "\n  - cors: {origins: [\n", "invalid YAML"),
    ("unknown layer", lambda text: text + "  - corz: {}\n", "unknown layer 'corz'; did you mean 'cors'?"),
    ("schema", lambda text: re.sub(r"threads: \d+", "threads: lots", text), "server.threads: Input should be"),
    ("lint", lambda text: text.replace("pipeline:\n", "pipeline:\n  - stack_support:Tag: {}\n"),
     "errors must be the outermost layer"),
    ("missing variable", lambda text: text.replace(SECRETS["JWT_SECRET"], "${NO_SUCH_JWT_SECRET_HERE}"),
     "environment variable NO_SUCH_JWT_SECRET_HERE is not set"),
]


def generation(port: int) -> int:
    status, headers, _ = request(port, "GET", "/healthz")
    assert status == 200
    return int(headers["x-stack-generation"])


def wait_generation(port: int, expected: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := generation(port)) != expected:
        assert seen < expected, f"generation jumped to {seen}, expected {expected}"
        assert time.monotonic() < deadline, f"generation stayed {seen}, expected {expected}"
        time.sleep(0.02)


def test_twenty_rewrites_under_load_fail_no_request(tmp_path: Path) -> None:
    port, other_port = free_port(), free_port()
    path = tmp_path / "stack.yaml"
    var = tmp_path / "var"

    def valid(i: int, *, listen: int = port, threads: int = 8, watch: str = "") -> str:
        text = full_stack(listen, var, errors_format=("envelope", "problem")[i % 2],
                          origin=f"https://app{i}.example", server=watch)
        return text.replace("threads: 8", f"threads: {threads}")

    path.write_text(valid(0))
    server = ServeProcess(path).start()
    try:
        wait_for_port(port)
        request(port, "GET", "/api/v1/search?q=json")  # build the search index before the load starts
        gen, failed, listen, threads = 1, 0, port, 8
        with Load(port, PLAN, threads=3, max_seconds=60) as load:
            load.wait_for(100)
            for step in range(20):
                if step % 2 == 1:  # invalid
                    name, breaks, message = BROKEN[(step // 2) % len(BROKEN)]
                    path.write_text(breaks(valid(step, listen=listen, threads=threads)))
                    if step != 13:  # at step 13 the poller is on: it reads the broken file by itself
                        server.signal(signal.SIGHUP)
                    failed += 1
                    server.wait_output("reload failed", count=failed)
                    line = [x for x in server.output().splitlines() if "reload failed" in x][-1]
                    assert f"reload failed, generation {gen} keeps serving" in line
                    assert message in line, name
                    assert generation(port) == gen, name
                    continue
                if step == 4:  # a new thread count needs a restart
                    threads = 12
                elif step == 8:  # so does a new address: the old one keeps serving meanwhile
                    listen = other_port
                elif step == 10:  # back to the address in force: nothing to restart for there
                    listen = port
                # Compared with what the process started with, so reported on every reload until a restart.
                needs = [name for name, pending in (("listen", listen != port), ("threads", threads != 8)) if pending]
                watch = ""
                if step == 12:
                    watch = "  reload: {watch: true, interval: 0.1}"
                path.write_text(valid(step, listen=listen, threads=threads, watch=watch))
                if step == 14:  # the poller notices without a signal; the new file turns polling off
                    pass
                elif step == 16:  # watch is off again: nothing happens until SIGHUP
                    time.sleep(0.5)
                    assert generation(port) == gen
                    server.signal(signal.SIGHUP)
                else:
                    server.signal(signal.SIGHUP)
                gen += 1
                wait_generation(port, gen)
                summary = f"generation {gen} serving"
                server.wait_output(summary)
                line = next(x for x in server.output().splitlines() if summary in x)
                if needs:
                    assert f"needs restart to apply: {', '.join(needs)}" in line
                else:
                    assert "needs restart" not in line
                load.wait_for(30)
            load.wait_for(100)
    finally:
        code = server.stop()
    output = server.output()
    assert code == 0
    assert gen == 11
    results = load.snapshot()
    assert len(results) > 1000
    assert load.failures() == []
    assert {r.status for r in results} <= {200, 400, 401, 404}
    for thread in range(3):  # each connection saw the generation rise one step at a time, never fall
        seen = [int(r.headers["x-stack-generation"]) for r in results if r.thread == thread]
        assert seen == sorted(seen)
    assert set(range(1, 12)) <= {int(r.headers["x-stack-generation"]) for r in results}
    starts = sorted(r.started for r in results)
    assert max(b - a for a, b in pairwise(starts)) < 1.0, "the load stalled"
    assert "Traceback" not in output
    assert output.count("reload failed") == 10


# ---------------------------------------------------------------- in-process: state carried over


def test_a_reload_keeps_memory_state_revoked_tokens_and_sessions(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(full_stack(free_port(), tmp_path / "var"))
    UserStore(str(tmp_path / "var" / "users.sqlite3")).add("alice", "correct horse battery", ["admin"])
    live = LiveStack(path)
    client = TestApp(live, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    credentials = {"username": "alice", "password": "correct horse battery"}
    revoked = client.post_json("/auth/login", credentials).json["access_token"]
    client.post("/auth/logout", headers={"Authorization": f"Bearer {revoked}"}, status=204)
    client.get("/api/v1/health", headers={"Authorization": f"Bearer {revoked}"}, status=401)
    kept = client.post_json("/auth/login", credentials).json["access_token"]  # and a session cookie
    assert "wsgistack_session" in client.cookies

    path.write_text(full_stack(free_port(), tmp_path / "var", errors_format="problem"))
    assert live.reload().ok and live.generation == 2
    refused = client.get("/api/v1/health", headers={"Authorization": f"Bearer {revoked}"}, status=401)
    assert refused.content_type == "application/problem+json"  # the new pipeline answered
    client.get("/api/v1/health", headers={"Authorization": f"Bearer {kept}"}, status=200)
    # The cookie's session, stored before the reload, still identifies its user (the access log says who).
    log = tmp_path / "var" / "access.log"
    client.get("/api/v1/health")
    assert json.loads(log.read_text().splitlines()[-1])["user"] == "alice"
    client.post("/auth/logout", headers={"Origin": "http://localhost:3000"}, status=204)
    client.get("/api/v1/health")
    assert json.loads(log.read_text().splitlines()[-1])["user"] is None

    # A changed store URL starts from scratch, as the operator asked.
    path.write_text(full_stack(free_port(), tmp_path / "var", store="memory://?max_entries=5000"))
    assert live.reload().ok
    client.get("/api/v1/health", headers={"Authorization": f"Bearer {revoked}"}, status=200)


def test_watch_follows_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    base = 'app: {factory: "stack_support:echo_app"}\npipeline: [errors: {}]\n'
    path.write_text(base)
    live = LiveStack(path)
    live.follow_watch()
    try:
        time.sleep(0.2)
        path.write_text(base + "server: {reload: {watch: true, interval: 0.05}}\n")
        assert live.generation == 1  # not watching yet: only a signal reloads
        assert live.reload().ok and live.generation == 2
        path.write_text(base + "server: {reload: {watch: true, interval: 0.05}, ident: x}\n")
        _wait(lambda: live.generation == 3)
        path.write_text(base)  # the poller reads this and stops
        _wait(lambda: live.generation == 4)
        time.sleep(0.2)
        path.write_text(base + "server: {ident: y}\n")
        time.sleep(0.3)
        assert live.generation == 4
    finally:
        live.stop_watch()


def test_a_shorter_interval_applies_at_once(tmp_path: Path) -> None:
    """The poller waiting out an hour's interval does not keep a reload to 0.05 s waiting for that hour."""
    path = tmp_path / "stack.yaml"
    base = 'app: {factory: "stack_support:echo_app"}\npipeline: [errors: {}]\n'
    path.write_text(base + "server: {reload: {watch: true, interval: 3600}}\n")
    live = LiveStack(path)
    live.follow_watch()
    try:
        path.write_text(base + "server: {reload: {watch: true, interval: 0.05}}\n")
        assert live.reload().ok and live.generation == 2  # a SIGHUP
        time.sleep(0.2)
        path.write_text(base + "server: {reload: {watch: true, interval: 0.05}, ident: x}\n")
        _wait(lambda: live.generation == 3)
    finally:
        live.stop_watch()


def test_watch_waits_until_the_file_stops_changing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file written in place in several pieces is read once it has stayed the same for an interval."""
    path = tmp_path / "stack.yaml"
    head = 'app: {factory: "stack_support:echo_app"}\nserver: {reload: {watch: true, interval: 0.2}}\n'
    full = head + "pipeline:\n  - errors: {}\n  - request_id: {}\n  - headers: {}\n"
    path.write_text(full)
    live = LiveStack(path)
    live.follow_watch()
    try:
        with path.open("w") as out:  # a slow copy: a shorter, valid prefix, then the rest
            for piece in (head + "pipeline:\n  - errors: {}\n", "  - request_id: {}\n", "  - headers: {}\n"):
                out.write(piece)
                out.flush()
                time.sleep(0.12)  # less than an interval between pieces
        _wait(lambda: live.generation == 2)
        assert [spec.name for spec in live.current.config.pipeline] == ["errors", "request_id", "headers"]
        with caplog.at_level("WARNING", logger="wsgistack"):
            path.write_text(head + "pipeline:\n  - errors: {}\n")
            # The poller logs the warning just after it swaps the pipeline (and counts the generation).
            removed = "the new pipeline has no request_id, headers any more (layers it removed)"
            _wait(lambda: live.generation == 3 and removed in caplog.text)
    finally:
        live.stop_watch()


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the poller did not reload in time")
        time.sleep(0.01)


def test_every_server_setting_is_applied_by_a_reload_or_reported() -> None:
    """A new server setting must be added to RESTART_ONLY unless a reload really applies it."""
    from config.live import RESTART_ONLY
    from config.schema import ServerOptions

    # drain_timeout is read when the server stops, so the configuration in force then applies;
    # worker_timeout by the supervisor on every pass of its loop, from its reloaded configuration.
    assert set(ServerOptions.model_fields) - set(RESTART_ONLY) == {"generation_header", "reload", "drain_timeout",
                                                                   "worker_timeout"}


def test_requests_still_running_on_a_replaced_pipeline_at_exit_get_their_access_lines(tmp_path: Path) -> None:
    """A stream on generation 1, a reload, then the server stops: generation 1's layers are closed too."""
    path = tmp_path / "stack.yaml"
    log = tmp_path / "access.log"
    config = ('app: {factory: "stack_support:large_app", options: {mib: 1}}\n'
              f"pipeline:\n  - errors: {{}}\n  - access_log: {{file: {log}}}\n")
    path.write_text(config)
    live = LiveStack(path)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/download", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
               "wsgi.errors": io.StringIO(), "REMOTE_ADDR": "127.0.0.1"}
    body = live(environ, ignore_start)
    next(iter(body))  # sending, when the file is changed and reloaded
    path.write_text(config + "  - request_id: {}\n")
    assert live.reload().ok and live.generation == 2
    live.close()
    [line] = [json.loads(text) for text in log.read_text().splitlines()]
    assert (line["path"], line["error"]) == ("/download", "shutdown")
