"""The ``api_v1`` and ``api_v2`` blueprints: search, search stream, health and config.

Both versions serve the same data; only the search body differs:

- v1: ``{"query", "results": [...], "meta": {"total", "page", "per_page", "query"}}``
- v2: ``{"query", "data": [...], "pagination": {"page", "per_page", "total", "pages"}}``

Each result is ``{"title", "url", "content", "engine"}``.  A missing or empty
``q``, a ``q`` over 1000 characters or a ``page`` that is not a whole number
from 1 to 1000 (leading zeros allowed) gives 400, and so does a ``q`` or ``page``
given more than once, or a ``q`` of more than 32 words for the ``local`` engine;
so does a query string that is not UTF-8 once percent-decoded (naming the
parameter it is in).  Health answers without touching the index or any
store, so it stays cheap enough for load balancers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Response, request

from app.search import MAX_PAGE, SearchPage
from app.state import SUPPORTED_VERSIONS, AppState
from app.stream import COMPLETE_ID, HeldSlot, search_events, sse_response
from middleware.base import REQUEST_ID, refuse

if TYPE_CHECKING:
    from collections.abc import Callable

    from werkzeug.datastructures import MultiDict

__all__ = ["MAX_PAGE", "MAX_QUERY_LENGTH", "api_blueprint", "search_args", "utf8_query"]

MAX_QUERY_LENGTH = 1000


def utf8_query(query_string: str) -> None:
    """Refuse, with a 400 naming its parameter, a query string that is not UTF-8 once percent-decoded.

    Werkzeug raises reading the parameters of one with a raw byte that is not UTF-8 (a 500), and keeps an
    escape of such a byte as its text (``q=caf%E9`` a search for ``caf%E9``, as ``q=caf%25E9`` is).  The
    string comes as PEP 3333 hands it on: its bytes as latin-1.  Splitting at ``&`` and ``=`` (ASCII, never
    inside a UTF-8 sequence) leaves every piece UTF-8 exactly when the whole is.
    """
    if query_string.isascii() and "%" not in query_string:
        return
    for field in query_string.split("&"):
        name, _, value = field.partition("=")
        for part in (name, value):
            try:
                unquote_to_bytes(part.encode("latin-1", "replace")).decode("utf-8")
            except UnicodeDecodeError:
                label = unquote_to_bytes(name.replace("+", " ").encode("latin-1", "replace")).decode("utf-8", "replace")
                raise refuse(400, f"The query parameter {label!r} is not valid UTF-8 once percent-decoded.",
                             details={"parameter": label}) from None


def _once(args: MultiDict[str, str], name: str) -> str | None:
    """The one value of parameter ``name`` (None when absent), or a 400 when it is given more than once.

    Werkzeug's ``get`` takes the first of several; a proxy, a log reader or a layer of one's own may take
    the last, and a client that appends ``&page=2`` to a URL holding ``page=1`` would get page 1 unwarned.
    """
    values = args.getlist(name)
    if len(values) > 1:
        raise refuse(400, f"The query parameter {name!r} may be given only once (it is given {len(values)} times).",
                     details={"parameter": name})
    return values[0] if values else None


def search_args(args: MultiDict[str, str]) -> tuple[str, int]:
    """The validated ``q`` and ``page`` of a search request, or a 400 naming the parameter."""
    query = (_once(args, "q") or "").strip()
    if not any(c.isprintable() and not c.isspace() for c in query):  # control characters alone are no query either
        raise refuse(400, "The query parameter 'q' is required and may not be empty.",
                     details={"parameter": "q"})
    if len(query) > MAX_QUERY_LENGTH:
        raise refuse(400, f"The query parameter 'q' may be at most {MAX_QUERY_LENGTH} characters "
                     f"long (it has {len(query)}).", details={"parameter": "q", "max": MAX_QUERY_LENGTH})
    text = _once(args, "page")
    if text is None:
        return query, 1
    digits = text.lstrip("0")  # leading zeros make no other number ("00002" is 2); no int() of any length
    page = int(digits) if text.isascii() and text.isdigit() and 0 < len(digits) <= 4 else 0
    if not 1 <= page <= MAX_PAGE:
        raise refuse(400, f"The query parameter 'page' must be a whole number from 1 to {MAX_PAGE}.",
                     details={"parameter": "page", "max": MAX_PAGE})
    return query, page


def api_blueprint(version: str, state: AppState) -> Blueprint:
    """Build the blueprint of one API version (``v1`` or ``v2``) over the shared state."""
    bp = Blueprint(f"api_{version}", __name__, url_prefix=f"/api/{version}")
    shape: Callable[[SearchPage], dict[str, Any]] = SearchPage.v1 if version == "v1" else SearchPage.v2
    search_options = state.options.search
    logger = state.context.logger.getChild("app.stream")
    # An engine's own limits on the query (the local one's word count): refused before a stream starts.
    check_query: Callable[[str], None] | None = getattr(state.engine, "check_query", None)

    @bp.get("/search")
    def search() -> dict[str, Any]:
        utf8_query(request.environ.get("QUERY_STRING", ""))
        query, page = search_args(request.args)
        return shape(state.engine.search(query, page))

    @bp.get("/search/stream")
    def search_stream() -> Response:
        if request.headers.get("Last-Event-ID") == COMPLETE_ID:
            # An EventSource left open reconnects after search_complete: no second search, and the
            # 204 stops it for good (HTML's server-sent events).
            done = Response(status=204, headers={"Cache-Control": "no-store"})
            del done.headers["Content-Type"]  # (no content to have a type)
            return done
        utf8_query(request.environ.get("QUERY_STRING", ""))
        query, page = search_args(request.args)
        if check_query is not None:
            check_query(query)
        slots = state.streams
        if slots is not None and not slots.take(search_options.max_streams):
            # Paced streams hold a server thread each for their whole length: past the cap, the
            # others (and the probes) would queue behind them.
            wait = math.ceil(5 * search_options.stream_interval)
            raise refuse(503, f"{search_options.max_streams} search streams are running, as many as this "
                         f"server runs at once; retry in {wait} seconds.", headers=[("Retry-After", str(wait))])
        events = search_events(state.engine, query, page, shape, search_options.stream_interval, logger,
                               request.environ.get(REQUEST_ID), request.environ)
        return sse_response(events if slots is None else HeldSlot(events, slots.give_back))

    @bp.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": version, "engine": state.engine.name}

    @bp.get("/config")
    def config() -> dict[str, Any]:
        return {
            "version": version,
            "api_versions": list(SUPPORTED_VERSIONS),
            "engine": state.engine.name,
            "per_page": search_options.per_page,
            "max_query_length": MAX_QUERY_LENGTH,
            "max_page": MAX_PAGE,
            "stream": {"path": f"/api/{version}/search/stream", "interval": search_options.stream_interval},
            "login": state.can_issue_tokens(),
        }

    return bp
