"""The searxng engine against a SearXNG-shaped server on loopback: 200, 502, 504."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from webtest import TestApp

from app import create_app
from middleware.base import Context
from middleware.errors import ErrorsMiddleware


class FakeSearxng(ThreadingHTTPServer):
    """Answers /search like SearXNG; the query text picks a misbehaviour."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeSearxng

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        params = parse_qs(parts.query)
        self.server.requests.append((parts.path, params))
        query = params.get("q", [""])[0]
        if not parts.path.endswith("/search"):
            self._send(404, b"not found", "text/plain")
        elif query == "boom":
            self._send(500, b"<h1>Internal Server Error</h1>", "text/html")
        elif query == "garbage":
            self._send(200, b"<html>not json</html>", "text/html")
        elif query == "shapeless":
            self._send(200, b'{"answers": []}')
        elif query == "slow":
            self.server.release.wait(5)
            self._send(200, b'{"results": []}')
        else:
            page = int(params.get("pageno", ["1"])[0])
            doc = {
                "query": query,
                "number_of_results": 42,
                "results": [
                    {"title": f"{query} result {page}.{i}", "url": f"https://example.org/{page}/{i}",
                     "content": f"About {query}", "engine": "duckduckgo", "score": 1.0}
                    for i in range(3)
                ] + [{"title": "no url, dropped"}],
            }
            self._send(200, json.dumps(doc).encode())


@pytest.fixture
def upstream() -> Iterator[FakeSearxng]:
    """A SearXNG-shaped server on a free loopback port."""
    server = FakeSearxng()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def searxng_app(tmp_path: Path, upstream: str, **search: Any) -> TestApp:
    opts = {"var_dir": str(tmp_path), "search": {"engine": "searxng", "upstream": upstream, **search}}
    return TestApp(ErrorsMiddleware(create_app(opts), ErrorsMiddleware.Options(), Context()))


def test_results_are_mapped_to_v1(tmp_path: Path, upstream: FakeSearxng) -> None:
    body = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": "python wsgi", "page": "2"}).json
    assert body["query"] == "python wsgi"
    assert body["results"] == [
        {"title": f"python wsgi result 2.{i}", "url": f"https://example.org/2/{i}",
         "content": "About python wsgi", "engine": "duckduckgo"}
        for i in range(3)
    ]
    assert body["meta"] == {"total": 42, "page": 2, "per_page": 10, "query": "python wsgi"}
    path, params = upstream.requests[-1]
    assert path == "/search"
    assert params == {"q": ["python wsgi"], "format": ["json"], "pageno": ["2"]}


def test_results_are_mapped_to_v2(tmp_path: Path, upstream: FakeSearxng) -> None:
    body = searxng_app(tmp_path, upstream.url).get("/api/v2/search", {"q": "flask"}).json
    assert [r["url"] for r in body["data"]] == [f"https://example.org/1/{i}" for i in range(3)]
    assert body["pagination"] == {"page": 1, "per_page": 10, "total": 42, "pages": 5}


def test_upstream_path_prefix_is_kept(tmp_path: Path, upstream: FakeSearxng) -> None:
    searxng_app(tmp_path, upstream.url + "/searx/").get("/api/v1/search", {"q": "x"})
    assert upstream.requests[-1][0] == "/searx/search"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("boom", (502, "The search upstream answered with HTTP 500."), id="upstream 500"),
        pytest.param("garbage", (502, "The search upstream sent a response that is not valid JSON."),
                     id="invalid JSON"),
        pytest.param("shapeless", (502, "The search upstream sent JSON without a 'results' list."),
                     id="JSON without results"),
        pytest.param("slow", (504, "The search upstream did not answer within 0.2 seconds."), id="slow upstream"),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upstream_failures(tmp_path: Path, upstream: FakeSearxng, version: str, query: str,
                           expected: tuple[int, str]) -> None:
    status, message = expected
    client = searxng_app(tmp_path, upstream.url, timeout=0.2)
    error = client.get(f"/api/{version}/search", {"q": query}, status=status).json["error"]
    assert (error["code"], error["message"]) == (status, message)


def test_unreachable_upstream_is_a_502(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = searxng_app(tmp_path, f"http://127.0.0.1:{port}").get(
        "/api/v1/search", {"q": "x"}, status=502).json["error"]
    assert error["message"] == "The search upstream could not be reached (ConnectionRefusedError)."


def test_upstream_failure_in_a_stream_becomes_an_error_event(tmp_path: Path, upstream: FakeSearxng) -> None:
    text = searxng_app(tmp_path, upstream.url).get("/api/v1/search/stream", {"q": "boom"}).text
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: search_started", "event: search_progress",
                                      "event: search_progress", "event: search_error"]
    assert json.loads(events[-1][1][len("data: "):]) == {
        "code": 502, "message": "The search upstream answered with HTTP 500."}


def test_stream_reports_the_upstream_stages(tmp_path: Path, upstream: FakeSearxng) -> None:
    text = searxng_app(tmp_path, upstream.url).get("/api/v1/search/stream", {"q": "ok"}).text
    progress = [json.loads(line[len("data: "):]) for line in text.split("\n") if '"progress"' in line]
    assert progress == [
        {"progress": 25, "stage": "upstream_connected"},
        {"progress": 50, "stage": "upstream_responded"},
        {"progress": 75, "stage": "upstream_received"},
        {"progress": 100, "stage": "parsed"},
    ]
