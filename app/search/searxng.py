"""The ``searxng`` search engine: the JSON API of a SearXNG instance.

It sends ``GET {upstream}/search?q=…&format=json&pageno=N`` and maps
SearXNG's ``results`` and ``number_of_results`` to the API's shape.
``timeout`` bounds the whole exchange: connecting (each address tried at most
``connect_timeout``; a TLS handshake gets what is left of ``timeout``),
sending the request, and every read of the status line, the headers and the
body, so an upstream that trickles bytes is cut off at ``timeout`` like one
that sends nothing.  Time spent paused at a stage, while
the stream endpoint paces or sends its events, does not count.  Given a
``heartbeat`` (by the stream), the waits for the name's lookup, for the
answer's first byte and for each read of its body go in slices of at most that
many seconds, and ``WAITING`` is yielded between them (the stream sends a
comment, which does not count either); the last slice is what is left of
``timeout``, so the 504 comes at the deadline exactly.  Connecting and a TLS
handshake wait in one piece.  The plain search gives none: it waits in one piece.  Name
resolution counts too: the resolver's own timeouts (5 s a try, for each
nameserver and attempt in ``resolv.conf``) would hold a server thread far
longer, so the name is looked up in a thread of its own that a search waits
for until its deadline (a 504), and the searches that come while one lookup
runs wait for that one: a resolver that hangs ties up one thread, not one per
search.  Nothing is kept between searches: the system's resolver (or its
cache) answers each one.

The upstream URL may carry a user and password (sent as HTTP basic auth) and
a query string of its own (``?token=…``, kept ahead of the search's parameters).
Interim answers (1xx: 103 Early Hints from a proxy or CDN in front of it, 102
Processing) are read past to the final one; a 101 (never asked for) is a 502.

An HTTP error, a refused connection (or a failed name lookup or TLS handshake:
"could not be reached"), an answer HTTP cannot read or that ends early (a
bad status line, too many headers, broken chunks, a connection closed or
reset before the body's end: "answer was broken") or a body that is not the
expected JSON becomes ``502 Bad Gateway``, and so does a body over ``MAX_BODY_BYTES`` (5 MiB; the
socket is read no further than ``MAX_RESPONSE_BYTES``, whatever the framing says);
running out of time becomes ``504 Gateway
Timeout``; a 429 (SearXNG's limiter) or 503 becomes ``503`` with the
upstream's ``Retry-After`` (seconds or an HTTP date; at most an hour; 30 s when it gives none or one
that is neither).  A
result whose ``url`` is not an ``http``/``https`` URL with a host (and no
control character or lone surrogate), or whose ``title`` or ``content`` is
neither a string nor null, is dropped, and a page passes on at most
``MAX_RESULTS``; a lone surrogate (a ``\\ud800`` escape) in a result's text
becomes U+FFFD.  A ``number_of_results`` that is not a
whole number from the results seen so far up to 2**53 - 1 is ignored (the
total is then the results seen so far, and one more when the page is full, so
that a client following ``pages`` asks for the next one; SearXNG often reports
0 for engines that give no estimate); on an empty page (past the end) the
total is at most what the pages before it hold.
SearXNG only answers JSON when ``search.formats`` in its settings lists
``json``; otherwise it answers 403, which shows up here as a 502.  Its bot
limiter (``server.limiter``, on for a ``public_instance``) refuses API clients
with 429, which shows up here as a 503 "busy": put this server's address in
``botdetection.ip_lists.pass_ip`` of the instance's ``limiter.toml``.

SearXNG chooses its own page size, so ``per_page`` in the answer is the larger
of the configured size and the number of results on the page.  Do not use it
for a public SearXNG instance you do not run: they rate-limit API clients.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import io
import ipaddress
import json
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlencode, urlsplit

from werkzeug.exceptions import BadGateway, GatewayTimeout, HTTPException
from werkzeug.http import parse_date

from app.search import WAITING, Progress, SearchEngine, SearchPage, SearchResult
from middleware.base import refuse

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from app.options import SearchOptions

__all__ = ["MAX_TOTAL", "SearxngEngine", "resolve"]

MAX_BODY_BYTES = 5 * 1024 * 1024
#: The most bytes read from the upstream's socket for one answer: the status line, the headers
#: (http.client takes at most 100 lines of 64 KiB), the body and its chunk framing. The body's own
#: cap is checked as it is decoded; this one also holds when the framing is hostile (a chunk size
#: of ``-1`` makes http.client read to the end of the stream in one call).
MAX_RESPONSE_BYTES = 3 * MAX_BODY_BYTES
#: The most results one page passes on: SearXNG sends a few dozen; more would make one answer huge.
MAX_RESULTS = 100
_WEB_SCHEMES = ("http://", "https://")
#: What a result's URL may not hold: controls (C0, DEL, C1) and lone surrogates (no UTF-8 carries them).
_NOT_IN_URL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Seconds a client is asked to wait when a busy upstream gave no Retry-After of its own.
BUSY_RETRY_AFTER = 30
#: The largest ``number_of_results`` believed: beyond it JavaScript clients lose integer precision.
MAX_TOTAL = 2**53 - 1
_CHUNK = 64 * 1024


class SearxngEngine(SearchEngine):
    """Ask a SearXNG instance and map its JSON answer.

    Options used: ``upstream`` (base URL, may include a path prefix),
    ``timeout`` (seconds for the whole exchange), ``connect_timeout`` (seconds
    for each TCP connect, within ``timeout``) and ``per_page``.

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
        #: The upstream URL's own query (``?token=…``), kept ahead of the search's parameters.
        self.query = parts.query
        self.headers = {"Accept": "application/json", "User-Agent": "wsgistack"}
        if parts.username is not None or parts.password is not None:  # a SearXNG behind HTTP basic auth
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            self.headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = options.timeout
        self.connect_timeout = min(options.connect_timeout, options.timeout)
        self.per_page = options.per_page
        self.context = ssl.create_default_context() if self.https else None
        self._lookup_lock = threading.Lock()
        self._lookup: _Lookup | None = None  # the lookup of the host's name running now, if any
        try:
            self._literal = bool(ipaddress.ip_address(self.host))  # an address: nothing to look up
        except ValueError:
            self._literal = False

    def stages(self, query: str, page: int, heartbeat: float | None = None) -> Generator[Progress, None, SearchPage]:
        deadline = _Deadline(self.timeout)
        target = f"{self.prefix}/search?" + (f"{self.query}&" if self.query else "") + urlencode(
            {"q": query, "format": "json", "pageno": page})
        conn: http.client.HTTPConnection | None = None
        response: http.client.HTTPResponse | None = None
        sent = False  # past this, a failure is the upstream's answer, not reaching it
        try:
            try:
                lookup = None if self._literal else self._lookup_now()
                if lookup is not None and heartbeat is not None:
                    yield from _waiting(lookup.done.wait, deadline, heartbeat)
                conn = self._connect(deadline, lookup)
                conn.sock.settimeout(deadline.remaining())
                conn.request("GET", target, headers=self.headers)
                sent = True
                with deadline.paused():
                    yield 25, "upstream_connected"
                # HTTPResponse reads through sock.makefile(): the wrapper's file waits only until the deadline.
                answer = _DeadlineSocket(conn.sock, deadline)
                response = _Response(cast("socket.socket", answer), method="GET")
                wait = None if heartbeat is None else functools.partial(_waiting, answer.ready, deadline, heartbeat)
                if wait is not None:  # SearXNG answers once its engines have: mostly, this is the long wait
                    yield from wait()
                response.begin()
                with deadline.paused():
                    yield 50, "upstream_responded"
                if response.status in (429, 503):  # SearXNG's limiter, or an upstream in maintenance
                    raise _busy(response.status, response.getheader("Retry-After"))
                if response.status != 200:
                    raise BadGateway(f"The search upstream answered with HTTP {response.status}.")
                body = yield from _read(response, wait)
            except TimeoutError:
                raise GatewayTimeout(
                    f"The search upstream did not answer within {self.timeout:g} seconds."
                ) from None
            except (OSError, http.client.HTTPException, UnicodeError) as exc:  # UnicodeError: a name the
                # resolver's idna codec refuses (the options refuse the ones it is known to)
                if sent:  # closed before or during the answer, or one HTTP cannot read (status line, headers, chunks)
                    raise BadGateway(f"The search upstream's answer was broken ({type(exc).__name__}).") from None
                raise BadGateway(f"The search upstream could not be reached ({type(exc).__name__}).") from None
        finally:
            if response is not None:
                response.close()
            if conn is not None:
                conn.close()
        yield 75, "upstream_received"
        result = self._page(query, page, body)
        yield 100, "parsed"
        return result

    def _connect(self, deadline: _Deadline, lookup: _Lookup | None) -> http.client.HTTPConnection:
        """A connection over a socket connected (and for https, handshaken) within the deadline."""
        sock = self._open_socket(deadline, lookup)
        try:
            if self.context is not None:  # connect_timeout is for reaching the address; the handshake has the rest
                sock.settimeout(deadline.remaining())
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        conn = (http.client.HTTPSConnection(self.host, self.port, context=self.context) if self.https
                else http.client.HTTPConnection(self.host, self.port))
        conn.sock = sock
        return conn

    def _open_socket(self, deadline: _Deadline, lookup: _Lookup | None) -> socket.socket:
        """Connect to the first address that accepts; unlike ``socket.create_connection``,
        the attempts share the deadline instead of each getting the whole timeout."""
        error: OSError = OSError(f"no address found for {self.host}")
        timeout = 0.0
        for family, kind, proto, _, address in self._addresses(deadline, lookup):
            timeout = min(self.connect_timeout, deadline.remaining())
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                error = exc
            else:
                return sock
        if isinstance(error, TimeoutError) and timeout == self.connect_timeout < self.timeout:
            # The last attempt ran out of connect_timeout, not the whole timeout: say which.
            raise GatewayTimeout(f"The search upstream did not accept a connection within "
                                 f"{self.connect_timeout:g} seconds.")
        raise error

    def _lookup_now(self) -> _Lookup:
        """The lookup of the host's name running now, else a new one."""
        with self._lookup_lock:
            lookup = self._lookup
            if lookup is None or lookup.done.is_set():
                lookup = self._lookup = _Lookup(self.host, self.port)
        return lookup

    def _addresses(self, deadline: _Deadline, lookup: _Lookup | None) -> list[Any]:
        """What :func:`resolve` answers for the host (``lookup``: of its name), waited for no longer than
        the deadline."""
        if lookup is None:
            return resolve(self.host, self.port)  # an address: answered without asking any resolver
        if not lookup.done.wait(deadline.remaining()):
            raise GatewayTimeout(f"The search upstream's name was not resolved within {self.timeout:g} seconds.")
        if lookup.error is not None:
            raise lookup.error
        return lookup.addresses

    def _page(self, query: str, page: int, body: bytes) -> SearchPage:
        try:  # a number of more digits than any count is no count (int() of 5000 digits would refuse it all)
            doc = json.loads(body, parse_int=_int_or_none)
        except ValueError:
            raise BadGateway("The search upstream sent a response that is not valid JSON.") from None
        except RecursionError:
            raise BadGateway("The search upstream sent JSON nested too deeply to read.") from None
        items = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise BadGateway("The search upstream sent JSON without a 'results' list.")
        results = tuple(result for result in map(self._result, items) if result is not None)[:MAX_RESULTS]
        per_page = max(self.per_page, len(results))
        reported = _count(doc.get("number_of_results"))
        if results:  # at least the results of the pages before and of this one
            seen = (page - 1) * per_page + len(results)
            total = reported if reported is not None and reported >= seen else seen
            if total == seen and reported != seen and len(results) >= self.per_page:
                total += 1  # a full page and no count (SearXNG often says 0): the next page may hold more
        else:  # past the end: the pages before hold everything there is, at most
            total = min(reported or 0, (page - 1) * per_page)
        return SearchPage(query, results, total, page, per_page)

    def _result(self, item: Any) -> SearchResult | None:
        """One upstream result, or None when it has no URL or a field of the wrong type."""
        if not isinstance(item, dict):
            return None
        url, title, content = item.get("url"), item.get("title"), item.get("content")
        if not isinstance(url, str) or not _web_address(url):
            return None  # no URL, or one a link to would not open a web page (javascript:, data:, https://)
        if not isinstance(title, str | None) or not isinstance(content, str | None):
            return None
        engine = item.get("engine")
        if not isinstance(engine, str) or not engine:
            engine = self.name
        return SearchResult(_text(title or ""), url, _text(content or ""), _text(engine))


def resolve(host: str, port: int) -> list[Any]:
    """The TCP addresses of ``host``, as the system's resolver gives them (``getaddrinfo``)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


class _Lookup:
    """One :func:`resolve` of a name, run in a daemon thread: each search waits for it only until its deadline."""

    def __init__(self, host: str, port: int) -> None:
        self.done = threading.Event()
        self.addresses: list[Any] = []
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(host, port), name="wsgistack-resolve", daemon=True).start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.addresses = resolve(host, port)
        except BaseException as exc:  # for every search waiting for it to raise
            self.error = exc
        finally:
            self.done.set()


class _Deadline:
    """The time left for one upstream exchange; time spent in :meth:`paused` does not count."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; ``TimeoutError`` when there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Move the deadline on by the time the block takes (a generator suspended at ``yield``)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.at += time.monotonic() - started


def _waiting(ready: Callable[[float], bool], deadline: _Deadline, heartbeat: float) -> Generator[Progress, None, None]:
    """Wait in slices of ``heartbeat`` seconds until ``ready(seconds)`` says so, yielding :data:`WAITING` between them.

    Only while more than a slice is left of the deadline: the caller's own wait takes the rest, and
    fails as it would have without slices (a 504 saying what ran out), at the deadline exactly.
    Time spent at the ``yield`` (the stream sending its comment) does not count, as a pause at a stage does not.
    """
    while deadline.remaining() > heartbeat and not ready(heartbeat):
        with deadline.paused():
            yield WAITING


class _Response(http.client.HTTPResponse):
    """An ``HTTPResponse`` that reads past every interim (1xx) answer to the final one.

    RFC 9110 §15.2: a client must take an interim answer it does not expect (103 Early Hints
    from a proxy or a CDN before the upstream, 102 Processing) and go on reading; http.client
    skips only 100 Continue.  101 stays: it is final for the connection, and is never asked for here.
    """

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]  # http.client's, not typed
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # its header fields (Link: …) mean nothing here


class _DeadlineReader(io.RawIOBase):
    """Reads from a socket, each waiting only until the deadline, at most MAX_RESPONSE_BYTES in all.

    With ``slice`` set, a read waits at most that long, and finding nothing sets ``idle`` and
    answers None (nothing yet), which a ``BufferedReader.peek`` passes on as ``b""``.
    """

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open until this reader is closed
        self._deadline = deadline
        self._left = MAX_RESPONSE_BYTES
        self.slice: float | None = None
        self.idle = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int | None:
        if self._left <= 0:
            raise _too_large()
        if self.slice is not None:
            return self._read_slice(buffer, self.slice)
        self._sock.settimeout(self._deadline.remaining())
        with memoryview(buffer) as view:
            read = self._raw.readinto(view[:self._left])
        if read:
            self._left -= read
        return read

    def _read_slice(self, buffer: WriteableBuffer, seconds: float) -> int | None:
        """Read, waiting at most ``seconds``: from the socket itself, as its file refuses to read
        again once a read of it timed out."""
        self._sock.settimeout(seconds)
        with memoryview(buffer) as view:
            try:
                read = self._sock.recv_into(view[:self._left])
            except TimeoutError:
                self.idle = True
                return None
        if read:
            self._left -= read
        return read

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What ``HTTPResponse`` takes from a socket: a file to read the response from."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._raw = _DeadlineReader(sock, deadline)
        self._file: io.BufferedReader = io.BufferedReader(self._raw)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return self._file

    def ready(self, seconds: float) -> bool:
        """Whether the answer has a byte to read (or has ended) within ``seconds``: one read at most,
        into the file's buffer, where the response reads it next."""
        self._raw.slice, self._raw.idle = seconds, False
        try:
            self._file.peek(1)
        finally:
            self._raw.slice = None
        return not self._raw.idle


def _web_address(url: str) -> bool:
    """An ``http``/``https`` URL with a host, and without a character no address holds."""
    if not url[:8].lower().startswith(_WEB_SCHEMES) or _NOT_IN_URL.search(url):
        return False
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:  # a bracketed host that is not an address
        return False


def _text(value: str) -> str:
    """``value`` with each lone surrogate (which Python's JSON reads from a ``\\ud800`` escape) as U+FFFD."""
    return _SURROGATE.sub("\ufffd", value)


def _int_or_none(text: str) -> int | None:
    """A JSON integer, or None when it has more digits than a count can (Python refuses 4300+)."""
    return int(text) if len(text) <= 20 else None


def _busy(status: int, retry_after: str | None) -> HTTPException:
    """503 for an upstream that asks to be left alone, passing on its ``Retry-After`` (at most an hour).

    RFC 9110 §10.2.3: seconds, or an HTTP date (a date gone by: now).
    """
    wait = retry_after.strip() if retry_after else ""
    if wait.isascii() and wait.isdigit():  # (past its leading zeros, more than four digits is past the hour)
        digits = wait.lstrip("0") or "0"
        seconds = 3600 if len(digits) > 4 else min(int(digits), 3600)
    else:
        when = parse_date(wait) if wait else None
        seconds = BUSY_RETRY_AFTER if when is None else min(3600, max(0, math.ceil(when.timestamp() - time.time())))
    return refuse(503, f"The search upstream is busy (HTTP {status}); retry in {seconds} seconds.",
                  headers=[("Retry-After", str(seconds))])


def _count(value: Any) -> int | None:
    """``number_of_results`` as a count, or None when it is not a plausible one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():  # also NaN and ±Infinity
        return None
    if not 0 <= value <= MAX_TOTAL:
        return None
    return int(value)


def _read(response: http.client.HTTPResponse,
          wait: Callable[[], Generator[Progress, None, None]] | None) -> Generator[Progress, None, bytes]:
    """The body, at most MAX_BODY_BYTES. With ``wait`` (a stream's heartbeat), each read takes only
    what one read of the socket brings, and waits for it in slices first: never longer than a slice silent."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if wait is None:
            chunk = response.read(_CHUNK)
        else:
            if not response.isclosed() and response.length != 0:  # (at the end: nothing more to wait for)
                yield from wait()
            chunk = response.read1(_CHUNK)
        if not chunk:
            if response.length:  # closed before the Content-Length's end (read() does not raise on that)
                raise http.client.IncompleteRead(b"", response.length)
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)


def _too_large() -> HTTPException:
    return BadGateway(f"The search upstream sent more than {MAX_BODY_BYTES} bytes.")
