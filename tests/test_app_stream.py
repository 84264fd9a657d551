"""Search progress as Server-Sent Events: order, headers, and no buffering."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import flask
import pytest
from webtest import TestApp
from werkzeug.test import EnvironBuilder

from app import create_app
from app.search import Progress, SearchEngine, SearchPage
from app.stream import HeldSlot, search_events
from middleware.base import Context, refuse
from middleware.errors import UNEXPECTED, ErrorsMiddleware
from middleware.request_id import RequestIdMiddleware


def make_app(tmp_path: Path, **search: Any) -> flask.Flask:
    return create_app({"var_dir": str(tmp_path), "search": {"index_sources": ["json"], **search}})


def parse(chunks: Iterable[bytes]) -> list[tuple[str, Any]]:
    """Split an event-stream body into (event, data) pairs."""
    events = []
    for block in b"".join(chunks).decode().strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def start(wsgi: Any, path: str) -> tuple[dict[str, Any], Iterator[bytes], Iterable[bytes]]:
    """Call the WSGI app directly so nothing collects the body for us."""
    environ = EnvironBuilder(path=path).get_environ()
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    body = wsgi(environ, start_response)
    return seen, iter(body), body


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_events_in_order_and_complete_equals_search(tmp_path: Path, version: str) -> None:
    client = TestApp(make_app(tmp_path))
    response = client.get(f"/api/{version}/search/stream", {"q": "decode"})
    events = parse([response.body])
    assert events == [
        ("search_started", {"query": "decode"}),
        ("search_progress", {"progress": 33, "stage": "index_ready"}),
        ("search_progress", {"progress": 67, "stage": "matched"}),
        ("search_progress", {"progress": 100, "stage": "ranked"}),
        ("search_complete", client.get(f"/api/{version}/search", {"q": "decode"}).json),
    ]


@pytest.mark.parametrize(("last_event_id", "status", "events"), [
    pytest.param(None, 200, 5, id="a first connection: the search"),
    pytest.param("complete", 204, 0, id="a reconnection after search_complete: nothing more to say"),
    pytest.param("Complete", 200, 5, id="an id is matched exactly: another id is a new search"),
    pytest.param("", 200, 5, id="an empty id (an EventSource whose stream had no id): a new search"),
])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_reconnection_after_search_complete_gets_204(tmp_path: Path, version: str, last_event_id: str | None,
                                                       status: int, events: int) -> None:
    """An EventSource left open reconnects when the stream ends, sending back the last event id it saw:
    search_complete's id gets a 204, on which it stops for good, instead of a second search."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    response = TestApp(make_app(tmp_path)).get(f"/api/{version}/search/stream", {"q": "decode"}, headers=headers)
    assert response.status_int == status
    assert len(response.body.split(b"\n\n")) - 1 == events
    if status == 204:
        assert (response.body, response.headers["Cache-Control"]) == (b"", "no-store")
        assert "Content-Type" not in response.headers
    else:
        assert response.body.endswith(b"\nid: complete\n\n")  # (only the last event has an id)
        assert response.body.count(b"\nid: ") == 1


def test_stream_headers(tmp_path: Path) -> None:
    seen, chunks, body = start(make_app(tmp_path), "/api/v1/search/stream?q=json")
    headers = dict(seen["headers"])
    assert seen["status"] == "200 OK"
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in headers
    list(chunks)
    body.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("layered", [False, True], ids=["bare app", "errors + request_id layers"])
def test_first_event_is_sent_before_the_search_runs(tmp_path: Path, layered: bool) -> None:
    app = make_app(tmp_path)
    wsgi: Any = app
    if layered:
        context = Context()
        wsgi = ErrorsMiddleware(RequestIdMiddleware(app, RequestIdMiddleware.Options(), context),
                                ErrorsMiddleware.Options(), context)
    index = Path(app.extensions["wsgistack"].options.index_file)
    _, chunks, body = start(wsgi, "/api/v1/search/stream?q=decode")
    assert not isinstance(body, list | tuple | bytes), "the body must be a generator, not a buffer"
    first = next(chunks)
    assert first == b'event: search_started\ndata: {"query":"decode"}\n\n'
    assert not index.exists(), "the index is built only after search_started was sent"
    second = next(chunks)
    assert b'"stage":"index_ready"' in second
    assert index.exists()
    rest = list(chunks)
    assert rest[-1].startswith(b"event: search_complete\n")
    body.close()  # type: ignore[attr-defined]


def test_stream_interval_paces_the_events(tmp_path: Path) -> None:
    _, chunks, body = start(make_app(tmp_path, stream_interval=0.05), "/api/v1/search/stream?q=json")
    next(chunks)
    stamps = [time.perf_counter()]
    for _ in chunks:
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) == 4
    assert min(gaps) >= 0.045
    body.close()  # type: ignore[attr-defined]


def test_closing_the_stream_early_stops_the_search(tmp_path: Path) -> None:
    _, chunks, body = start(make_app(tmp_path), "/api/v1/search/stream?q=json")
    next(chunks)
    body.close()  # type: ignore[attr-defined]  # the client went away
    assert list(chunks) == []


def test_closing_a_stream_that_holds_a_slot_closes_its_events_and_gives_the_slot_back_once() -> None:
    """The events' own close runs (the engine's generator and its upstream request end there), then the slot goes."""
    log: list[str] = []

    def events() -> Iterator[bytes]:
        try:
            yield b"event: search_started\n\n"
            yield b"event: search_complete\n\n"
        finally:
            log.append("events closed")

    held = HeldSlot(events(), lambda: log.append("slot given back"))
    assert next(held) == b"event: search_started\n\n"
    held.close()
    held.close()
    assert (log, held.held) == (["events closed", "slot given back"], False)


def test_head_on_the_stream_sends_no_body(tmp_path: Path) -> None:
    response = TestApp(make_app(tmp_path)).head("/api/v1/search/stream", {"q": "json"})
    assert response.body == b""
    assert response.content_type == "text/event-stream"


class OneStage(SearchEngine):
    """An engine that finds nothing in one stage."""

    name = "one-stage"

    def stages(self, query: str, page: int, heartbeat: float | None = None) -> Generator[Progress, None, SearchPage]:
        yield 100, "done"
        return SearchPage(query, (), 0, page, 10)


class Busy(SearchEngine):
    """An engine whose upstream is busy once the stream has started."""

    name = "busy"

    def stages(self, query: str, page: int, heartbeat: float | None = None) -> Generator[Progress, None, SearchPage]:
        yield 50, "asking"
        raise refuse(503, "The search upstream is busy.", headers=[("Retry-After", "7")])


def test_a_refusal_while_streaming_ends_the_stream_with_its_error_and_the_request_id() -> None:
    events = parse(search_events(Busy(), "json", 1, lambda page: {}, 0.0, logging.getLogger("test.stream"), "rid-8"))
    assert events[-1] == ("search_error", {"code": 503, "message": "The search upstream is busy.", "retry_after": 7,
                                           "request_id": "rid-8"})


def test_a_failure_while_shaping_the_result_ends_the_stream_with_an_error(caplog: pytest.LogCaptureFixture) -> None:
    def shape(page: SearchPage) -> dict[str, Any]:
        raise OverflowError("integer division result too large for a float")

    with caplog.at_level(logging.ERROR, logger="test.stream"):
        events = parse(search_events(OneStage(), "json", 1, shape, 0.0, logging.getLogger("test.stream"), "rid-7"))
    assert events == [
        ("search_started", {"query": "json"}),
        ("search_progress", {"progress": 100, "stage": "done"}),
        ("search_error", {"code": 500, "message": UNEXPECTED, "retry_after": 30, "request_id": "rid-7"}),
    ]
    assert caplog.messages == ["search stream failed for a query of 4 characters"]
    assert [r.request_id for r in caplog.records] == ["rid-7"]  # type: ignore[attr-defined]  # the body outlives it


def streams_started(app: Any, count: int) -> list[Iterable[bytes]]:
    """``count`` streams, each past its first event and still open."""
    bodies = []
    for _ in range(count):
        seen, chunks, body = start(app, "/api/v1/search/stream?q=json")
        assert seen["status"] == "200 OK"
        next(chunks)
        bodies.append(body)
    return bodies


def test_paced_streams_past_max_streams_are_refused_until_one_ends(tmp_path: Path) -> None:
    """Each paced stream holds a server thread for its whole length: the ones past the cap get 503."""
    app = ErrorsMiddleware(make_app(tmp_path, stream_interval=0.2, max_streams=2), ErrorsMiddleware.Options(),
                           Context())
    running = streams_started(app, 2)
    client = TestApp(app)
    refused = client.get("/api/v2/search/stream", {"q": "json"}, status=503)  # v1 and v2 share the slots
    assert refused.headers["Retry-After"] == "1"
    assert refused.json["error"]["message"] == ("2 search streams are running, as many as this server runs at "
                                                "once; retry in 1 seconds.")
    running.pop().close()  # type: ignore[attr-defined]  # a client that went away frees its slot
    client.head("/api/v1/search/stream", {"q": "json"}, status=200)  # a HEAD holds it only while answered
    assert parse([client.get("/api/v1/search/stream", {"q": "json"}).body])[-1][0] == "search_complete"
    client.get("/api/v1/search/stream", {"q": "json"}, status=200)
    running.pop().close()  # type: ignore[attr-defined]


def test_the_cap_holds_across_a_reload(tmp_path: Path) -> None:
    """A reload builds a new app while the old one's streams run on: the cap counts them all (a count per app
    let max_streams more through at each reload, until every server thread was held)."""
    old = make_app(tmp_path / "old", stream_interval=0.2, max_streams=2)
    new = ErrorsMiddleware(make_app(tmp_path / "new", stream_interval=0.2, max_streams=2), ErrorsMiddleware.Options(),
                           Context())
    running = streams_started(old, 2)
    TestApp(new).get("/api/v1/search/stream", {"q": "json"}, status=503)
    running.pop().close()  # type: ignore[attr-defined]
    TestApp(new).get("/api/v1/search/stream", {"q": "json"}, status=200)
    running.pop().close()  # type: ignore[attr-defined]


def test_unpaced_streams_have_no_cap(tmp_path: Path) -> None:
    for body in streams_started(make_app(tmp_path, max_streams=1), 3):
        body.close()  # type: ignore[attr-defined]


def test_a_stream_whose_answer_never_went_out_gives_its_slot_back(tmp_path: Path) -> None:
    """A start_response that raises (a layer of your own, a server refusing a header) leaves the answer
    unreturned and unclosed: its slot goes back once it is collected, not at the next restart (slots are
    counted per process, a reload does not clear them)."""
    import gc

    app = make_app(tmp_path, stream_interval=0.2, max_streams=1)

    def refusing(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        raise OSError("the server refused a header")

    environ = EnvironBuilder(path="/api/v1/search/stream", query_string="q=json").get_environ()
    with pytest.raises(OSError):
        app(environ, refusing)
    gc.collect()
    TestApp(app).get("/api/v1/search/stream", {"q": "json"}, status=200)


class Upstream(BaseHTTPRequestHandler):
    """A SearXNG that fails by the query: ``boom`` answers 500, ``busy`` 429 (Retry-After: 60); else no results."""

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        query = self.path.partition("q=")[2].partition("&")[0]
        status, body = {"boom": (500, b"<h1>Internal Server Error</h1>"), "busy": (429, b"")}.get(
            query, (200, b'{"results": []}'))
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "60")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _unshapeable(page: SearchPage) -> dict[str, Any]:
    raise OverflowError("integer division result too large for a float")


@pytest.mark.parametrize(("query", "broken_shape", "code", "level"), [
    pytest.param("boom", False, 502, logging.WARNING, id="upstream 500"),
    pytest.param("busy", False, 503, logging.WARNING, id="upstream busy"),
    pytest.param("ok", True, 500, logging.ERROR, id="unexpected failure"),
])
def test_a_failure_inside_a_stream_leaves_a_trace(make_stack: Callable[..., TestApp], tmp_path: Path,
                                                  upstream: str, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture, query: str, broken_shape: bool,
                                                  code: int, level: int) -> None:
    """The status went out before the failure: it stays 200, and the access line and the log say what happened."""
    if broken_shape:
        monkeypatch.setattr(SearchPage, "v1", _unshapeable)
    log_file = tmp_path / "access.log"
    client = make_stack({
        "app": {"options": {"var_dir": str(tmp_path / "var"), "search": {"engine": "searxng", "upstream": upstream}}},
        "pipeline": [{"errors": {}}, {"request_id": {}}, {"access_log": {"file": str(log_file)}}],
    })
    with caplog.at_level(logging.WARNING, logger="wsgistack"):
        response = client.get("/api/v1/search/stream", {"q": query})
    assert response.status_int == 200
    assert parse([response.body])[-1][0] == "search_error"
    request_id = response.headers["X-Request-ID"]
    [line] = [json.loads(text) for text in log_file.read_text().splitlines()]
    assert (line["request_id"], line["status"], line.get("error")) == (request_id, 200, f"search_error {code}")
    [record] = [r for r in caplog.records if r.name.startswith("wsgistack")]
    assert (record.levelno, record.request_id) == (level, request_id)  # type: ignore[attr-defined]
    assert f"search_error {code}" in record.getMessage() or broken_shape


class Clock:
    """``time`` for app.stream: sleeping moves it on at once, and every sleep is noted."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize(("interval", "comments", "sleeps"), [
    pytest.param(60.0, 3, [15.0, 15.0, 15.0, 15.0], id="the longest interval: a comment every 15 s"),
    pytest.param(20.0, 1, [15.0, 5.0], id="a comment, then the rest of the pause"),
    pytest.param(15.0, 0, [15.0], id="no longer than the heartbeat: no comment"),
    pytest.param(2.0, 0, [2.0], id="a short pause"),
])
def test_a_long_pause_sends_comments_that_keep_proxies_from_closing_the_stream(
        monkeypatch: pytest.MonkeyPatch, interval: float, comments: int, sleeps: list[float]) -> None:
    """stream_interval may be 60 s: silent that long, the stream was closed by a proxy whose idle timeout is a
    minute (nginx's proxy_read_timeout, a load balancer's), and a client that left held its thread until the
    next event. A comment line is no event to an EventSource."""
    clock = Clock()
    monkeypatch.setattr("app.stream.time", clock)
    chunks = list(search_events(OneStage(), "json", 1, lambda page: {}, interval, logging.getLogger("test.stream")))
    assert chunks[0].startswith(b"event: search_started\n")
    assert chunks[1:] == [*[b": keep-alive\n\n"] * comments, b'event: search_progress\ndata: {"progress":100,'
                          b'"stage":"done"}\n\n', *[b": keep-alive\n\n"] * comments,
                          b"event: search_complete\ndata: {}\nid: complete\n\n"]
    assert clock.sleeps == sleeps * 2


def test_a_client_that_leaves_during_a_long_pause_stops_it_at_the_next_comment(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("app.stream.time", clock)
    events = cast(Generator[bytes, None, None],  # (a generator: the server can close it)
                  search_events(OneStage(), "json", 1, lambda page: {}, 60.0, logging.getLogger("test.stream")))
    next(events)
    assert next(events) == b": keep-alive\n\n"
    events.close()  # the write of that comment failed: the server closes the body
    assert clock.sleeps == [15.0]


def spec_events(stream: bytes) -> list[tuple[str, str]]:
    """(event, data) as an ``EventSource`` dispatches them: the HTML standard's parser (any of CR LF, CR, LF ends
    a line; data lines joined with LF; a blank line dispatches; a comment or unknown field is ignored)."""
    import re

    events: list[tuple[str, str]] = []
    data: list[str] = []
    name = ""
    for line in re.split(r"\r\n|\r|\n", stream.decode("utf-8")):
        if not line:
            if data:
                events.append((name or "message", "\n".join(data)))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return events


HOSTILE = "json\n\nevent: search_complete\ndata: {}\r\rid: 1\r\n\u2028\u2029\x85 end"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_line_breaks_in_the_query_cannot_make_events_of_their_own(tmp_path: Path, version: str) -> None:
    """The query goes back in search_started and search_complete: CR, LF (and what some parsers take for line
    ends) stay escapes in one data line, so the client sees the stream's five events and the query intact."""
    body = TestApp(make_app(tmp_path)).get(f"/api/{version}/search/stream", {"q": HOSTILE}).body
    events = spec_events(body)
    assert [name for name, _ in events] == ["search_started", *["search_progress"] * 3, "search_complete"]
    assert json.loads(events[0][1]) == {"query": HOSTILE.strip()}
    assert json.loads(events[-1][1])["query"] == HOSTILE.strip()
    assert body.isascii() and b"\r" not in body
