"""Every error the Flask core answers goes through the stack's one renderer.

The ``errors`` layer puts its renderer in ``environ["wsgistack.render_error"]``
(``(environ, exc) -> (status, headers, body)``); the handlers here call it with
the werkzeug ``HTTPException`` (404, 405 with ``Allow``, 400, 502, 504 …) or,
for anything else, with the original exception, which it renders as a 500
without the exception text and logs.  When the app runs without the stack,
:func:`fallback_render` gives the same JSON envelope.  Werkzeug drops the body
of HEAD responses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, InternalServerError

from middleware.base import RENDER_ERROR, REQUEST_ID, decoded_path

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["Rendered", "fallback_render", "install_error_handlers"]

Rendered = tuple[int, list[tuple[str, str]], bytes]
Renderer = Callable[["WSGIEnvironment", BaseException], Rendered]
_DROP = frozenset({"content-type", "content-length"})


def fallback_render(environ: WSGIEnvironment, exc: BaseException, debug: bool = False) -> Rendered:
    """Render ``exc`` as the ``{"error": {...}}`` envelope when no ``errors`` layer is present."""
    if isinstance(exc, HTTPException) and exc.code is not None:
        code = exc.code
        message = exc.description or _phrase(code)
        details: Any = getattr(exc, "wsgistack_details", None)
        headers = [(k, v) for k, v in exc.get_headers(environ) if k.lower() not in _DROP]
    else:
        code = 500
        message = InternalServerError.description or "Internal Server Error"
        details = {"exception": f"{type(exc).__name__}: {exc}"} if debug else None
        headers = []
    extra = getattr(exc, "wsgistack_headers", None)
    if extra:
        present = {k.lower() for k, _ in headers}
        headers.extend((k, v) for k, v in extra if k.lower() not in present)
    doc = {
        "error": {
            "code": code,
            "message": message,
            "details": details,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "path": decoded_path(environ),
            "method": environ.get("REQUEST_METHOD", "GET"),
            "request_id": environ.get(REQUEST_ID),
        }
    }
    body = json.dumps(doc, separators=(",", ":"), default=str).encode()
    headers.append(("Content-Type", "application/json"))
    headers.append(("Content-Length", str(len(body))))
    return code, headers, body


def install_error_handlers(app: Flask, *, debug: bool, logger: logging.Logger) -> None:
    """Route ``HTTPException`` and every other exception through the stack's renderer."""

    def respond(exc: BaseException) -> Response:
        environ = request.environ
        renderer: Renderer | None = environ.get(RENDER_ERROR)
        if renderer is not None:
            status, headers, body = renderer(environ, exc)
        else:
            if not isinstance(exc, HTTPException):
                # %r escapes control characters, so a path cannot forge log lines.
                logger.error("unhandled exception in %s %r", request.method, request.path, exc_info=exc)
            status, headers, body = fallback_render(environ, exc, debug)
        response = Response(body, status=status)
        response.headers = Headers(headers)
        return response

    def on_http_error(exc: HTTPException) -> Response:
        return respond(exc)

    def on_exception(exc: Exception) -> Response:
        return respond(exc)

    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(Exception, on_exception)


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"
