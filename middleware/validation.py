"""Refuse requests that are too large or malformed before the app sees them.

Checks, in order, each refusal a sentence naming the limit and the value:

- URL longer than ``max_url_length`` (414), query string longer than
  ``max_query_length`` (414);
- path or query that is not UTF-8 once percent-decoded, or a query with a
  broken ``%`` escape (400);
- more than ``max_headers`` header fields, one field (name plus value) over
  ``max_header_bytes``, or all of them over ``max_total_header_bytes`` (431);
- a body announced longer than ``max_body_bytes`` (413, before the app
  reads a byte); a chunked body is cut off with a 413 when a read crosses the
  limit;
- a body whose ``Content-Type`` is not in ``allowed_content_types`` (415);
- a JSON body that is not UTF-8, not well-formed, nested deeper than
  ``json_max_depth``, longer than ``json_max_bytes`` or repeating a key in one
  object (400 / 413).  The body is parsed once: the value is stored in
  ``environ["wsgistack.json"]`` and ``wsgi.input`` is replaced by the same
  bytes, so the app can still read it;
- a parameter value matching one of the operator's ``deny_patterns`` (400).

``deny_patterns`` are a blunt operator tool for known-bad values (a
parameter that must never contain ``..``, say).  They are no substitute for
parameterized SQL queries and output encoding, which are what actually stop
injection and XSS; this layer deliberately ships no "attack detection" regexes.

A GET without a body costs a few dictionary look-ups plus one pass over the
``HTTP_*`` keys (skipped when all three header limits are null).

When not to use it: in front of an app that streams large uploads of types
you cannot list, unless you raise ``max_body_bytes`` and set
``allowed_content_types`` to null.  Put it outside every layer that reads the
request body.
"""

from __future__ import annotations

import encodings
import encodings.aliases
import ipaddress
import json
import math
import re
import sys
from io import BytesIO
from itertools import accumulate, count
from operator import sub
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_to_bytes

from pydantic import Field, field_validator, model_validator
from werkzeug.http import parse_options_header

from middleware.base import Context, LayerOptions, ip_literal, note, refuse, target_authority

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from werkzeug.exceptions import HTTPException

__all__ = ["JSON", "ValidationMiddleware"]

JSON = "wsgistack.json"
DEFAULT_CONTENT_TYPES = (
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
)
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/(\*|[a-z0-9!#$&^_.+-]+)")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 9112 §3.2 / RFC 3986 §3.2.2: the Host of nearly every request, a reg-name with a port of 1-9999
# if any; _other_host judges the rest (an empty Host, an IP literal, another port) off the common path.
_REG_NAME = r"[A-Za-z0-9._~!$&'()*+;=%-]+"
_HOST = re.compile(_REG_NAME + r"(?::[1-9][0-9]{0,3})?")
# An IP literal or a reg-name, then a port of digits, maybe none (RFC 3986 §3.2.3): _other_host judges its value.
_ANY_HOST = re.compile(r"(?:(\[[0-9A-Fa-f:.]+\])|" + _REG_NAME + r")(?::([0-9]*))?")
_CONTENT_FIELDS = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})  # header fields WSGI gives without HTTP_
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
#: What int() says of a number longer than Python's limit (sys.get_int_max_str_digits, 4300).
_INT_LIMIT = re.compile(r"Exceeds the limit \((\d+) digits\) for integer string conversion: value has (\d+) digits")
_ACCEPT_HEADER = {"POST": "Accept-Post", "PATCH": "Accept-Patch"}
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def _other_unicode(charset: str) -> bool:
    """Whether ``charset`` names an encoding of Unicode other than UTF-8 (a JSON text may not use one).

    Any alias Python knows counts (``u16``, ``utf_32``, ``unicode-1-1-utf-7``), and the IANA
    names of UCS-2 and UCS-4 it does not know.  Looked up in the fixed alias table, not with
    ``codecs.lookup``: that keeps every name it cannot find for the life of the process (a
    client sending a new one per request grows the server without bound), and raises
    ValueError, not LookupError, on a NUL (``charset*=UTF-8''a%00b``).
    """
    if len(charset) > _LONGEST_CHARSET:
        return False  # no encoding's name: a charset the JSON body ignores (RFC 8259 §11)
    key = encodings.normalize_encoding(charset).lower()
    name = encodings.aliases.aliases.get(key, key).replace("_", "-")
    return name.startswith(("utf-16", "utf-32", "utf-7", "ucs-", "iso-10646-ucs", "csunicode", "csucs4"))


#: Longer than any encoding's name (IANA's longest is 45 characters).
_LONGEST_CHARSET = 64
#: More digits than any body's length has (2**64 has 20).
_LONGEST_LENGTH = 20


def _other_host(host: str) -> bool:
    """Whether a ``Host`` that :data:`_HOST` does not match names a host all the same.

    An empty one does (RFC 9112 §3.2: the target has no authority), and a name or an IPv6 literal
    (``[::1]``) with an optional port of 1 to 65535.  Not a port without a name (``:80``: an http URI
    with an empty host is invalid, RFC 9110 §4.2.1), a port past 65535 or port 0, nor brackets
    round what is no IPv6 address (``[:::]``, ``[1.2.3.4]``): urllib raises on those, and so does
    werkzeug's ``Location`` of a redirect built from the host (a 500).
    """
    if not host:
        return True
    match = _ANY_HOST.fullmatch(host)
    if match is None:
        return False
    literal, port = match.groups()
    digits = (port or "").lstrip("0")  # (leading zeros allowed; an empty port too)
    if port and not (len(digits) <= 5 and 0 < int(digits or "0") < 65536):
        return False
    return literal is None or isinstance(ip_literal(literal), ipaddress.IPv6Address)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    """A JSON number as a float; one out of range (``1e999``) would be infinity, which JSON cannot hold."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


#: The default ``json_max_bytes`` (as Express's body-parser): parsing costs about 0.3 to 1 ms of CPU
#: per KiB, and a JSON API's requests are rarely larger.
JSON_MAX_BYTES = 102400

#: The most digits a JSON integer may have (RFC 8259 §9 lets a parser set the range it reads);
#: Python's own limit on converting text to int is the same.
MAX_INT_DIGITS = 4300


def _integer_too_long(digits: int, limit: int = MAX_INT_DIGITS) -> str:
    return f"an integer of {digits} digits is longer than the {limit} digits a number may have here"


def _integer(text: str) -> int:
    """A JSON integer; one longer than :data:`MAX_INT_DIGITS` digits is refused by name."""
    digits = len(text) - (text[:1] == "-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(_integer_too_long(digits))
    return int(text)


# A \uD800-\uDFFF escape: only a pair of them makes a character, a lone one no UTF-8 text holds.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _deeper_than(body: bytes, limit: int) -> bool:
    """Whether valid JSON ``body`` nests more than ``limit`` arrays/objects.

    One pass at C speed, whatever the shape: without its strings, the body's
    brackets (all made ``[`` and ``]``: it is valid JSON, so they pair up) split
    at each ``]`` into the runs of ``[`` before it; after the i-th run, the depth
    is the opens so far less the i closes before it.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    skeleton = _JSON_STRING.sub(b"", body).translate(_BRACKETS, _NOT_BRACKET)
    opened = accumulate(map(len, skeleton.split(b"]")))
    deepest: int = max(map(sub, opened, count()))
    return deepest > limit


class _LimitedInput:
    """``wsgi.input`` for a body of unknown length: a read past ``limit`` raises 413.

    The 413 is kept in :attr:`refused`: an app that answers it itself (Flask renders an
    ``HTTPException`` as its own HTML page) or goes on without the rest of the body has its
    answer replaced by it (:meth:`guard`).
    """

    def __init__(self, stream: Any, limit: int, option: str) -> None:
        self._stream = stream
        self._left = limit
        self._limit = limit
        self._option = option
        self.refused: HTTPException | None = None

    def _cap(self, size: int | None) -> int:
        room = max(self._left + 1, 0)  # one byte past the limit tells "too long"
        return room if size is None or size < 0 else min(size, room)

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            self._left = -1
            self.refused = refuse(
                413,
                f"The request body is longer than {self._option} ({self._limit} bytes).",
                details={"limit": self._option, "max": self._limit},
            )
            raise self.refused
        return data

    def guard(self, start_response: StartResponse) -> StartResponse:
        """``start_response`` for the app: once a read crossed the limit, the 413 is the answer."""
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if self.refused is not None:
                raise self.refused
            return start_response(status, headers, exc_info)
        return start

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            return self._take(self._stream.read(self._cap(size)))
        chunks = []
        while chunk := self._take(self._stream.read(self._cap(None))):
            chunks.append(chunk)
        return b"".join(chunks)

    def readline(self, size: int | None = -1) -> bytes:
        return self._take(self._stream.readline(self._cap(size)))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(self)

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class ValidationMiddleware:
    """Size, encoding, content-type and JSON checks at the edge of the stack.

    Options (sizes in bytes; a null header limit switches that check off):

    ``max_body_bytes`` (1048576)
        Largest body: ``Content-Length`` is checked before the app reads;
        chunked bodies are cut off when a read crosses it.
    ``max_query_length`` (2048), ``max_url_length`` (8192)
        The raw query string; the request target (``REQUEST_URI``/``RAW_URI``
        when the server gives it, else script name + path + query).
    ``max_headers`` (100), ``max_header_bytes`` (8192), ``max_total_header_bytes`` (32768)
        Count of ``HTTP_*`` fields; one field's name plus value; all of them.
    ``allowed_content_types`` (JSON, urlencoded and multipart forms, plain text)
        Media types a body may have; ``type/*`` entries allowed; null allows any.
    ``check_json`` (True), ``json_max_depth`` (32), ``json_max_bytes`` (102400,
    or ``max_body_bytes`` when that is lower; null: ``max_body_bytes``), ``reject_duplicate_keys`` (True)
        The JSON checks, for ``application/json`` and ``*/*+json`` bodies.
    ``form_max_fields`` (1000)
        Fields an urlencoded form body may have (it is read only to search ``deny_patterns``).
    ``deny_patterns`` (``{}``)
        ``{parameter: [regex, ...]}`` (``"*"``: every parameter), searched in
        query parameters, urlencoded form fields and top-level string members
        of a JSON object (when ``check_json`` is on).  Not an injection defence (see the module docstring).

    Example::

        opts = ValidationMiddleware.Options(max_body_bytes=65536, max_query_length=1000)
        app = ValidationMiddleware(app, opts, Context())
    """

    class Options(LayerOptions):
        max_body_bytes: int = Field(default=1048576, ge=0)
        max_query_length: int = Field(default=2048, ge=0)
        max_url_length: int = Field(default=8192, ge=1)
        max_headers: int | None = Field(default=100, ge=1)
        max_header_bytes: int | None = Field(default=8192, ge=1)
        max_total_header_bytes: int | None = Field(default=32768, ge=1)
        allowed_content_types: tuple[str, ...] | None = DEFAULT_CONTENT_TYPES
        check_json: bool = True
        json_max_depth: int = Field(default=32, ge=1, le=256)
        json_max_bytes: int | None = Field(default=JSON_MAX_BYTES, ge=0)
        reject_duplicate_keys: bool = True
        form_max_fields: int = Field(default=1000, ge=1)
        deny_patterns: dict[str, tuple[str, ...]] = Field(default_factory=dict)

        @field_validator("allowed_content_types")
        @classmethod
        def _media_types(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
            if value is None:
                return None
            if not value:
                raise ValueError("allowed_content_types may not be empty; use null to allow any")
            normal = tuple(v.strip().lower() for v in value)
            for item in normal:
                if item != "*/*" and not _MEDIA_TYPE.fullmatch(item):
                    raise ValueError(f"allowed_content_types entry {item!r} is not a media type")
            return normal

        @field_validator("deny_patterns")
        @classmethod
        def _patterns_compile(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
            for name, patterns in value.items():
                for i, pattern in enumerate(patterns):
                    try:
                        re.compile(pattern)
                    except (re.error, OverflowError) as exc:  # OverflowError: a repeat count of 2**32 or more
                        raise ValueError(
                            f"deny_patterns[{name!r}][{i}] {pattern!r} is not a valid "
                            f"regular expression: {exc}"
                        ) from exc
            return value

        @model_validator(mode="after")
        def _json_within_body(self) -> ValidationMiddleware.Options:
            given = "json_max_bytes" in self.model_fields_set  # the default gives way to a lower max_body_bytes
            if given and self.json_max_bytes is not None and self.json_max_bytes > self.max_body_bytes:
                raise ValueError(
                    f"json_max_bytes ({self.json_max_bytes}) may not exceed "
                    f"max_body_bytes ({self.max_body_bytes})"
                )
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        o = options
        self._max_body = o.max_body_bytes
        self._max_query = o.max_query_length
        self._max_url = o.max_url_length
        self._max_headers = o.max_headers
        self._max_header = o.max_header_bytes
        self._max_total = o.max_total_header_bytes
        self._check_headers = any(
            v is not None for v in (o.max_headers, o.max_header_bytes, o.max_total_header_bytes)
        )
        types = o.allowed_content_types
        self._any_type = types is None or "*/*" in types
        self._types = frozenset(t for t in types or () if not t.endswith("/*"))
        self._majors = frozenset(t[:-2] for t in types or () if t.endswith("/*"))
        self._types_text = ", ".join(types or ())
        self._check_json = o.check_json
        json_max = o.max_body_bytes if o.json_max_bytes is None else min(o.json_max_bytes, o.max_body_bytes)
        self._json_max = json_max
        self._json_option = "json_max_bytes" if json_max < o.max_body_bytes else "max_body_bytes"
        self._json_depth = o.json_max_depth
        # Integers are read by the C scanner (a call each would make [0, 0, …] 7x slower): Python's own
        # limit on their digits is MAX_INT_DIGITS, unless a program raised it (then _integer checks;
        # which of the two is asked per body, so a limit raised after the build counts too).
        self._decode_json, self._decode_json_capped = (json.JSONDecoder(
            object_pairs_hook=_no_duplicates if o.reject_duplicate_keys else None,
            parse_constant=_no_constants,
            parse_float=_finite,
            parse_int=parse_int,
        ).decode for parse_int in (None, _integer))
        wild = [(f"deny_patterns['*'][{i}]", re.compile(p))
                for i, p in enumerate(o.deny_patterns.get("*", ()))]
        self._deny_any = tuple(wild)
        self._deny = {
            name: tuple([(f"deny_patterns[{name!r}][{i}]", re.compile(p))
                         for i, p in enumerate(patterns)] + wild)
            for name, patterns in o.deny_patterns.items() if name != "*"
        }
        self._deny_on = bool(o.deny_patterns)

    def _refuse(self, environ: WSGIEnvironment, code: int, message: str, limit: str,
                headers: Iterable[tuple[str, str]] = (), **details: Any) -> HTTPException:
        note(environ, "validation", f"{code}: {message}")
        return refuse(code, message, headers=headers, details={"limit": limit, **details})

    def _over(self, environ: WSGIEnvironment, code: int, subject: str, actual: int,
              option: str, limit: int) -> HTTPException:
        return self._refuse(
            environ, code, f"{subject} is {actual} bytes long, more than {option} ({limit}).",
            option, max=limit, actual=actual,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        query: str = environ.get("QUERY_STRING", "")
        path: str = environ.get("PATH_INFO", "")
        uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
        if path[:1] not in ("/", "") or (uri and uri[:1] != "/"):
            answer = self._target(environ, start_response, path, uri)
            if answer is not None:
                return answer
        if uri:
            url_length = len(uri)
        else:
            url_length = len(environ.get("SCRIPT_NAME", "")) + len(path)
            url_length += len(query) + 1 if query else 0
        if url_length > self._max_url:
            raise self._over(environ, 414, "The URL", url_length, "max_url_length", self._max_url)
        if len(query) > self._max_query:
            raise self._over(environ, 414, "The query string", len(query), "max_query_length",
                             self._max_query)
        if not path.isascii():
            self._utf8(environ, path.encode("latin-1", "replace"), "path")
        self._check_host(environ)
        if query and ("%" in query or not query.isascii()):
            self._check_query(environ, query)
        if self._check_headers:
            self._check_header_fields(environ)
        if self._deny_on and query:
            # Raw bytes come as latin-1 (PEP 3333); _check_query found them UTF-8, as the app reads them.
            text = query if query.isascii() else query.encode("latin-1").decode("utf-8", "replace")
            self._check_params(environ, parse_qsl(text, keep_blank_values=True), "query")
        length = environ.get("CONTENT_LENGTH")
        chunked = "HTTP_TRANSFER_ENCODING" in environ
        if chunked or (length and length != "0"):
            limited = self._check_body(environ, length, chunked)
            if limited is not None:
                return self.app(environ, limited.guard(start_response))
        return self.app(environ, start_response)

    def preview_environ(self, environ: WSGIEnvironment) -> dict[str, Any]:
        """The Host an absolute-form target gives the layers inside (for reads ahead, see ``ReadAhead``).

        ``GET http://host/path``: :meth:`_target` makes the target's authority ``HTTP_HOST``, which
        the cache keys on; a target it refuses only makes the read ahead a wasted one.
        """
        uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
        authority = target_authority(uri) if uri and uri[:1] != "/" else None
        return {"HTTP_HOST": authority} if authority else {}

    def _check_host(self, environ: WSGIEnvironment) -> None:
        """RFC 9112 §3.2: one Host, a host name with an optional port, and one at all on HTTP/1.1."""
        host = environ.get("HTTP_HOST")
        if host is None:
            if environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
                raise self._refuse(environ, 400, "An HTTP/1.1 request must have a Host header.", "host")
        elif "," in host:  # Waitress joins repeated fields with ", "; no host name holds a comma
            raise self._refuse(environ, 400, "The request has more than one Host header.", "host")
        elif _HOST.fullmatch(host) is None and not _other_host(host):
            raise self._refuse(environ, 400, f"The Host header {host[:100]!r} is not a host name with an "
                                             "optional port.", "host")

    def _target(self, environ: WSGIEnvironment, start_response: StartResponse, path: str,
                uri: str | None) -> Iterable[bytes] | None:
        """A request target that is not a path (RFC 9112 §3.2): answered here, or made a path's.

        ``OPTIONS *`` asks about the server as a whole (RFC 9110 §9.3.7): an empty 200.
        An authority (``CONNECT host:port``) or ``*`` with another method names no resource: 400.
        An absolute URL (``GET http://host/path``, what a client sends a forward proxy): the server
        passes its path on, and its authority is the host, whatever ``Host`` says (RFC 9112 §3.2.2).
        """
        if path[:1] not in ("/", ""):
            if path == "*" and environ.get("REQUEST_METHOD") == "OPTIONS":
                self._check_host(environ)  # one, a host name, present on HTTP/1.1 (RFC 9112 §3.2): any request
                start_response("200 OK", [("Content-Length", "0")])
                return []
            raise self._refuse(environ, 400, f"The request target {(uri or path)[:100]!r} is not a path: this "
                                             "server answers for resources, whose targets start with '/'.", "target")
        assert uri is not None
        scheme, sep, _ = uri.partition("://")
        authority = target_authority(uri)
        if not sep or scheme.lower() not in ("http", "https") or not authority or "@" in authority:
            raise self._refuse(environ, 400, f"The request target {uri[:100]!r} is neither a path nor an http(s) "
                                             "URL with a host.", "target")
        self._check_host(environ)  # the Host received must be right all the same (§3.2), then it gives way
        environ["HTTP_HOST"] = authority
        return None

    def _utf8(self, environ: WSGIEnvironment, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._refuse(environ, 400, f"The {what} is not valid UTF-8 once "
                               f"percent-decoded (byte {exc.start}).", "utf-8") from None

    def _check_query(self, environ: WSGIEnvironment, query: str) -> None:
        bad = _BAD_PERCENT.search(query)
        if bad is not None:
            at = bad.start()
            raise self._refuse(environ, 400, f"The query string has an invalid percent-escape "
                               f"{query[at:at + 3]!r} at offset {at}.", "percent-encoding")
        self._utf8(environ, unquote_to_bytes(query.encode("latin-1", "replace")), "query string")

    def _check_header_fields(self, environ: WSGIEnvironment) -> None:
        # Each field's name (as HTTP_NAME) and value; the comparisons pick the HTTP_ keys without a
        # call per key (this runs per request, over every key the layers outside added).
        sizes = [len(key) + len(value) for key, value in environ.items() if "HTTP_" <= key < "HTTP`"]
        for key in _CONTENT_FIELDS:  # Content-Type, -Length: WSGI gives them without HTTP_
            value = environ.get(key)
            if value:
                sizes.append(len(key) + len(value) + 5)  # as if HTTP_CONTENT_TYPE, to go with the others
        count = len(sizes)
        total = sum(sizes) - 5 * count  # the sizes count header names without the HTTP_ prefix
        biggest = max(sizes, default=5) - 5
        if self._max_headers is not None and count > self._max_headers:
            raise self._refuse(environ, 431, f"The request has {count} header fields, more "
                               f"than max_headers ({self._max_headers}).", "max_headers",
                               max=self._max_headers, actual=count)
        if self._max_header is not None and biggest > self._max_header:
            biggest_key = max((k for k in environ if k[:5] == "HTTP_" or (k in _CONTENT_FIELDS and environ[k])),
                              key=lambda k: len(k) + len(environ[k]) - (5 if k[:5] == "HTTP_" else 0))
            name = biggest_key.removeprefix("HTTP_").replace("_", "-").title()
            raise self._over(environ, 431, f"The {name} header", biggest, "max_header_bytes",
                             self._max_header)
        if self._max_total is not None and total > self._max_total:
            raise self._refuse(environ, 431, f"The header fields total {total} bytes, more "
                               f"than max_total_header_bytes ({self._max_total}).",
                               "max_total_header_bytes", max=self._max_total, actual=total)

    def _check_params(self, environ: WSGIEnvironment, pairs: Iterable[tuple[str, Any]],
                      where: str) -> None:
        for name, value in pairs:
            values = value if isinstance(value, list) else [value]
            for label, pattern in self._deny.get(name, self._deny_any):
                for item in values:
                    if isinstance(item, str) and pattern.search(item):
                        raise self._refuse(environ, 400, f"The value of {where} parameter "
                                           f"{name!r} matches {label}.", "deny_patterns")

    def _type_allowed(self, mimetype: str) -> bool:
        if self._any_type or mimetype in self._types:
            return True
        major, slash, _ = mimetype.partition("/")
        return bool(slash) and major in self._majors

    def _check_body(self, environ: WSGIEnvironment, length_text: str | None,
                    chunked: bool) -> _LimitedInput | None:
        """Check the body's length and type; the stream put in front of a chunked body the app reads."""
        if chunked and not environ.get("wsgi.input_terminated"):
            # A server that passes the chunked stream on as it came (wsgiref) leaves no end to read
            # to: reading the body would wait for the client until it gave up.
            raise self._refuse(environ, 411, "A chunked request body needs a server that decodes it; "
                               "send a Content-Length.", "content-length")
        length = None
        if length_text:
            if not (length_text.isascii() and length_text.isdigit()):
                raise self._refuse(environ, 400, f"The Content-Length {length_text!r} is not a "
                                   "whole number of bytes.", "content-length")
            digits = length_text.lstrip("0")
            if len(digits) > _LONGEST_LENGTH:  # RFC 9110 §8.6: no int() of a numeral of any length
                raise self._refuse(environ, 413, f"The request body is longer than max_body_bytes "
                                   f"({self._max_body}): its Content-Length has {len(digits)} digits.",
                                   "max_body_bytes", max=self._max_body)
            length = int(digits or "0")
            if len(length_text) > _LONGEST_LENGTH:  # zeros before it: the app, werkzeug too, reads it with int()
                environ["CONTENT_LENGTH"] = str(length)
            if length > self._max_body:
                raise self._over(environ, 413, "The request body", length, "max_body_bytes",
                                 self._max_body)
            if length == 0 and not chunked:
                return None
        mimetype, params = parse_options_header(environ.get("CONTENT_TYPE", ""))
        mimetype = mimetype.lower()
        if not self._type_allowed(mimetype):
            accept = _ACCEPT_HEADER.get(environ.get("REQUEST_METHOD", ""))
            shown = f"Content-Type {mimetype[:100]!r} is" if mimetype else "A body without Content-Type is"
            raise self._refuse(environ, 415, f"{shown} not accepted; allowed_content_types are "
                               f"{self._types_text}.", "allowed_content_types",
                               headers=[(accept, self._types_text)] if accept else ())
        is_json = self._check_json and (mimetype == "application/json"
                                        or mimetype.endswith("+json"))
        is_form = self._deny_on and mimetype == "application/x-www-form-urlencoded"
        if not (is_json or is_form):
            if chunked:
                limited = _LimitedInput(environ["wsgi.input"], self._max_body, "max_body_bytes")
                environ["wsgi.input"] = limited
                return limited
            return None
        self._read_and_check(environ, mimetype, params, length, chunked, is_json)
        return None

    def _read_and_check(self, environ: WSGIEnvironment, mimetype: str, params: dict[str, str],
                        length: int | None, chunked: bool, is_json: bool) -> None:
        """Read a JSON or form body once, check it, and hand the same bytes to the app."""
        # An empty field or list element, and identity, are no coding (RFC 9110 §5.6.1.2, §8.4.1)
        codings = [c for c in (part.strip().lower() for part in environ.get("HTTP_CONTENT_ENCODING", "").split(","))
                   if c and c != "identity"]
        coding = ", ".join(codings)
        if codings:
            raise self._refuse(environ, 415, f"Content-Encoding {coding[:100]!r} is not accepted on "
                               f"{mimetype} bodies.", "content-encoding",
                               headers=[("Accept-Encoding", "identity")])
        # JSON is UTF-8 and a charset parameter means nothing (RFC 8259 §8.1, §11): one that names
        # another encoding of all of Unicode says the body is not JSON text.
        charset = params.get("charset", "utf-8").lower()
        if is_json and _other_unicode(charset):
            raise self._refuse(environ, 415, f"JSON bodies must be UTF-8, not {charset[:_LONGEST_CHARSET]!r}.",
                               "charset")
        if is_json:
            limit, option = self._json_max, self._json_option
        else:
            limit, option = self._max_body, "max_body_bytes"
        if length is not None and length > limit:  # only json_max_bytes can be lower
            raise self._over(environ, 413, "The JSON body", length, option, limit)
        stream = environ["wsgi.input"]
        if length is None or chunked:
            body = _LimitedInput(stream, limit, option).read()
        else:
            body = stream.read(length)
            if len(body) < length:
                raise self._refuse(environ, 400, f"The request body ended after {len(body)} of "
                                   f"the {length} bytes its Content-Length announced.",
                                   "content-length", max=length, actual=len(body))
        environ["wsgi.input"] = BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input_terminated"] = True
        if not body:
            return
        if is_json:
            value = self._parse_json(environ, body)
            environ[JSON] = value
            if self._deny_on and isinstance(value, dict):
                self._check_params(environ, value.items(), "JSON")
        else:
            fields = self.options.form_max_fields
            try:  # (the fields are counted before anything is split: a body of "&&&…" costs no parsing)
                pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict",
                                  max_num_fields=fields)
            except UnicodeDecodeError:
                raise self._refuse(environ, 400, "The form body is not valid UTF-8 once "
                                   "percent-decoded.", "utf-8") from None
            except ValueError:  # "Max number of fields exceeded"
                raise self._refuse(environ, 413, f"The form body has more than form_max_fields ({fields}) "
                                   "fields.", "form_max_fields", max=fields) from None
            self._check_params(environ, pairs, "form")

    def _parse_json(self, environ: WSGIEnvironment, body: bytes) -> Any:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._refuse(environ, 400, f"The JSON body is not valid UTF-8 (byte "
                               f"{exc.start}).", "utf-8") from None
        if text[:1] == "\ufeff":  # what json says of it ("Expecting value … char 0") does not say why
            raise self._refuse(environ, 400, "The JSON body starts with a byte order mark (EF BB BF), which JSON "
                               "text may not carry (RFC 8259 §8.1); send it without.", "json")
        too_deep = f"The JSON body nests deeper than json_max_depth ({self._json_depth})."
        try:
            python_caps = 0 < sys.get_int_max_str_digits() <= MAX_INT_DIGITS
            value = (self._decode_json if python_caps else self._decode_json_capped)(text)
        except _DuplicateKey as exc:
            raise self._refuse(environ, 400, f"The JSON body repeats the key {exc.args[0]!r} "
                               "in one object (reject_duplicate_keys).",
                               "reject_duplicate_keys") from None
        except RecursionError:
            raise self._refuse(environ, 400, too_deep, "json_max_depth",
                               max=self._json_depth) from None
        except ValueError as exc:
            too_long = _INT_LIMIT.match(str(exc))
            said = str(exc) if too_long is None else _integer_too_long(int(too_long[2]), int(too_long[1]))
            raise self._refuse(environ, 400, f"The request body is not well-formed JSON: "
                               f"{said}.", "json") from None
        if _deeper_than(body, self._json_depth):
            raise self._refuse(environ, 400, too_deep, "json_max_depth", max=self._json_depth)
        if _SURROGATE_ESCAPE.search(body) is not None:  # rare: then check every string of the value
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise self._refuse(environ, 400, "The JSON body is not valid UTF-8: it escapes half of a "
                                   "surrogate pair (\\ud800-\\udfff) on its own.", "utf-8") from None
        return value
