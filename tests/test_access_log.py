"""The access_log layer: one JSON line per request, counted bytes, no log injection."""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import abort
from werkzeug.wrappers import Response

from middleware import access_log
from middleware.access_log import AccessLogMiddleware, LineHandler, write_atomic
from middleware.base import IDENTITY, REQUEST_ID, Context, Identity, refuse
from middleware.errors import ErrorsMiddleware

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Body:
    """A streamed response body that records whether the server closed it."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks, self.fail_after, self.closed = chunks, fail_after, False

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_after:
                raise OSError("upstream went away")
            yield chunk

    def close(self) -> None:
        self.closed = True


class Inner:
    """An inner app that answers by path, like the layers and the Flask core would."""

    def __init__(self) -> None:
        self.body: Body | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        environ[REQUEST_ID] = "req-1"
        if path == "/crash":
            raise RuntimeError("secret text that must not reach the log")
        if path == "/limited":
            raise refuse(429, "Slow down.", headers=[("Retry-After", "3")])
        if path == "/teapot":  # werkzeug's abort(Response(...)): errors answers with that response
            abort(Response("short and stout", status=418))
        if path == "/refused-on-first-chunk":  # a generator app: start_response, and a refusal, come on next()
            return refused_on_first_chunk(start_response)
        if path == "/crash-on-first-chunk":
            return crash_on_first_chunk(start_response)
        if path == "/me":
            environ[IDENTITY] = Identity("alice", frozenset({"admin"}))
        if path == "/stream":
            self.body = Body([b"data: 1\n\n", b"data: 22\n\n", b"data: 333\n\n"])
            start_response("200 OK", [("Content-Type", "text/event-stream")])
            return self.body
        if path in ("/broken-stream", "/broken-at-once", "/broken-after-nothing"):
            chunks = [b"", b"second"] if path == "/broken-after-nothing" else [b"first", b"second"]
            self.body = Body(chunks, fail_after=0 if path == "/broken-at-once" else 1)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return self.body
        if path in ("/write-then-crash", "/write-then-refuse"):  # the status and bytes went out, then it failed
            start_response("200 OK", [("Content-Type", "text/plain")])(b"partial")
            if path == "/write-then-refuse":
                raise refuse(404, "Gone meanwhile.")
            raise OSError("client went away")
        if path == "/write":
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"legacy ")
            return [b"write"]
        status = "404 Not Found" if path == "/missing" else "200 OK"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]


def refused_on_first_chunk(start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app's body: a layer's start_response refuses (a session's save), which errors renders."""
    raise refuse(403, "Not yours.")
    start_response("200 OK", [])  # pragma: no cover - refused before
    yield b"never"  # pragma: no cover


def crash_on_first_chunk(start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app's body that fails before it starts the response: errors renders a 500."""
    raise RuntimeError("secret text that must not reach the log")
    start_response("200 OK", [])  # pragma: no cover - failed before
    yield b"never"  # pragma: no cover


#: In an expected line: the length of the body the client got (a refusal's, as errors rendered it).
SENT = object()


@pytest.fixture
def inner() -> Inner:
    """The inner app."""
    return Inner()


@pytest.fixture
def make(inner: Inner, tmp_path: Path) -> Iterator[Callable[..., tuple[TestApp, Callable[[], list[dict[str, Any]]]]]]:
    """Build errors -> access_log (to a file) -> inner; return the app and a reader of the lines."""
    layers: list[AccessLogMiddleware] = []
    log_file = tmp_path / "access.log"

    def build(**options: Any) -> tuple[TestApp, Callable[[], list[dict[str, Any]]]]:
        layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(file=str(log_file), **options), Context())
        layers.append(layer)
        app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context()))

        def lines() -> list[dict[str, Any]]:
            text = log_file.read_text(encoding="utf-8") if log_file.exists() else ""
            assert text == "" or text.endswith("\n")
            return [json.loads(line) for line in text.splitlines()]

        return app, lines

    yield build
    for layer in layers:
        layer.close()


@pytest.mark.parametrize(
    ("options", "request_path", "expected"),
    [
        pytest.param({}, "/hello", {"method": "GET", "path": "/hello", "status": 200, "bytes": 5,
                                    "user": None, "request_id": "req-1"}, id="plain request"),
        pytest.param({}, "/missing", {"status": 404, "bytes": 5}, id="app's own 404"),
        pytest.param({}, "/me", {"user": "alice"}, id="identity set by an inner layer"),
        pytest.param({}, "/stream", {"status": 200, "bytes": 9 + 10 + 11}, id="streamed body counted"),
        pytest.param({}, "/write", {"bytes": 12}, id="legacy write() counted"),
        pytest.param({}, "/limited", {"status": 429, "bytes": SENT}, id="refusal logged with its code and body"),
        pytest.param({}, "/teapot", {"status": 418, "bytes": SENT}, id="a refusal with its own response: its status"),
        pytest.param({}, "/refused-on-first-chunk", {"status": 403, "bytes": SENT},
                     id="a generator app's refusal, rendered by errors: its status, no error"),
        pytest.param({}, "/crash", {"status": 500, "bytes": SENT, "error": "RuntimeError"},
                     id="exception logged as 500"),
        pytest.param({}, "/crash-on-first-chunk", {"status": 500, "bytes": SENT, "error": "RuntimeError"},
                     id="a generator app's exception before it starts: logged as 500"),
        pytest.param({}, "/caf%C3%A9?token=secret", {"path": "/caf\u00e9"}, id="utf-8 path, no query"),
        pytest.param({}, "/caf%E9", {"path": "/caf\\xe9"}, id="a byte that is not UTF-8: told apart from /caf%C3%A9"),
        pytest.param({"query": True}, "/q?x=caf%E9", {"query": "x=caf%E9"}, id="a query as sent"),
        pytest.param({"query": True}, "/q?token=secret&x=1", {"query": "token=secret&x=1"}, id="query on"),
        pytest.param({}, "/hello", {"user_agent": "probe/1.0"}, id="user agent"),
    ],
)
def test_fields(make: Callable[..., Any], options: dict[str, Any], request_path: str,
                expected: dict[str, Any]) -> None:
    app, lines = make(**options)
    response = app.get(request_path, headers={"User-Agent": "probe/1.0"}, extra_environ={"REMOTE_ADDR": "192.0.2.7"},
                       expect_errors=True)
    [line] = lines()
    expected = {k: len(response.body) if v is SENT else v for k, v in expected.items()}
    assert response.body or expected.get("bytes") == 0  # (the rendered ones have a body to count)
    assert {k: line[k] for k in expected} == expected
    assert ISO_UTC.match(line["time"]), line["time"]
    assert line["client_ip"] == "192.0.2.7"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert ("query" in line) is bool(options.get("query"))
    assert ("error" in line) is ("error" in expected)
    assert "secret text" not in json.dumps(line)


@pytest.mark.parametrize(("raw", "shown"), [
    pytest.param("caf\u00e9".encode().decode("latin-1"), "caf\u00e9", id="UTF-8 bytes: the text"),
    pytest.param("caf\xe9", "caf\\xe9", id="a byte that is not UTF-8: escaped, told apart from UTF-8"),
])
def test_raw_bytes_in_the_query_and_user_agent_are_shown_as_the_paths_are(make: Callable[..., Any], raw: str,
                                                                           shown: str) -> None:
    """PEP 3333 gives the bytes of a query and a header as latin-1: the line shows them as UTF-8, as a path's."""
    from webtest import TestRequest

    app, lines = make(query=True)
    request = TestRequest.blank("/hello")
    request.environ.update({"QUERY_STRING": f"q={raw}", "HTTP_USER_AGENT": f"{raw}/1.0"})  # as Waitress passes them
    app.do_request(request)
    [line] = lines()
    assert (line["query"], line["user_agent"]) == (f"q={shown}", f"{shown}/1.0")


@pytest.mark.parametrize("path", ["/limited", "/crash", "/refused-on-first-chunk"])
def test_a_refusal_to_head_is_logged_with_the_no_bytes_errors_sent(make: Callable[..., Any], path: str) -> None:
    app, lines = make()
    response = app.head(path, expect_errors=True)
    assert response.body == b"" and int(response.headers["Content-Length"]) > 0
    assert lines()[0]["bytes"] == 0


@pytest.mark.parametrize("path", ["/limited", "/crash"])
def test_a_refusal_nothing_renders_outside_is_logged_at_once_with_no_bytes(inner: Inner, tmp_path: Path,
                                                                           path: str) -> None:
    """Without errors outside, the server answers the exception: the line goes out as it passes, 0 bytes."""
    log_file = tmp_path / "access.log"
    layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(file=str(log_file)), Context())
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
    setup_testing_defaults(environ)
    with pytest.raises(Exception) as raised:
        layer(environ, ignore_start)
    line = json.loads(log_file.read_text(encoding="utf-8"))  # written before the exception went on
    assert (line["status"], line["bytes"]) == ({"/limited": 429, "/crash": 500}[path], 0)
    assert not hasattr(raised.value, "wsgistack_rendered")
    layer.close()


def test_a_refusal_a_layer_outside_answers_itself_is_logged_once_it_is_dropped(inner: Inner, tmp_path: Path) -> None:
    """A layer between errors and the access log that answers a refusal itself: the line is not lost."""
    log_file = tmp_path / "access.log"
    layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(file=str(log_file)), Context())

    def answers_refusals(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return layer(environ, start_response)
        except Exception:
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
            return [b"handled"]

    app = TestApp(ErrorsMiddleware(answers_refusals, ErrorsMiddleware.Options(), Context()))
    gc.disable()  # written as the exception goes, not when a collection finds it
    try:
        assert app.get("/limited").body == b"handled"
        line = json.loads(log_file.read_text(encoding="utf-8"))
    finally:
        gc.enable()
    assert (line["status"], line["bytes"]) == (429, 0)  # what the access log knew of it
    layer.close()
    assert len(log_file.read_text(encoding="utf-8").splitlines()) == 1  # and never written twice


@pytest.mark.parametrize(("method", "script", "path_info", "target", "logged"), [
    ("CONNECT", "", "443", "example.com:443", "example.com:443"),  # as Waitress splits it
    ("GET", "", "admin/x", "admin/x", "admin/x"),  # GET admin/x HTTP/1.1: Waitress passes the path on as sent
    # Under Waitress's url_prefix (/app), a target without its slash is not under the prefix: the
    # line shows it as sent, not glued to the prefix as a path no one asked for ("/appadmin/x").
    ("GET", "/app", "admin/x", "admin/x", "admin/x"),
    ("GET", "/app", "/admin/x", "/app/admin/x", "/app/admin/x"),
    ("GET", "/app", "", "/app", "/app"),
])
def test_a_target_that_is_not_a_path_is_logged_as_sent(make: Callable[..., Any], method: str, script: str,
                                                       path_info: str, target: str, logged: str) -> None:
    from webtest import TestRequest

    app, lines = make()
    request = TestRequest.blank("/", method=method)
    request.environ.update({"SCRIPT_NAME": script, "PATH_INFO": path_info, "REQUEST_URI": target})
    TestApp(app.app, lint=False).do_request(request, expect_errors=True)
    assert lines()[0]["path"] == logged


def test_user_agent_can_be_left_out(make: Callable[..., Any]) -> None:
    app, lines = make(user_agent=False)
    app.get("/hello", headers={"User-Agent": "probe/1.0"})
    assert "user_agent" not in lines()[0]


def test_one_line_per_request_in_order(make: Callable[..., Any]) -> None:
    app, lines = make()
    for path in ("/a", "/b", "/c"):
        app.get(path)
    assert [line["path"] for line in lines()] == ["/a", "/b", "/c"]


def test_close_is_forwarded_and_the_line_written_on_close(make: Callable[..., Any], inner: Inner) -> None:
    app, lines = make()
    layer = app.app.app  # errors -> access_log
    result = layer(_environ("/stream"), ignore_start)
    assert lines() == []  # nothing yet: the body has not been sent
    chunks = list(result)
    assert lines() == []
    result.close()
    assert inner.body is not None and inner.body.closed
    [line] = lines()
    assert line["bytes"] == sum(map(len, chunks)) == 30
    result.close()  # a second close writes nothing more
    assert len(lines()) == 1


@pytest.mark.parametrize(("chunks_taken", "expected"), [
    pytest.param(None, {"bytes": 30}, id="body sent whole"),
    pytest.param(1, {"bytes": 0, "error": "aborted"}, id="body left after its first chunk"),
])
def test_a_server_that_never_closes_still_gets_the_line(make: Callable[..., Any], inner: Inner,
                                                        chunks_taken: int | None, expected: dict[str, Any]) -> None:
    """A server against PEP 3333 drops the response without close(): the line is written when it is collected."""
    app, lines = make()
    layer = app.app.app  # errors -> access_log
    result = layer(_environ("/stream"), ignore_start)
    body = iter(result)
    for _ in itertools.islice(body, chunks_taken):
        pass
    assert lines() == []
    del result, body
    gc.collect()  # (CPython collects it at once; the collector for an exchange in a cycle)
    [line] = lines()
    assert {k: line.get(k) for k in ("status", "bytes", "error")} == {"status": 200, "error": None, **expected}
    assert inner.body is not None and inner.body.closed  # the app's answer is closed too
    assert not layer.open


@pytest.mark.parametrize(("path", "status", "sent"), [
    pytest.param("/broken-stream", 200, len(b"first"), id="after a chunk: the 200 went out"),
    pytest.param("/broken-at-once", 500, 0, id="before any chunk: nothing went out, the server sends a 500"),
    pytest.param("/broken-after-nothing", 500, 0, id="after an empty chunk: the headers wait for bytes (PEP 3333)"),
])
def test_failure_while_streaming_is_logged(make: Callable[..., Any], inner: Inner, path: str, status: int,
                                           sent: int) -> None:
    app, lines = make()
    with pytest.raises(OSError, match="upstream went away"):
        app.get(path)
    [line] = lines()
    assert (line["status"], line["bytes"], line["error"]) == (status, sent, "OSError")
    assert inner.body is not None and inner.body.closed


def test_bytes_a_legacy_write_could_not_send_are_not_counted(make: Callable[..., Any]) -> None:
    """write() counts its data once the server took it: a client gone raises there, and nothing went out."""
    app, lines = make()
    layer = app.app.app  # errors -> access_log

    def client_gone(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            raise OSError("client went away")
        return write

    with pytest.raises(OSError, match="client went away"):
        layer(_environ("/write"), client_gone)
    [line] = lines()
    assert (line["status"], line["bytes"], line["error"]) == (500, 0, "OSError")


@pytest.mark.parametrize(("path", "error"), [
    pytest.param("/write-then-crash", "OSError", id="an exception"),
    pytest.param("/write-then-refuse", "NotFound", id="a refusal: too late to render"),
])
def test_failure_after_write_keeps_the_status_sent(make: Callable[..., Any], path: str, error: str) -> None:
    """The 200 went out with the first write(): a failure after it cannot change what the client got."""
    app, lines = make()
    layer = app.app.app  # errors -> access_log
    with pytest.raises(Exception, match=r"client went away|Gone meanwhile"):
        layer(_environ(path), ignore_start)
    [line] = lines()
    assert (line["status"], line["bytes"], line["error"]) == (200, len(b"partial"), error)


@pytest.mark.parametrize(
    ("field", "environ_key", "hostile"),
    [
        pytest.param("path", "PATH_INFO", "/x\n{\"status\":200}\x1b[31m\r", id="path"),
        pytest.param("user_agent", "HTTP_USER_AGENT", "ua\n{\"forged\":true}\x1b]0;title\x07", id="user agent"),
        pytest.param("query", "QUERY_STRING", "a=1\n\x00\x7f\u2028", id="query"),
        pytest.param("request_id", REQUEST_ID, "id\r\nforged", id="request id from a layer"),
    ],
)
def test_no_log_injection(make: Callable[..., Any], tmp_path: Path, field: str, environ_key: str,
                          hostile: str) -> None:
    app, lines = make(query=True)
    layer = app.app.app  # errors -> access_log
    passthrough = layer.app

    def hostile_layer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        result: Iterable[bytes] = passthrough(environ, start_response)
        if environ_key == REQUEST_ID:  # as if an inner layer had set it
            environ[REQUEST_ID] = hostile
        return result

    layer.app = hostile_layer
    environ = _environ("/x")
    environ[environ_key] = hostile
    raw = logged(layer, environ, tmp_path)
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert all(32 <= byte < 127 for byte in raw[:-1]), raw  # printable ASCII only
    [line] = lines()
    assert line[field] == hostile  # escaped in the file, intact once parsed


def test_logger_mode(inner: Inner, caplog: pytest.LogCaptureFixture) -> None:
    app = TestApp(AccessLogMiddleware(inner, AccessLogMiddleware.Options(logger="test.access"), Context()))
    with caplog.at_level(logging.INFO, logger="test.access"):
        app.get("/hello")
    [record] = [r for r in caplog.records if r.name == "test.access"]
    assert record.levelno == logging.INFO
    assert json.loads(record.getMessage())["path"] == "/hello"
    # The record names the layer's module, as logger.info called there would (a format's %(module)s, %(funcName)s).
    assert (record.pathname, record.module, record.funcName) == (access_log.__file__, "access_log", "write")


class Kept(logging.Handler):
    """A handler that keeps the messages it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def refuse_all(record: logging.LogRecord) -> bool:
    return False


@pytest.mark.parametrize(("setup", "to_line_handler", "to_parent", "records"), [
    pytest.param({}, 1, 0, 0, id="its only handler, not propagating: the line without a record"),
    pytest.param({"propagate": True}, 1, 1, 1, id="propagating: the parent's handlers get it too"),
    pytest.param({"handler_level": logging.WARNING}, 0, 0, 1, id="the handler's level above INFO"),
    pytest.param({"handler_filter": refuse_all}, 0, 0, 1, id="the handler's filter refuses it"),
    pytest.param({"logger_filter": refuse_all}, 0, 0, 1, id="the logger's filter refuses it"),
    pytest.param({"second_handler": True}, 1, 0, 1, id="a second handler gets it too"),
    pytest.param({"propagate": True, "formatter": True}, 1, 1, 1, id="a formatter on the line handler is ignored"),
])
def test_a_line_handler_on_the_logger(inner: Inner, tmp_path: Path, setup: dict[str, Any], to_line_handler: int,
                                      to_parent: int, records: int) -> None:
    """A LineHandler alone on a logger that does not propagate is handed the line directly; any other
    configuration of the logger gets a record, and its levels, filters and parents have their say."""
    parent, logger = logging.getLogger("test.lines"), logging.getLogger("test.lines.access")
    kept, second = Kept(), Kept()
    parent.addHandler(kept)
    built: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.name == logger.name:
            built.append(record)
        return record

    with open(tmp_path / "out.log", "w") as stream:
        handler = LineHandler(stream)
        handler.setLevel(setup.get("handler_level", logging.NOTSET))
        if "handler_filter" in setup:
            handler.addFilter(setup["handler_filter"])
        if "formatter" in setup:
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.handlers[:] = [handler, second] if setup.get("second_handler") else [handler]
        logger.propagate = setup.get("propagate", False)
        if "logger_filter" in setup:
            logger.addFilter(setup["logger_filter"])
        logger.setLevel(logging.INFO)
        logging.setLogRecordFactory(counting)
        try:
            layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(logger=logger.name), Context())
            TestApp(layer).get("/hello")
        finally:
            logging.setLogRecordFactory(factory)
            logger.handlers[:], logger.filters[:], logger.propagate = [], [], True
            parent.removeHandler(kept)
    written = (tmp_path / "out.log").read_text().splitlines()
    assert [json.loads(line)["path"] for line in written] == ["/hello"] * to_line_handler
    assert [json.loads(message)["path"] for message in kept.messages] == ["/hello"] * to_parent
    assert len(second.messages) == (1 if setup.get("second_handler") else 0)
    assert len(built) == records


def test_time_and_duration_are_those_of_the_request(make: Callable[..., Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``time`` is when the request came (UTC, milliseconds), ``duration_ms`` from then until the line."""
    import time

    starts = iter([1700000000.25, 1700000000.0625, 1700000001.5])
    clocks = iter([10.0, 10.0625, 20.0, 20.5, 30.0, 31.25])
    monkeypatch.setattr(access_log, "time", SimpleNamespace(
        time=lambda: next(starts), perf_counter=lambda: next(clocks), strftime=time.strftime, gmtime=time.gmtime,
        monotonic=time.monotonic))
    app, lines = make()
    for path in ("/a", "/b", "/c"):
        app.get(path)
    assert [(line["time"], line["duration_ms"]) for line in lines()] == [
        ("2023-11-14T22:13:20.250Z", 62.5), ("2023-11-14T22:13:20.062Z", 500.0), ("2023-11-14T22:13:21.500Z", 1250.0)]
    assert re.findall(rb'"duration_ms":([0-9.]+)', (tmp_path / "access.log").read_bytes()) == [
        b"62.500", b"500.000", b"1250.000"]


def test_disabled_logger_steps_aside() -> None:
    logging.getLogger("test.quiet").setLevel(logging.WARNING)
    body = iter([b"hel", b"lo"])  # a stream: a wrapper or a copy would not be this very object

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return body

    layer = AccessLogMiddleware(app, AccessLogMiddleware.Options(logger="test.quiet"), Context())
    assert layer(_environ("/hello"), ignore_start) is body  # nothing wrapped, nothing counted


def test_stream_mode(inner: Inner, capsys: pytest.CaptureFixture[str]) -> None:
    layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(stream="stdout"), Context())
    try:
        TestApp(layer).get("/hello")
    finally:
        layer.close()
    out = capsys.readouterr().out
    assert json.loads(out)["path"] == "/hello"
    assert out.count("\n") == 1


def test_file_is_reopened_after_rotation(make: Callable[..., Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("middleware.access_log.ROTATION_CHECK_SECONDS", 0.0)
    app, lines = make()
    app.get("/before")
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    app.get("/after")
    assert [line["path"] for line in lines()] == ["/after"]
    rotated = [json.loads(x) for x in (tmp_path / "access.log.1").read_text().splitlines()]
    assert [line["path"] for line in rotated] == ["/before"]


def test_reopen_on_demand(make: Callable[..., Any], tmp_path: Path) -> None:
    app, lines = make()
    app.get("/before")
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    app.app.app.reopen()  # errors -> access_log
    app.get("/after")
    assert [line["path"] for line in lines()] == ["/after"]


def test_write_failures_are_reported_once_and_never_fail_requests(
    inner: Inner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(file=str(tmp_path / "a.log")), Context())
    layer.close()  # every later write fails (EBADF)
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        for _ in range(3):
            assert TestApp(layer).get("/hello").text == "hello"
    assert [r.getMessage()[:40] for r in caplog.records] == [f"access log: cannot write to {tmp_path}"[:40]]


def test_write_failures_are_reported_again_a_minute_later(inner: Inner, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    now = [1000.0]
    monkeypatch.setattr(access_log, "time", SimpleNamespace(
        time=time.time, perf_counter=time.perf_counter, strftime=time.strftime, gmtime=time.gmtime,
        monotonic=lambda: now[0]))
    layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(file=str(tmp_path / "a.log")), Context())
    layer.close()  # every later write fails (EBADF)
    reported = []
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        for now[0] in (1000.0, 1059.5, 1060.0, 1119.5, 1120.0):
            caplog.clear()
            TestApp(layer).get("/hello")
            reported.append(len(caplog.records))
    assert reported == [1, 0, 1, 0, 1]


def test_a_reopen_after_close_does_nothing(make: Callable[..., Any], tmp_path: Path) -> None:
    """A SIGHUP that comes while the process shuts down: the file closed for good is not opened again."""
    app, _ = make()
    app.get("/before")
    layer = app.app.app  # errors -> access_log
    layer.close()
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    layer.reopen()
    layer.follow()
    assert not (tmp_path / "access.log").exists()


def test_options_refused() -> None:
    with pytest.raises(ValidationError, match="file and stream may not both be set; choose one destination"):
        AccessLogMiddleware.Options(file="/tmp/x.log", stream="stdout")
    with pytest.raises(ValidationError, match="file must be a path, or left out to use the logger"):
        AccessLogMiddleware.Options(file="")
    with pytest.raises(ValidationError, match="Input should be 'stdout' or 'stderr'"):
        AccessLogMiddleware.Options(stream="syslog")


def test_from_yaml(make_stack: Callable[..., TestApp], tmp_path: Path) -> None:
    log_file = tmp_path / "yaml-access.log"
    app = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"access_log": {"file": str(log_file), "exclude_paths": ["/healthz"]}},
                     {"request_id": {}}],
    })
    app.get("/healthz")
    body = app.get("/api/x").json
    [line] = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert line["path"] == "/api/x"
    assert line["request_id"] == body["request_id"]
    assert line["status"] == 200


def _threads(count: int, target: Callable[[int], None]) -> None:
    workers = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert not any(worker.is_alive() for worker in workers)


@pytest.mark.parametrize("sink", ["line_handler", "file"])
def test_concurrent_lines_arrive_whole(tmp_path: Path, sink: str) -> None:
    """8 threads writing at once: every line arrives whole, none lost.

    Lines on the pipe stay within PIPE_BUF (longer ones are atomic on regular files only).
    """
    longest = 3900 if sink == "line_handler" else 6000
    if sink == "file":
        target = tmp_path / "a.log"
        write = AccessLogMiddleware(lambda e, s: [], AccessLogMiddleware.Options(file=str(target)),
                                    Context()).sink.write  # type: ignore[union-attr]

        def read() -> str:
            return target.read_text()
    else:
        read_fd, write_fd = os.pipe()
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.extend(iter(lambda: os.read(read_fd, 65536), b"")))
        reader.start()
        stream = os.fdopen(write_fd, "w")
        write = LineHandler(stream).write_line

        def read() -> str:
            stream.close()
            reader.join(10)
            os.close(read_fd)
            return b"".join(received).decode()

    def run(worker: int) -> None:
        for n in range(200):
            write(json.dumps({"worker": worker, "n": n, "pad": "x" * (39 * n % longest)}))

    _threads(8, run)
    lines = [json.loads(line) for line in read().splitlines()]
    assert sorted((line["worker"], line["n"]) for line in lines) == [(w, n) for w in range(8) for n in range(200)]


def test_line_handler_writes_without_its_lock(tmp_path: Path) -> None:
    """A line goes out while another thread holds the handler's lock (no queueing on it)."""
    with open(tmp_path / "out.log", "w") as stream:
        handler = LineHandler(stream)
        handler.acquire()
        try:
            writer = threading.Thread(target=handler.write_line, args=('{"n":1}',))
            writer.start()
            writer.join(5)
            assert not writer.is_alive()
        finally:
            handler.release()
    assert (tmp_path / "out.log").read_text() == '{"n":1}\n'


@pytest.mark.parametrize("size", [10, 5000])
def test_line_handler_keeps_the_order_of_what_the_stream_buffered(tmp_path: Path, size: int) -> None:
    """Text written through the stream before the handler's first line comes first; long lines too."""
    with open(tmp_path / "out.log", "w") as stream:
        stream.write("earlier text\n")  # buffered, not yet on disk
        handler = LineHandler(stream)
        handler.write_line("a" * size)
        handler.write_line("b")
    assert (tmp_path / "out.log").read_text() == "earlier text\n" + "a" * size + "\nb\n"


def test_line_handler_on_a_stream_without_descriptor() -> None:
    stream = io.StringIO()
    LineHandler(stream).write_line('{"n":1}')
    assert stream.getvalue() == '{"n":1}\n'


def test_file_is_swapped_under_the_same_descriptor(make: Callable[..., Any], tmp_path: Path) -> None:
    """A reopen keeps the descriptor number, so a write racing with it cannot go to another file."""
    app, lines = make()
    sink = app.app.app.sink  # errors -> access_log
    before = sink.fd[0]
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    app.app.app.reopen()
    assert sink.fd[0] == before
    assert not os.get_inheritable(before)
    app.get("/after")
    assert [line["path"] for line in lines()] == ["/after"]


@pytest.mark.parametrize(("environ_key", "value", "field"), [
    pytest.param("HTTP_USER_AGENT", "A" * 9000, "user_agent", id="a long User-Agent"),
    pytest.param("PATH_INFO", "/" + "p" * 9000, "path", id="a long path"),
    pytest.param("PATH_INFO", "/" + "\u00e9".encode().decode("latin-1") * 3000, "path",
                 id="a long non-ASCII path (6 bytes a character once escaped)"),
    pytest.param("QUERY_STRING", "q=" + "\x01" * 3000, "query", id="a long query of control characters"),
])
def test_a_line_with_long_fields_is_cut_to_go_out_whole(make: Callable[..., Any], tmp_path: Path, environ_key: str,
                                                        value: str, field: str) -> None:
    """A line up to PIPE_BUF goes out in one write(), never interleaved with another request's line on a pipe:
    a client must not be able to push its line past that (and break other requests' lines too)."""
    import select

    app, lines = make(query=True)
    layer = app.app.app  # errors -> access_log
    environ = _environ("/x")
    environ[environ_key] = value
    raw = logged(layer, environ, tmp_path)
    assert len(raw) <= select.PIPE_BUF
    [line] = lines()
    assert line["truncated"] is True
    assert line[field].endswith("...") and 10 < len(line[field]) < len(value)
    assert line["status"] == 200 and line["client_ip"] == "192.0.2.7"


def logged(layer: Any, environ: dict[str, Any], tmp_path: Path) -> bytes:
    """Send ``environ`` straight through the access_log ``layer``; what its log file holds then."""
    result = layer(environ, ignore_start)
    list(result)
    result.close()
    return (tmp_path / "access.log").read_bytes()


def ignore_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    """A start_response for direct calls: the test reads the log, not the response."""
    return lambda data: None


def _environ(path: str) -> dict[str, Any]:
    environ: dict[str, Any] = {"PATH_INFO": path, "REMOTE_ADDR": "192.0.2.7"}
    setup_testing_defaults(environ)
    return environ


def test_a_broken_stream_is_reported_once_a_minute(capsys: pytest.CaptureFixture[str]) -> None:
    """A log shipper that went away fails every line: one report on stderr, not one per request."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    stream = os.fdopen(write_end, "w")
    handler = LineHandler(stream)
    try:
        for i in range(50):
            handler.write_line(f'{{"n":{i}}}')
    finally:
        with contextlib.suppress(OSError):
            stream.close()
    assert capsys.readouterr().err.count("--- Logging error ---") == 1


def test_a_line_cut_short_is_ended_before_the_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A full disk cuts a line: the next line still starts on a line of its own."""
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    real_write = os.write
    calls: list[int] = []

    def disk_full_once(descriptor: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(descriptor, data[:5])  # part of the line goes out
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr("middleware.access_log.os.write", disk_full_once)
    try:
        assert write_atomic(fd, b'{"n":1}\n') is True
        assert write_atomic(fd, b'{"n":2}\n') is True
        assert write_atomic(fd, b'{"n":3}\n') is True
    finally:
        os.close(fd)
    assert path.read_bytes().splitlines() == [b'{"n":', b'{"n":2}', b'{"n":3}']


def test_a_request_still_running_at_shutdown_gets_its_line(inner: Inner, tmp_path: Path) -> None:
    """The drain timeout cut off a long stream: the process exits with it running, its line is still written."""
    log_file = tmp_path / "access.log"
    layer = AccessLogMiddleware(inner, AccessLogMiddleware.Options(file=str(log_file)), Context())
    finished: dict[str, Any] = {}
    setup_testing_defaults(finished)
    finished.update(PATH_INFO="/hello")
    done = layer(finished, ignore_start)
    b"".join(done)
    done.close()  # type: ignore[attr-defined]
    running: dict[str, Any] = {}
    setup_testing_defaults(running)
    running.update(PATH_INFO="/stream")
    result = layer(running, ignore_start)
    next(iter(result))  # the first chunk went out; the server is still sending when the process stops
    layer.close()
    lines = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert [(line["path"], line["status"], line["bytes"], line.get("error")) for line in lines] == [
        ("/hello", 200, 5, None), ("/stream", 200, 0, "shutdown")]
    assert inner.body is not None and not inner.body.closed
    result.close()  # type: ignore[attr-defined]  # a close that comes after all the same: no second line,
    assert len(log_file.read_text(encoding="utf-8").splitlines()) == 2
    assert inner.body.closed  # and the app's answer is closed all the same (PEP 3333)
