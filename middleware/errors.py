"""The one renderer for every refusal and every unhandled exception.

Layers refuse by raising a werkzeug ``HTTPException`` (see
:func:`middleware.base.refuse`); this layer, always the outermost, turns it
into a response in the configured format.  It also puts its renderer in
``environ["wsgistack.render_error"]`` so the Flask core renders its own
errors (404, 405, 500…) the same way.

Do not use it when an outer server or gateway already owns the error format:
then place nothing, and the builder still adds a default one, because a stack
without a renderer would send werkzeug's HTML pages to API clients.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from pydantic import model_validator
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.urls import iri_to_uri

from .base import (
    ORIG_PATH,
    RENDER_ERROR,
    REQUEST_ID,
    TOKEN,
    Context,
    LayerOptions,
    PrimedBody,
    add_missing,
    decoded_path,
    escape_control,
    header_text,
    not_a_path,
    note,
    one_leading_slash,
    rendered,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("wsgistack.errors")

_CONTENT_TYPES = {
    "envelope": "application/json",
    "problem": "application/problem+json",
}
#: A URI with a scheme (RFC 3986 §3.1): https://…, tag:…, urn:….
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z")
# Headers an exception's own response would carry that we replace.
_DROP = frozenset({"content-type", "content-length"})
#: Statuses whose response ends with its header section (RFC 9110 §15.3.5, §15.4.5): content after it, or a
#: Content-Length saying some follows, would be read as the next response on the connection.
_NO_CONTENT = frozenset({204, 304})
#: The message of every 500 from an exception: what happened is in the log line its request id finds.
UNEXPECTED = "An unexpected error occurred; the request id identifies it in the logs."


class ErrorsOptions(LayerOptions):
    """Options of the ``errors`` layer."""

    format: Literal["envelope", "problem"] = "envelope"
    """``envelope`` gives ``{"error": {...}}``; ``problem`` gives RFC 9457 problem details."""
    debug: bool = False
    """Include the exception text and traceback in 500 bodies (servers listening on loopback only)."""
    type_base: str = ""
    """Base URI for the problem ``type`` member (``{type_base}{status}``); ``about:blank`` when empty."""

    @model_validator(mode="after")
    def _type_base_is_absolute(self) -> ErrorsOptions:
        base = self.type_base
        if base and not _ABSOLUTE.match(base):
            raise ValueError("type_base must be an absolute URI such as https://errors.example.org/ or "
                             "tag:example.org,2025:errors:")
        if base and not base.endswith(("/", ":", "#", "=")):  # the status is appended: .../405, not ...org405
            raise ValueError(f"type_base {base!r} must end with '/' (or ':', '#', '='): the status is appended "
                             f"to it, so it would read {base}404")
        return self


#: Directives by which a response says how it may be kept: an error's own Cache-Control stands then.
_KEEPING = re.compile(r"(?i)(?:^|[\s,])(?:no-store|max-age|s-maxage|public)\b")


def not_stored(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` of an error with ``no-store``, unless they say how it may be kept.

    A ``Cache-Control: private`` the session layer adds to every answer of a logged-in request
    says who may keep it, not for how long: the browser's own cache could still keep a 404.
    """
    given = [i for i, (k, _) in enumerate(headers) if k.lower() == "cache-control"]
    if not given:
        return [*headers, ("Cache-Control", "no-store")]
    if any(_KEEPING.search(headers[i][1]) for i in given):
        return headers
    first = given[0]
    return [*headers[:first], (headers[first][0], f"{headers[first][1]}, no-store"), *headers[first + 1:]]


class ErrorsMiddleware:
    """Render every ``HTTPException`` and unhandled exception in one format.

    Options:
      ``format``: ``envelope`` (default) or ``problem`` (``application/problem+json``).
      ``debug``: show exception text and traceback in 500 bodies; refused
      unless the server listens only on loopback.
      ``type_base``: base URI for problem ``type`` (``{type_base}{status}``).

    The envelope is ``{"error": {"code", "message", "details", "timestamp",
    "path", "method", "request_id"}}``.  405 responses carry ``Allow``,
    headers that inner layers attached to the exception (``Retry-After``,
    ``WWW-Authenticate``, CORS and security headers) are kept, and HEAD
    responses have no body.

    Usage::

        app = ErrorsMiddleware(app, ErrorsMiddleware.Options(format="problem"), Context())
    """

    Options = ErrorsOptions

    def __init__(self, app: WSGIApplication, options: ErrorsOptions, context: Context) -> None:
        if options.debug and (not context.loopback_only or context.proxied):
            raise ValueError("debug may be true only when the server listens on loopback only, with no proxy "
                             "forwarding remote clients to it (server.trusted_proxy, a proxy layer)")
        self.app = app
        self.options = options
        self.format = options.format
        self.content_type = _CONTENT_TYPES[options.format]
        self.debug = options.debug
        self.logger = context.logger.getChild("errors") if context.logger else log

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[RENDER_ERROR] = self.render
        started = False

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal started
            started = True
            # An error names this request (its id, its time): no cache past the stack may answer another
            # request with it (404, 405 and 414 are cacheable by default, RFC 9110 §15.1). Added here, on
            # the way out, so the cache layer inside may still keep the statuses it was told to.
            if status[0] in "45":
                headers = not_stored(headers)
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, start)
            if not started:
                # A generator app (PEP 3333 allows it) starts the response on the body's first iteration,
                # and a layer inside may refuse there (the session's save, in start_response): taken
                # here, what it raises before anything was sent is rendered as a refusal from the call.
                return PrimedBody(body)
        except Exception as exc:  # an HTTPException too: the app may have called start_response already
            # exc_info only when it had: a server (werkzeug's test client too) re-raises the
            # exception it is given, and a refusal nothing answered yet is this layer's to render.
            return self._respond(environ, start, exc, sys.exc_info() if started else None)
        return body

    def _respond(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        exc: BaseException,
        exc_info: Any,
    ) -> Iterable[bytes]:
        status, headers, body = self.render(environ, exc)
        note(environ, "errors", f"rendered {status}")
        # exc_info lets a server replace headers if the app had already started a response.
        start_response(status_line(status), headers, exc_info)
        rendered(exc, status, len(body))  # (the access log inside waits for this to write its line)
        return [body]

    def render(self, environ: WSGIEnvironment, exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
        """Return ``(status, headers, body)`` for ``exc``; also used by the Flask core."""
        own = getattr(exc, "response", None) if isinstance(exc, HTTPException) else None
        if own is not None and hasattr(own, "get_data"):  # abort(Response(...)): that response, as it is,
            headers = own.headers.to_wsgi_list()  # with the headers the layers it passed attached
            add_missing(headers, getattr(exc, "wsgistack_headers", None))
            if own.status_code in _NO_CONTENT:  # whatever body and length it was given
                headers = [(k, v) for k, v in headers if k.lower() not in _DROP]
                return own.status_code, self._sendable(environ, headers), b""
            body = b"" if environ.get("REQUEST_METHOD") == "HEAD" else own.get_data()
            return own.status_code, self._sendable(environ, headers), body
        if isinstance(exc, HTTPException) and type(exc.code) is int and 300 <= exc.code <= 599:
            # an error or a redirect; any other code (1xx, 2xx, none, not a status) is a bug, answered as one
            code = exc.code
            message = exc.description or _phrase(code)
            details = getattr(exc, "wsgistack_details", None)
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods:  # werkzeug's come from a set
                exc.valid_methods = allow_order(exc.valid_methods)
            headers = [(k, v) for k, v in exc.get_headers(environ) if k.lower() not in _DROP]
            new_url = getattr(exc, "new_url", None)  # a RequestRedirect (308) says where in its own response
            if isinstance(new_url, str) and 300 <= code < 400:  # a URI, as werkzeug's own response sends it
                headers.append(("Location", iri_to_uri(new_url)))
        else:
            code = 500
            message = UNEXPECTED
            details = None
            headers = []
            self.logger.error(
                "unhandled exception in %s %s (request id %s)",
                environ.get("REQUEST_METHOD", "?"),
                escape_control(_asked_path(environ)),
                environ.get(REQUEST_ID, "-"),
                exc_info=exc,
                # request_id (inside: always, the builder keeps errors outermost) has left its request by now
                extra={"request_id": environ.get(REQUEST_ID)},
            )
            if self.debug:
                details = {
                    "exception": f"{type(exc).__name__}: {_text(exc)}",
                    "traceback": traceback.format_exception(exc),
                }
        add_missing(headers, getattr(exc, "wsgistack_headers", None))
        headers = self._sendable(environ, headers)
        if code in _NO_CONTENT:
            return code, headers, b""
        try:
            body = self._body(environ, code, message, details)
        except Exception:  # details (or a message) JSON cannot hold: a NaN, a tuple key, a loop, a failing str()
            self.logger.error(
                "could not render the details of a %d for %s %s (request id %s); sent without them",
                code, environ.get("REQUEST_METHOD", "?"), escape_control(_asked_path(environ)),
                environ.get(REQUEST_ID, "-"), exc_info=True, extra={"request_id": environ.get(REQUEST_ID)})
            body = self._body(environ, code, message if isinstance(message, str) else _phrase(code), None)
        headers.append(("Content-Type", self.content_type))
        headers.append(("Content-Length", str(len(body))))
        if environ.get("REQUEST_METHOD") == "HEAD":
            body = b""
        return code, headers, body

    def _sendable(self, environ: WSGIEnvironment, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` without the fields that cannot be sent as they are (RFC 9110 §5: a token name, a value
        of visible ASCII): a CR LF would start a header of its own, and one Waitress cannot encode makes it
        answer its own plain 500. Each one left out is logged."""
        if all(_field(name, value) for name, value in headers):
            return headers
        kept = []
        for name, value in headers:
            if _field(name, value):
                kept.append((name, value))
            else:
                self.logger.error(
                    "left the header %r out of a response to %s %s (request id %s): %r cannot be sent",
                    name, environ.get("REQUEST_METHOD", "?"), escape_control(_asked_path(environ)),
                    environ.get(REQUEST_ID, "-"), value, extra={"request_id": environ.get(REQUEST_ID)})
        return kept

    def _body(self, environ: WSGIEnvironment, code: int, message: str, details: Any) -> bytes:
        path = _asked_path(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "HEAD":  # its Content-Length must be that of the GET's body (RFC 9110 §9.3.2)
            method = "GET"
        request_id = environ.get(REQUEST_ID)
        if self.format == "problem":
            doc: dict[str, Any] = {
                "type": f"{self.options.type_base}{code}" if self.options.type_base else "about:blank",
                "title": _phrase(code),
                "status": code,
                "detail": message,
                "instance": _uri_path(environ),
            }
            if details is not None:
                doc["details"] = details
            if request_id:
                doc["request_id"] = request_id
        else:
            doc = {
                "error": {
                    "code": code,
                    "message": message,
                    "details": details,
                    "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "path": path,
                    "method": method,
                    "request_id": request_id,
                }
            }
        # allow_nan=False: NaN and Infinity are not JSON (RFC 8259 §6); a client's parser refuses them
        return json.dumps(doc, separators=(",", ":"), default=str, allow_nan=False).encode()


#: The order ``Allow`` lists methods in, whatever order they were found in (a set's, which varies by process).
_METHOD_ORDER = {m: i for i, m in enumerate(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))}


def allow_order(methods: Iterable[str]) -> list[str]:
    """``methods`` in one order, the same in every process: the common ones as RFC 9110 lists them, then by name."""
    return sorted(set(methods), key=lambda m: (_METHOD_ORDER.get(m, len(_METHOD_ORDER)), m))


def status_line(code: int) -> str:
    """``"404 Not Found"``: the code and its RFC 9110 reason phrase, for every error, whoever raised it."""
    return f"{code} {_phrase(code)}"


#: RFC 9110's names where Python's ``http.HTTPStatus`` (3.11, 3.12) still has RFC 7231's.
_RFC_9110_PHRASES = {413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
                     422: "Unprocessable Content"}


def _field(name: object, value: object) -> bool:
    """Whether ``name: value`` can be sent as it is: a token and visible ASCII on one line (RFC 9110 §5)."""
    return isinstance(name, str) and isinstance(value, str) and TOKEN.fullmatch(name) is not None \
        and header_text(value)


def _text(exc: BaseException) -> str:
    """``str(exc)``, or what the traceback module says when that fails."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def _phrase(code: int) -> str:
    phrase = _RFC_9110_PHRASES.get(code)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


#: What a path may hold unescaped (RFC 3986 pchar and "/"): everything else is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def _asked_path(environ: WSGIEnvironment) -> str:
    """The decoded path the client asked for, before a layer rewrote it for routing (ORIG_PATH): the one
    the access log shows; for a target that is not a path (``CONNECT host:443``), that target."""
    asked = environ.get(ORIG_PATH)
    if asked is None and (target := not_a_path(environ)) is not None:
        return target
    return decoded_path(environ if asked is None else {"PATH_INFO": asked})


def _uri_path(environ: WSGIEnvironment) -> str:
    """The request's path as a URI reference (RFC 9457's ``instance``): "/a%3Fb", not "/a?b"."""
    raw = environ.get("SCRIPT_NAME", "") + environ.get(ORIG_PATH, environ.get("PATH_INFO", ""))
    if ORIG_PATH not in environ and (target := not_a_path(environ)) is not None:
        raw = target
    raw = one_leading_slash(raw)  # as the router reads it; "//evil.example/x" would name another host
    try:
        data = raw.encode("latin-1")  # PEP 3333: the bytes as sent, decoded as latin-1
    except UnicodeEncodeError:
        data = raw.encode("utf-8")
    uri = quote(data, safe=_PATH_SAFE) or "/"
    if uri[0] != "/":  # a target that is not a path (CONNECT host:443): a colon before the first "/" would read
        first, slash, rest = uri.partition("/")  # as a scheme (RFC 3986 §4.2), so it is percent-encoded there
        uri = first.replace(":", "%3A") + slash + rest
    return uri

