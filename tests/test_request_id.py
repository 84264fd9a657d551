"""The request_id layer: accepting or generating ids, echoing them, errors and logs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from stack_support import recording_start
from webtest import TestApp

from middleware.base import REQUEST_ID, TRACE, Context, refuse
from middleware.errors import ErrorsMiddleware
from middleware.request_id import RequestIdLogFilter, RequestIdMiddleware, _RandomIds, current_request_id

GENERATED = re.compile(r"[0-9a-f]{32}")
log = logging.getLogger("tests.request_id")


class Inner:
    """An inner app that records the id it saw, logs a line, and answers by path."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.current: list[str | None] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.seen.append(environ.get(REQUEST_ID))
        self.current.append(current_request_id())
        log.warning("inside the app")
        path = environ["PATH_INFO"]
        if path == "/missing":
            raise refuse(404, "No such page.")
        if path == "/crash":
            raise RuntimeError("inner failure")
        if path in ("/missing-on-first-chunk", "/crash-on-first-chunk"):  # a generator app: fails on next()
            return fails_on_first_chunk(path, start_response)
        headers = [("Content-Type", "text/plain")]
        if path == "/own-id":
            headers.append(("x-request-id", "set-by-app"))
        start_response("200 OK", headers)
        return [b"ok"]


def fails_on_first_chunk(path: str, start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app's body: it starts its response on the first next(), and fails there (errors renders it)."""
    if path == "/missing-on-first-chunk":
        raise refuse(404, "No such page.")
    raise RuntimeError("inner failure")
    start_response("200 OK", [])  # pragma: no cover - failed before
    yield b"never"  # pragma: no cover


@pytest.fixture
def inner() -> Inner:
    """The recording inner app."""
    return Inner()


@pytest.fixture
def make(inner: Inner) -> Callable[..., TestApp]:
    """Build errors -> request_id -> inner from keyword options."""

    def build(**options: Any) -> TestApp:
        layer = RequestIdMiddleware(inner, RequestIdMiddleware.Options(**options), Context())
        return TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(format="envelope"),
                                        Context()))

    return build


KEPT, NEW = "kept", "generated"


@pytest.mark.parametrize(
    ("options", "request_headers", "expected"),
    [
        pytest.param({}, {}, NEW, id="no incoming id"),
        pytest.param({}, {"X-Request-ID": "abc-123"}, KEPT, id="simple id"),
        pytest.param({}, {"X-Request-ID": "0b9c6a1e-7f43-4c1e-9d0a-2f1e6b7c8d9e"}, KEPT,
                     id="uuid"),
        pytest.param({}, {"X-Request-ID": "trace:a.b/c@d+e=f_g"}, KEPT, id="punctuation allowed"),
        pytest.param({}, {"X-Request-ID": "a" * 128}, KEPT, id="exactly max_length"),
        pytest.param({}, {"X-Request-ID": "a" * 129}, NEW, id="one over max_length"),
        pytest.param({"max_length": 8}, {"X-Request-ID": "123456789"}, NEW,
                     id="custom max_length"),
        pytest.param({}, {"X-Request-ID": "abc 123"}, NEW, id="space"),
        pytest.param({}, {"X-Request-ID": "abc\t123"}, NEW, id="tab"),
        pytest.param({}, {"X-Request-ID": "abc\x01"}, NEW, id="control character"),
        pytest.param({}, {"X-Request-ID": "abc\n"}, NEW, id="trailing newline"),
        pytest.param({}, {"X-Request-ID": "caf\xe9"}, NEW, id="non-ascii"),
        pytest.param({}, {"X-Request-ID": "-abc"}, NEW, id="leading dash"),
        pytest.param({}, {"X-Request-ID": "<script>"}, NEW, id="angle brackets"),
        pytest.param({}, {"X-Request-ID": "abc,def"}, NEW, id="comma: a list of two ids"),
        pytest.param({}, {"X-Request-ID": ""}, NEW, id="empty"),
        pytest.param({"trust_incoming": False}, {"X-Request-ID": "abc-123"}, NEW,
                     id="trust_incoming off"),
        pytest.param({"pattern": r".*"}, {"X-Request-ID": "any thing"}, NEW,
                     id="permissive pattern still refuses spaces"),
        pytest.param({"pattern": r".*"}, {"X-Request-ID": "{any}|thing"}, KEPT,
                     id="permissive pattern"),
        pytest.param({"pattern": r".*"}, {"X-Request-ID": "abc\x7f"}, NEW,
                     id="permissive pattern still refuses DEL"),
        pytest.param({"pattern": r".*"}, {"X-Request-ID": "abc\x01"}, NEW,
                     id="permissive pattern still refuses control characters"),
        pytest.param({"pattern": r".*"}, {"X-Request-ID": "caf\xe9"}, NEW,
                     id="permissive pattern still refuses non-ascii"),
        pytest.param({"pattern": r".*"}, {"X-Request-ID": "!~"}, KEPT,
                     id="permissive pattern: first and last printable ascii"),
        pytest.param({"pattern": r"[0-9]+"}, {"X-Request-ID": "abc"}, NEW, id="custom pattern"),
        pytest.param({"header": "X-Correlation-ID"}, {"X-Correlation-ID": "corr-1"}, KEPT,
                     id="custom header"),
        pytest.param({"header": "X-Correlation-ID"}, {"X-Request-ID": "abc-123"}, NEW,
                     id="custom header ignores the default one"),
    ],
)
def test_accept_or_generate(make: Callable[..., TestApp], inner: Inner, options: dict[str, Any],
                            request_headers: dict[str, str], expected: str) -> None:
    app = make(**options)
    header = options.get("header", "X-Request-ID")
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in request_headers.items()}
    response = app.get("/", extra_environ=environ)
    rid = response.headers[header]
    assert inner.seen == [rid]
    assert inner.current == [rid]
    if expected == KEPT:
        assert rid == request_headers[header]
    else:
        assert GENERATED.fullmatch(rid)
        assert rid != request_headers.get(header)


def test_generated_ids_differ(make: Callable[..., TestApp]) -> None:
    app = make()
    ids = {app.get("/").headers["X-Request-ID"] for _ in range(20)}
    assert len(ids) == 20


def test_header_echoed_once(make: Callable[..., TestApp]) -> None:
    response = make().get("/", headers={"X-Request-ID": "abc-123"})
    assert [v for k, v in response.headerlist if k.lower() == "x-request-id"] == ["abc-123"]


def test_app_header_wins(make: Callable[..., TestApp], inner: Inner) -> None:
    response = make().get("/own-id", headers={"X-Request-ID": "abc-123"})
    assert [v for k, v in response.headerlist if k.lower() == "x-request-id"] == ["set-by-app"]
    assert inner.seen == ["abc-123"]


def test_refusal_carries_id(make: Callable[..., TestApp]) -> None:
    response = make().get("/missing", headers={"X-Request-ID": "abc-123"}, status=404)
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.json["error"]["request_id"] == "abc-123"
    assert response.json["error"]["message"] == "No such page."


@pytest.mark.parametrize(("path", "status"), [
    pytest.param("/missing", 404, id="refused by the call"),
    pytest.param("/missing-on-first-chunk", 404, id="refused by a generator app's first chunk"),
    pytest.param("/crash-on-first-chunk", 500, id="crash in a generator app's first chunk"),
])
def test_error_responses_carry_id_in_header_and_body(make: Callable[..., TestApp], path: str, status: int) -> None:
    response = make().get(path, headers={"X-Request-ID": "abc-123"}, status=status)
    assert [v for k, v in response.headerlist if k.lower() == "x-request-id"] == ["abc-123"]
    assert response.json["error"]["request_id"] == "abc-123"
    assert response.json["error"]["code"] == status


def test_crash_carries_generated_id(make: Callable[..., TestApp], inner: Inner) -> None:
    response = make().get("/crash", status=500)
    rid = response.headers["X-Request-ID"]
    assert GENERATED.fullmatch(rid)
    assert inner.seen == [rid]
    assert response.json["error"]["request_id"] == rid


def test_custom_header_on_error(make: Callable[..., TestApp]) -> None:
    response = make(header="X-Correlation-ID").get("/missing", status=404)
    assert GENERATED.fullmatch(response.headers["X-Correlation-ID"])
    assert "X-Request-ID" not in response.headers


class Capture(logging.Handler):
    """A handler that keeps the records it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture() -> Iterable[Capture]:
    """A handler with the request id filter on the test logger."""
    handler = Capture()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)


def test_log_records_carry_id(make: Callable[..., TestApp], capture: Capture) -> None:
    make().get("/", headers={"X-Request-ID": "abc-123"})
    log.warning("after the request")
    assert [capture.format(r) for r in capture.records] == [
        "abc-123 inside the app",
        "- after the request",
    ]


def test_context_reset_after_exception(make: Callable[..., TestApp], capture: Capture) -> None:
    make().get("/crash", headers={"X-Request-ID": "abc-123"}, status=500)
    assert current_request_id() is None
    log.warning("after the crash")
    assert [capture.format(r) for r in capture.records] == [
        "abc-123 inside the app",
        "- after the crash",
    ]


def test_log_filter_keeps_explicit_id_and_default(capture: Capture) -> None:
    capture.filters[0].default = "none"  # type: ignore[union-attr]
    log.warning("explicit", extra={"request_id": "given"})
    log.warning("outside")
    assert [capture.format(r) for r in capture.records] == ["given explicit", "none outside"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"header": "X Request"}, "header 'X Request' is not a valid HTTP header name",
                     id="header with space"),
        pytest.param({"header": ""}, "header '' is not a valid HTTP header name", id="empty header"),
        pytest.param({"header": "X_Request_Id"}, "header 'X_Request_Id' has an '_': Waitress drops such header "
                     "fields (WSGI cannot tell them from '-'); write 'X-Request-Id'", id="underscore in the header"),
        pytest.param({"pattern": "(["}, "pattern '([' is not a valid regular expression",
                     id="bad regex"),
        pytest.param({"pattern": "a{4294967296}"}, "pattern 'a{4294967296}' is not a valid regular expression",
                     id="a repeat count past what re can hold"),
        pytest.param({"max_length": 0}, "greater than or equal to 1", id="zero max_length"),
        pytest.param({"max_length": 5000}, "less than or equal to 1024", id="huge max_length"),
        pytest.param({"generate": "uuid"}, "Extra inputs are not permitted", id="unknown option"),
    ],
)
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        RequestIdMiddleware.Options(**options)
    assert message in str(info.value)


def test_yaml_stack(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"errors": {}}, {"request_id": {"header": "X-Correlation-ID"}}],
    })
    response = stack.get("/", headers={"X-Correlation-ID": "corr-7"})
    assert response.headers["X-Correlation-ID"] == "corr-7"
    assert response.json["request_id"] == "corr-7"


def test_a_started_response_body_is_the_apps_own() -> None:
    """Once the app has started its response, its iterable goes to the server as it is (a one-chunk list
    the server can size, a file_wrapper it can send), not wrapped."""
    body = [b"ok"]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    layer = RequestIdMiddleware(app, RequestIdMiddleware.Options(), Context())
    started: list[list[tuple[str, str]]] = []
    result = layer({"REQUEST_METHOD": "GET", "PATH_INFO": "/"},
                   recording_start(lambda status, headers: started.append(headers)))
    assert result is body
    assert started[0][0] == ("Content-Type", "text/plain")
    assert started[0][1][0] == "X-Request-ID"


@pytest.mark.parametrize(("request_headers", "decision"), [
    pytest.param({"X-Request-ID": "abc-123"}, "kept the incoming X-Request-ID", id="kept"),
    pytest.param({"X-Request-ID": "abc 123"}, "refused the incoming X-Request-ID; generated one", id="refused"),
])
def test_trace_notes(make: Callable[..., TestApp], request_headers: dict[str, str], decision: str) -> None:
    trace: list[tuple[str, str]] = []
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in request_headers.items()}
    make().get("/", extra_environ={**environ, TRACE: trace})
    assert trace == [("request_id", decision)]


def test_no_trace_note_without_an_incoming_id(make: Callable[..., TestApp]) -> None:
    trace: list[tuple[str, str]] = []
    make().get("/", extra_environ={TRACE: trace})
    assert trace == []


def test_ids_are_not_handed_out_twice_across_batches() -> None:
    ids = _RandomIds()
    drawn = [ids() for _ in range(600)]  # past two refills of 256
    assert len(set(drawn)) == 600
    assert all(GENERATED.fullmatch(rid) for rid in drawn)


@pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning")
def test_a_forked_worker_does_not_reuse_its_parents_batch() -> None:
    ids = _RandomIds()
    ids()  # the batch is drawn, 255 ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert status == 0
    assert GENERATED.fullmatch(child)
    assert child != ids()
