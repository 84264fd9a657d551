"""The contract every wsgistack layer follows, and the helpers they share.

A layer is a class ``XxxMiddleware(app, options, context)`` whose ``Options``
pydantic model (a :class:`LayerOptions` subclass) sits beside it in the same
module.  ``__init__`` normalises everything; ``__call__`` only does
per-request work.  Refusals raise :func:`refuse` (a werkzeug
``HTTPException``) and the ``errors`` layer renders them.

Request-scoped facts live in environ under ``wsgistack.*`` keys.  The
helpers below parse a fact once, store it in environ and hand back the stored
value to every later caller, so no layer builds a ``Request`` object or parses
the same header twice on the hot path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator
from werkzeug.exceptions import HTTPException, default_exceptions
from werkzeug.http import parse_cookie

from stores.base import mask_url_passwords

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from stores.base import Store

__all__ = [
    "API_VERSION",
    "CLIENT_IP",
    "COOKIES",
    "HOST_PORT",
    "HTTP_METHODS",
    "IDENTITY",
    "LONGEST_ADDRESS",
    "ORIG_PATH",
    "PATH",
    "READ_AHEAD",
    "RENDER_ERROR",
    "REQUEST_ID",
    "ROUTE",
    "ROUTE_TEMPLATE",
    "SESSION",
    "SESSION_BOUND",
    "SESSION_USER_HINT",
    "STRANGER_ORIGINS",
    "TIMINGS",
    "TOKEN",
    "TRACE",
    "VERSIONS",
    "Context",
    "HostList",
    "Identity",
    "LayerOptions",
    "Listener",
    "Methods",
    "Networks",
    "PathGlobs",
    "PrimedBody",
    "ReadAhead",
    "ReadKey",
    "RulePaths",
    "UnstartedBody",
    "add_missing",
    "add_vary",
    "address_in",
    "call_with_headers",
    "client_ip",
    "client_key",
    "cookies",
    "decoded_path",
    "decorate_error",
    "escape_control",
    "file_identity",
    "header_list",
    "header_name",
    "header_text",
    "host_key",
    "host_name",
    "host_names",
    "ip_literal",
    "ipv6_network",
    "mask_url_passwords",
    "network",
    "networks",
    "no_boolean_numbers",
    "normalise_origin",
    "note",
    "on_rendered",
    "one_leading_slash",
    "own_origin",
    "parse_origin",
    "read_ahead",
    "refusal_status",
    "refuse",
    "rendered",
    "resolve_path",
    "rooted_path",
    "serialise_origin",
    "set_cookie_header",
    "shown",
    "split_host",
    "wildcard_stranger",
    "with_head",
    "wrap_start_response",
]

# Request-scoped environ keys.  Later layers and the Flask core read these.
REQUEST_ID = "wsgistack.request_id"
CLIENT_IP = "wsgistack.client_ip"
SESSION = "wsgistack.session"
IDENTITY = "wsgistack.identity"
API_VERSION = "wsgistack.api_version"
RENDER_ERROR = "wsgistack.render_error"
COOKIES = "wsgistack.cookies"  # (the HTTP_COOKIE parsed, its cookies): see cookies()
PATH = "wsgistack.path"
#: The PATH_INFO the client asked for, kept by a layer that rewrote it for routing (versioning:
#: ``/api/search`` to ``/api/v1/search``): error bodies and logs name what was asked.
ORIG_PATH = "wsgistack.versioning.orig_path"
#: Set by versioning when the answer depends on request headers (the URI has a variant per version):
#: ``(supported versions, where the version starts in PATH_INFO)``; a write drops every variant's entry.
VERSIONS = "wsgistack.versioning.versions"
#: Set (True) when the response holds something of this one session, which no cache may give another
#: session of the same user (a CSRF token bound to the session id).
SESSION_BOUND = "wsgistack.session_bound"
TIMINGS = "wsgistack.timings"
TRACE = "wsgistack.trace"
#: Store reads an outer layer made for inner ones in its own round trip (see ReadAhead).
READ_AHEAD = "wsgistack.read_ahead"
#: In a previewed environ only (see ReadAhead): ``(subject, roles)`` of the user the session
#: cookie's session held when this process last read or saved it.
SESSION_USER_HINT = "wsgistack.session_user_hint"
#: The route template that answered (the Flask core's rule, or a layer's own path), for metrics labels.
ROUTE = "wsgistack.route"
#: ``context.services`` name of ``route_template(path, method) -> template | None``, which the app
#: publishes so that requests refused before routing are labelled with the route they were for.
ROUTE_TEMPLATE = "route_template"

Headers = list[tuple[str, str]]


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _check_globs(value: list[str]) -> list[str]:
    for pattern in value:
        if not (pattern.startswith("/") or pattern == "*"):
            raise ValueError(f"path pattern {pattern!r} must start with '/' (or be '*')")
    return value


def _some_paths(value: list[str]) -> list[str]:
    if not value:  # a rule's compiled patterns would match every path: `{paths: [], auth: none}` opens the site
        raise ValueError("paths is empty: a rule must name at least one path pattern; leave paths out for every "
                         "path ('*')")
    return value


def _check_methods(value: list[str]) -> list[str]:
    for method in value:
        if method.upper() not in HTTP_METHODS:
            raise ValueError(f"unknown HTTP method {method!r} (known: {', '.join(sorted(HTTP_METHODS))})")
    return [m.upper() for m in value]


def _check_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"entry {item!r} is not an IP network (write 10.0.0.0/8 or 127.0.0.1)") from None
    return value


#: Option types shared by layers that take rules: path globs, HTTP methods, IP networks.
PathGlobs = Annotated[list[str], AfterValidator(_check_globs)]
#: The ``paths`` of one rule (auth, ratelimit): globs, at least one.
RulePaths = Annotated[list[str], AfterValidator(_check_globs), AfterValidator(_some_paths)]
Methods = Annotated[list[str], AfterValidator(_check_methods)]
Networks = Annotated[tuple[str, ...], AfterValidator(_check_networks)]


def networks(values: Iterable[str]) -> list[Network]:
    """Parse validated ``Networks`` once, in ``__init__``."""
    return [network(v) for v in values]


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def network(value: str) -> Network:
    """One network; an IPv4-mapped one (``::ffff:10.0.0.0/104``) as the IPv4 network it maps.

    Peers are compared as IPv4 when they are IPv4-mapped: a network written the
    mapped way must be IPv4 too, or nothing would ever be in it.
    """
    net = ipaddress.ip_network(value, strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def address_in(environ: WSGIEnvironment, nets: Iterable[Network]) -> bool:
    """Whether the trusted client address is in one of ``nets`` (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(client_ip(environ))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in nets)


_ORIGIN = re.compile(
    r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of a serialised origin, lowercased, default port as None.

    Shared by ``cors`` and ``csrf`` so both read origin lists the same way.
    """
    match = _ORIGIN.fullmatch(origin.lower())
    if match is None:
        return None
    scheme, host, port_text = match.groups()
    port = int(port_text) if port_text else None
    if port is not None and port > 65535:
        return None
    return scheme, host, None if port == _DEFAULT_PORTS.get(scheme) else port


def serialise_origin(scheme: str, host: str, port: int | None) -> str:
    """``scheme://host[:port]`` from :func:`parse_origin`'s parts (a default port left out)."""
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def normalise_origin(origin: str) -> str | None:
    """``origin`` in its one spelling (lower case, no default port), or None when it is no origin."""
    parsed = parse_origin(origin)
    return None if parsed is None else serialise_origin(*parsed)


def own_origin(environ: WSGIEnvironment) -> str:
    """The request's own origin, normalised: ``wsgi.url_scheme`` and the Host header (or the server's
    name and port); as written when it does not parse."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    return normalise_origin(f"{scheme}://{host}") or f"{scheme}://{host}"


def shown(text: str | None) -> str:
    """Request text safe to quote in a message: printable ASCII, at most 100 characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in (text or ""))
    return text if len(text) <= 100 else text[:97] + "..."


def escape_control(text: str) -> str:
    """Escape control characters so request data cannot forge log lines."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", text)


def no_boolean_numbers(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Refuse a boolean where a number goes: YAML reads yes/no/on/off/true/false as booleans,
    and pydantic would take ``threads: yes`` as 1 without a word."""
    field = cls.model_fields.get(info.field_name) if info.field_name is not None else None
    if field is None:
        return value
    if isinstance(value, bool) and field.annotation in _NUMBER_HINTS:
        raise ValueError("a number is needed, not a boolean (YAML reads yes, no, on, off, true and false "
                         "as booleans)")
    if isinstance(value, list | tuple) and field.annotation in _NUMBERS_HINTS \
            and any(isinstance(item, bool) for item in value):
        raise ValueError("numbers are needed, not booleans (YAML reads yes, no, on, off, true and false "
                         "as booleans)")
    return value


_NUMBER_HINTS: tuple[Any, ...] = (int, float, int | None, float | None)
_NUMBERS_HINTS: tuple[Any, ...] = (tuple[int, ...], tuple[float, ...], list[int], list[float])


class LayerOptions(BaseModel):
    """Base for every layer's ``Options``: unknown keys are refused, values frozen."""

    # Errors leave out the input: built from Python, a refused option would print every option given,
    # secrets included (check and serve report stack.yaml's mistakes themselves, secrets masked).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, hide_input_in_errors=True)

    _numbers = field_validator("*", mode="before")(classmethod(no_boolean_numbers))


#: What a read ahead reads: ``(key, ttl)`` or, for ``get_or_lock``, ``(key, ttl, lock_key)``, with a write
#: mark to read (and set when missing) in the same step ``(key, ttl, lock_key, mark, mark_ttl)``.
ReadKey = (tuple[str, float | None] | tuple[str, float | None, str]
           | tuple[str, float | None, str, str, float])


@dataclass
class ReadAhead:
    """A store read a layer makes per request, which an outer layer's round trip can carry.

    A layer registers one at build time (``context.offer_read(...)``, which
    keeps it when the store is Redis): ``key(environ)`` names what this request will
    read (``(key, ttl)``, ``ttl`` for ``getex``; ``(key, ttl, lock_key)`` for
    ``get_or_lock``, ``(key, ttl, lock_key, mark, mark_ttl)`` to read a write mark with it),
    or ``None``.  The rate limiter,
    which sends one pipeline per request anyway, adds the reads of the layers
    inside it that share its Redis, and leaves the answers in
    ``environ[READ_AHEAD]``; the layer then takes its answer with
    :func:`read_ahead` instead of a round trip of its own, and reads as before
    when there is none (no rate limiter, another store, a failed pipeline, or a
    key that differs from the one read ahead).

    The rate limiter asks ``key`` before the layers between it and the reader
    ran.  The builder makes ``key`` see the request as the reader will
    (:meth:`within`, :meth:`through`): outside the reader's scope it names
    nothing, and a layer in between that changes what the key depends on (the
    versioning layer rewrites the path and sets the API version) shows its
    change with a ``preview_environ(environ)`` method.  A read ahead only ever reads, so
    a wrong guess costs a wasted read, never a wrong answer.  ``get_or_lock``
    also takes a lock when the key is missing: the rate limiter gives back a lock
    whose answer no layer took (a request refused in between, a wrong guess),
    with the token the read took it with (``Store.unlock``).
    """

    store: Store
    op: str  # "get", "getex" or "get_or_lock"
    key: Callable[[WSGIEnvironment], ReadKey | None]

    def within(self, scope: Any) -> None:
        """Name nothing for requests outside ``scope`` (the reader's own scope, when it has one)."""
        if not scope:
            return
        key = self.key
        self.key = lambda environ: key(environ) if scope.matches(environ) else None

    def through(self, preview: Callable[[WSGIEnvironment], dict[str, Any] | None], scope: Any = None,
                label: str = "a layer") -> None:
        """Let ``key`` see the request as changed by an outer layer's ``preview`` (within its ``scope``).

        ``preview(environ)`` returns the environ entries that layer will set
        (``{}``: none), or ``None`` when it will refuse the request or cannot tell:
        then nothing is read ahead.
        """
        key = self.key

        def seen(environ: WSGIEnvironment) -> ReadKey | None:
            if scope and not scope.matches(environ):
                return key(environ)
            changes = preview(environ)
            if changes is None:
                return None
            if not isinstance(changes, dict):
                raise TypeError(f"{label}.preview_environ returned {type(changes).__name__}; "
                                "return a dict of environ entries, or None")
            return key({**environ, **changes} if changes else environ)

        self.key = seen


_NOT_READ = object()


def read_ahead(environ: WSGIEnvironment, store: Store, op: str, key: str) -> tuple[bool, Any]:
    """``(True, value)`` when an outer layer read ``key`` from ``store`` for this request, else ``(False, None)``.

    When the outer layer's round trip found the store unavailable, this raises
    that error (a ``StoreError``): the layer applies its ``on_store_error`` at
    once instead of waiting for the same store again.
    """
    found: dict[tuple[int, str, str], Any] | None = environ.get(READ_AHEAD)
    if found is None:
        return False, None
    value = found.pop((id(store), op, key), _NOT_READ)
    if value is _NOT_READ:
        return False, None
    if isinstance(value, Exception):
        raise value
    return True, value


@dataclass
class Context:
    """What a layer gets at build time: named stores, a logger and stack settings.

    ``loopback_only`` is true when the server listens only on loopback
    addresses; layers use it to allow development-only settings (``debug``,
    insecure cookies).  ``services`` lets a layer publish an object that the
    Flask core reads at request time (the auth layer publishes its token
    service as ``services["tokens"]``).
    """

    stores: dict[str, Store] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("wsgistack"))
    loopback_only: bool = True
    #: A proxy forwards clients to the server (``server.trusted_proxy``, a proxy layer): on loopback
    #: sockets or not, its clients may be anyone (``debug`` tracebacks must not reach them).
    proxied: bool = False
    workers: int = 1
    services: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    listeners: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)
    #: Reads that layers will make per request, for an outer layer's round trip to carry.
    read_ahead: list[ReadAhead] = field(default_factory=list)
    #: The path rewrites of the layers built so far (the ones inside the layer being built), innermost
    #: first: see :func:`routed_path`.  The builder adds a layer whose ``rewrites_path`` is true.
    path_rewrites: list[Callable[[WSGIEnvironment], dict[str, Any] | None]] = field(default_factory=list)
    #: Of the same layers, ``alternative_paths(environ)``: every ``PATH_INFO`` a request for the URL may
    #: be routed to, whatever the headers it is sent with say (versioning's, for CORS preflights).
    path_alternatives: list[Callable[[WSGIEnvironment], tuple[str, ...]]] = field(default_factory=list)

    def path(self, value: str) -> str:
        """A file an option names: ``~`` expanded, a relative one against the stack file's folder.

        (``settings["base_dir"]``; the working directory when the stack was built from
        text or a mapping without a ``base_dir``.)  Every file option of the built-in
        layers goes through it, as the app's ``var_dir`` does, so ``serve.py -c conf/stack.yaml``
        finds them wherever it is started.
        """
        return resolve_path(self.settings.get("base_dir"), value)

    def offer_read(self, store: Store, op: str, key: Callable[[WSGIEnvironment], ReadKey | None]) -> None:
        """Register a per-request read (see :class:`ReadAhead`) when ``store`` can be read ahead (Redis)."""
        if callable(getattr(store, "read_command", None)):
            self.read_ahead.append(ReadAhead(store, op, key))

    def emit(self, event: str, **fields: Any) -> None:
        """Tell every listener (metrics, logs) that ``event`` happened.

        Event names are dotted: ``cache.hit``, ``ratelimit.reject``,
        ``auth.failure`` (``reason=``), ``store.error`` (``store=``) …
        With no listener this costs one attribute read.
        """
        if self.listeners:
            for listener in self.listeners:
                listener(event, fields)

    def emitter(self, event: str, **fields: Any) -> Callable[[], None]:
        """``emit(event, **fields)``, made ready once: for an event a layer emits on most requests
        (``ratelimit.pass``, ``cache.hit``).

        A listener with a ``bind(event, fields)`` method (metrics, the operator page) returns
        the call that counts that very event, so it works out its counter once, not per
        request; any other listener is called as by :meth:`emit`, with a fields dict of its
        own each time.  Listeners added, removed or replaced later are bound at the next call.
        """
        made: list[Any] = [[], ()]  # a copy of the listeners bound, and their calls

        def fire() -> None:
            listeners = self.listeners
            if listeners != made[0]:  # (compared item by item, by identity first: no copy per call)
                made[:] = [list(listeners), tuple(_bind(listener, event, fields) for listener in listeners)]
            for call in made[1]:
                call()

        return fire

    def store(self, name: str) -> Store:
        """Return the named store, or raise ``LookupError`` naming the known ones."""
        try:
            return self.stores[name]
        except KeyError:
            known = ", ".join(sorted(self.stores)) or "none"
            raise LookupError(f"unknown store {name!r} (known: {known})") from None


def _bind(listener: Callable[[str, dict[str, Any]], None], event: str, fields: dict[str, Any]) -> Callable[[], None]:
    bind = getattr(listener, "bind", None)
    if callable(bind):
        bound: Callable[[], None] = bind(event, dict(fields))
        return bound
    return lambda: listener(event, dict(fields))


class Listener:
    """A context listener (``context.listeners``) that can also bind one event ahead (see :meth:`Context.emitter`)."""

    __slots__ = ("bind", "on_event")

    def __init__(self, on_event: Callable[[str, dict[str, Any]], None],
                 bind: Callable[[str, dict[str, Any]], Callable[[], None]]) -> None:
        self.on_event, self.bind = on_event, bind

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.on_event(event, fields)


@dataclass(frozen=True)
class Identity:
    """Who the request acts for, set by the auth (or session) layer in ``wsgistack.identity``."""

    subject: str
    roles: frozenset[str] = frozenset()
    source: str = "jwt"
    claims: Mapping[str, Any] = field(default_factory=dict)


def note(environ: WSGIEnvironment, layer: str, decision: str) -> None:
    """Record what a layer decided, for ``serve.py explain`` (free when not tracing)."""
    trace: list[tuple[str, str]] | None = environ.get(TRACE)
    if trace is not None:
        trace.append((layer, decision))


def refuse(
    code: int,
    description: str | None = None,
    *,
    headers: Iterable[tuple[str, str]] = (),
    details: Any = None,
) -> HTTPException:
    """Build the werkzeug ``HTTPException`` for ``code`` with extra headers and details.

    The ``errors`` layer renders it; ``headers`` (``Retry-After``,
    ``WWW-Authenticate``, ``Allow`` …) are added to the rendered response and
    ``details`` goes into the body.
    """
    cls = default_exceptions.get(code)
    if cls is None:
        exc = HTTPException(description)
        exc.code = code
    else:
        exc = cls(description=description)
    exc.wsgistack_headers = list(headers)  # type: ignore[attr-defined]
    exc.wsgistack_details = details  # type: ignore[attr-defined]
    return exc


def decorate_error(exc: BaseException, headers: Iterable[tuple[str, str]]) -> None:
    """Attach response headers to an exception on its way out to the ``errors`` layer.

    A layer whose headers must also appear on error responses (security
    headers, CORS, rate-limit headers) catches the exception in ``__call__``,
    calls this, and re-raises.  Headers already attached win over later ones.
    """
    extra: list[tuple[str, str]] | None = getattr(exc, "wsgistack_headers", None)
    if extra is None:
        extra = []
        try:
            exc.wsgistack_headers = extra  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exceptions with __slots__
            return
    add_missing(extra, headers)


def refusal_status(exc: BaseException) -> int:
    """The status the ``errors`` layer renders ``exc`` with: that of the response an ``HTTPException``
    carries (``abort(Response(...))``), else its code, else 500 (any other exception too)."""
    if isinstance(exc, HTTPException):
        own = exc.response
        if own is not None and hasattr(own, "get_data"):
            return int(own.status_code)
        if exc.code:
            return exc.code
    return 500


def on_rendered(exc: BaseException, callback: Callable[[int, int], None]) -> bool:
    """Ask the ``errors`` layer outside to call ``callback(status, body bytes)`` once it has rendered ``exc``.

    A layer that records what was sent (the access log) learns what the refusal it let
    through became.  False when ``exc`` takes no attributes; ``errors`` drops the callback
    once called, so the exception does not hold the caller's state past the response.
    """
    try:
        exc.wsgistack_rendered = callback  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        return False
    return True


def rendered(exc: BaseException, status: int, size: int) -> None:
    """Tell the ``on_rendered`` callback of ``exc``, if any, what it was rendered as (the ``errors`` layer)."""
    callback = getattr(exc, "wsgistack_rendered", None)
    if callback is not None:
        del exc.wsgistack_rendered  # type: ignore[attr-defined]
        callback(status, size)


#: A Host header's value: a name or an IP literal (IPv6 bracketed), and a port.
HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?)(?::([0-9]{1,5}))?")


def host_key(name: str) -> str:
    """``name``, an IPv6 literal (bracketed or not) in its one bracketed spelling: ``[::1]``."""
    inner = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" not in inner:
        return name
    try:
        return f"[{ipaddress.IPv6Address(inner).compressed}]"
    except ValueError:
        return name


def split_host(host: str) -> tuple[str, str, str]:
    """``(name, ":", port)`` of ``host[:port]``; IPv6 literals keep their brackets."""
    if host.endswith("]") or ":" not in host:
        return host, "", ""
    return host.rpartition(":")


def not_a_path(environ: WSGIEnvironment) -> str | None:
    """The request target as sent when it is not a path (``CONNECT example.com:443``, ``GET *``), else None.

    Waitress splits such a target as if it were a URL (``example.com:443`` gives the path ``443``):
    a log line or an error naming that path would send whoever reads it looking for the wrong thing.
    """
    path: str = environ.get("PATH_INFO", "")
    if path[:1] in ("/", ""):
        return None
    target: str | None = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    return target if target and target[:1] != "/" and "://" not in target else path


def target_authority(uri: str | None) -> str | None:
    """The authority of an absolute-form request target (``GET http://host:8080/path``), else None.

    RFC 9112 §3.2.2: the server takes its host from there, whatever ``Host`` says
    (the validation layer makes it ``HTTP_HOST``); a check of the host checks it too.
    """
    if not uri or uri[:1] == "/":
        return None
    _, sep, rest = uri.partition("://")
    if not sep:  # ``*`` (OPTIONS *) or an authority (CONNECT host:port): no URL, no host of its own
        return None
    return rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]


def host_name(host: str) -> str:
    """The name of a ``Host`` value (``host[:port]``) as host lists compare it: lower case, no port, no
    trailing dot, an IPv6 literal bracketed."""
    return host_key(split_host(host)[0].lower().rstrip("."))


def ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP literal host names (IPv6 bracketed or not), else None."""
    try:
        return ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return None


def host_names(value: Iterable[str], option: str) -> tuple[str, ...]:
    """Entries of a host-name list (``allowed_hosts``, ``hosts``) as :class:`HostList` compares them: lowercase, no
    trailing dot; a ValueError naming ``option`` for one that is no host name (a URL, a port, a path)."""
    found = []
    for entry in value:
        name = entry.strip().lower().rstrip(".")
        bare = name[2:] if name.startswith("*.") else name
        if name != "*" and not (HOST_PORT.fullmatch(bare) and not split_host(bare)[2]) and ip_literal(name) is None:
            raise ValueError(f"{option} entry {entry!r} is not a host name: write ops.example.org, *.example.org "
                             "or '*' (no scheme, port or path)")
        found.append(name)
    return tuple(found)


class HostList:
    """Host names as ``allowed_hosts`` (proxy) and ``hosts`` (operator page, metrics) list them: exact
    (any case, a trailing dot alike), ``*.example.org`` for its subdomains, ``*`` for any."""

    def __init__(self, hosts: Iterable[str]) -> None:
        keys = [host_key(h.strip().lower().rstrip(".")) for h in hosts]
        self.any = "*" in keys
        self.exact = frozenset(k for k in keys if not k.startswith("*."))
        self.suffixes = tuple(k[1:] for k in keys if k.startswith("*."))

    def allow(self, name: str) -> bool:
        """Whether the list takes ``name`` (from :func:`host_name`)."""
        return self.any or name in self.exact or (name.endswith(self.suffixes) and not name.startswith("."))


#: A token (RFC 9110 §5.6.2): a field name, a method, a coding; match it with ``fullmatch``.
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_name(value: str) -> str:
    """``value`` if it is a header name a WSGI app can read, else a ValueError saying why (for option validators).

    WSGI spells ``-`` and ``_`` alike in environ (``HTTP_X_API_VERSION``), so a name with ``_`` would
    be read from the header with ``-`` while ``Vary`` named the other; servers drop such fields anyway.
    """
    if not TOKEN.fullmatch(value):
        raise ValueError(f"header {value!r} is not a valid HTTP header name")
    if "_" in value:
        raise ValueError(f"header {value!r} has an '_': Waitress drops such header fields (WSGI "
                         f"cannot tell them from '-'); write {value.replace('_', '-')!r}")
    return value


def add_missing(headers: list[tuple[str, str]], more: Iterable[tuple[str, str]] | None) -> None:
    """Append the headers of ``more`` whose names ``headers`` does not have yet (any case)."""
    if more:
        present = {name.lower() for name, _ in headers}
        headers.extend((n, v) for n, v in more if n.lower() not in present)


def with_head(methods: Iterable[str]) -> frozenset[str]:
    """``methods``, and HEAD too when GET is there: the router answers HEAD with the GET view, so a rule
    or scope for GET that let HEAD by would let it run that view past the rule."""
    found = frozenset(methods)
    return found | {"HEAD"} if "GET" in found else found


def resolve_path(base: str | os.PathLike[str] | None, value: str) -> str:
    """``value`` with ``~`` expanded and, when relative, taken from ``base`` (the working directory if None).

    How every file a stack.yaml names is found: the app's, the layers' (``Context.path``), the CLI's.
    """
    path = os.path.expanduser(value)
    return path if base is None or os.path.isabs(path) else os.path.join(base, path)


def header_text(value: str) -> bool:
    """Whether ``value`` can go in a header field as it is: printable ASCII on one line (RFC 9110 §5.5)."""
    return value.isascii() and value.isprintable()


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Which file ``path`` names right now, as (device, inode); None if none. A file renamed over it has another."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def one_leading_slash(path: str) -> str:
    """``path`` with its leading slashes counted as one, as werkzeug's router counts them."""
    return "/" + path.lstrip("/") if path[:2] == "//" else path


def rooted_path(path: str) -> str:
    """``path`` as werkzeug's router reads it: leading slashes count as one, and a path without one is
    rooted (``GET admin/x HTTP/1.1``: Waitress passes ``admin/x`` on, the router routes ``/admin/x``).

    A path the router reads as it is (a slash, then anything but another) sorts from ``"/"`` up to
    ``"//"`` or from ``"/0"`` up to ``"0"`` (``"0"`` follows ``"/"``): the layers that look at every
    request's path (health, metrics, operator_page) test it so, two comparisons and no slice, about
    half the time of ``path[:1]`` and ``path[1:2]``.
    """
    return path if "/0" <= path < "0" or "/" <= path < "//" else "/" + path.lstrip("/")


def decoded_path(environ: WSGIEnvironment) -> str:
    """The percent-decoded request path as text (PEP 3333 gives it as latin-1), as the router sees it.

    Bytes that are not UTF-8 read as U+FFFD, as the router reads them: two paths
    the app cannot tell apart are the same path to every layer (a cache key, a rule).

    Leading slashes count as one, as werkzeug's router counts them (``//auth/login``
    routes to ``/auth/login``): Waitress merges them itself, other servers
    (gunicorn) pass them on, and a rule written for ``/auth/*`` must match there too.
    A path without a leading slash is rooted, as the router roots it (:func:`rooted_path`).

    Kept in environ with the ``PATH_INFO`` it was decoded from: a layer that
    rewrites ``PATH_INFO`` (versioning, a layer of your own) need not drop it,
    the next reader decodes the new path.
    """
    raw: str = environ.get("PATH_INFO", "")
    cached: tuple[str, str] | None = environ.get(PATH)
    if cached is not None and cached[0] == raw:
        return cached[1]
    text = rooted_path(raw)
    try:  # bytes that are not UTF-8 become U+FFFD, as werkzeug's router decodes them
        path = text.encode("latin-1").decode("utf-8", "replace")
    except UnicodeError:  # not latin-1 text (against PEP 3333): taken as it is
        path = text
    environ[PATH] = (raw, path)
    return path


PathRewrites = tuple[Callable[["WSGIEnvironment"], "dict[str, Any] | None"], ...]


def rewrites_inside(context: Context) -> PathRewrites:
    """The path rewrites of the layers inside the one being built, outermost first (see :func:`routed_path`)."""
    return tuple(reversed(context.path_rewrites))


def routed_path(environ: WSGIEnvironment, rewrites: PathRewrites) -> str:
    """The decoded path the app will route, after the ``rewrites`` of the layers inside (versioning's).

    A layer that matches rules on paths (auth, ratelimit) and sits outside a
    layer that rewrites them (``/api/search`` to ``/api/v1/search``) sees the
    request path; this is the path the rewritten request reaches, found with
    those layers' ``preview_environ``.  Rules must hold for both spellings, or
    a rule written for the one the app routes is stepped around with the other.
    """
    path = decoded_path(environ)
    view: WSGIEnvironment | None = None
    for preview in rewrites:
        changes = preview(view or environ)
        if changes is None:  # that layer refuses the request: it never reaches a rewritten path
            break
        if "PATH_INFO" in changes:
            view = {**(view or environ), **changes}
    return path if view is None else decoded_path(view)


def cookies(environ: WSGIEnvironment) -> Mapping[str, str]:
    """The request's cookies, parsed once per request and kept in environ.

    Kept with the ``HTTP_COOKIE`` they were parsed from, as :func:`decoded_path`
    keeps its path: a layer that changes the header (drops it, sets it from
    another one) need not drop the parsed cookies, the next reader parses the new
    header; a read ahead made before that change is for another key and goes unused.
    """
    header = environ.get("HTTP_COOKIE")
    cached: tuple[str | None, Mapping[str, str]] | None = environ.get(COOKIES)
    if cached is not None and (cached[0] is header or cached[0] == header):
        return cached[1]
    jar: Mapping[str, str]
    try:
        jar = parse_cookie(header) if header else {}
    except UnicodeError:  # not UTF-8: keep what decodes, replace the rest
        fixed = str(header).encode("latin-1", "replace").decode("utf-8", "replace").encode().decode("latin-1")
        jar = parse_cookie(fixed)
    environ[COOKIES] = (header, jar)
    return jar


#: The longest text an IP address is written in: an IPv6 address in full (IPv4-mapped, 45 characters) with a
#: zone (``%`` and an interface name, at most 15), in brackets, with a port.  Longer text is no address a
#: client has, only what a client wrote (a proxy or Waitress's ``trusted_proxy`` passes a forwarded
#: header's text on as it came): it is neither parsed into a cache nor kept as a key as it came.
LONGEST_ADDRESS = 72


def client_key(ip: str, prefix: int = 64) -> str:
    """The client at ``ip`` (from :func:`client_ip`) as per-client counters key it, at most 72 characters.

    An IPv6 address counts by its /prefix network (see :func:`ipv6_network`); text longer than
    any address (see :data:`LONGEST_ADDRESS`) by a digest of it: still one key per text, but a
    table of 100,000 clients then holds 100,000 short keys, not what each request's header held.
    """
    if len(ip) > LONGEST_ADDRESS:
        return "#" + hashlib.blake2b(ip.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return ipv6_network(ip, prefix) if ":" in ip else ip


@lru_cache(maxsize=8192)
def ipv6_network(ip: str, prefix: int = 64) -> str:
    """The /prefix network of an IPv6 address (IPv4-mapped ones count as IPv4): one client, for counting.

    A host on one network (a /64 is a home or a server) picks any address in it at will.  A 6to4
    address (``2002::/16``) and a Teredo one (``2001::/32``) count as the IPv4 address they are built
    on: 6to4 gives that address a /48, 65,536 /64s, and a Teredo client gets a /64 per flags it picks
    (and per server), its own address being the last 32 bits, obfuscated.
    """
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        return str(addr.sixtofour)
    if addr.teredo is not None:
        return str(addr.teredo[1])
    return str(ipaddress.IPv6Network((int(addr) >> (128 - prefix) << (128 - prefix), prefix)))


def client_ip(environ: WSGIEnvironment) -> str:
    """The client address a trusted party established (proxy layer or Waitress)."""
    ip: str | None = environ.get(CLIENT_IP)
    if ip is None:
        ip = environ.get("REMOTE_ADDR") or ""
        if ip[:1] == "[":  # Waitress's trusted_proxy passes "[2001:db8::1]:40001" on as it came
            end = ip.find("]")
            ip = ip[1:end] if end > 0 else ip
        else:
            port = environ.get("REMOTE_PORT")
            if type(port) is str and port and not port.isdigit():  # (werkzeug's own server gives an int)
                ip = _rejoined(ip, port)
        environ[CLIENT_IP] = ip
    return ip


def _rejoined(ip: str, port: str) -> str:
    """The address Waitress's trusted_proxy split as if it ended in a port: ``::ffff:192.0.2.7`` came as
    REMOTE_ADDR ``::ffff`` and REMOTE_PORT ``192.0.2.7`` (every IPv4-mapped client one address, one
    rate-limit bucket).  A real port is digits only."""
    joined = f"{ip}:{port}"
    try:
        ipaddress.IPv6Address(joined)
    except ValueError:
        return ip
    return joined


#: Origins no policy means to allow: a regex that matches one of them matches anyone's site
#: (names without a hyphen, under the common top-level domains, for patterns like [a-z]+\.com).
STRANGER_ORIGINS = tuple(f"{scheme}://{host}" for scheme in ("https", "http") for host in (
    "wsgistack-probe.invalid", "wsgistack-probe.invalid:8443", "wsgistackprobe.com", "wsgistackprobe.net",
    "wsgistackprobe.org", "wsgistackprobe.io", "wsgistackprobe.co.uk", "wsgistackprobe.example"))


def wildcard_stranger(scheme: str, host: str, port: int | None) -> str | None:
    """An origin of someone else's site that the wildcard entry ``scheme://host:port`` matches, if any.

    ``https://*.co.uk`` is not a bare top-level domain, but a suffix anyone registers names under
    all the same: it matches ``https://wsgistackprobe.co.uk``, as the regex ``https://.*\\.co\\.uk`` does.
    """
    if not host.startswith("*."):
        return None
    for origin in STRANGER_ORIGINS:
        stranger = parse_origin(origin)
        if stranger is not None and stranger[2] is None and stranger[1].endswith(host[1:]):
            return serialise_origin(scheme, stranger[1], port)
    return None


def header_list(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
    """Normalise headers given as a mapping or pairs into a list of pairs."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]


def add_vary(headers: Headers, *fields: str) -> None:
    """Merge ``fields`` into the ``Vary`` header in place, without duplicates."""
    for i, (name, value) in enumerate(headers):
        if len(name) == 4 and name.lower() == "vary":
            lowered = value.lower()
            if len(fields) == 1 and "*" not in lowered and fields[0].lower() not in lowered:
                # (every response comes here: a name that is not even a substring is missing)
                headers[i] = (name, f"{value}, {fields[0]}" if value.strip() else fields[0])
                return
            present = {v.strip() for v in lowered.split(",")}
            if "*" in present:
                return
            extra = [f for f in fields if f.lower() not in present]
            if extra:
                headers[i] = (name, ", ".join([value, *extra]) if value.strip() else ", ".join(extra))
            return
    headers.append(("Vary", ", ".join(fields)))


def wrap_start_response(
    start_response: StartResponse,
    edit: Callable[[str, Headers], None],
) -> StartResponse:
    """Return a ``start_response`` that lets ``edit(status, headers)`` change headers in place.

    This is how layers add response headers without buffering the body.
    """

    def wrapped(status: str, headers: Headers, exc_info: Any = None) -> Callable[[bytes], object]:
        headers = list(headers)
        edit(status, headers)
        return start_response(status, headers, exc_info)

    return wrapped


def call_with_headers(app: WSGIApplication, environ: WSGIEnvironment, start_response: StartResponse,
                      edit: Callable[[str, Headers], None],
                      extra: Iterable[tuple[str, str]] | Callable[[BaseException], Iterable[tuple[str, str]]],
                      ) -> Iterable[bytes]:
    """Call ``app`` with a ``start_response`` whose headers ``edit(status, headers)`` changes in place; what
    it raises before the response starts, from the call or from a generator app's body before its first
    chunk, carries ``extra`` to the ``errors`` layer (:func:`decorate_error`), as the response would have.
    ``extra`` may be a function of the exception, for headers that depend on it (on the response it carries)."""
    started = False

    def start(status: str, headers: Headers, exc_info: Any = None) -> Callable[[bytes], object]:
        nonlocal started
        started = True
        headers = list(headers)
        edit(status, headers)
        return start_response(status, headers, exc_info)

    try:
        body = app(environ, start)
    except Exception as exc:
        _carry(exc, extra)
        raise
    if started:
        return body
    # A generator app starts its response on the first next(); errors takes that chunk itself and
    # renders what it raises, which must carry these headers as a refusal from the call does.
    return UnstartedBody(body, lambda: started, lambda exc: _carry(exc, extra))


def _carry(exc: BaseException,
           extra: Iterable[tuple[str, str]] | Callable[[BaseException], Iterable[tuple[str, str]]]) -> None:
    """:func:`decorate_error` with ``extra``, or with what ``extra(exc)`` gives (see :func:`call_with_headers`)."""
    decorate_error(exc, extra(exc) if callable(extra) else extra)


class PrimedBody:
    """A response body whose first chunk was taken already (to see the response start), then the rest.

    A generator app (PEP 3333 allows it) calls ``start_response`` on its body's
    first iteration: taking that chunk within a layer's call makes what it
    raises there, before anything was sent, a refusal from the call.  If taking
    it fails, the body is closed (the server never sees it) and the error goes on.
    """

    __slots__ = ("_body", "_first", "_rest")

    def __init__(self, body: Iterable[bytes]) -> None:
        self._body = body
        self._rest = iter(body)
        try:
            self._first = [next(self._rest)]
        except StopIteration:
            self._first = []
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[bytes]:
        yield from self._first
        yield from self._rest

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


class UnstartedBody:
    """The body of an app that returned without starting its response (a generator app starts it
    on its first iteration, PEP 3333): what it raises before ``started()`` gets ``decorate(exc)``,
    as what the call raises does in the layer that wraps it (``decorate_error`` with its headers).

    ``errors`` takes that first chunk within its own call and renders what it raises, so a refusal
    there carries the headers of every layer that returned such a body.
    """

    __slots__ = ("_body", "_decorate", "_started")

    def __init__(self, body: Iterable[bytes], started: Callable[[], bool],
                 decorate: Callable[[BaseException], None]) -> None:
        self._body, self._started, self._decorate = body, started, decorate

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._body)
        while not self._started():
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except Exception as exc:
                if not self._started():
                    self._decorate(exc)
                raise
            yield chunk
        yield from chunks

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def set_cookie_header(name: str, value: str, **attrs: Any) -> str:
    """Render one ``Set-Cookie`` value; ``attrs`` use werkzeug's ``dump_cookie`` names."""
    from werkzeug.http import dump_cookie

    return dump_cookie(name, value, **attrs)

