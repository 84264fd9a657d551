"""One JSON line per request: who asked for what, what they got, how long it took.

The line goes to the ``wsgistack.access`` logger (or a file or stream of its
own) when the server closes the response, so it carries the bytes really
sent and the full duration, also of a streamed body; the body is counted as
it passes, never buffered.  Every text field goes through the escaper of
``json.dumps(ensure_ascii=True)``, so a request cannot forge or split a log
line with newlines, escape sequences or other control characters.

Building and formatting a ``LogRecord`` costs more than the rest of the layer
together.  When the logger's only handler is a :class:`LineHandler` (a
stream handler that writes messages as they are), the layer hands it the
line directly, with the same output.

It sits inside ``errors`` (the builder keeps ``errors`` outermost), so it sees
exceptions before they are rendered: it logs them with the status the
``errors`` layer will send (the ``HTTPException``'s own response's, else its code, else 500) and
re-raises.  Environ is shared, so the request id and identity that inner
layers set are in the line even when access_log sits outside them.

Do not use it when the front proxy already writes the access log you need;
two logs of every request only cost I/O.  Keep ``query`` off (the default)
when query strings may carry secrets such as tokens.
"""

from __future__ import annotations

import logging
import math
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator
from werkzeug.exceptions import HTTPException

from .base import (
    IDENTITY,
    RENDER_ERROR,
    REQUEST_ID,
    Context,
    LayerOptions,
    client_ip,
    not_a_path,
    on_rendered,
    refusal_status,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["APP_ERROR", "AccessLogMiddleware", "LineHandler"]

#: Environ key under which the app notes a failure it reported itself after the status went out (a
#: stream's ``search_error`` event: ``"search_error 502"``); the line's ``error`` unless something else failed.
APP_ERROR = "wsgistack.app_error"

_INFO = logging.INFO
#: How often (seconds) the file's identity is compared with the path, to follow logrotate.
ROTATION_CHECK_SECONDS = 1.0
_quote = encode_basestring_ascii  # what json.dumps(ensure_ascii=True) uses for every string
#: Lines up to this size go out with one unlocked write() (POSIX PIPE_BUF: atomic on a pipe).
_ATOMIC_BYTES = select.PIPE_BUF


class AccessLogMiddleware:
    """Write one JSON line per request when its response is closed.

    Fields: ``time`` (request start, ISO 8601 UTC), ``request_id``,
    ``client_ip``, ``method``, ``path``, ``query`` (when on), ``status``,
    ``bytes`` (body bytes sent), ``duration_ms``, ``user`` (the identity's
    subject or null), ``user_agent`` (when on), and ``error`` (the exception
    type, only when the app failed; else what the app noted under ``APP_ERROR``).

    Options:
        ``logger`` ("wsgistack.access"): the logger that receives the lines (level INFO).
        ``file`` (none): append the lines to this file instead; a move by logrotate is
        noticed within a second (``reopen()`` forces it).
        ``stream`` (none): ``stdout`` or ``stderr`` instead of the logger.
        ``query`` (false): include the raw query string.
        ``user_agent`` (true): include the ``User-Agent`` header.

    Example::

        app = AccessLogMiddleware(app, AccessLogMiddleware.Options(stream="stdout"), Context())
        # {"time":"2025-01-01T12:00:00.000Z","request_id":"...","method":"GET",...}
    """

    class Options(LayerOptions):
        logger: str = "wsgistack.access"
        file: str | None = None
        stream: Literal["stdout", "stderr"] | None = None
        query: bool = False
        user_agent: bool = True

        @model_validator(mode="after")
        def _one_destination(self) -> AccessLogMiddleware.Options:
            if self.file and self.stream:
                raise ValueError("file and stream may not both be set; choose one destination")
            if self.file == "":
                raise ValueError("file must be a path, or left out to use the logger")
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app, self.options = app, options
        self.query, self.user_agent = options.query, options.user_agent
        self.sink: _AppendFile | _Stream | None = None
        self.logger: logging.Logger | None = None
        if options.file:
            self.sink = _AppendFile(context.path(options.file), context.logger)
        elif options.stream:
            self.sink = _Stream(getattr(sys, options.stream))
        else:
            self.logger = logging.getLogger(options.logger)
        self._emit = self.sink.write if self.sink is not None else self._to_logger
        self._second = (0, "")  # (whole second, its ISO 8601 text): formatted once a second
        #: Exchanges not closed yet: a line is written for each, by whichever takes it from here first
        #: (its close(), or this layer's at shutdown). Weak references, each removed when its exchange is
        #: collected: a server that never closes one leaks nothing. (A plain set: add, remove and copy
        #: are each one C call, safe across threads; a WeakSet's iteration is not.)
        self.open: set[weakref.ref[_Exchange]] = set()

    def close(self) -> None:
        """Write the lines of requests still open, then close the file this layer appends to.

        At shutdown, requests the drain timeout cut off (a long stream) are still
        running when the process exits: their lines say ``"error":"shutdown"``, with
        the bytes sent until then.
        """
        for exchange in [found for ref in self.open.copy() if (found := ref()) is not None]:
            if exchange.claim():
                exchange.error = exchange.error or "shutdown"
                self.write(exchange)
        if isinstance(self.sink, _AppendFile):
            self.sink.close()

    def reopen(self) -> None:
        """Reopen the file now (say on SIGHUP); moves are also noticed within a second."""
        if isinstance(self.sink, _AppendFile):
            self.sink.reopen()

    def follow(self) -> None:
        """Reopen the file if it was moved, as a write does once a second.

        For a process that holds the layer but writes nothing through it (serve.py's
        supervisor): it would keep a rotated file open, and its disk space taken, for good.
        """
        sink = self.sink
        if isinstance(sink, _AppendFile) and sink.lock.acquire(blocking=False):
            try:
                sink._follow()
            except OSError:
                pass  # a write reports it
            finally:
                sink.lock.release()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.logger is not None and not self.logger.isEnabledFor(_INFO):
            return self.app(environ, start_response)
        exchange = _Exchange(self, environ, start_response)
        self.open.add(exchange.ref)
        try:
            exchange.result = self.app(environ, exchange.start_response)
        except Exception as exc:
            if exchange.sent:  # write() sent the status and some body: too late to render, it stays
                exchange.error = type(exc).__name__
            elif isinstance(exc, HTTPException):
                exchange.status = refusal_status(exc)
            else:
                exchange.status, exchange.error = 500, type(exc).__name__
            if not exchange.sent and RENDER_ERROR in environ:  # errors outside renders it
                exchange.await_render(exc)
            exchange.close()
            raise
        return exchange

    def write(self, exchange: _Exchange) -> None:
        """Build the JSON line for a finished exchange and send it to the destination."""
        duration = (time.perf_counter() - exchange.clock) * 1000
        text = self._line(exchange, duration, _quote)
        if len(text) >= _ATOMIC_BYTES:  # long fields a client sent (a path, a User-Agent): cut them,
            text = self._line(exchange, duration, _cut)  # so that the line still goes out in one write()
        self._emit(text)

    def _line(self, exchange: _Exchange, duration: float, quote: Callable[[str], str]) -> str:
        environ = exchange.environ
        started = exchange.started
        second = int(started)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        # Every text value goes through json's own escaper (quotes, backslashes, control and
        # non-ASCII characters become escapes), so the line is one line of ASCII JSON.
        # (``_text`` only for non-ASCII values: this runs for every request.)
        path = exchange.path
        if path[:1] != "/" and path:  # CONNECT host:443 (Waitress's PATH_INFO: "443"): the target as sent
            path = not_a_path(environ) or path
        request_id = environ.get(REQUEST_ID)
        identity = environ.get(IDENTITY)
        subject = None if identity is None else getattr(identity, "subject", None)
        line = [f'{{"time":"{cached[1]}.{int((started - second) * 1000):03d}Z"'
                f',"request_id":{"null" if request_id is None else quote(str(request_id))}'
                f',"client_ip":{quote(client_ip(environ))}'
                f',"method":{quote(exchange.method)}'
                f',"path":{quote(path if path.isascii() else _text(path))}']
        if self.query:
            line.append(f',"query":{quote(_text(exchange.query))}')
        line.append(f',"status":{exchange.status:d},"bytes":{exchange.sent:d},"duration_ms":{duration:.3f}'
                    f',"user":{"null" if subject is None else quote(str(subject))}')
        if self.user_agent:
            agent = environ.get("HTTP_USER_AGENT", "")
            line.append(f',"user_agent":{quote(agent if agent.isascii() else _text(agent))}')
        error = exchange.error or environ.get(APP_ERROR)
        if error:
            line.append(f',"error":{quote(str(error))}')
        line.append(',"truncated":true}' if quote is _cut else "}")
        return "".join(line)

    def _to_logger(self, line: str) -> None:
        logger = self.logger
        assert logger is not None
        handlers = logger.handlers
        if len(handlers) == 1 and not logger.propagate and not logger.filters and not logger.disabled:
            handler = handlers[0]
            if type(handler) is LineHandler and not handler.filters and handler.level <= _INFO:
                handler.write_line(line)  # what the record would come to, without making one
                return
        # What logger.info(line) does, without looking up the caller's frame: the record names
        # this module, as findCaller would.
        logger.handle(logger.makeRecord(logger.name, _INFO, __file__, 0, line, (), None, "write"))


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes each record's message as it is, one line per record.

    Give the access logger one: when it is the only handler of
    a logger that does not propagate, the layer hands it each line directly,
    without building and formatting a ``LogRecord`` (most of what logging
    costs per request); the output is the same.  Any other configuration of
    the logger gets ordinary records.

        logging.getLogger("wsgistack.access").handlers[:] = [LineHandler(sys.stdout)]
        logging.getLogger("wsgistack.access").propagate = False

    A line goes out as one ``write()`` on the stream's file descriptor,
    without taking the handler's lock: see :func:`write_atomic`.
    """

    terminator = "\n"

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._fd_of: tuple[Any, int | None] = (None, None)  # (stream, its descriptor or None)
        self._reported = -math.inf  # when a failed write was last reported (at most once a minute)

    def format(self, record: logging.LogRecord) -> str:
        """The message alone: an access line is already complete (a formatter set here is ignored)."""
        return record.getMessage()

    def _fd(self) -> int | None:
        stream = self.stream
        known, fd = self._fd_of
        if known is not stream:
            fd = _descriptor(stream)
            self._fd_of = (stream, fd)
        return fd

    def write_line(self, line: str) -> None:
        """Write ``line`` as emitting a record with that message would."""
        fd = self._fd()
        if fd is not None and write_atomic(fd, (line + "\n").encode("utf-8", "backslashreplace")):
            return
        self.acquire()
        try:
            stream = self.stream
            stream.write(line + self.terminator)
            stream.flush()
        except Exception:  # as emit() does: report on stderr, never fail the request
            # A broken pipe or a full disk fails every line: one report a minute, not one per request.
            now = time.monotonic()
            if now - self._reported >= 60:
                self._reported = now
                self.handleError(logging.makeLogRecord({"msg": line, "levelno": _INFO, "levelname": "INFO"}))
        finally:
            self.release()


def _descriptor(stream: Any) -> int | None:
    """The file descriptor under ``stream``, its buffered text flushed first; None when it has none."""
    try:
        fd = stream.fileno()
        stream.flush()  # what was written through the stream so far goes out before our lines
    except (AttributeError, OSError, ValueError):  # StringIO and other in-memory streams
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def write_atomic(fd: int, data: bytes) -> bool:
    """Write ``data`` with one ``write()``, holding no lock; False when the caller must write it.

    The access log writes from every server thread.  Holding a lock around
    the write (what ``logging`` handlers do) makes threads queue on it while
    the holder waits for the kernel without the GIL; each hand-over then
    waits for the GIL too, and under 64 connections a Waitress process
    served a fifth of its requests.  One ``write()`` needs no lock: POSIX
    makes writes of up to ``PIPE_BUF`` (4096) bytes to a pipe atomic, and an
    ``O_APPEND`` file, a terminal or a socket takes a short line whole.
    Longer lines, non-blocking descriptors and errors return False, and the
    caller writes under its lock as before (on a pipe such a line may then
    interleave with short ones; on a regular file Linux keeps writes whole).
    """
    if fd in _CUT_SHORT:  # the last line here was cut short (a full disk): end it before this one
        data = b"\n" + data
    if len(data) > _ATOMIC_BYTES:
        return False
    try:
        written = os.write(fd, data)
    except OSError:
        return False
    while written < len(data):  # a socket or terminal took part of it: send the rest (rare)
        try:
            written += os.write(fd, data[written:])
        except OSError:
            _CUT_SHORT.add(fd)  # writing it again would duplicate its start; the next line ends it
            return True
    if _CUT_SHORT:  # (the common case skips the call)
        _CUT_SHORT.discard(fd)
    return True


#: Descriptors whose last line was cut short: the next line written there starts on a new line.
_CUT_SHORT: set[int] = set()


class _Exchange:
    """One request: the ``start_response`` and body wrappers that count what is sent."""

    __slots__ = ("__weakref__", "awaiting", "clock", "done", "environ", "error", "layer", "method", "path", "query",
                 "real_start", "real_write", "ref", "result", "sent", "started", "status", "streaming")

    def __init__(self, layer: AccessLogMiddleware, environ: WSGIEnvironment,
                 start_response: StartResponse) -> None:
        self.layer, self.environ, self.real_start = layer, environ, start_response
        self.ref = weakref.ref(self, layer.open.discard)  # (its callback drops it once collected)
        self.started, self.clock = time.time(), time.perf_counter()
        # Inner layers may rewrite these; the log shows what the client asked for.
        self.method: str = environ.get("REQUEST_METHOD", "")
        path: str = environ.get("PATH_INFO", "")
        # (a path without its slash is no path under SCRIPT_NAME: _line shows the target as sent)
        self.path: str = environ.get("SCRIPT_NAME", "") + path if path[:1] == "/" or not path else path
        self.query: str = environ.get("QUERY_STRING", "")
        self.status = 500
        self.sent = 0
        self.error: str | None = None
        self.result: Iterable[bytes] | None = None
        self.real_write: Any = None
        self.done = False
        self.streaming = False  # the body is being iterated and has not ended
        self.awaiting = False  # the line waits for what errors renders (see await_render)

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.real_write = self.real_start(status, headers, exc_info)
        try:
            self.status = int(status[:3])
        except ValueError:
            self.status = 500
        return self.write

    def write(self, data: bytes) -> object:
        written = self.real_write(data)
        self.sent += len(data)  # counted once the server took it (a client gone raises instead)
        return written

    def __iter__(self) -> Iterator[bytes]:
        if self.result is None:
            return
        # A chunk counts as sent when the server comes back for the next one: one whose write
        # failed (the client went away) ends the iteration, and close() marks the line aborted.
        self.streaming = True
        # No status yet: a generator app starts its response on the first next(), which errors takes
        # itself, so that it renders what that raises as it renders a refusal from the call.
        deferred = self.real_write is None
        taken, started = 0, False
        try:
            for chunk in self.result:
                self.sent += taken
                taken = len(chunk)
                started = started or taken > 0  # the server sends the headers with the first bytes
                yield chunk
        except Exception as exc:  # the server asked for more: it took the last chunk
            self.sent += taken
            if not started and not self.sent:  # nothing went out yet, the headers neither
                if deferred and isinstance(exc, HTTPException):  # errors renders the refusal
                    self.status, self.streaming = refusal_status(exc), False
                    if RENDER_ERROR in self.environ:
                        self.await_render(exc)
                    raise
                self.status = 500  # the server's 500, or errors' for any other exception
                if deferred and RENDER_ERROR in self.environ:  # errors takes the first chunk: it renders this
                    self.streaming = False
                    self.await_render(exc)
            self.error = type(exc).__name__
            raise
        self.sent += taken
        self.streaming = False

    def await_render(self, exc: BaseException) -> None:
        """Write the line once ``errors`` (outside) has rendered ``exc``: its status and body size, not 0 bytes.

        The exception holds this exchange until then (``on_rendered``); one that
        errors never renders (a layer between swallowed it) is written when it is
        dropped, as the status and bytes known so far.
        """
        self.awaiting = on_rendered(exc, self.rendered)

    def rendered(self, status: int, size: int) -> None:
        self.awaiting = False
        self.status, self.sent = status, size
        if not self.done and self.claim():
            self.layer.write(self)

    def claim(self) -> bool:
        """Whether the caller is the one to write this exchange's line (its close, or the layer's at shutdown)."""
        try:
            self.layer.open.remove(self.ref)  # one C-level set operation: one caller succeeds
        except KeyError:
            return False
        self.done = True
        return True

    def close(self) -> None:
        result, self.result = self.result, None  # the app's answer is closed once, whoever wrote the line
        # (the layer's close at shutdown may have written it; one awaiting errors' render is written then)
        owes = not self.awaiting and not self.done and self.claim()
        if owes and self.streaming and self.error is None:  # the server stopped taking the body before its end
            self.error = "aborted"
        try:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        finally:
            if owes:
                self.layer.write(self)

    def __del__(self) -> None:
        if not self.done:  # dropped without close() (a server against PEP 3333): the line is written now
            self.layer.open.discard(self.ref)  # (gone already when the collector broke a cycle)
            self.done = True
            if self.streaming and self.error is None:
                self.error = "aborted"
            result, self.result = self.result, None
            try:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            finally:
                self.layer.write(self)


#: The most one text field takes in a line that would be longer than _ATOMIC_BYTES: nine such
#: fields and the rest of the line stay under PIPE_BUF (4096), so the line is written whole.
FIELD_BYTES = 400


def _cut(text: str) -> str:
    """``text`` as a JSON string of at most FIELD_BYTES bytes, ending in "..." when it was cut."""
    quoted = _quote(text)
    keep = len(text)
    while len(quoted) > FIELD_BYTES:
        keep = max(0, min(keep - 1, keep * (FIELD_BYTES - 8) // len(quoted)))
        quoted = _quote(text[:keep] + "...")
    return quoted


def _text(raw: str) -> str:
    """PEP 3333 strings carry bytes as latin-1: show them as UTF-8, a byte that is not as ``\\xe9``.

    So ``/caf%E9`` and ``/caf%C3%A9``, two requests, are two different lines.
    """
    try:
        return raw.encode("latin-1").decode("utf-8", "backslashreplace")
    except UnicodeError:  # not latin-1 text (against PEP 3333): shown as it is
        return raw


class _AppendFile:
    """Appends each line with one ``write()`` to an ``O_APPEND`` file; follows rotation.

    Writes take no lock (see :func:`write_atomic`).  A reopen puts the new
    file under the same descriptor number with ``dup2``, so a write racing
    with it lands in the old file or the new one, never elsewhere.
    """

    def __init__(self, path: str, logger: logging.Logger) -> None:
        self.path, self.logger = path, logger
        self.lock = threading.Lock()  # one reopen or close at a time; writes never take it
        self.fd = [self._open()]  # a list, so the finalizer closes the current descriptor
        self.checked = time.monotonic()
        self.failed_at = -60.0
        self._closer = weakref.finalize(self, _close_fd, self.fd)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, line: str) -> None:
        data = line.encode("ascii") + b"\n"
        now = time.monotonic()
        if now - self.checked >= ROTATION_CHECK_SECONDS and self.lock.acquire(blocking=False):
            try:  # one thread looks; the others write on meanwhile
                self.checked = now
                self._follow()
            except OSError as exc:
                self._failed(now, exc)
            finally:
                self.lock.release()
        fd = self.fd[0]
        if fd >= 0 and write_atomic(fd, data):
            return
        with self.lock:  # a line longer than PIPE_BUF, or the write failed: try once more, in one piece
            try:
                os.write(self.fd[0], data)
            except OSError as exc:  # disk full, file gone: say so once a minute, never fail
                self._failed(now, exc)

    def _failed(self, now: float, exc: OSError) -> None:
        if now - self.failed_at >= 60:
            self.failed_at = now
            self.logger.error("access log: cannot write to %s: %s", self.path, exc)

    def _follow(self) -> None:
        try:
            on_disk = os.stat(self.path)
            mine = os.fstat(self.fd[0])
            if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                return
        except FileNotFoundError:
            pass
        self._swap()

    def _swap(self) -> None:
        if not self._closer.alive:
            return  # closed for good
        fresh = self._open()
        try:
            os.dup2(fresh, self.fd[0], inheritable=False)
        finally:
            os.close(fresh)

    def reopen(self) -> None:
        with self.lock:
            self._swap()

    def close(self) -> None:
        with self.lock:
            self._closer()


class _Stream(LineHandler):
    """Writes each line to a text stream (``stdout``, ``stderr``) as a :class:`LineHandler` does."""

    def write(self, line: str) -> None:
        self.write_line(line)


def _close_fd(holder: list[int]) -> None:
    fd, holder[0] = holder[0], -1  # later writes fail with EBADF instead of hitting a reused number
    if fd >= 0:
        os.close(fd)
