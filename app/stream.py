"""Search progress as Server-Sent Events, sent as each stage finishes.

The body is a generator: ``search_started`` goes out before the search
begins, one ``search_progress`` (``{"progress": percent, "stage": name}``)
follows each real stage the engine reports, and ``search_complete`` carries
the same body as the plain search endpoint.  A failure after the stream has
started (in the search or in shaping its result) cannot change the status any
more, so it becomes a ``search_error`` event (``{"code", "message",
"retry_after", "request_id"}``) that ends the stream; it is logged (a warning with the code,
the traceback of an unexpected one) and the access line says
``"error":"search_error 502"``, since the status says nothing.  An ``EventSource`` reconnects to a
stream that ended, and so would search again: ``search_complete`` carries the event id
:data:`COMPLETE_ID`, which the reconnection sends back as ``Last-Event-ID``, and the endpoint
answers that with ``204 No Content``, on which an ``EventSource`` stops for good (HTML's
server-sent events).  A stream that failed has no such id, as it has more to say: the error event sets the
reconnection time (``retry:``) to the upstream's ``Retry-After``, else
``ERROR_RETRY_SECONDS``, so that a page that keeps it open does not ask a
failing upstream again every three seconds.  ``interval`` seconds pass between events, with a
comment line (``: keep-alive``) every ``HEARTBEAT_SECONDS`` of a longer pause, so that no proxy
takes the stream for idle and a client that left is noticed within that; the engine's generator
is paused meanwhile, and that pause (like the time it takes to send an event) does not count
against the upstream ``timeout``.  The engine is given the same heartbeat: while it waits on
its upstream (SearXNG may take up to its ``timeout``, 300 s at most), it yields ``WAITING``
every ``HEARTBEAT_SECONDS``, and the same comment goes out; sending it does not count against the
``timeout`` either.  Nothing here
buffers; layers must pass ``text/event-stream`` through unbuffered.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException

from app.search import WAITING, SearchEngine, SearchPage
from middleware.access_log import APP_ERROR
from middleware.errors import UNEXPECTED

__all__ = ["STREAMING", "HeldSlot", "search_events", "sse_event", "sse_response"]

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: Seconds an ``EventSource`` waits before it reconnects after a ``search_error`` without a Retry-After.
ERROR_RETRY_SECONDS = 30
#: The least it waits: an upstream's ``Retry-After: 0`` (or a date gone by) would have it search again at once.
MIN_RETRY_SECONDS = 3
#: The longest the stream stays silent within a pause between events: a comment line (no event to an
#: ``EventSource``) goes out then, and as often while the engine waits on its upstream.  A proxy drops a
#: connection idle for its read timeout (a minute for nginx's ``proxy_read_timeout`` and many load
#: balancers), and a client that left is noticed at the next write.
HEARTBEAT_SECONDS = 15.0
HEARTBEAT = b": keep-alive\n\n"
#: The Waitress connections a search stream is being sent on.  serve.py looks once a second at every
#: connection with a request in flight; on one of these an end of stream counts as the client gone, as
#: a reset does on any: an ``EventSource`` never half-closes, while the client of an ordinary request
#: may (``shutdown(SHUT_WR)``, ``nc -N``, a load balancer passing its FIN on) and still wait for the
#: answer.  The set lives here, beside what fills it, and serve.py reads it without importing the app:
#: if this module was never imported, no stream runs.  Weak: a connection closed and dropped leaves it.
STREAMING: weakref.WeakSet[Any] = weakref.WeakSet()


#: The event id of ``search_complete``: a reconnection that sends it back (``Last-Event-ID``) is told,
#: with a 204, that the stream has nothing more to say.
COMPLETE_ID = "complete"


def sse_event(event: str, data: Any, retry: float | None = None, event_id: str | None = None) -> bytes:
    """One Server-Sent Event; compact JSON never holds a raw newline. ``retry``: the client's reconnection
    time from now on, in seconds (sent in milliseconds); ``event_id``: the id the client's reconnection
    sends back as ``Last-Event-ID``."""
    also = "" if event_id is None else f"id: {event_id}\n"
    also += "" if retry is None else f"retry: {int(retry * 1000)}\n"
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n{also}\n".encode()


def _error_event(code: int, message: str | None, retry_after: int, request_id: str | None) -> bytes:
    """The last event of a failed stream: the error envelope's fields (its ``request_id`` too: a
    page's ``EventSource`` cannot read the ``X-Request-ID`` header) and when to ask again."""
    return sse_event("search_error", {"code": code, "message": message, "retry_after": retry_after,
                                      "request_id": request_id}, retry_after)


def _retry_after(exc: HTTPException) -> int:
    """The Retry-After (seconds) an error carries (the app's ``refuse`` headers), at least MIN_RETRY_SECONDS;
    else ERROR_RETRY_SECONDS."""
    for name, value in getattr(exc, "wsgistack_headers", ()):
        if name.lower() == "retry-after" and value.isdigit():
            return max(MIN_RETRY_SECONDS, int(value))
    return ERROR_RETRY_SECONDS


def search_events(
    engine: SearchEngine,
    query: str,
    page: int,
    shape: Callable[[SearchPage], dict[str, Any]],
    interval: float,
    logger: logging.Logger,
    request_id: str | None = None,
    environ: dict[str, Any] | None = None,
) -> Iterator[bytes]:
    """Yield the events of one search as they happen.

    The events are made while the server sends the body, after every layer has
    returned: a failure is logged with ``request_id`` given here.  Its status
    (200) went out with the first event, so the failure is also noted in the
    request's ``environ`` under ``APP_ERROR``, as ``search_error <code>``: the
    access line carries it.

    While it runs, the Waitress connection it goes out on (if any) is in
    :data:`STREAMING`: there a client's end of stream means it left.
    """
    if environ is None:
        environ = {}
    channel = _connection(environ)
    if channel is not None:
        STREAMING.add(channel)
    try:
        yield sse_event("search_started", {"query": query})
        steps = engine.stages(query, page, HEARTBEAT_SECONDS)
        try:
            while True:
                try:
                    step = next(steps)
                except StopIteration as done:
                    result: SearchPage = done.value
                    complete = sse_event("search_complete", shape(result), event_id=COMPLETE_ID)
                    break
                if step == WAITING:  # no stage: the engine is still waiting on its upstream
                    yield HEARTBEAT
                    continue
                progress, stage = step
                if interval:
                    yield from _pause(interval)
                yield sse_event("search_progress", {"progress": progress, "stage": stage})
        except HTTPException as exc:
            code = exc.code or 500
            logger.warning("search stream ended with search_error %d: %s", code, exc.description,
                           extra={"request_id": request_id})
            environ[APP_ERROR] = f"search_error {code}"
            yield _error_event(code, exc.description, _retry_after(exc), request_id)
            return
        except Exception:
            logger.exception("search stream failed for a query of %d characters", len(query),
                             extra={"request_id": request_id})
            environ[APP_ERROR] = "search_error 500"
            yield _error_event(500, UNEXPECTED, ERROR_RETRY_SECONDS, request_id)
            return
        finally:
            steps.close()
        if interval:
            yield from _pause(interval)
        yield complete
    finally:
        if channel is not None:
            STREAMING.discard(channel)


def _pause(seconds: float) -> Iterator[bytes]:
    """Sleep ``seconds``, with a :data:`HEARTBEAT` after every :data:`HEARTBEAT_SECONDS` of it that more follows."""
    end = time.monotonic() + seconds
    while end - time.monotonic() > HEARTBEAT_SECONDS:
        time.sleep(HEARTBEAT_SECONDS)
        yield HEARTBEAT
    left = end - time.monotonic()
    if left > 0:
        time.sleep(left)


def _connection(environ: dict[str, Any]) -> Any | None:
    """The server's connection object the request came on: Waitress's channel, else None."""
    return getattr(environ.get("waitress.client_disconnected"), "__self__", None)


class HeldSlot:
    """``events``, with ``release()`` called once when the server closes them (also when never iterated: HEAD).

    Also when nobody ever does: a ``start_response`` that raised (a layer of your own, a server
    refusing a header) leaves the answer unreturned and unclosed, and its slot, counted per
    process, would stay taken until a restart; it goes when the answer is collected.
    """

    def __init__(self, events: Iterator[bytes], release: Callable[[], None]) -> None:
        self.events = events
        self._release = weakref.finalize(self, release)  # calls release() once: at close, else when collected

    @property
    def held(self) -> bool:
        return self._release.alive

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self.events)

    def close(self) -> None:
        try:
            close = getattr(self.events, "close", None)
            if close is not None:
                close()
        finally:
            self._release()


def sse_response(events: Iterator[bytes]) -> Response:
    """A streamed ``text/event-stream`` response (no Content-Length, no caching)."""
    return Response(events, mimetype="text/event-stream", headers=HEADERS)
