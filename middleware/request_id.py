"""Give every request an id, echo it in the response and put it in the logs.

The layer accepts the id a client or proxy sent (``X-Request-ID`` by
default) when it is short and made of safe characters, and otherwise makes a
new random one.  The id goes into ``environ["wsgistack.request_id"]``, into
the response header (unless the app already set that header), onto error
responses rendered by the ``errors`` layer, and into log records through
:class:`RequestIdLogFilter`.

The log filter reads a context variable that the layer sets while the
request passes through it, i.e. while the app computes its response.  Log
lines written while a streamed body is being sent, after the layer has
returned, show the filter's ``default`` instead.

When not to use it: when a proxy in front of you already issues ids and you
do not want a second header on responses, set ``trust_incoming`` and keep
the layer anyway (it then only echoes); drop it only if nothing downstream
reads ``wsgistack.request_id``.  Do not turn ``trust_incoming`` on for ids
that must be unique or unguessable: a client chooses what it sends.
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from middleware.base import (
    REQUEST_ID,
    Context,
    Headers,
    LayerOptions,
    call_with_headers,
    header_name,
    note,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["RequestIdLogFilter", "RequestIdMiddleware", "current_request_id"]

DEFAULT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$"
# Whatever pattern the operator chooses, an echoed id never holds spaces,
# control characters or anything outside printable ASCII.
_SAFE = re.compile(r"[\x21-\x7e]+")

_current: ContextVar[str | None] = ContextVar("wsgistack_request_id", default=None)

_BATCH = 256


class _RandomIds:
    """Random 128-bit ids as 32 hex digits, drawn from ``os.urandom`` 256 at a time.

    One ``getrandom()`` call per request cost a system call on the hot path;
    a batch costs one per 256 requests.  ``list.pop`` is atomic, so threads
    never share an id (two threads refilling at once only draw two batches),
    and a forked worker drops the batch it inherited from its parent.
    """

    def __init__(self) -> None:
        self._ready: list[str] = []
        os.register_at_fork(after_in_child=self.forget)

    def __call__(self) -> str:
        try:
            return self._ready.pop()
        except IndexError:
            data = os.urandom(16 * _BATCH)
            ready = self._ready = [data[i : i + 16].hex() for i in range(0, len(data), 16)]
            return ready.pop()

    def forget(self) -> None:
        self._ready = []


_new_id = _RandomIds()


def current_request_id() -> str | None:
    """The id of the request being handled in this context, or None outside one."""
    return _current.get()


class RequestIdLogFilter(logging.Filter):
    """Add ``record.request_id`` to every log record (``default`` outside a request).

    A record that already carries ``request_id`` (``extra={"request_id": ...}``)
    keeps it.  Attach it to a handler and use ``%(request_id)s`` in the format::

        handler.addFilter(RequestIdLogFilter())
        handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    """

    def __init__(self, name: str = "", default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _current.get() or self.default
        return True


class RequestIdMiddleware:
    """Assign a request id, expose it in environ, responses, errors and logs.

    Options:

    ``header`` (``"X-Request-ID"``)
        The request header read and the response header written.
    ``trust_incoming`` (``True``)
        Accept a well-formed id from the request.  False always generates one.
    ``max_length`` (``128``)
        Longest incoming id accepted; longer ones are replaced.
    ``pattern`` (``^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$``)
        Regular expression an incoming id must match in full.  Spaces,
        control characters and non-ASCII are refused whatever it says.

    Generated ids are 32 lowercase hex digits (128 random bits)::

        app = RequestIdMiddleware(app, RequestIdMiddleware.Options(), Context())
        app = RequestIdMiddleware(app, RequestIdMiddleware.Options(trust_incoming=False), Context())
    """

    class Options(LayerOptions):
        header: str = "X-Request-ID"
        trust_incoming: bool = True
        max_length: int = Field(default=128, ge=1, le=1024)
        pattern: str = DEFAULT_PATTERN

        @field_validator("header")
        @classmethod
        def _header_is_token(cls, value: str) -> str:
            return header_name(value)

        @field_validator("pattern")
        @classmethod
        def _pattern_compiles(cls, value: str) -> str:
            try:
                re.compile(value)
            except (re.error, OverflowError) as exc:  # OverflowError: a repeat count of 2**32 or more
                raise ValueError(
                    f"pattern {value!r} is not a valid regular expression: {exc}"
                ) from exc
            return value

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        self._header = options.header
        self._header_lower = options.header.lower()
        self._environ_key = "HTTP_" + options.header.upper().replace("-", "_")
        self._trust = options.trust_incoming
        self._max_length = options.max_length
        self._pattern = re.compile(options.pattern)
        self._also_safe = options.pattern != DEFAULT_PATTERN  # the default is already safe
        self._kept = f"kept the incoming {options.header}"
        self._replaced = f"refused the incoming {options.header}; generated one"

    def _accept(self, incoming: str) -> bool:
        return (
            len(incoming) <= self._max_length
            and self._pattern.fullmatch(incoming) is not None
            and (not self._also_safe or _SAFE.fullmatch(incoming) is not None)
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        incoming = environ.get(self._environ_key) if self._trust else None
        if incoming and self._accept(incoming):
            rid: str = incoming
            note(environ, "request_id", self._kept)
        else:
            rid = _new_id()
            if incoming:
                note(environ, "request_id", self._replaced)
        environ[REQUEST_ID] = rid
        header = self._header
        lower = self._header_lower
        size = len(lower)

        def add_id(status: str, headers: Headers) -> None:
            for name, _ in headers:
                if len(name) == size and name.lower() == lower:  # len() first: most names differ in length
                    return
            headers.append((header, rid))

        token = _current.set(rid)
        try:
            return call_with_headers(self.app, environ, start_response, add_id, ((header, rid),))
        finally:
            _current.reset(token)
