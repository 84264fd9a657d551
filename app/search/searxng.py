"""The ``searxng`` search engine: the JSON API of a SearXNG instance.

It sends ``GET {upstream}/search?q=…&format=json&pageno=N`` with a connect
timeout and an overall deadline for the whole answer, and maps SearXNG's
``results`` and ``number_of_results`` to the API's shape.  An HTTP error,
a refused connection or a body that is not the expected JSON becomes
``502 Bad Gateway``; running out of time becomes ``504 Gateway Timeout``.
SearXNG only answers JSON when ``search.formats`` in its settings lists
``json``; otherwise it answers 403, which shows up here as a 502.

SearXNG chooses its own page size, so ``per_page`` in the answer is the larger
of the configured size and the number of results on the page.  Do not use it
for a public SearXNG instance you do not run: they rate-limit API clients.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from werkzeug.exceptions import BadGateway, GatewayTimeout

from app.search import Progress, SearchEngine, SearchPage, SearchResult

if TYPE_CHECKING:
    from app.options import SearchOptions

__all__ = ["SearxngEngine"]

MAX_BODY_BYTES = 5 * 1024 * 1024
_CHUNK = 64 * 1024


class SearxngEngine(SearchEngine):
    """Ask a SearXNG instance and map its JSON answer.

    Options used: ``upstream`` (base URL, may include a path prefix),
    ``timeout`` (seconds for the whole answer), ``connect_timeout`` and ``per_page``.

        engine = SearxngEngine(SearchOptions(engine="searxng", upstream="http://127.0.0.1:8888"))
        engine.search("python", page=2).total
    """

    name = "searxng"

    def __init__(self, options: SearchOptions) -> None:
        if options.upstream is None:
            raise ValueError("upstream is required when engine is 'searxng'")
        parts = urlsplit(str(options.upstream))
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = options.timeout
        self.connect_timeout = min(options.connect_timeout, options.timeout)
        self.per_page = options.per_page
        self.context = ssl.create_default_context() if self.https else None

    def stages(self, query: str, page: int) -> Generator[Progress, None, SearchPage]:
        deadline = time.monotonic() + self.timeout
        target = f"{self.prefix}/search?" + urlencode({"q": query, "format": "json", "pageno": page})
        conn = self._connection()
        try:
            try:
                conn.connect()
                conn.request("GET", target, headers={"Accept": "application/json"})
                yield 25, "upstream_connected"
                _set_timeout(conn, deadline)
                response = conn.getresponse()
                yield 50, "upstream_responded"
                if response.status != 200:
                    raise BadGateway(f"The search upstream answered with HTTP {response.status}.")
                body = _read(response, conn, deadline)
            except TimeoutError:
                raise GatewayTimeout(
                    f"The search upstream did not answer within {self.timeout:g} seconds."
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise BadGateway(f"The search upstream could not be reached ({type(exc).__name__}).") from None
        finally:
            conn.close()
        yield 75, "upstream_received"
        result = self._page(query, page, body)
        yield 100, "parsed"
        return result

    def _connection(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self.context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)

    def _page(self, query: str, page: int, body: bytes) -> SearchPage:
        try:
            doc = json.loads(body)
        except ValueError:
            raise BadGateway("The search upstream sent a response that is not valid JSON.") from None
        items = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise BadGateway("The search upstream sent JSON without a 'results' list.")
        results = tuple(
            SearchResult(_text(item.get("title")), _text(item.get("url")),
                         _text(item.get("content")), _text(item.get("engine")) or self.name)
            for item in items
            if isinstance(item, dict) and item.get("url")
        )
        per_page = max(self.per_page, len(results))
        seen = (page - 1) * per_page + len(results)
        reported = doc.get("number_of_results")
        total = int(reported) if isinstance(reported, int | float) and reported >= seen else seen
        return SearchPage(query, results, total, page, per_page)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _set_timeout(conn: http.client.HTTPConnection, deadline: float) -> None:
    """Let the next socket read wait only until the overall deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    if conn.sock is not None:
        conn.sock.settimeout(remaining)


def _read(response: http.client.HTTPResponse, conn: http.client.HTTPConnection, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        _set_timeout(conn, deadline)
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadGateway(f"The search upstream sent more than {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
