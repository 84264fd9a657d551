"""An operator page at ``/_stack``: the live pipeline, its numbers and its stores.

The page draws the pipeline the builder folded (outermost first, the app
last) with each layer's options, secrets masked, and beside each layer how
many requests entered it and how long they spent in the layer itself.  It
shows the cache hit ratio, rate-limit rejects, auth failures, store errors
and deprecated-version requests (from ``context.listeners``), each store's
health, the config generation and the last reload.  A small script polls
``<path>/data.json`` and updates the numbers in place, without reloading.

Everything is answered here; the inner layers and the app are never
entered.  The page needs no external asset: its script and style are served
from ``<path>/app.js`` and ``<path>/app.css`` so that the page's own
``Content-Security-Policy`` can stay at ``'self'``.

Numbers are per process and start at zero when the pipeline is (re)built.
Per-layer times cover the layers inside this one (those an outer layer times
too when it starts the timing list, such as ``metrics`` with
``layer_timing``); the innermost layer's time includes the app unless the
builder times the app as ``app``.  Do not use it as a public status page:
it shows the configuration; keep it on loopback (the default) or behind
``roles``, and prefer ``metrics`` for alerting and history.

The page answers its own origin only: a request that another site's page
makes (``Sec-Fetch-Site`` ``cross-site`` or ``same-site``, or an ``Origin``
other than the request's own) gets 403, also inside ``cors``; and a Host
that is neither an IP address, ``localhost`` nor one of ``hosts`` gets 403,
so that a DNS-rebinding site cannot read the page through the operator's
browser.  ``metrics`` uses the same checks (:class:`HostCheck`,
:func:`cross_origin`).
"""

from __future__ import annotations

import ast
import collections
import hashlib
import html
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from stores.base import mask_secrets, secret_value

from .base import (
    HOST_PORT,
    IDENTITY,
    ROUTE,
    TIMINGS,
    TOKEN,
    Context,
    HostList,
    Identity,
    LayerOptions,
    Listener,
    Networks,
    UnstartedBody,
    address_in,
    host_name,
    host_names,
    ip_literal,
    mask_url_passwords,
    networks,
    normalise_origin,
    own_origin,
    refusal_status,
    refuse,
    rooted_path,
    shown,
)
from .health import STORE_CHECK_SECONDS, StoreChecks

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["HostCheck", "HostNames", "OperatorPageMiddleware", "cross_origin", "from_browser"]

MASK = "•••"
#: an option (or nested key, or URL query parameter) whose name contains one of these is masked
SECRET_WORDS = ("secret", "key", "password", "passwd", "token", "credential", "authorization")  # in free text
_EVENTS = ("cache.hit", "cache.miss", "cache.stale", "cache.bypass", "ratelimit.pass", "ratelimit.reject",
           "ratelimit.shadow_reject", "auth.failure", "store.error", "version.deprecated")
_DETAIL = {"auth.failure": "reason", "store.error": "store", "version.deprecated": "version"}
_PAGES = ("/data.json", "/app.js", "/app.css")  # below the page's path
#: The built-in options that list header names, never (name, value) pairs: [X-Auth, X-Request-ID] is shown.
_HEADER_NAME_LISTS = frozenset({"expose_headers", "allow_headers", "key_headers"})
_OWN = frozenset(("", "/", *_PAGES))  # what the page answers: the rest of its path goes on to the app
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
           ("Referrer-Policy", "no-referrer"), ("Content-Security-Policy", _CSP)]
_NAMES = ("operator_page", "middleware.operator_page:OperatorPageMiddleware")
#: A header line or an environment entry: "Authorization: Bearer …", "DB_PASS=…".
_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)(\s*[:=]\s*)\S.*", re.DOTALL)
_LIMIT = 256  # distinct layer names and event details kept; more are folded into "other"
_PENDING = 64  # requests whose timings wait to be folded (until a look at the page, or 64 more requests)


# -- who may read it (the page and metrics) -------------------------------------
def _check_hosts(value: tuple[str, ...]) -> tuple[str, ...]:
    """``hosts`` entries as the check compares them: lowercase, no trailing dot."""
    return host_names(value, "hosts")


#: The ``hosts`` option of the page and of ``metrics``: names (``*.example.org`` for subdomains,
#: ``*`` for any) by which the page may be opened besides IP addresses and ``localhost``.
HostNames = Annotated[tuple[str, ...], AfterValidator(_check_hosts)]


class HostCheck:
    """Refuses a Host a DNS-rebinding page would send: one that is not an IP address, ``localhost`` or listed.

    A page the browser got from ``attacker.example``, whose name then resolves to
    this server, reads this server's answers as its own origin; its requests carry
    ``Host: attacker.example``.  An IP address or ``localhost`` cannot be such a
    name, so only other names need listing (``hosts``, as the proxy layer's
    ``allowed_hosts``: exact, ``*.example.org`` for subdomains, ``*`` for any).
    ``option`` names the option in the refusal (``operator_page.hosts``).
    """

    def __init__(self, hosts: tuple[str, ...], option: str, what: str) -> None:
        self.names = HostList(("localhost", *hosts))
        self.option, self.what = option, what

    def refusal(self, environ: WSGIEnvironment) -> str | None:
        """Why this request's Host may not open the page, or None when it may (or sent no Host: no browser)."""
        host = environ.get("HTTP_HOST")
        if not host or self.names.any:
            return None
        if not HOST_PORT.fullmatch(host):
            return f"The Host header {shown(host)} is not a host name."
        name = host_name(host)
        if self.names.allow(name) or ip_literal(name) is not None:
            return None
        return (f"Host {shown(name)} is not one of {self.option}: add it there to open {self.what} by this name "
                "(IP addresses and localhost need no entry); other names are refused so that a DNS-rebinding "
                "site cannot read it.")


def from_browser(environ: WSGIEnvironment) -> bool:
    """Whether a browser sent the request: fetch metadata, an ``Origin`` or a browser's ``User-Agent``.

    Browsers send ``Sec-Fetch-Site`` only to https and loopback addresses, and no
    ``Origin`` on a same-origin ``GET``, so the ``Mozilla/`` every browser's
    ``User-Agent`` starts with is what a DNS-rebinding page's ``fetch`` over http
    shows (Firefox lets a script replace it; Chromium and Safari do not).
    """
    return ("HTTP_SEC_FETCH_SITE" in environ or "HTTP_ORIGIN" in environ
            or str(environ.get("HTTP_USER_AGENT", "")).startswith("Mozilla/"))


def cross_origin(environ: WSGIEnvironment, what: str, navigable: bool) -> str | None:
    """Why another origin's page may not read this answer, or None when the request is not from one.

    ``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` (a bookmark, the
    address bar), or an ``Origin`` that is not the request's own (scheme and Host,
    default ports left out), is refused.  ``navigable``: a top-level navigation
    (a link on another site) may open it: another page cannot read that answer.
    """
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site is not None and (site := site.strip().lower()) not in ("same-origin", "none") and not (
            navigable and environ.get("HTTP_SEC_FETCH_MODE") == "navigate"
            and environ.get("HTTP_SEC_FETCH_DEST") == "document"):
        return f"{what} may not be read from another site's page (Sec-Fetch-Site: {shown(site)})."
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None:
        own = own_origin(environ)
        if normalise_origin(origin) != own:
            return f"{what} may not be read from another origin's page (Origin {shown(origin)} is not this one, {own})."
    return None


class OperatorPageMiddleware:
    """Serve the operator page, its JSON and assets at ``path``; time and count everything else.

    Options:
        ``path`` ("/_stack"): where the page lives; ``<path>/data.json`` is its data,
        ``<path>/app.js`` and ``<path>/app.css`` its script and style.
        ``allow_from`` (loopback): CIDRs that may see the page (403 for others); ``[]``
        allows every address and then needs ``roles``.
        ``roles`` (none): when set, ``wsgistack.identity`` must hold one of them (an
        ``auth`` layer outside this one sets it): no identity gives 401, other roles 403.
        ``hosts`` (none): the names, besides IP addresses and ``localhost``, the page may be
        opened by (``ops.example.org``, ``*.example.org``; ``*``: any); a request for
        another Host gets 403, as one from another origin's page does.
        ``refresh_seconds`` (2): how often the page polls its data.
        ``title`` ("wsgistack"): the page heading.

    Example::

        app = OperatorPageMiddleware(app, OperatorPageMiddleware.Options(roles=("admin",)),
                                     Context(stores={"shared": MemoryStore()}))
    """

    class Options(LayerOptions):
        path: str = "/_stack"
        allow_from: Networks = ("127.0.0.0/8", "::1/128")
        roles: tuple[str, ...] = ()
        hosts: HostNames = ()
        refresh_seconds: float = Field(default=2.0, ge=0.25, le=3600)
        title: str = Field(default="wsgistack", min_length=1, max_length=200)

        @field_validator("path")
        @classmethod
        def _path(cls, value: str) -> str:
            if not value.startswith("/"):
                raise ValueError(f"path must start with '/', got {value!r}")
            value = value.rstrip("/")
            if not value:
                raise ValueError("path may not be '/': the page would hide the whole app")
            return value


        @model_validator(mode="after")
        def _guarded(self) -> OperatorPageMiddleware.Options:
            if not self.allow_from and not self.roles:
                raise ValueError("allow_from may be empty only when roles is set; "
                                 "otherwise every client could read the configuration")
            if any(not role for role in self.roles):
                raise ValueError("roles may not contain an empty string")
            return self

    @staticmethod
    def wants_layer_timing(options: Any) -> bool:
        """Always: the page shows each layer's own time, so the builder times every layer."""
        return True

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app, self.options, self.context = app, options, context
        self.path, self.plen = options.path, len(options.path)
        self.networks = networks(options.allow_from)
        self.roles = frozenset(options.roles)
        self.hosts = HostCheck(options.hosts, "operator_page.hosts", "the operator page")
        self.started = time.time()
        self.checks = StoreChecks()
        self._lock = threading.Lock()
        self._layers: dict[str, list[float]] = {}  # name -> [count, own seconds]
        self._statuses: dict[str, int] = {}  # "2xx" -> count
        self._events: dict[str, int] = dict.fromkeys(_EVENTS, 0)
        self._details: dict[tuple[str, str], int] = {}
        self._masked: tuple[object, list[dict[str, Any]]] | None = None
        #: Timing lists of requests that left the page, folded later: the layers outside it (timed
        #: when metrics' layer_timing starts the list) add their entries only after it returned.
        self._pending: collections.deque[tuple[list[tuple[str, float]], int, object]] = collections.deque()
        context.listeners.append(Listener(self._on_event, self._bind_event))

    # -- the hot path ------------------------------------------------------
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO") or ""
        if not ("/0" <= path < "0" or "/" <= path < "//"):  # not as the router reads it (see rooted_path):
            path = rooted_path(path)  # leading slashes count as one (gunicorn passes them on), one is added
        # Only the page's own resources: other paths below it go on inside (the cache layer's
        # purge_path, /_stack/cache/purge in the shipped examples, lives there).
        if path.startswith(self.path) and ((rest := path[self.plen:]) in _OWN):
            return self._answer(environ, start_response, rest)
        timings = environ.get(TIMINGS)
        if timings is None:
            timings = environ[TIMINGS] = []
        mark, counted = len(timings), [""]  # the status class counted for this request, once there is one

        def counting(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            write = start_response(status, headers, exc_info)  # (one the server refuses is not what went out)
            status_class = status[:1] + "xx"
            if status_class != counted[0]:  # a status replaced before the body (exc_info) moves the count
                self._count(status_class, instead=counted[0])
                counted[0] = status_class
            return write

        def failed(exc: BaseException) -> None:  # raised before the response started: errors renders it
            if not counted[0]:
                counted[0] = f"{refusal_status(exc) // 100}xx"
                self._count(counted[0])

        try:
            result = self.app(environ, counting)
            # A generator app starts its response on its first chunk; what that raises is rendered too.
            return result if counted[0] else UnstartedBody(result, lambda: bool(counted[0]), failed)
        except Exception as exc:
            failed(exc)
            raise
        finally:
            pending = self._pending
            pending.append((timings, mark, environ.get(TIMINGS)))
            while len(pending) > _PENDING:  # requests that long ago have left the outer layers too
                try:
                    self._fold(*pending.popleft())
                except IndexError:  # a page's snapshot (or another request) took the rest meanwhile
                    break

    def _count(self, status_class: str, instead: str = "") -> None:
        with self._lock:
            self._statuses[status_class] = self._statuses.get(status_class, 0) + 1
            if instead:  # counted before as another class: the same request, its status replaced
                left = self._statuses[instead] - 1
                if left:
                    self._statuses[instead] = left
                else:
                    del self._statuses[instead]

    def _fold(self, timings: list[tuple[str, float]], mark: int, current: object) -> None:
        """Add each layer's own time: its inclusive time minus the next inner layer's."""
        entries = timings[mark:]
        if current is not timings and isinstance(current, list):  # an inner layer started its own list
            entries = current + entries
        if not entries:
            return
        inner = 0.0
        with self._lock:
            for name, inclusive in entries:
                own, inner = max(inclusive - inner, 0.0), inclusive
                stat = self._layers.get(name)
                if stat is None:
                    stat = self._layers.setdefault(name if len(self._layers) < _LIMIT else "other", [0, 0.0])
                stat[0] += 1
                stat[1] += own

    def _on_event(self, event: str, fields: dict[str, Any]) -> None:
        field = _DETAIL.get(event)
        self._count_event(event, None if field is None else str(fields.get(field, "unknown")))

    def _bind_event(self, event: str, fields: dict[str, Any]) -> Callable[[], None]:
        """The call that counts this one event (see ``Context.emitter``)."""
        field = _DETAIL.get(event)
        return partial(self._count_event, event, None if field is None else str(fields.get(field, "unknown")))

    def _count_event(self, event: str, detail: str | None) -> None:
        with self._lock:
            if event in self._events or len(self._events) < _LIMIT:
                self._events[event] = self._events.get(event, 0) + 1
            if detail is not None:
                key = (event, detail) if (event, detail) in self._details or len(self._details) < _LIMIT \
                    else (event, "other")
                self._details[key] = self._details.get(key, 0) + 1

    # -- the page ------------------------------------------------------------
    def _answer(self, environ: WSGIEnvironment, start_response: StartResponse, rest: str) -> Iterable[bytes]:
        environ[ROUTE] = self.path + (rest if rest in _PAGES else "")  # a fixed label for metrics
        self._check_access(environ, rest in ("", "/"))
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            exc = refuse(405, headers=[("Allow", "GET, HEAD")])
            exc.description = f"{self.path} answers GET and HEAD only."  # 405's first argument is not text
            raise exc
        base = environ.get("SCRIPT_NAME", "") + self.path
        if rest in ("", "/"):
            body, kind = self.render(self.snapshot(), base).encode(), "text/html; charset=utf-8"
        elif rest == "/data.json":
            body, kind = json.dumps(self.snapshot(), separators=(",", ":")).encode(), "application/json"
        elif rest == "/app.js":
            body, kind = _JS.encode(), "text/javascript; charset=utf-8"
        else:
            body, kind = _CSS.encode(), "text/css; charset=utf-8"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))), *_COMMON])
        return [] if method == "HEAD" else [body]

    def _check_access(self, environ: WSGIEnvironment, document: bool) -> None:
        if self.networks and not address_in(environ, self.networks):
            raise refuse(403, "The operator page is not available to this client address.")
        # Another origin's page may not read it: not through cors outside (which would allow that
        # origin), nor as its own origin after a DNS rebinding (Host is then the other site's name).
        why = self.hosts.refusal(environ) or cross_origin(environ, "The operator page", navigable=document)
        if why is not None:
            raise refuse(403, why)
        if self.roles:
            identity = environ.get(IDENTITY)
            if not isinstance(identity, Identity):
                raise refuse(401, "The operator page needs a signed-in user.",
                             headers=[("WWW-Authenticate", 'Bearer realm="wsgistack"')])
            if self.roles.isdisjoint(identity.roles):  # (any iterable: a layer of one's own may set a list)
                raise refuse(403, f"The operator page needs one of the roles {', '.join(sorted(self.roles))}.")

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data (secrets already masked)."""
        settings = self.context.settings
        pending = self._pending
        while pending:  # a request still in the outer layers may lack their entries: counted without them
            try:
                self._fold(*pending.popleft())
            except IndexError:  # another thread folded the last one
                break
        with self._lock:
            layers = {name: (int(c), t) for name, (c, t) in self._layers.items()}
            statuses, events, details = dict(self._statuses), dict(self._events), dict(self._details)
        described = settings.get("pipeline")
        if not isinstance(described, list):  # used without the builder: what the timings saw
            described = [{"name": name, "index": i, "options": {}}
                         for i, name in enumerate(n for n in reversed(layers) if n != "app")]
        masked = self._mask_pipeline(described)
        pipeline = [{**spec, **_stat(layers.get(spec["label"]))} for spec in masked]
        # The layers, their options and scopes as shown: a reload that changes any of them changes it.
        shown = json.dumps(masked, sort_keys=True, default=str).encode()
        core = str(settings.get("app") or "app")
        hit, stale, miss = events["cache.hit"], events["cache.stale"], events["cache.miss"]
        looked = hit + stale + miss
        return {
            "title": self.options.title, "pid": os.getpid(), "started_at": round(self.started, 3),
            "generation": settings.get("generation"), "last_reload": _reload(settings.get("last_reload")),
            "signature": "|".join(str(spec.get("name")) for spec in pipeline)
                         + "#" + hashlib.sha256(shown).hexdigest()[:12],
            "requests": {"total": sum(statuses.values()), "by_status": dict(sorted(statuses.items()))},
            "pipeline": pipeline, "app": {"name": core, **_stat(layers.get("app"))},
            "cache": {"hit": hit, "stale": stale, "miss": miss, "bypass": events["cache.bypass"],
                      "hit_ratio": round((hit + stale) / looked, 4) if looked else None},
            "ratelimit": {"pass": events["ratelimit.pass"], "reject": events["ratelimit.reject"],
                          "shadow_reject": events["ratelimit.shadow_reject"]},
            "auth": {"failures": events["auth.failure"], "by_reason": _by(details, "auth.failure")},
            "store_errors": {"total": events["store.error"], "by_store": _by(details, "store.error")},
            "deprecated": {"total": events["version.deprecated"], "by_version": _by(details, "version.deprecated")},
            "events": events,
            "stores": self._stores(),
        }

    def _mask_pipeline(self, described: list[Any]) -> list[dict[str, Any]]:
        cached = self._masked
        if cached is not None and cached[0] is described:
            return cached[1]
        specs = [s for s in described if isinstance(s, Mapping)]
        mine = self.options.model_dump(mode="json")
        me = next((i for i, s in enumerate(specs) if s.get("name") in _NAMES and s.get("options") == mine), -1)
        masked = [{"name": str(s.get("name")), "label": str(s.get("label") or s.get("name")),
                   "index": s.get("index"), "implicit": bool(s.get("implicit")),
                   "scope": str(s.get("scope") or ""), "inside": i > me, "this": i == me,
                   "options": _json_ready(mask(s.get("options") or {}))}
                  for i, s in enumerate(specs)]
        self._masked = (described, masked)
        return masked

    def _stores(self) -> list[dict[str, Any]]:
        """Each store's health, the stores asked at once (a hung Redis holds a poll once, not once per store)."""
        stores = sorted(self.context.stores.items())
        found = self.checks.facts(stores, STORE_CHECK_SECONDS)
        return [self._health(name, store, found[name]) for name, store in stores]

    @staticmethod
    def _health(name: str, store: Any, facts: Mapping[str, Any]) -> dict[str, Any]:
        breaker, latency, error = facts.get("breaker"), facts.get("latency_ms"), facts.get("error")
        try:  # a number, or None: a store of one's own may say it with a Decimal, or not at all
            latency = float(latency) if isinstance(latency, int | float | str | Decimal) \
                and not isinstance(latency, bool) and math.isfinite(float(latency)) else None  # (JSON has no NaN)
        except ValueError:
            latency = None
        return {"name": name, "ok": bool(facts.get("ok")), "backend": str(facts.get("backend", "")),
                "url": mask(str(facts.get("url") or getattr(store, "url", ""))),
                "breaker": _json_ready(breaker) if breaker is None or isinstance(breaker, str | int | float)
                else str(breaker),
                "latency_ms": latency, "error": None if error is None else mask(str(error))}

    def render(self, data: dict[str, Any], base: str) -> str:
        """The HTML page for ``data`` (from :meth:`snapshot`); ``base`` is the page's URL path."""
        e = html.escape
        boxes = ['<li class="edge">client</li>']
        for i, layer in enumerate(data["pipeline"]):
            opts = "".join(f"<dt>{e(str(k))}</dt><dd>{e(_short(v))}</dd>" for k, v in layer["options"].items())
            tags = "".join(f' <span class="tag">{e(tag)}</span>' for tag in (
                "implicit" if layer["implicit"] else "", layer["scope"],
                "this page" if layer["this"] else "",
                "" if layer["inside"] or layer["count"] else "not timed") if tag)
            boxes.append(f'<li class="layer"><h3>{e(layer["name"])}{tags}</h3>{_stats(f"layer-{i}", layer)}'
                         f'<dl>{opts or "<dt>options</dt><dd>defaults</dd>"}</dl></li>')
        boxes.append(f'<li class="layer core"><h3>{e(data["app"]["name"])}</h3>{_stats("app", data["app"])}</li>')
        stores = "".join(
            f'<tr><td>{e(s["name"])}</td><td id="store-{i}-ok" class="{"ok" if s["ok"] else "bad"}">'
            f'{"ok" if s["ok"] else "down"}</td><td>{e(s["backend"])}</td><td>{e(s["url"])}</td>'
            f'<td id="store-{i}-breaker">{e(str(s["breaker"] or "—"))}</td>'
            f'<td id="store-{i}-latency">{"—" if s["latency_ms"] is None else e(str(s["latency_ms"]))}</td>'
            f'<td id="store-{i}-error">{e(str(s["error"] or "—"))}</td></tr>'
            for i, s in enumerate(data["stores"]))
        cards = "".join(f'<div class="card"><span>{e(label)}</span><b id="{key}">{e(value)}</b></div>'
                        for key, label, value in _cards(data)) + _reload_card(data["last_reload"])
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(data["title"])}</title>'
                '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
                f'<link rel="stylesheet" href="{e(base)}/app.css"><script src="{e(base)}/app.js" defer></script>'
                f'</head><body data-source="{e(base)}/data.json" data-refresh="{self.options.refresh_seconds}" '
                f'data-signature="{e(data["signature"])}"><header><h1>{e(data["title"])}</h1>'
                f'<p>process <span id="pid">{data["pid"]}</span><span id="pid-changed" hidden></span> · '
                f'updated <span id="updated">at load</span> · every '
                f'{self.options.refresh_seconds:g} s <span id="status"></span></p>'
                '<p id="changed" hidden>The pipeline changed: reload the page to see the new one.</p></header>'
                f'<main><section><h2>Pipeline</h2><ol class="flow" id="pipeline">{"".join(boxes)}</ol></section>'
                f'<section><h2>Numbers</h2><div class="cards">{cards}</div><h2>Stores</h2><table><thead><tr>'
                '<th>name</th><th>state</th><th>backend</th><th>url</th><th>breaker</th><th>ping ms</th>'
                '<th>why not ok</th></tr>'
                f'</thead><tbody>{stores}</tbody></table></section></main></body></html>')


# -- masking -----------------------------------------------------------------
def _secret_text(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in SECRET_WORDS)


def mask(value: Any, name: str = "") -> Any:
    """``value`` with secrets replaced by ``•••``: by option name, URL password or query parameter."""
    if name and secret_value(name, value) and value not in (None, True, False, "", [], {}):
        return MASK
    if isinstance(value, Mapping):
        return {str(k): mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # A (name, value) pair: a header, say; not the built-ins' lists of header names (expose_headers).
        if len(value) == 2 and isinstance(value[0], str) and TOKEN.fullmatch(value[0]) \
                and secret_value(value[0], value[1]) \
                and not isinstance(value[1], list | tuple | Mapping) and name not in _HEADER_NAME_LISTS:
            return [value[0], MASK]
        return [mask(v) for v in value]
    if isinstance(value, str):
        if "PRIVATE KEY-----" in value:  # a PEM private key, whatever its option is called
            return MASK
        if value and value[0] in "{[(":  # a repr() of a structure (options of a plain factory layer)
            try:
                return mask(ast.literal_eval(value))
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return MASK if _secret_text(value) else mask_url_passwords(value, MASK)
        line = _LINE.fullmatch(value)
        if line is not None and secret_value(line[1], value[line.end(2):]):  # "Authorization: Bearer …"
            return line[1] + line[2] + MASK
        if "://" in value or "@" in value or "=" in value:
            return mask_secrets(value, MASK)  # read whole, not parsed: "pw#x@host" is masked too
    return value


# -- small helpers -----------------------------------------------------------
def _json_ready(value: Any) -> Any:
    """``value`` with the floats JSON has no number for as text (``inf``, ``-inf``, ``nan``).

    YAML's ``.inf`` (``metrics.buckets`` may end with it) would otherwise reach
    ``data.json`` as ``Infinity``, which no browser parses: every poll failed.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def _stat(found: tuple[int, float] | None) -> dict[str, Any]:
    count, total = found or (0, 0.0)
    return {"count": count, "total_ms": round(total * 1000, 3),
            "avg_ms": round(total * 1000 / count, 4) if count else None}


def _by(details: dict[tuple[str, str], int], event: str) -> dict[str, int]:
    return dict(sorted((detail, n) for (name, detail), n in details.items() if name == event))


def _reload(result: Any) -> dict[str, Any] | None:
    if result is None:
        return None
    try:
        ok, generation = bool(result.ok), result.generation
        return {"ok": ok, "generation": generation, "at": result.at, "summary": result.summary(),
                "headline": result.summary() if ok else f"reload failed, generation {generation} keeps serving",
                "problems": [] if ok else [str(p) for p in result.problems]}
    except Exception as exc:  # an odd object must not break the page
        unreadable = f"unreadable ({type(exc).__name__})"
        return {"ok": None, "generation": None, "at": None, "summary": unreadable, "headline": unreadable,
                "problems": []}


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _stats(prefix: str, stat: Mapping[str, Any]) -> str:
    return (f'<p class="stats"><b id="{prefix}-count">{stat["count"]}</b> requests · '
            f'<b id="{prefix}-avg">{_ms(stat["avg_ms"])}</b> ms avg · '
            f'<b id="{prefix}-total">{_ms(stat["total_ms"])}</b> ms total</p>')


def _statuses(by_status: Mapping[str, int]) -> str:
    return " · ".join(f"{k} {n}" for k, n in by_status.items()) or "—"


def _cards(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    ratio = d["cache"]["hit_ratio"]
    return [("requests", "requests", str(d["requests"]["total"])),
            ("statuses", "by status", _statuses(d["requests"]["by_status"])),
            ("cache-ratio", "cache hit ratio", "—" if ratio is None else f"{ratio * 100:.1f}%"),
            ("ratelimit-reject", "rate-limit rejects", str(d["ratelimit"]["reject"])),
            ("ratelimit-shadow", "shadow rejects", str(d["ratelimit"]["shadow_reject"])),
            ("auth-failures", "auth failures", str(d["auth"]["failures"])),
            ("store-errors", "store errors", str(d["store_errors"]["total"])),
            ("deprecated", "deprecated-version requests", str(d["deprecated"]["total"])),
            ("generation", "config generation", "—" if d["generation"] is None else str(d["generation"]))]


def _reload_card(last: Mapping[str, Any] | None) -> str:
    """The last reload's card: a failed one is wide, in the error colour, its problems a list."""
    failed, problems = last is not None and last["ok"] is False, (last or {}).get("problems") or []
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return (f'<div id="reload-card" class="{"card wide bad" if failed else "card"}"><span>last reload</span>'
            f'<b id="reload">{html.escape("—" if last is None else str(last["headline"]))}</b>'
            f'<ul id="reload-problems"{"" if problems else " hidden"}>{items}</ul></div>')


_CSS = """\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f5f6f8}
header{padding:12px 20px;background:#1b1f24;color:#fff}header h1{margin:0;font-size:20px}header p{margin:4px 0 0}
#changed{color:#ffd166}#status{color:#ff8a80}main{display:flex;flex-wrap:wrap;gap:24px;padding:16px 20px}
section{flex:1 1 420px}h2{font-size:16px;margin:8px 0}
.flow{list-style:none;margin:0;padding:0}.flow li{margin:0 0 22px;position:relative}
.flow li:not(:last-child)::after{content:"\\2193";position:absolute;left:50%;bottom:-20px;color:#6b7280}
.edge{text-align:center;font-weight:600;color:#6b7280}
.layer{background:#fff;border:1px solid #d0d5dd;border-left:4px solid #3b82f6;border-radius:6px;padding:8px 12px}
.core{border-left-color:#10b981}.layer h3{margin:0;font-size:15px}
.tag{white-space:nowrap;font-size:11px;font-weight:400;background:#eef2ff;border-radius:3px;padding:1px 5px}
.stats{margin:4px 0;color:#374151}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:4px 0 0}
dt{color:#6b7280}dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{background:#fff;border:1px solid #d0d5dd;border-radius:6px;padding:8px}.card span{display:block;color:#6b7280}
.card b{font-size:18px;word-break:break-word}table{border-collapse:collapse;width:100%;background:#fff}
td,th{border:1px solid #d0d5dd;padding:4px 6px;text-align:left}.ok{color:#047857}.bad{color:#b91c1c;font-weight:600}
.card.wide{grid-column:1/-1}.card.bad{border-color:#b91c1c;border-left:4px solid #b91c1c;background:#fef2f2}
.card ul{margin:6px 0 0;padding-left:18px;font:12px/1.5 ui-monospace,monospace;word-break:break-word}
#pid-changed{color:#ffd166}
"""

_JS = """\
"use strict";
(() => {
  const body = document.body, source = body.dataset.source;
  const every = Math.max(250, parseFloat(body.dataset.refresh) * 1000 || 2000);
  const set = (id, value) => {
    const el = document.getElementById(id), text = String(value);
    if (el && el.textContent !== text) el.textContent = text;
  };
  const ms = (v) => (v === null || v === undefined ? "\\u2014" : Number(v).toFixed(3));
  let pid = document.getElementById("pid").textContent;
  const reload = (last) => {
    const problems = last === null || !last.problems ? [] : last.problems;
    set("reload", last === null ? "\\u2014" : last.headline);
    document.getElementById("reload-card").className = last !== null && last.ok === false ? "card wide bad" : "card";
    const list = document.getElementById("reload-problems"), shown = [...list.children].map((li) => li.textContent);
    if (shown.length !== problems.length || shown.some((text, i) => text !== problems[i])) {
      list.replaceChildren(...problems.map((text) => {
        const li = document.createElement("li");
        li.textContent = text;
        return li;
      }));
    }
    list.hidden = problems.length === 0;
  };
  const stat = (prefix, s) => { set(prefix + "-count", s.count); set(prefix + "-avg", ms(s.avg_ms));
                                set(prefix + "-total", ms(s.total_ms)); };
  const render = (d) => {
    set("requests", d.requests.total);
    set("statuses", Object.entries(d.requests.by_status).map(([k, n]) => k + " " + n).join(" \u00b7 ") || "\u2014");
    const r = d.cache.hit_ratio;
    set("cache-ratio", r === null ? "\\u2014" : (r * 100).toFixed(1) + "%");
    set("ratelimit-reject", d.ratelimit.reject); set("ratelimit-shadow", d.ratelimit.shadow_reject);
    set("auth-failures", d.auth.failures); set("store-errors", d.store_errors.total);
    set("deprecated", d.deprecated.total);
    set("generation", d.generation === null ? "\\u2014" : d.generation);
    reload(d.last_reload);
    if (String(d.pid) !== pid) {  // with server.workers > 1, another process answered this poll
      set("pid-changed", " (was " + pid + ": numbers are per process)");
      document.getElementById("pid-changed").hidden = false;
      pid = String(d.pid);
      set("pid", pid);
    }
    d.pipeline.forEach((layer, i) => stat("layer-" + i, layer));
    stat("app", d.app);
    d.stores.forEach((s, i) => {
      set("store-" + i + "-ok", s.ok ? "ok" : "down");
      const el = document.getElementById("store-" + i + "-ok");
      if (el) el.className = s.ok ? "ok" : "bad";
      set("store-" + i + "-breaker", s.breaker === null ? "\\u2014" : s.breaker);
      set("store-" + i + "-latency", s.latency_ms === null || s.latency_ms === undefined ? "\\u2014" : s.latency_ms);
      set("store-" + i + "-error", s.error === null || s.error === undefined ? "\\u2014" : s.error);
    });
    document.getElementById("changed").hidden = d.signature === body.dataset.signature;
    set("updated", new Date().toLocaleTimeString());
    set("status", "");
  };
  const poll = () => {
    fetch(source, {cache: "no-store", credentials: "same-origin", headers: {Accept: "application/json"}})
      .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(render)
      .catch((e) => set("status", "\\u00b7 update failed: " + e.message))
      .finally(() => setTimeout(poll, every));
  };
  setTimeout(poll, every);
})();
"""
