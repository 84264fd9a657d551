"""API versioning: find the version a request asks for, route it, and flag deprecated ones.

Under ``prefix`` (``/api``) the version comes from the URL (``/api/v2/search``),
from a header (``X-API-Version: v2``) or from the ``Accept`` media type
(``application/vnd.wsgistack.v2+json``).  An unversioned path is rewritten to
the chosen version (``/api/search`` becomes ``/api/v2/search``, the original
kept in ``environ["wsgistack.versioning.orig_path"]``), so the router only
knows versioned routes.  The version goes into ``environ["wsgistack.api_version"]``,
on which the response cache keys.  Deprecated versions get ``Deprecation``
(RFC 9745), ``Sunset`` (RFC 8594) and ``Link`` headers, and their use is
counted per client.

Versions are compared in one normal form, in the config as in requests: lower
case, no surrounding spaces, and a bare number N is vN (``supported: [1, V2]``
means ``[v1, v2]``).  In the URL only case is ignored: ``/api/V2/x`` is v2 and
is rewritten to ``/api/v2/x``, while ``/api/2/x`` names no version.

Responses vary (``Vary``) on the request headers the choice depended on: the
sources ranked above the one that decided, which named no version, and that
source itself when it is a header.

Rules: a URL and a header that disagree give 400, never a silent choice.
``Accept`` is negotiation, so a supported vendor type that disagrees with the
URL or the header yields to whichever source ``precedence`` names first (when
``accept`` comes first, the path is rewritten to its version).  Unsupported
versions give 404 in the URL (this layer answers, with the supported list,
instead of rewriting ``/api/v9/x`` to ``/api/v1/v9/x``), 400 in the header
and 406 in ``Accept`` (only when no vendor type it lists is supported).

Do not use it when the app negotiates versions itself, or for paths outside
one prefix (scope a second entry with ``paths``).
"""

from __future__ import annotations

import calendar
import re
import threading
import time
from collections import OrderedDict
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from werkzeug.exceptions import HTTPException
from werkzeug.http import http_date, parse_accept_header

from .base import (
    API_VERSION,
    IDENTITY,
    ORIG_PATH,
    VERSIONS,
    Context,
    Headers,
    LayerOptions,
    add_vary,
    client_ip,
    client_key,
    decorate_error,
    escape_control,
    header_name,
    note,
    refuse,
    rooted_path,
    wrap_start_response,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ORIG_PATH", "SOURCE", "VersioningMiddleware"]

SOURCE = "wsgistack.versioning.source"
# A URL segment shaped like a version is never treated as a resource name.
_SHAPE = re.compile(r"[vV]\d+(?:\.\d+)*")
#: type "/" subtype, both tokens (RFC 9110 §8.3.1), lower case as compared.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
Source = Literal["url", "header", "accept"]


def _unix(moment: date | datetime) -> int:
    """Seconds since the epoch; dates are midnight UTC, naive datetimes are UTC."""
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    if moment.tzinfo is not None:
        return int(moment.timestamp())
    return calendar.timegm(moment.timetuple())


def _normal(value: str) -> str:
    value = value.strip().lower()
    return f"v{value}" if value.isdigit() else value


def _normal_option(value: object) -> object:
    """A version named in the config, in the form requests are compared in (YAML gives 2 as a number)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"v{value}"
    return _normal(value) if isinstance(value, str) else value


#: What may stand between ``<`` and ``>`` in a Link header: visible ASCII but space, ``"``, ``<``, ``>``.
_URI_REFERENCE = re.compile(r'[!#-;=?-~]+')


class Deprecated(LayerOptions):
    """When a version was deprecated, when it goes away, and where to read about it."""

    deprecation: datetime | date
    sunset: datetime | date | None = None
    link: str | None = None
    successor: str | None = None

    @field_validator("link", "successor")
    @classmethod
    def _uri_reference(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Sent as ``Link: <value>``: a URI (RFC 8288 §3), so visible ASCII with no space, quote or angle bracket."""
        if value is not None and not _URI_REFERENCE.fullmatch(value):
            raise ValueError(f"{info.field_name} is sent in a Link header as <{info.field_name}>: write a URL of "
                             "visible ASCII characters, without spaces, quotes or angle brackets (percent-encode "
                             "the others)")
        return value

    @model_validator(mode="after")
    def _sunset_after(self) -> Deprecated:
        if self.sunset is not None and _unix(self.sunset) < _unix(self.deprecation):
            raise ValueError("sunset must not be earlier than deprecation")
        return self

    def headers(self) -> Headers:
        """The response headers that announce this deprecation."""
        out = [("Deprecation", f"@{_unix(self.deprecation)}")]
        if self.sunset is not None:
            out.append(("Sunset", http_date(_unix(self.sunset))))
        if self.link:
            out.append(("Link", f'<{self.link}>; rel="deprecation"'))
        if self.successor:
            out.append(("Link", f'<{self.successor}>; rel="successor-version"'))
        return out


class VersioningOptions(LayerOptions):
    """Options of the ``versioning`` layer (see :class:`VersioningMiddleware`)."""

    supported: tuple[str, ...] = ("v1",)
    default: str | None = None
    precedence: tuple[Source, ...] = ("url", "header", "accept")
    header: str = "X-API-Version"
    media_type_prefix: str = "application/vnd.wsgistack."
    prefix: str = "/api"
    deprecated: dict[str, Deprecated] = Field(default_factory=dict)
    report_interval: float = Field(3600.0, ge=0)
    max_clients: int = Field(10_000, ge=1)

    @field_validator("supported", mode="before")
    @classmethod
    def _normal_supported(cls, value: object) -> object:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str | int) for v in value):
            return value  # the field's own validation names what is wrong
        seen: dict[object, object] = {}
        for written in value:
            version = _normal_option(written)
            if version in seen:
                raise ValueError(f"supported names {version!r} twice ({seen[version]!r} and {written!r}); case, "
                                 "surrounding spaces and a bare number (2 for v2) do not make versions differ")
            seen[version] = written
        return list(seen)

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        return header_name(value)

    @field_validator("default", mode="before")
    @classmethod
    def _normal_default(cls, value: object) -> object:
        return _normal_option(value)

    @field_validator("deprecated", mode="before")
    @classmethod
    def _normal_deprecated(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        normal = {_normal_option(k): v for k, v in value.items()}
        if len(normal) != len(value):
            raise ValueError(f"deprecated names a version twice ({', '.join(repr(k) for k in value)}); case, "
                             "surrounding spaces and a bare number (2 for v2) do not make versions differ")
        return normal

    @model_validator(mode="after")
    def _can_be_right(self) -> VersioningOptions:
        if not self.supported:
            raise ValueError("supported must name at least one version, such as [v1, v2]")
        for version in self.supported:
            if not version or "/" in version:
                raise ValueError(f"supported versions must be single path segments (got {version!r})")
        known = ", ".join(self.supported)
        if self.default is not None and self.default not in self.supported:
            raise ValueError(f"default {self.default!r} is not in supported ({known})")
        for version in self.deprecated:
            if version not in self.supported:
                raise ValueError(f"deprecated names {version!r}, which is not in supported ({known})")
        if "url" not in self.precedence or len(set(self.precedence)) != len(self.precedence):
            raise ValueError("precedence must name url once, and header and accept at most once each")
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix must start with '/' and not end with one (got {self.prefix!r})")
        return self


#: Accept types that take any version's JSON: with one of them acceptable, an unsupported vendor
#: version in the same header falls back to the other sources (or the default) instead of 406.
_PLAIN_TYPES = frozenset({"application/json", "application/*", "*/*"})

_REFUSED = object()  # a preview's memo: _choose refused the request
#: A weight whose qvalue ends with its dot (``q=0.``, ``q=1.``): RFC 9110 §12.4.2 allows it, werkzeug's
#: parser drops the entry; the same weight without the dot is read.
_BARE_DOT_Q = re.compile(r"(;[ \t]*[qQ]=[01])\.(?=[ \t]*(?:[;,]|\Z))")
#: A ``rel`` parameter of a Link field value: a quoted list of relation types, or one bare (RFC 8288 §3.3).
_REL = re.compile(r'\brel\s*=\s*(?:"([^"]*)"|([^\s;,"]+))', re.IGNORECASE)


def _add_notice(headers: Headers, notice: Iterable[tuple[str, str]]) -> None:
    """Add a deprecated version's headers to an answer, keeping those the app gave.

    ``Deprecation`` (RFC 9745) and ``Sunset`` (RFC 8594) hold one value each: a
    second line would make the field invalid, and clients ignore it whole; the
    app's, which knows the endpoint, wins.  ``Link`` may be repeated: each of
    the layer's relations is added unless a link of that relation is there.
    """
    for name, value in notice:
        lower = name.lower()
        if lower == "link":
            ours = _rels(value)
            if any(n.lower() == "link" and ours & _rels(v) for n, v in headers):
                continue
        elif any(n.lower() == lower for n, _ in headers):
            continue
        headers.append((name, value))


def _rels(link: str) -> set[str]:
    """The relation types of the links in a ``Link`` field value."""
    return {rel for quoted, bare in _REL.findall(link) for rel in (quoted or bare).lower().split()}


class VersioningMiddleware:
    """Choose the API version of each request under ``prefix`` and route it there.

    Options:
      ``supported``: the versions served (``[v1]``); the first is the default default.  Versions
      here, in ``default`` and in ``deprecated`` are normalised as request values are (``V2``, ``2``
      and `` v2 `` are ``v2``).
      ``default``: the version of a request that names none (``None``: the first supported).
      ``precedence``: order of sources (``[url, header, accept]``); leave out header or accept to
      ignore it.  URL and header must agree whatever the order.
      ``header``: the version request header (``X-API-Version``; ``v2`` and ``2`` both mean v2).
      ``media_type_prefix``: vendor media type before the version (``application/vnd.wsgistack.``).
      ``prefix``: the versioned path prefix (``/api``).
      ``deprecated``: ``{v1: {deprecation: 2025-01-01, sunset: 2025-12-31, link: URL,
      successor: URL}}``; ``link`` gives ``rel="deprecation"``, ``successor`` ``rel="successor-version"``.
      ``report_interval``: seconds between log lines about one client's deprecated use (3600).
      ``max_clients``: how many clients the deprecated-use counter remembers (10000).

    Usage::

        opts = VersioningMiddleware.Options(supported=["v1", "v2"], default="v2")
        app = VersioningMiddleware(app, opts, Context())
    """

    #: Its ``preview_environ`` shows the path it routes to: auth and rate-limit rules outside match it too.
    rewrites_path = True
    Options = VersioningOptions

    def __init__(self, app: WSGIApplication, options: VersioningOptions, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        self.logger = context.logger.getChild("versioning")
        self.supported = frozenset(options.supported)
        self.listed = list(options.supported)
        self.default = options.default or options.supported[0]
        self.prefix = options.prefix
        self.prefix_slash = options.prefix + "/"
        self.versions = (self.supported, len(self.prefix_slash))
        self.header_env = "HTTP_" + options.header.upper().replace("-", "_")
        self.media_prefix = options.media_type_prefix.lower()
        self.precedence = options.precedence
        self.use_header = "header" in options.precedence
        self.use_accept = "accept" in options.precedence
        self._accept_over_url = self.use_accept and options.precedence.index("accept") < options.precedence.index("url")
        # The request headers a choice depended on: those of the sources ranked above the
        # deciding one (each named no version, or the deciding one would not have decided)
        # and its own.  A caller that stored a response without them could serve it to a
        # request that would have been answered with another version.
        names = {"url": None, "header": options.header, "accept": "Accept"}
        ranked = [names[s] for s in options.precedence]
        self.vary: dict[str, list[str]] = {
            source: [n for n in ranked[: i + 1] if n is not None] for i, source in enumerate(options.precedence)}
        self.vary["default"] = [n for n in ranked if n is not None]
        self.notices = {v: d.headers() for v, d in options.deprecated.items()}
        self._refusal_vary = [("Vary", ", ".join(self.vary["default"]))] if self.vary["default"] else []
        self._counts: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._previewed = f"wsgistack.versioning.previewed.{id(self)}"  # see preview_environ
        self._lock = threading.Lock()

    def _choose(self, environ: WSGIEnvironment) -> tuple[str, str, str | None] | None:
        """``(version, source, rewritten path or None)`` for a request under the prefix, else None.

        Refuses (raises) a version that is not supported or sources that disagree.
        """
        path: str = environ.get("PATH_INFO", "")
        path = rooted_path(path)  # gunicorn passes leading slashes on, Waitress a path without one
        if path != self.prefix and not path.startswith(self.prefix_slash):
            return None
        rest = path[len(self.prefix_slash):]
        segment = rest.partition("/")[0]
        url = header = accept = None
        if segment in self.supported:
            url = segment
        elif (folded := segment.lower()) in self.supported:  # /api/V2/x: rewritten to /api/v2/x
            url = folded
        elif _SHAPE.fullmatch(segment):
            raise self._unsupported(404, f"API version {segment!r} in the URL", segment, "url")
        if self.use_header:
            asked = environ.get(self.header_env)
            if asked:
                header = self._from_header(asked)
        if self.use_accept:
            asked = environ.get("HTTP_ACCEPT")
            if asked and self.media_prefix in asked.lower():
                accept = self._from_accept(asked)
        if url is not None and header is not None and url != header:
            raise refuse(400, f"The URL asks for API version {url} but the {self.options.header} header asks "
                              f"for {header}; send one, or make them agree.",
                         details={"url": url, "header": header, "supported": self.listed},
                         headers=self._refusal_vary)
        if header is None and accept is None:  # the usual case: the URL's version, or none at all
            source = "url" if url is not None else "default"
            version = url or self.default
        else:
            found = {"url": url, "header": header, "accept": accept}
            source = next((s for s in self.precedence if found[s] is not None), "default")
            version = found.get(source) or self.default
        if version == segment:
            return version, source, None
        # No version in the path, Accept outranks the URL's, or its case differs.
        tail = rest[len(segment):] if url else ("/" + rest if path != self.prefix else "")
        return version, source, f"{self.prefix_slash}{version}{tail}"

    def preview_environ(self, environ: WSGIEnvironment) -> dict[str, Any] | None:
        """What this layer will set in ``environ`` (for reads ahead, see ``ReadAhead``); None when it refuses.

        The layers outside ask more than once per request (the rate limiter's read
        ahead, the auth and rate-limit rules): the answer is kept in ``environ``
        for as long as the path and the version headers are the very same.
        """
        path, header, accept = environ.get("PATH_INFO"), environ.get(self.header_env), environ.get("HTTP_ACCEPT")
        seen = environ.get(self._previewed)
        if seen is not None and seen[0] is path and seen[1] is header and seen[2] is accept:
            answer: dict[str, Any] | None = seen[3]
            return answer
        chosen: object
        try:
            chosen = self._choose(environ)
        except HTTPException:
            chosen, answer = _REFUSED, None
        else:
            if chosen is None:
                answer = {}
            elif chosen[2] is None:
                answer = {API_VERSION: chosen[0]}
            else:
                answer = {API_VERSION: chosen[0], "PATH_INFO": chosen[2]}
        environ[self._previewed] = (path, header, accept, answer, chosen)
        return answer

    def alternative_paths(self, environ: WSGIEnvironment) -> tuple[str, ...]:
        """Every ``PATH_INFO`` a request for this URL may be routed to, whatever version headers it sends.

        For a CORS preflight, which carries none of them (a vendor ``Accept`` needs no preflight):
        the real request may name any supported version.  Empty when the URL's own version holds
        (a header that disagrees is refused) or the path is not under the prefix.
        """
        if not (self.use_header or self.use_accept):
            return ()
        path = rooted_path(environ.get("PATH_INFO", ""))
        if path != self.prefix and not path.startswith(self.prefix_slash):
            return ()
        rest = path[len(self.prefix_slash):]
        segment = rest.partition("/")[0]
        named = segment in self.supported or segment.lower() in self.supported
        if named and not self._accept_over_url:
            return ()
        tail = rest[len(segment):] if named else ("/" + rest if path != self.prefix else "")
        return tuple(f"{self.prefix_slash}{version}{tail}" for version in self.listed)

    def _chosen(self, environ: WSGIEnvironment) -> tuple[str, str, str | None] | None:
        """:meth:`_choose`, or what a preview of this very request worked out already."""
        seen = environ.get(self._previewed)
        if seen is not None and seen[4] is not _REFUSED and seen[0] is environ.get("PATH_INFO") \
                and seen[1] is environ.get(self.header_env) and seen[2] is environ.get("HTTP_ACCEPT"):
            chosen: tuple[str, str, str | None] | None = seen[4]
            return chosen
        return self._choose(environ)  # a refusal is raised afresh

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        chosen = self._chosen(environ)
        if chosen is None:
            return self.app(environ, start_response)
        version, source, rewritten = chosen
        environ[API_VERSION] = version
        environ[SOURCE] = source
        if rewritten is not None:
            environ[ORIG_PATH] = environ.get("PATH_INFO", "")
            environ["PATH_INFO"] = rewritten
        note(environ, "versioning", f"{version} from {source}")
        notice = self.notices.get(version)
        vary = self.vary[source]
        if notice is not None:
            self._count(environ, version)
        elif not vary:  # no request header could have changed the choice
            return self.app(environ, start_response)
        if vary:  # the URI has an answer per version: a write to it drops them all (the cache reads this)
            environ[VERSIONS] = self.versions
        extra = notice or ()

        def edit(status: str, headers: Headers) -> None:
            if extra:
                _add_notice(headers, extra)
            if vary:
                add_vary(headers, *vary)

        try:
            return self.app(environ, wrap_start_response(start_response, edit))
        except Exception as exc:  # the errors layer renders it (an HTTPException or a 500) with these headers
            decorate_error(exc, ())
            attached = getattr(exc, "wsgistack_headers", None)
            if attached is not None:
                _add_notice(attached, extra)
                if vary:
                    add_vary(attached, *vary)
            own = getattr(exc, "response", None) if isinstance(exc, HTTPException) else None
            if own is not None and hasattr(own, "get_data"):
                # abort(Response(...)) is sent as it is, the attached headers only where it has none of
                # that name: its own Vary or Link would drop ours whole.  Edited in place, as a response.
                headers = own.headers.to_wsgi_list()
                edit("", headers)
                own.headers.clear()
                own.headers.extend(headers)
            raise

    def _unsupported(self, code: int, what: str, asked: str, source: str) -> HTTPException:
        # A refusal decided by a request header varies on the headers this layer reads, as its answers do.
        return refuse(code, f"{what} is not supported (supported: {', '.join(self.listed)}).",
                      details={"version": asked, "source": source, "supported": self.listed},
                      headers=self._refusal_vary if source != "url" else ())

    def _from_header(self, value: str) -> str:
        version = _normal(value)
        if version not in self.supported:
            raise self._unsupported(400, f"API version {version[:40]!r} from the {self.options.header} "
                                         "header", version[:40], "header")  # its normal form, as Accept's
        return version

    def _from_accept(self, value: str) -> str | None:
        """The version an ``Accept`` naming the vendor type asks for; None when it leaves it to the next source."""
        prefix = self.media_prefix
        entries = [(media_type.partition(";")[0].strip().lower(), quality)
                   for media_type, quality in parse_accept_header(_BARE_DOT_Q.sub(r"\1", value))]
        # Vendor types the parser kept (q=0 too); werkzeug before 3.1.7 keeps a stray quote in the type:
        # not a media type, so unread.
        read = sum(media_type.startswith(prefix) and _MEDIA_TYPE.fullmatch(media_type) is not None
                   for media_type, _ in entries)
        written = sum(entry.partition(";")[0].strip().lower().startswith(prefix) for entry in value.split(","))
        if read < written:
            # An entry of the header names the vendor type, yet the parser kept none of it: werkzeug drops
            # an entry whose q is not a number from 0 to 1, or the whole header when it cannot be split.
            # The client asked for a version; serving another one (the default, or the next vendor type it
            # listed) would answer another question.  (The type named in a parameter,
            # profile="…vnd.wsgistack.v2+json", asks for nothing.)
            raise refuse(400, f"The Accept header names the media type {self.options.media_type_prefix}… but "
                              "cannot be read (a q value must be a number from 0 to 1, and quotes must pair); "
                              f"send, for example, {self.options.media_type_prefix}{self.listed[-1]}+json.",
                         details={"source": "accept", "supported": self.listed}, headers=self._refusal_vary)
        asked: list[str] = []
        plain = False  # a type any version is served as is acceptable too
        for media_type, quality in entries:
            if not media_type.startswith(prefix):
                plain = plain or (quality > 0 and media_type in _PLAIN_TYPES)
                continue
            if quality <= 0 or not _MEDIA_TYPE.fullmatch(media_type):
                continue
            version = _normal(media_type[len(prefix):].partition("+")[0])
            if version in self.supported:
                return version
            asked.append(version)
        if not asked or plain:  # RFC 9110 12.5.1: serve what else the client accepts
            return None
        raise self._unsupported(406, f"API version {', '.join(asked)[:60]!r} in the Accept header",
                                ", ".join(asked)[:60], "accept")

    def _count(self, environ: WSGIEnvironment, version: str) -> None:
        identity = environ.get(IDENTITY)
        # An IPv6 host picks any address of its /64 at will: one client, as the rate limiter counts it.
        client = str(identity.subject) if identity is not None else client_key(client_ip(environ))
        self.context.emit("version.deprecated", version=version, client=client)
        now = time.monotonic()
        with self._lock:
            entry = self._counts.pop((client, version), None) or [0, -1e18]
            entry[0] += 1
            self._counts[(client, version)] = entry
            if len(self._counts) > self.options.max_clients:
                self._counts.popitem(last=False)
            due = now - entry[1] >= self.options.report_interval
            if due:
                count, entry[0], entry[1] = entry[0], 0, now
        if due:
            self.logger.warning("client %s used deprecated API version %s (%d requests since the last report)",
                                escape_control(client), version, int(count))
