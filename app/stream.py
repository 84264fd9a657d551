"""Search progress as Server-Sent Events, sent as each stage finishes.

The body is a generator: ``search_started`` goes out before the search
begins, one ``search_progress`` (``{"progress": percent, "stage": name}``)
follows each real stage the engine reports, and ``search_complete`` carries
the same body as the plain search endpoint.  A failure after the stream has
started (in the search or in shaping its result) cannot change the status any
more, so it becomes a ``search_error`` event (``{"code", "message"}``) that
ends the stream.  ``interval`` seconds pass between events; the engine's
generator is paused meanwhile, and that pause (like the time it takes to send
an event) does not count against the upstream ``timeout``.  Nothing here
buffers; layers must pass ``text/event-stream`` through unbuffered.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException, InternalServerError

from app.search import SearchEngine, SearchPage

__all__ = ["search_events", "sse_event", "sse_response"]

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str, data: Any) -> bytes:
    """One Server-Sent Event; compact JSON never holds a raw newline."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def search_events(
    engine: SearchEngine,
    query: str,
    page: int,
    shape: Callable[[SearchPage], dict[str, Any]],
    interval: float,
    logger: logging.Logger,
    request_id: str | None = None,
) -> Iterator[bytes]:
    """Yield the events of one search as they happen.

    The events are made while the server sends the body, after every layer has
    returned: a failure is logged with ``request_id`` given here.
    """
    yield sse_event("search_started", {"query": query})
    steps = engine.stages(query, page)
    try:
        while True:
            try:
                progress, stage = next(steps)
            except StopIteration as done:
                result: SearchPage = done.value
                complete = sse_event("search_complete", shape(result))
                break
            if interval:
                time.sleep(interval)
            yield sse_event("search_progress", {"progress": progress, "stage": stage})
    except HTTPException as exc:
        yield sse_event("search_error", {"code": exc.code, "message": exc.description})
        return
    except Exception:
        logger.exception("search stream failed for a query of %d characters", len(query),
                         extra={"request_id": request_id})
        yield sse_event("search_error", {"code": 500, "message": InternalServerError.description})
        return
    finally:
        steps.close()
    if interval:
        time.sleep(interval)
    yield complete


def sse_response(events: Iterator[bytes]) -> Response:
    """A streamed ``text/event-stream`` response (no Content-Length, no caching)."""
    return Response(events, mimetype="text/event-stream", headers=HEADERS)
