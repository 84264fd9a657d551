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

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from middleware.base import RENDER_ERROR, Context
from middleware.errors import ErrorsMiddleware, not_stored, status_line

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["Rendered", "fallback_render", "install_error_handlers"]


def _no_app(environ: WSGIEnvironment, start_response: Any) -> list[bytes]:  # pragma: no cover - never called
    raise RuntimeError("the fallback renderer has no application")

Rendered = tuple[int, list[tuple[str, str]], bytes]
Renderer = Callable[["WSGIEnvironment", BaseException], Rendered]


def fallback_render(environ: WSGIEnvironment, exc: BaseException, debug: bool = False) -> Rendered:
    """Render ``exc`` as the ``{"error": {...}}`` envelope when no ``errors`` layer is present.

    This is the errors layer's own renderer with its default options, and the
    ``no-store`` it adds on the way out, so the app alone answers exactly as the
    stack would.
    """
    status, headers, body = _fallback[debug].render(environ, exc)
    return status, not_stored(headers) if status >= 400 else headers, body


_fallback = {
    flag: ErrorsMiddleware(_no_app, ErrorsMiddleware.Options(debug=flag), Context(logger=logging.getLogger("app")))
    for flag in (False, True)
}


def install_error_handlers(app: Flask, *, debug: bool, logger: logging.Logger) -> None:
    """Route ``HTTPException`` and every other exception through the stack's renderer."""

    def respond(exc: BaseException) -> Response:
        environ = request.environ
        renderer: Renderer | None = environ.get(RENDER_ERROR)
        if renderer is not None:
            status, headers, body = renderer(environ, exc)
        else:
            status, headers, body = fallback_render(environ, exc, debug)
        response = Response(body, status=status_line(status))  # werkzeug would say "404 NOT FOUND"
        response.headers = Headers(headers)
        return response

    def on_http_error(exc: HTTPException) -> Response:
        return respond(exc)

    def on_exception(exc: Exception) -> Response:
        return respond(exc)

    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(Exception, on_exception)

