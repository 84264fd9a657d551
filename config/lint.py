"""Stage 4: check the pipeline's order and combination, with reasons.

Errors are orders that are unsafe (the stack would leak or mis-key);
warnings are orders that are odd.  Each rule is a small function that reads
the list of :class:`LayerSpec` and yields problems; ``RULES`` runs them all.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from middleware.base import with_head
from stores.base import secret_value

from .build import LayerSpec, StackConfig, data_at, reads_forwarding_headers, suggest
from .errors import Problem, dotted
from .registry import LAYERS, import_string
from .scope import Scope

Rule = Callable[[StackConfig, list[LayerSpec]], Iterator[Problem]]
STATEFUL_SHARED = ("session", "ratelimit", "auth")


def kind(spec: LayerSpec) -> str | None:
    """The built-in name of a spec: also when written as a module:attr path, re-exported or subclassed.

    werkzeug's ``ProxyFix`` (or a subclass) counts as ``proxy``: it sets the
    client address from the forwarding headers, so the same order rules hold.
    """
    if spec.name in LAYERS:
        return spec.name
    if inspect.isclass(spec.target):
        for name, cls in _built_in_classes():
            if issubclass(spec.target, cls):
                return name
    return "proxy" if reads_forwarding_headers(spec) else None


@functools.cache
def _built_in_classes() -> tuple[tuple[str, type], ...]:
    """The registry's layer classes; an entry that does not import as a class is left out here.

    Such an entry is reported where a pipeline names it (the build's "cannot import layer"):
    one broken line in the registry must not stop every other pipeline from being checked.
    """
    found = []
    for name, target in LAYERS.items():
        try:
            cls = import_string(target)
        except Exception:  # any import failure of that one entry
            continue
        if inspect.isclass(cls):
            found.append((name, cls))
    return tuple(found)


def _first(specs: list[LayerSpec], name: str) -> LayerSpec | None:
    return next((s for s in specs if kind(s) == name), None)


def _all(specs: list[LayerSpec], name: str) -> list[LayerSpec]:
    return [s for s in specs if kind(s) == name]


def _pos(specs: list[LayerSpec], spec: LayerSpec) -> int:
    return specs.index(spec)


def _problem(cfg: StackConfig, spec: LayerSpec, message: str, severity: str = "error") -> Problem:
    doc = cfg.document
    line, col = doc.locate(spec.path, key=True) if spec.path else (0, 0)
    return Problem(message, spec.path or ("pipeline",), doc.file, line, col, severity)  # type: ignore[arg-type]


def _before(specs: list[LayerSpec], outer: str, inner: str) -> Iterator[tuple[LayerSpec, LayerSpec]]:
    """Pairs where a layer of kind ``outer`` sits outside one of kind ``inner``."""
    for a in _all(specs, outer):
        for b in _all(specs, inner):
            if _pos(specs, a) < _pos(specs, b):
                yield a, b


def _apart(specs: list[LayerSpec], outer: LayerSpec, inner: LayerSpec) -> bool:
    """Whether no request can be in the scope of both layers: True only when that is sure.

    Methods that share none are sure.  Paths are compared as :meth:`Scope.overlaps` does (by the text
    before the first wildcard and after the last), and only when no layer inside the outer one may
    rewrite the path (versioning, a class with ``rewrites_path``, or a layer of your own, which may
    do so without saying).
    """
    a, b = outer.scope, inner.scope
    if a.methods and b.methods and not with_head(a.methods) & with_head(b.methods):
        return True
    if not a.paths or not b.paths:
        return False
    if any(kind(spec) in (None, "versioning") or getattr(spec.target, "rewrites_path", False)
           for spec in specs[_pos(specs, outer) + 1:]):
        return False
    return not a.overlaps(b)


def _where(spec: LayerSpec) -> str:
    return "the default errors layer" if spec.implicit else f"pipeline[{spec.index}]"


def errors_outermost(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for spec in _all(specs, "errors"):
        if _pos(specs, spec) != 0:
            yield _problem(cfg, spec, "errors must be the outermost layer (first in the pipeline), "
                                      "or refusals from the layers outside it are not rendered")
        if spec.scope:
            yield _problem(cfg, spec, "errors may not be scoped with paths, exclude_paths or methods; "
                                      "every request needs the renderer")


def cache_outside_private(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for inner in ("auth", "session"):
        for cache, other in _before(specs, "cache", inner):
            if _apart(specs, cache, other):
                continue
            yield _problem(cfg, cache, f"cache at {_where(cache)} is outside {inner} at {_where(other)}: a cached "
                                       f"response would be served before {inner} runs; move cache inside {inner}")


def _keys(spec: LayerSpec) -> set[str]:
    keys: set[str] = set()

    def add(value: Any) -> None:
        if isinstance(value, str):
            keys.add(value)
        elif isinstance(value, list | tuple):
            keys.update(str(v) for v in value)

    add(spec.option("key", "client_ip"))
    for rule in spec.option("rules", None) or []:
        add(_field(rule, "key"))
    return keys


def _field(rule: Any, name: str) -> Any:
    """A field of a ratelimit rule, validated (a model) or not (a dict)."""
    return rule.get(name) if isinstance(rule, dict) else getattr(rule, name, None)


def ratelimit_keys(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for rl, proxy in _before(specs, "ratelimit", "proxy"):
        if "client_ip" in _keys(rl):
            yield _problem(cfg, rl, f"ratelimit at {_where(rl)} is outside the proxy layer at {_where(proxy)}: it "
                                    "would key on the proxy's address, so every client shares one limit")
    for rl in _all(specs, "ratelimit"):
        if "user" in _keys(rl):
            auth = _first(specs, "auth")
            if auth is None or _pos(specs, auth) > _pos(specs, rl):
                yield _problem(cfg, rl, f"ratelimit at {_where(rl)} keys on user but is not inside auth: the "
                                        "identity is not known yet; move it inside auth")


def _reads_address(spec: LayerSpec) -> bool:
    """Whether a proxy layer sets the client address from the proxy's header (werkzeug's ProxyFix does by default)."""
    return bool(spec.option("x_for", 1) or spec.option("forwarded", 0))


def _waitress_reads_address(cfg: StackConfig) -> bool:
    headers = {str(h).lower() for h in cfg.server.trusted_proxy_headers}
    return bool(cfg.server.trusted_proxy) and bool({"x-forwarded-for", "forwarded"} & headers)


def _address_unread(cfg: StackConfig, specs: list[LayerSpec], rl: LayerSpec) -> bool:
    """Whether a ratelimit keyed on client_ip sees only the proxy's address: nothing outside it reads the client's."""
    return "client_ip" in _keys(rl) and not _waitress_reads_address(cfg) and not any(
        _reads_address(p) for p in _all(specs, "proxy") if _pos(specs, p) < _pos(specs, rl))


_ONE_BUCKET = ("every request seems to come from the proxy, so all clients share one limit")


def ratelimit_behind_proxy_layer(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A proxy layer (so a proxy in front) that takes no client address, outside a client_ip ratelimit."""
    for rl in _all(specs, "ratelimit"):
        proxies = [p for p in _all(specs, "proxy") if _pos(specs, p) < _pos(specs, rl)]
        if proxies and _address_unread(cfg, specs, rl):
            p = proxies[0]
            # (werkzeug's ProxyFix, options given as keyword arguments, reads no Forwarded header)
            header, fix = ("X-Forwarded-For (x_for)", "x_for") if isinstance(p.options, dict) else \
                ("X-Forwarded-For (x_for) nor Forwarded (forwarded)", "x_for (or forwarded)")
            reads = f"reads no {header}" if fix == "x_for" else f"reads neither {header}"
            yield _problem(cfg, rl, f"ratelimit at {_where(rl)} keys on client_ip, but nothing takes the client's "
                                    f"address from the proxy in front ({p.name} at {_where(p)} {reads}): "
                                    f"{_ONE_BUCKET}; set {fix} on {p.name} at {_where(p)}", "warning")


def ratelimit_behind_waitress_proxy(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """server.trusted_proxy (so a proxy in front) without the header that carries the client address."""
    if not cfg.server.trusted_proxy:
        return
    for rl in _all(specs, "ratelimit"):
        if _address_unread(cfg, specs, rl) and not any(_pos(specs, p) < _pos(specs, rl) for p in _all(specs, "proxy")):
            yield _problem(cfg, rl, f"ratelimit at {_where(rl)} keys on client_ip, but nothing takes the client's "
                                    "address from the proxy in front (server.trusted_proxy is set, and "
                                    "server.trusted_proxy_headers lacks x-forwarded-for and forwarded; no proxy layer "
                                    f"outside it reads X-Forwarded-For or Forwarded): {_ONE_BUCKET}; add "
                                    "x-forwarded-for to server.trusted_proxy_headers", "warning")


def ratelimit_escapes(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for rl in _all(specs, "ratelimit"):
        keys = _keys(rl)
        if keys and all(k.startswith("header:") for k in keys):
            yield _problem(cfg, rl, f"ratelimit at {_where(rl)} keys only on request headers: a client escapes its "
                                    "limit by sending new values; combine it with client_ip", "warning")
    for auth, rl in _before(specs, "auth", "ratelimit"):
        if _keys(rl) == {"client_ip"} and not any(
            _keys(o) == {"client_ip"} and _pos(specs, o) < _pos(specs, auth) for o in _all(specs, "ratelimit")
        ):
            yield _problem(cfg, rl, f"ratelimit at {_where(rl)} keys on client_ip but is inside auth at "
                                    f"{_where(auth)}: requests auth refuses are never counted, so token guessing is "
                                    "unlimited; put a client_ip ratelimit before auth", "warning")


def ratelimit_policies(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    # (A policy on a memory:// store is not flagged: ${REDIS_URL:-memory://} makes it apply in production.)
    for rl in _all(specs, "ratelimit"):
        for i, rule in enumerate(rl.option("rules") or ()):
            if _field(rule, "on_store_error") is not None and not _field(rule, "limits"):
                yield _problem(cfg, rl, f"ratelimit rules[{i}] sets on_store_error, but it has no limits (it "
                                        "exempts the requests it matches): it never applies", "warning")


def _same_layer(spec: LayerSpec, other: LayerSpec) -> str | None:
    """The name both are listed as when they are the same layer, else None.

    A built-in (or a subclass) by its kind; a layer of your own only when it is the same class or
    factory with the same options: it may be a general one meant to run twice with two settings
    (two headers added, say), which wsgistack cannot tell from a slip.
    """
    name = kind(spec)
    if name is not None:
        return name if kind(other) == name else None
    if kind(other) is None and spec.target is other.target and spec.options == other.options:
        return spec.name
    return None


def duplicates(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    seen: list[LayerSpec] = []
    for spec in specs:
        for other in seen:
            name = _same_layer(spec, other)
            if name is None or not spec.scope.overlaps(other.scope):
                continue
            if name == "ratelimit" and _keys(spec) != _keys(other):
                continue
            yield _problem(cfg, spec, f"{name} appears twice with overlapping scope ({_where(other)} and "
                                      f"{_where(spec)}); requests in both scopes pass it twice", "warning")
        seen.append(spec)


def _counters(spec: LayerSpec) -> set[tuple[str, str, str, str]]:
    """The counters a ratelimit layer keeps per client: (rule id, strategy, limit, key), as its keys name them."""
    from limits import parse_many

    def key_of(value: Any) -> str:
        return "|".join(value) if isinstance(value, list | tuple) else str(value)

    from middleware.ratelimit import _Rule, _rule_digest

    strategy, key = spec.option("strategy", "fixed-window"), spec.option("key", "client_ip")
    rules = [("default", spec.option("limits", None) or [], None, None)]
    for i, rule in enumerate(spec.option("rules", None) or []):
        # Named as the layer names its counters: by what the rule matches, not its place.
        rid = _rule_digest(rule) if isinstance(rule, _Rule) else f"r{i}"
        rules.append((rid, _field(rule, "limits") or [], _field(rule, "strategy"), _field(rule, "key")))
    found = set()
    for rid, limits, rule_strategy, rule_key in rules:
        for text in [limits] if isinstance(limits, str) else limits:
            try:
                items = parse_many(str(text))
            except ValueError:
                continue
            for item in items:
                limit = f"{item.amount}/{item.multiples}/{item.GRANULARITY.name}"
                found.add((rid, str(rule_strategy or strategy), limit,
                           key_of(rule_key if rule_key is not None else key)))
    return found


def _keyspace(cfg: StackConfig, name: str) -> tuple[object, ...]:
    """Where a store keeps its keys: one Redis database under one ``key_prefix`` for two names that give the
    same server, database and prefix (``sessions`` and ``limits`` both ``${REDIS_URL}``); else the name itself
    (each ``memory://`` name is a store of its own; a URL read no further is taken for one too)."""
    spec = cfg.stores.get(name)
    url = urlsplit(spec.url) if spec is not None else None
    if spec is None or url is None or url.scheme.lower() not in ("redis", "rediss") or url.query:
        return ("store", name)
    try:
        host, port = (url.hostname or "localhost").lower(), url.port or 6379
    except ValueError:  # a port out of range: stage 3 says so
        return ("store", name)
    number = url.path[1:]
    if number and not number.isdecimal():  # no database number (/²: isdigit() but not int(); /0/): stage 3 says so
        return ("store", name)
    db = int(number) if number else 0
    return (url.scheme.lower(), host, port, db, str(spec.options.get("key_prefix", "wsgistack:")))


def ratelimit_namespaces(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    seen: list[LayerSpec] = []
    for spec in _all(specs, "ratelimit"):
        store = str(spec.option("store", "shared"))
        where = (_keyspace(cfg, store), spec.option("namespace", "") or "")
        for other in seen:
            other_store = str(other.option("store", "shared"))
            if (_keyspace(cfg, other_store), other.option("namespace", "") or "") != where:
                continue
            if _counters(spec) & _counters(other):
                stores = f"store {store!r}" if store == other_store else \
                    f"stores {store!r} and {other_store!r} (one Redis database under one key_prefix)"
                yield _problem(cfg, spec, f"ratelimit at {_where(spec)} and the one at {_where(other)} count in "
                                          f"{stores} under the same namespace with an equal limit: they "
                                          "share one counter per client, so requests to one use up the other's "
                                          "budget; give each a namespace", "warning")
                break
        seen.append(spec)


#: Layers that refuse requests: outside cors, their refusals would reach a page without CORS headers.
REFUSING = ("validation", "ratelimit", "session", "csrf", "auth", "versioning")


def cors_position(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for inner in REFUSING:
        for other, cors in _before(specs, inner, "cors"):
            if _apart(specs, other, cors):
                continue
            yield _problem(cfg, cors, f"cors at {_where(cors)} is inside {inner} at {_where(other)}: preflights "
                                      f"would meet {inner} first and its refusals would lack CORS headers",
                           "warning")


def cors_scope_takes_preflights(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A cors layer scoped to methods without OPTIONS never sees the preflights of the requests it answers."""
    for cors in _all(specs, "cors"):
        methods = cors.scope.methods
        if methods and "OPTIONS" not in methods:
            yield _problem(cfg, cors, f"cors at {_where(cors)} is scoped to methods {', '.join(methods)} without "
                                      "OPTIONS: browsers' preflights (OPTIONS) pass it by and reach the app, which "
                                      "answers them without CORS headers, so those requests are never sent; "
                                      "add OPTIONS to methods", "warning")


def cache_identity(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    auth = _first(specs, "auth")
    for cache in _all(specs, "cache"):
        outside_auth = auth is None or _pos(specs, auth) > _pos(specs, cache)
        if spec_true(cache, "per_user") and outside_auth:
            yield _problem(cfg, cache, f"cache at {_where(cache)} has per_user: true but no auth layer runs before "
                                       "it: there is no identity to key on")
        purge_path = cache.option("purge_path")
        if purge_path and outside_auth:
            yield _problem(cfg, cache, f"cache at {_where(cache)} sets purge_path but no auth layer runs before it: "
                                       "the purge endpoint would always answer 401", "warning")
        if isinstance(purge_path, str) and cache.scope and not any(
                cache.scope.matches({"REQUEST_METHOD": method,  # PATH_INFO as PEP 3333 gives it: bytes as latin-1
                                     "PATH_INFO": purge_path.encode("utf-8").decode("latin-1")})
                for method in ("POST", "DELETE")):
            yield _problem(cfg, cache, f"cache at {_where(cache)} sets purge_path {purge_path!r} outside its own "
                                       "scope (paths, exclude_paths, methods): a purge would never reach the layer; "
                                       "add the path to its paths")
        for session in _all(specs, "session"):
            name = session.option("cookie_name")
            if name and name not in (cache.option("cookie_names") or ()):
                yield _problem(cfg, cache, f"cache at {_where(cache)} does not list the session cookie {name!r} in "
                                           "cookie_names: requests carrying a session would not be treated as "
                                           "private", "warning")


#: Methods that drop a cache's entries of their URI when they succeed (RFC 9111 §4.4).
_WRITES = ("POST", "PUT", "PATCH", "DELETE")


def cache_sees_writes(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for cache in _all(specs, "cache"):
        methods = cache.scope.methods
        missing = [m for m in _WRITES if methods and m not in methods]
        if missing:
            yield _problem(cfg, cache, f"cache at {_where(cache)} is scoped to methods {', '.join(methods)}: "
                                       f"{', '.join(missing)} requests never reach it, so a successful write no "
                                       "longer drops the entries of its URI (RFC 9111 §4.4) and readers get the "
                                       "old answer until its ttl ends; remove methods (the cache answers only GET "
                                       "and HEAD anyway)", "warning")


def spec_true(spec: LayerSpec, name: str) -> bool:
    return bool(spec.option(name, False))


def cache_inside_cors(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for cache, cors in _before(specs, "cache", "cors"):
        yield _problem(cfg, cache, f"cache at {_where(cache)} is outside cors at {_where(cors)}: it would replay one "
                                   "origin's Access-Control-Allow-Origin to other origins; move cache inside cors")


def cache_inside_ratelimit(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for cache, rl in _before(specs, "cache", "ratelimit"):
        if _apart(specs, cache, rl):
            continue
        yield _problem(cfg, cache, f"cache at {_where(cache)} is outside ratelimit at {_where(rl)}: cached answers are "
                                   "never counted, and each carries the RateLimit fields of the client whose request "
                                   "filled it to every other client; move cache inside ratelimit", "warning")


#: Layers that read the client address, scheme or host (request_id reads none: it may sit outside proxy).
_SEES_CLIENT = ("ratelimit", "session", "csrf", "auth", "metrics")


def proxy_position(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for proxy in _all(specs, "proxy"):
        if proxy.scope:
            yield _problem(cfg, proxy, "proxy should not be scoped with paths, exclude_paths or methods: the client "
                                       "address would then depend on the path", "warning")
        for name in _SEES_CLIENT:
            if name == "ratelimit":
                continue  # an error of its own in ratelimit_keys
            for other, _ in _before(specs, name, "proxy"):
                yield _problem(cfg, proxy, f"proxy at {_where(proxy)} is inside {name} at {_where(other)}: {name} "
                                           "sees the proxy's address, not the client's; put proxy right after errors",
                               "warning")


def cors_patterns(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for spec in _all(specs, "cors"):
        lint = getattr(spec.target, "lint", None)
        if callable(lint):
            for message in lint(spec.options):
                yield _problem(cfg, spec, message, "warning")


def csrf_needs_session(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for spec in _all(specs, "csrf"):
        session = _first(specs, "session")
        if spec_true(spec, "double_submit") and (session is None or _pos(specs, session) > _pos(specs, spec)):
            yield _problem(cfg, spec, f"csrf at {_where(spec)} uses double_submit but is not inside a session layer: "
                                      "the token is bound to the session id; place session before csrf")
        elif session is None:
            yield _problem(cfg, spec, "csrf protects cookie sessions, but the pipeline has no session layer",
                           "warning")
        if session is not None and spec.option("cookie_name") != session.option("cookie_name"):
            yield _problem(cfg, spec, f"csrf cookie_name {spec.option('cookie_name')!r} differs from the session "
                                      f"layer's cookie_name {session.option('cookie_name')!r}: csrf would never see "
                                      "a cookie-authenticated request")
        for auth, _ in _before(specs, "auth", "csrf"):
            if _pos(specs, auth) < _pos(specs, spec):
                yield _problem(cfg, spec, f"csrf at {_where(spec)} is inside auth at {_where(auth)}: forged requests "
                                          "reach token parsing first; place csrf before auth", "warning")


def csrf_header_allowed(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A double-submit token header that the cors layer does not allow never arrives from another origin."""
    for csrf in _all(specs, "csrf"):
        header = str(csrf.option("header") or "X-CSRF-Token")
        if not spec_true(csrf, "double_submit"):
            continue
        for cors in _all(specs, "cors"):
            policy = getattr(cors.options, "policy", None)
            if not callable(policy):
                continue
            allowed = {str(h).lower() for h in policy()["allow_headers"]}
            if "*" not in allowed and header.lower() not in allowed:
                yield _problem(cfg, cors, f"cors at {_where(cors)} does not allow the {header} header that csrf at "
                                          f"{_where(csrf)} needs (double_submit): a preflight asking for it is "
                                          f"refused, so pages on other origins cannot write; add {header} to "
                                          "allow_headers", "warning")


def auth_inside_session(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for auth, session in _before(specs, "auth", "session"):
        if spec_true(auth, "accept_session"):
            yield _problem(cfg, auth, f"auth at {_where(auth)} has accept_session: true but is outside session at "
                                      f"{_where(session)}: session['user'] is not available yet; move auth inside "
                                      "session")
    for session in _all(specs, "session"):
        if session.scope:
            yield _problem(cfg, session, "session is scoped: requests outside the scope have no session, and logins "
                                         "made there do not persist", "warning")
    first_session = _first(specs, "session")
    if first_session is not None and not _all(specs, "csrf"):
        for auth in _all(specs, "auth"):
            if _pos(specs, first_session) < _pos(specs, auth) and spec_true(auth, "accept_session"):
                yield _problem(cfg, auth, f"auth at {_where(auth)} accepts the session cookie as credentials "
                                          "(accept_session) but the pipeline has no csrf layer: another site's page "
                                          "can send a logged-in browser's POST; add csrf before auth, or set "
                                          "accept_session: false", "warning")


def versioning_before_cache(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for cache, ver in _before(specs, "cache", "versioning"):
        yield _problem(cfg, ver, f"versioning at {_where(ver)} is inside cache at {_where(cache)}: the cache "
                                 "keys on the API version, so versioning must run first", "warning")


_VERSION_SHAPE = re.compile(r"[vV]\d+(?:\.\d+)*")


def paths_inside_versioning(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A path pattern of a layer inside ``versioning`` that names a path under its prefix without a version.

    The layers inside see the path versioning rewrote (``/api/search`` arrives as ``/api/v1/search``),
    so such a pattern never matches: a scope or rule that never applies, a purge endpoint that
    answers 404.  (The layers outside match both spellings.)
    """
    for ver in _all(specs, "versioning"):
        prefix, supported = ver.option("prefix", "/api"), tuple(ver.option("supported", ()) or ())
        if not isinstance(prefix, str) or not all(isinstance(v, str) for v in supported):
            continue
        for spec in specs[_pos(specs, ver) + 1:]:
            for place, glob, severity in _path_patterns(spec):
                segment = _unversioned(glob, prefix, supported)
                if segment is None:
                    continue
                sample = re.sub(r"\[[^]]*]|[*?]", "x", glob)
                if ver.scope and not ver.scope.matches({"REQUEST_METHOD": "GET", "PATH_INFO": sample}):
                    continue  # versioning leaves that path alone: the layer sees it as it is
                rest = glob[len(prefix) + 1:]
                tail = rest[len(segment):]  # after the segment, from its "/"
                some = supported[0] if supported else "v1"
                if segment.lower() in supported:
                    why = f"rewrites it to {prefix}/{segment.lower()}{tail} first"
                    fix = f"write {prefix}/{segment.lower()}{tail}"
                elif _VERSION_SHAPE.fullmatch(segment):
                    why = f"answers 404 for version {segment!r}, which it does not support"
                    fix = f"name a supported version ({prefix}/{some}{tail}) or remove it"
                else:
                    shown = f"/{rest}" if rest else ""
                    why = f"rewrites it to {prefix}/<version>{shown} first"
                    fix = (f"name a version ({prefix}/{some}{shown})" if place == ("purge_path",) else
                           f"write {prefix}/*{shown} for every version, or name one ({prefix}/{some}{shown})")
                message = (f"{spec.name} at {_where(spec)} has {dotted(place)} {glob!r}, which no request reaches it "
                           f"with: versioning at {_where(ver)}, outside it, {why}; {fix}")
                where = (*spec.path, spec.name, *place)
                problem = _problem(cfg, spec, message, severity)
                line, col = cfg.document.locate(where) if spec.path else (0, 0)
                yield dataclasses.replace(problem, path=where, line=line, column=col) if spec.path else problem


def _path_patterns(spec: LayerSpec) -> Iterator[tuple[tuple[str | int, ...], str, str]]:
    """``(place in the options, pattern, severity)`` of every path pattern a layer is given."""
    for i, glob in enumerate(spec.scope.paths):
        yield ("paths", i), glob, "error"
    for i, glob in enumerate(spec.scope.exclude_paths):
        yield ("exclude_paths", i), glob, "warning"  # the layer then applies where it was meant not to
    purge = spec.option("purge_path") if spec.is_layer_class else None
    if isinstance(purge, str):
        yield ("purge_path",), purge, "error"
    rules = spec.option("rules") if spec.is_layer_class else None
    for i, rule in enumerate(rules if isinstance(rules, list | tuple) else ()):
        paths = _field(rule, "paths")
        for j, glob in enumerate(paths if isinstance(paths, list | tuple) else ()):
            if isinstance(glob, str):
                yield ("rules", i, "paths", j), glob, "error"


def _excluded_prefix(glob: str) -> str | None:
    """The text every path ``glob`` takes begins with, when it takes all of them (``/api/*``: ``/api/``), else None."""
    head = glob.rstrip("*")
    return head if head != glob and not any(c in head for c in "*?[") else None


def _excludes_all(scope: Scope) -> list[int]:
    """The ``exclude_paths`` entries that together leave out every path the scope's ``paths`` take (every path
    when it has none); [] unless that is sure: each path glob is an entry as written, or all of its paths begin
    with the text of an entry that ends in ``*`` (``/api/*`` leaves out ``/api/v?/items``)."""
    used: list[int] = []
    for glob in scope.paths or ("/*",):
        wild = re.search(r"[*?[]", glob)
        head = glob[:wild.start()] if wild else glob
        for i, out in enumerate(scope.exclude_paths):
            prefix = _excluded_prefix(out)
            if out == glob or (prefix is not None and head.startswith(prefix)):
                used.append(i)
                break
        else:
            return []
    return sorted(set(used))


def excluded_everywhere(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A layer whose ``exclude_paths`` leave out every request its ``paths`` take: it never runs (a limiter that
    limits nothing, an auth layer that checks nothing), and nothing else says so."""
    for spec in specs:
        used = _excludes_all(spec.scope) if spec.scope.exclude_paths else []
        if not used:
            continue
        globs = ", ".join(repr(spec.scope.exclude_paths[i]) for i in used)
        what = "every path of its paths" if spec.scope.paths else "every path"
        verb = "leaves" if len(used) == 1 else "leave"
        message = (f"{spec.name} at {_where(spec)} applies to no request: exclude_paths {globs} {verb} out {what}; "
                   "remove the layer, or narrow exclude_paths")
        problem = _problem(cfg, spec, message)
        if spec.path:
            where = (*spec.path, spec.name, "exclude_paths", used[0])
            line, col = cfg.document.locate(where)
            problem = dataclasses.replace(problem, path=where, line=line, column=col)
        yield problem


def _unversioned(glob: str, prefix: str, supported: tuple[str, ...]) -> str | None:
    """The segment after ``prefix`` in ``glob`` when versioning never lets a request with it through as it is."""
    if glob != prefix and not glob.startswith(prefix + "/"):
        return None
    segment = glob[len(prefix) + 1:].partition("/")[0]
    if any(c in segment for c in "*?[") or segment in supported:
        return None  # a pattern for every version (or several), or one version as versioning writes it
    return segment


def _answered(spec: LayerSpec) -> tuple[str, ...]:
    """The paths health or metrics answers itself (its probes, its scrape); () for another layer."""
    if kind(spec) == "health":
        return str(spec.option("liveness_path", "/healthz")), str(spec.option("readiness_path", "/readyz"))
    return (str(spec.option("path", "/metrics")),) if kind(spec) == "metrics" else ()


def _passes_by(specs: list[LayerSpec], outer: LayerSpec, probe: LayerSpec) -> bool:
    """Whether ``outer``'s scope (paths, exclude_paths, methods) leaves out every path ``probe`` answers: True only
    when that is sure (no layer between them that may rewrite the path)."""
    between = specs[_pos(specs, outer) + 1:_pos(specs, probe)]
    if any(kind(s) in (None, "versioning") or getattr(s.target, "rewrites_path", False) for s in between):
        return False
    paths = _answered(probe)
    return bool(paths) and not any(_reaches(outer, path) for path in paths)


def probes_first(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for name in ("health", "metrics", "access_log"):
        for inner in ("validation", "cors", "csrf", "auth", "ratelimit", "session", "versioning", "cache"):
            for other, spec in _before(specs, inner, name):
                if _passes_by(specs, other, spec):
                    continue  # a layer scoped to the API, say: the probes and scrapes never meet it
                what = "its refusals and cache hits would not be logged" if name == "access_log" else \
                    "probes and scrapes would meet it first"
                yield _problem(cfg, spec, f"{name} at {_where(spec)} is inside {inner} at {_where(other)}: "
                                          f"{what}", "warning")
        for spec in _all(specs, name):
            if name != "access_log" and spec.scope:
                yield _problem(cfg, spec, f"{name} may not be scoped with paths, exclude_paths or methods: it must "
                                          "see every request", "warning")
    metrics = _all(specs, "metrics")
    if len(metrics) > 1:
        yield _problem(cfg, metrics[1], "metrics may appear only once: an inner one would reset the per-layer "
                                        "timings of the layers it wraps")


def _memory_store(cfg: StackConfig, spec: LayerSpec) -> str | None:
    """The name of the memory:// store ``spec`` keeps its state in, else None."""
    store = str(spec.option("store", "shared"))
    url = cfg.stores.get(store)
    return store if url is not None and url.url.startswith("memory:") else None


def _class_shares(spec: LayerSpec) -> bool | None:
    """What a layer class with a ``store`` option says of its state (``shared_state``): None when it says nothing.

    For a layer of your own or a built-in alike; session, ratelimit and auth are judged by name.
    """
    keeps = spec.is_layer_class and "store" in spec.target.Options.model_fields
    return getattr(spec.target, "shared_state", None) if keeps else False


def per_process_state(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[tuple[LayerSpec, str, str, bool]]:
    """Each layer whose state every process must share but which keeps it in a memory:// store:
    ``(layer, its name as the messages give it, store, whether its class says so)``."""
    for spec in specs:
        store = _memory_store(cfg, spec)
        if store is None:
            continue
        name = kind(spec)
        if name in STATEFUL_SHARED:
            yield spec, name, store, False
        elif _class_shares(spec):
            yield spec, spec.name, store, True


def shared_state(cfg: StackConfig, specs: list[LayerSpec], several: str | None = None) -> Iterator[Problem]:
    """Per-process state (memory://) under several workers.

    ``several`` says why there are several processes when ``server.workers`` does not
    (a WSGI server hosting ``serve:app`` that runs its own).
    """
    count = cfg.server.workers
    if several is None:
        if count <= 1:
            return
        several = f"server.workers is {count}"
    for spec, label, store, by_class in per_process_state(cfg, specs):
        if by_class:
            yield _problem(cfg, spec, f"{label} keeps state in store {store!r} (memory://) that its class says "
                                      f"every process must share (shared_state), but {several}: each process would "
                                      "have its own copy; use redis://")
        else:
            yield _problem(cfg, spec, f"{label} keeps state in store {store!r} (memory://) but {several}: each "
                                      "process would have its own copy; use redis://")
    for spec in specs:
        name, kept = kind(spec), _memory_store(cfg, spec)
        shares = _class_shares(spec)
        if kept is None or name in STATEFUL_SHARED or shares:  # (those are per_process_state's, above)
            continue
        if name == "cache":
            yield _problem(cfg, spec, f"cache on a memory:// store with {count} workers keeps one "
                                      "cache per process (more misses, uneven purges)", "warning")
        elif shares is None:
            yield _problem(cfg, spec, f"{spec.name} keeps state in store {kept!r} (memory://) and {several}: each "
                                      "process has its own copy; if it must be shared (counters, sessions, "
                                      "revocations), use redis:// and set shared_state = True on its class; if a "
                                      "copy per process is right, set shared_state = False", "warning")


def fail_open_security(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for name in ("session", "auth"):
        for spec in _all(specs, name):
            if spec.option("on_store_error") == "open":
                yield _problem(cfg, spec, f"{name} has on_store_error: open: during a store outage it would skip "
                                          f"{'token revocation checks' if name == 'auth' else 'session checks'}",
                               "warning")


def _reaches(spec: LayerSpec, path: str) -> bool:
    """Whether a ``GET`` of ``path`` is in the scope (paths, exclude_paths, methods) of ``spec``."""
    # PATH_INFO as PEP 3333 gives it: bytes as latin-1
    return spec.scope.matches({"REQUEST_METHOD": "GET", "PATH_INFO": path.encode("utf-8").decode("latin-1")})


def _auth_level(auth: LayerSpec, path: str) -> str:
    """The level (required, optional, none) an auth layer's rules give a ``GET`` of ``path``, as it reads them."""
    from middleware.auth import AuthRules

    return AuthRules(auth.option("rules", None) or (), str(auth.option("default", "required"))).first(path, "GET")[0]


def auth_checks_nothing(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """An auth layer whose default and every rule are ``none``: it never looks at a request."""
    for auth in _all(specs, "auth"):
        rules = auth.option("rules", None) or ()
        if auth.option("default", "required") != "none" or any(
                _field(rule, "roles") or _field(rule, "auth") != "none" for rule in rules):
            continue
        yield _problem(cfg, auth, f"auth at {_where(auth)} has default: none and no rule that asks for a token (auth: "
                                  "required or optional, or roles): it never looks at a request, so no request needs "
                                  "a token and no identity is ever set (the token endpoints still issue them); set "
                                  "default: required (or optional), or add rules for the paths to protect", "warning")


def operator_page_position(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for page in _all(specs, "operator_page"):
        path = str(page.option("path", "/_stack"))
        answered = (path, f"{path}/data.json")  # the page and what its script polls
        if page.option("roles"):
            auth = _first(specs, "auth")
            if auth is None or _pos(specs, auth) > _pos(specs, page):
                yield _problem(cfg, page, f"operator_page at {_where(page)} requires roles but no auth layer runs "
                                          "before it: no identity is ever set, so every request would get 401")
            else:
                outside = [a for a in _all(specs, "auth") if _pos(specs, a) < _pos(specs, page)]
                if not any(all(_reaches(a, p) and _auth_level(a, p) != "none" for p in answered) for a in outside):
                    a = outside[-1]
                    if all(_reaches(a, p) for p in answered):
                        why = f"auth at {_where(a)} gives its path {path!r} auth: none (its rules or default)"
                    else:
                        why = (f"the scope of auth at {_where(a)} (paths, exclude_paths, methods) leaves its path "
                               f"{path!r} out")
                    yield _problem(cfg, page, f"operator_page at {_where(page)} requires roles, but {why}: no "
                                              "identity is set for the page, so every request would get 401; let "
                                              "auth see the page's path", "warning")
        for cors, page_ in _before(specs, "cors", "operator_page"):
            if page_ is page and any(_reaches(cors, p) for p in answered):
                yield _problem(cfg, page, f"operator_page at {_where(page)} is inside cors at {_where(cors)}: cors "
                                          "would let pages of the origins it allows read the page's data (the whole "
                                          "configuration; with allow_credentials, as the signed-in operator); the "
                                          "page refuses other origins itself, but keep it out of cors: add "
                                          f"['{path}', '{path}/*'] to cors's exclude_paths, or put the page before "
                                          "cors", "warning")
        for page_, proxy in _before(specs, "operator_page", "proxy"):
            if page_ is page:
                yield _problem(cfg, page, f"operator_page at {_where(page)} is outside proxy at {_where(proxy)}: "
                                          "allow_from would be checked against the proxy's address")
        for name in ("cache", "ratelimit"):
            for other, page_ in _before(specs, name, "operator_page"):
                if page_ is page:
                    yield _problem(cfg, page, f"operator_page at {_where(page)} is inside {name} at "
                                              f"{_where(other)}: the page's polling would count against it",
                                   "warning")


def _every_address(spec: LayerSpec, option: str = "allow_from") -> str | None:
    """The entry of a layer's ``allow_from`` (or ``option``) that is every address (``0.0.0.0/0``, ``::/0``), if any."""
    from middleware.base import network
    from middleware.proxy import UNIX

    return next((str(n) for n in spec.option(option, None) or ()
                 if n != UNIX and network(str(n)).prefixlen == 0), None)


def open_to_every_address(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """metrics or operator_page whose allow_from is every address, on a server others can reach."""
    if cfg.server.loopback_only and not cfg.server.trusted_proxy and not _all(specs, "proxy"):
        return
    where = f"the server listens on {', '.join(cfg.server.listen)}"
    if cfg.server.loopback_only:
        where = "a proxy forwards other clients' requests to it"
    for page in _all(specs, "operator_page"):
        entry = _every_address(page)
        if entry and not page.option("roles"):
            yield _problem(cfg, page, f"operator_page at {_where(page)} has allow_from {entry}, which is every "
                                      "address, and no roles: any client could read the whole configuration (the "
                                      "layer refuses an empty allow_from without roles for this reason); list the "
                                      "operators' networks, or set roles (with an auth layer outside it)")
    for metrics in _all(specs, "metrics"):
        entry = _every_address(metrics)
        if entry:
            yield _problem(cfg, metrics, f"metrics at {_where(metrics)} has allow_from {entry}, which is every "
                                         f"address, and {where}: any client could scrape "
                                         f"{metrics.option('path', '/metrics')} (its routes, traffic and errors); "
                                         "list the Prometheus servers' networks", "warning")


def unknown_stores(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A ``store`` option (the stateful layers) or an entry of a ``stores`` list (health) that names no store."""
    for spec in specs:
        if not spec.is_layer_class:
            continue
        fields = type(spec.options).model_fields
        named: list[tuple[tuple[str | int, ...], object]] = []
        if "store" in fields:
            named.append((("store",), spec.option("store")))
        if "stores" in fields and isinstance(spec.option("stores"), list | tuple):
            named += [(("stores", i), name) for i, name in enumerate(spec.option("stores"))]
        for place, store in named:
            if store in cfg.stores:
                continue
            known = ", ".join(sorted(cfg.stores)) or "none"
            where = (*spec.path, spec.name, *place)
            line, col = cfg.document.locate(where) if spec.path and cfg.document.marks.get(where) else (0, 0)
            problem = _problem(cfg, spec, f"{spec.name} names store {store!r}, which the stores section does not "
                                          f"define{suggest(str(store), cfg.stores)} (known: {known})")
            yield dataclasses.replace(problem, path=where, line=line, column=col) if line else problem


def proxy_twice(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """Waitress's proxy trust and a proxy layer both (a warning), and ``trusted_proxy: '*'``.

    Both at once is redundant, not a forgery: Waitress cuts X-Forwarded-For down to its
    ``trusted_proxy_count`` entries and clears the headers it does not trust, so the layer, whatever
    its ``x_for``, reaches no entry a client wrote that Waitress alone would not take.  ``'*'`` takes
    every peer for the proxy: beyond loopback any client sets its own address, an error.
    """
    proxy = _first(specs, "proxy")
    if proxy is not None and cfg.server.trusted_proxy:
        yield _problem(cfg, proxy, "both server.trusted_proxy (Waitress) and the proxy layer trust forwarding "
                                   "headers; under Waitress keep only server.trusted_proxy", "warning")
    if cfg.server.trusted_proxy == "*":
        line, col = cfg.document.locate(("server", "trusted_proxy"))
        address = {"x-forwarded-for", "forwarded"} & {str(h).lower() for h in cfg.server.trusted_proxy_headers}
        if address and not cfg.server.loopback_only:  # as ProxyFix off loopback (proxyfix_trusts_every_peer)
            yield Problem(f"trusted_proxy '*' trusts every peer, and the server listens on "
                          f"{', '.join(cfg.server.listen)}: any client could set its own address in X-Forwarded-For "
                          "or Forwarded (its rate-limit key, allow_from); set trusted_proxy to the proxy's address, "
                          "or use the proxy layer with trusted_proxies",
                          ("server", "trusted_proxy"), cfg.document.file, line, col)
            return
        forged = ", ".join("-".join(word.capitalize() for word in str(h).split("-"))
                           for h in cfg.server.trusted_proxy_headers)
        yield Problem(f"trusted_proxy '*' trusts every peer, so any client can forge {forged}",
                      ("server", "trusted_proxy"), cfg.document.file, line, col, "warning")


def proxy_peers_can_connect(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A proxy layer none of whose trusted_proxies can be a peer: every client would be the proxy."""
    from middleware.base import network
    from middleware.proxy import UNIX

    families = cfg.server.peer_families
    if families is None:
        return
    for spec in _all(specs, "proxy"):
        given = getattr(spec.options, "trusted_proxies", None)  # werkzeug's ProxyFix has no such list
        entries = [n for n in given or () if n != UNIX]
        if not entries or any(network(n).version in families for n in entries):  # as the layer reads them
            continue
        trusted = [ipaddress.ip_network(n, strict=False) for n in entries]
        shown = " and ".join(f"IPv{v}" for v in sorted(families))
        yield _problem(cfg, spec, f"{spec.name} at {_where(spec)} trusts only {', '.join(map(str, trusted))}, and "
                                  f"every listen address is {shown}: no such proxy can be the peer (IPv6 sockets "
                                  "take IPv6 peers only), so its forwarding headers would never count and every "
                                  "client would seem to be the proxy; add the address the proxy connects from")


def proxy_headers_kept(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    layer = cfg.forwarding_layer
    if layer is None or cfg.server.trusted_proxy or cfg.server.clear_untrusted_proxy_headers is not True:
        return
    line, col = cfg.document.locate(("server", "clear_untrusted_proxy_headers"))
    yield Problem(f"clear_untrusted_proxy_headers is true and trusted_proxy is unset: Waitress would remove every "
                  f"X-Forwarded-* and Forwarded header before {layer.name} at {_where(layer)} reads them, so every "
                  "request would seem to come from the proxy itself; remove the setting (it is then off while a "
                  "layer reads the headers) or set it to false",
                  ("server", "clear_untrusted_proxy_headers"), cfg.document.file, line, col)


def proxyfix_trusts_every_peer(cfg: StackConfig, specs: list[LayerSpec], listens: str | None = None,
                               instead: str = ", or server.trusted_proxy") -> Iterator[Problem]:
    """werkzeug's ProxyFix has no list of trusted peers: off loopback, any client would set its own address.

    ``listens`` and ``instead`` word it for another WSGI server (``config.live.build_hosted``):
    where it listens, and what to do besides a proxy layer.
    """
    from middleware.proxy import ProxyMiddleware

    if cfg.server.loopback_only:
        return
    if cfg.clears_proxy_headers:
        # Waitress clears the untrusted headers it knows (X-Forwarded-For, -Host, -Proto, -Port, -By,
        # Forwarded), and leaves X-Forwarded-Prefix to whoever sent it: ProxyFix's x_prefix believes any
        # client, and a prefix of //evil.example turns the app's redirects into another site's.
        for spec in specs:
            if reads_forwarding_headers(spec) and not issubclass(spec.target, ProxyMiddleware) \
                    and spec.option("x_prefix", 0):
                yield _problem(cfg, spec, f"{spec.name} at {_where(spec)} believes X-Forwarded-Prefix from every "
                                          "peer: Waitress clears the untrusted forwarding headers it knows, and this "
                                          "is not one of them; drop x_prefix, or use the proxy layer with "
                                          "trusted_proxies and x_prefix (it checks the prefix)")
        return
    listens = listens or f"the server listens on {', '.join(cfg.server.listen)}"
    for spec in specs:
        if reads_forwarding_headers(spec) and not issubclass(spec.target, ProxyMiddleware):
            yield _problem(cfg, spec, f"{spec.name} at {_where(spec)} believes X-Forwarded-* from every peer, and "
                                      f"{listens}: any client could set its own address (its rate-limit key, "
                                      f"allow_from); use the proxy layer with trusted_proxies{instead}")
        elif reads_forwarding_headers(spec) and (entry := _every_address(spec, "trusted_proxies")):
            # The proxy layer with 0.0.0.0/0 (or ::/0) among its trusted_proxies is ProxyFix by another name.
            forged = _forgeable(spec)
            if forged:
                yield _problem(cfg, spec, f"{spec.name} at {_where(spec)} trusts every address ({entry} in "
                                          f"trusted_proxies), and {listens}: any client could set its own {forged}; "
                                          f"list only the proxies' addresses in trusted_proxies{instead}")


def _forgeable(spec: LayerSpec) -> str:
    """What a proxy layer takes from the forwarding headers, as a client that sends them would set it ("" for none)."""
    if spec.option("x_for", 0) or spec.option("forwarded", 0):
        return "address (its rate-limit key, allow_from)"
    taken = [what for option, what in (("x_proto", "scheme"), ("x_host", "host"), ("x_port", "port"),
                                       ("x_prefix", "prefix")) if spec.option(option, 0)]
    return " and ".join(taken)


def request_id_early(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    rid = _first(specs, "request_id")
    if rid is None:
        return
    for spec in specs[:_pos(specs, rid)]:
        if kind(spec) not in ("errors", "proxy", "health", "metrics", "access_log"):
            yield _problem(cfg, rid, f"request_id at {_where(rid)} is inside {spec.name} at {_where(spec)}: its "
                                     "refusals and log lines carry no request id; put request_id right after errors",
                           "warning")


def validation_first(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for val in _all(specs, "validation"):
        for spec in specs[:_pos(specs, val)]:
            name = kind(spec)
            if name in ("session", "auth", "cache", "csrf"):
                yield _problem(cfg, spec, f"{name} at {_where(spec)} is outside validation at {_where(val)}: it "
                                          "would do store work for requests validation refuses; move validation "
                                          "before it", "warning")


def headers_cover_refusals(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for inner in ("validation", "ratelimit", "auth", "csrf", "session", "versioning", "cache"):
        for other, hdr in _before(specs, inner, "headers"):
            yield _problem(cfg, hdr, f"headers at {_where(hdr)} is inside {inner} at {_where(other)}: {inner}'s "
                                     "refusals would lack the security headers; move headers before it", "warning")


def _reads_scheme(spec: LayerSpec) -> bool:
    """Whether a proxy layer sets wsgi.url_scheme from the proxy's header (werkzeug's ProxyFix does by default)."""
    return bool(spec.option("x_proto", 1) or spec.option("forwarded", 0))


def _hsts_unsent(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[tuple[LayerSpec, list[LayerSpec]]]:
    """Each headers layer with HSTS on that no proxy layer outside it gives https, with the proxy layers that
    set the scheme; none when serve.py's Waitress makes requests https itself or listens on loopback only."""
    proxied = {"x-forwarded-proto", "forwarded"} & {str(h).lower() for h in cfg.server.trusted_proxy_headers}
    if cfg.server.url_scheme == "https" or proxied or cfg.server.loopback_only:
        return
    setters = [p for p in _all(specs, "proxy") if _reads_scheme(p)]
    for hdr in _all(specs, "headers"):
        if hdr.option("hsts", True) and not any(_pos(specs, p) < _pos(specs, hdr) for p in setters):
            yield hdr, setters


def hsts_outside_proxy(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for hdr, setters in _hsts_unsent(cfg, specs):
        if setters:
            yield _problem(cfg, hdr, f"headers at {_where(hdr)} is outside proxy at {_where(setters[0])}, which "
                                     "sets the scheme: headers reads it first and never sends "
                                     "Strict-Transport-Security; put proxy right after errors", "warning")


def hsts_reachable(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """No https anywhere in serve.py's server (another WSGI server may set the scheme itself: TLS, its own
    forwarded-header handling)."""
    for hdr, setters in _hsts_unsent(cfg, specs):
        if not setters:
            yield _problem(cfg, hdr, f"headers at {_where(hdr)} sends Strict-Transport-Security only on https "
                                     "requests, but nothing makes wsgi.url_scheme https (server.url_scheme is http, "
                                     "server.trusted_proxy_headers lacks x-forwarded-proto, no proxy layer reads "
                                     "X-Forwarded-Proto or Forwarded)", "warning")


def validation_limits(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for val in _all(specs, "validation"):
        query, url = val.option("max_query_length", 2048), val.option("max_url_length", 8192)
        if query >= url:
            yield _problem(cfg, val, f"validation.max_query_length ({query}) is not below max_url_length ({url}): "
                                     "the URL's limit refuses such queries first (414); raise max_url_length",
                           "warning")


def validation_vs_waitress(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    for val in _all(specs, "validation"):
        body = val.option("max_body_bytes", 1048576)
        if body > cfg.server.max_request_body_size:
            yield _problem(cfg, val, f"validation.max_body_bytes ({body}) is above server.max_request_body_size "
                                     f"({cfg.server.max_request_body_size}): Waitress refuses larger bodies first, "
                                     "with its own plain-text 413", "warning")
        total = val.option("max_total_header_bytes", 32768)
        if total is not None and total > cfg.server.max_request_header_size:
            yield _problem(cfg, val, f"validation.max_total_header_bytes ({total}) is above "
                                     f"server.max_request_header_size ({cfg.server.max_request_header_size}): "
                                     "Waitress refuses larger header blocks first", "warning")


def _core_search_options(cfg: StackConfig) -> Any:
    """The app's validated ``search`` options when its factory takes wsgistack's (``stream_interval``,
    ``max_streams``); else None (another app, or options that stage 3 refused)."""
    try:
        model = getattr(import_string(cfg.app.factory), "Options", None)
        search = model.model_validate(cfg.app.options).search if model is not None else None
    except Exception:
        return None
    has_cap = hasattr(search, "stream_interval") and hasattr(search, "max_streams")
    return search if has_cap else None


def streams_leave_a_thread(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A paced stream holds a server thread for its whole length (about five intervals, asleep): with
    ``max_streams`` not below the threads, they can take every thread of a process, and the health
    probes wait behind them.  Both count per process, so workers change nothing."""
    search = _core_search_options(cfg)
    threads = cfg.server.threads
    if search is None or not search.stream_interval > 0 or search.max_streams < threads:
        return
    fix = f"set max_streams to at most {threads - 1}, or raise" if threads > 1 else "raise"
    yield cfg.document.problem(
        ("app", "options", "search", "max_streams"),
        f"search.max_streams ({search.max_streams}) is not below server.threads ({threads}) with "
        f"search.stream_interval {search.stream_interval:g}: paced streams can hold every server thread of a process "
        "(each for about five intervals), and every other request, the health probes too, then waits behind them; "
        f"{fix} server.threads (both count per process, with workers too)", key=True, severity="warning")


#: What ``check`` suggests for a weak secret.
NEW_SECRET = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _weakness(secret: str) -> str | None:
    """Why a secret of the right length is still easy to guess (a run repeated, few characters), or None.

    Says nothing of the secret itself, which ends up in logs and terminals.
    """
    size = len(secret)
    for run in range(1, size // 2 + 1):
        if secret.startswith(secret[run:]):  # the first ``run`` characters over and over (the last copy may be cut)
            return f"is a run of {run} character{'s' if run > 1 else ''} repeated"
    distinct = len(set(secret))
    if distinct < 8:
        return f"uses only {distinct} different characters in {size}"
    return None


def _secrets_in(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """The strings under secret-named keys in a layer's options, with their paths."""
    if isinstance(value, dict):
        for key, item in value.items():
            secret = isinstance(key, str) and secret_value(key, item)  # (a rate limit's ``key: client_ip`` is none)
            if secret and isinstance(item, str):
                yield (*path, key), item
            elif secret and isinstance(item, list):
                yield from (((*path, key, i), x) for i, x in enumerate(item) if isinstance(x, str))
            else:
                yield from _secrets_in(item, (*path, key))


def _layer_secrets(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[tuple[int, tuple[str | int, ...], str]]:
    """``(the layer's index, path, secret)`` for each secret the pipeline's layers are given in stack.yaml."""
    for index, spec in enumerate(specs):
        if spec.implicit or not spec.path:
            continue
        where = (*spec.path, spec.name)
        for path, secret in _secrets_in(data_at(cfg.document, where), where):
            yield index, path, secret


def weak_secrets(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """A signing secret long enough for its layer but made of a repeated run or a handful of characters
    (``"a" * 48``, ``changeme`` over and over): its length is no measure of how hard it is to guess."""
    for _, path, secret in _layer_secrets(cfg, specs):
        why = _weakness(secret) if len(secret) >= 16 else None
        if why is not None:
            yield cfg.document.problem(path, f"the secret {why}: its length says little of how hard it is to "
                                             f"guess; {NEW_SECRET}", severity="warning")


def shared_secrets(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """One secret given to two layers (``SESSION_SECRET`` and ``JWT_SECRET`` set alike): each signs its own
    kind of thing, and a key that signs both makes a leak or misuse of one the other's too."""
    first: dict[str, tuple[int, tuple[str | int, ...]]] = {}  # secret -> (the layer that has it, where)
    for index, path, secret in _layer_secrets(cfg, specs):
        seen = first.setdefault(secret, (index, path))
        if seen[0] != index:  # (a layer's own fallbacks may repeat its key while it is rotated)
            yield cfg.document.problem(path, f"the same secret as {dotted(seen[1])}: give each layer a key of "
                                             f"its own; {NEW_SECRET}", severity="warning")


def empty_pipeline(cfg: StackConfig, specs: list[LayerSpec]) -> Iterator[Problem]:
    """No layer listed (``pipeline: []``, ``pipeline:`` or no ``pipeline`` at all): the app is served bare."""
    if not cfg.pipeline:
        yield cfg.document.problem(("pipeline",), "pipeline lists no layer: the app is served behind the default "
                                   "errors layer alone (no request ids, security headers, limits or access log); "
                                   "list the layers, as in the default stack.yaml", key=True, severity="warning")


RULES: list[Rule] = [
    empty_pipeline,
    weak_secrets,
    shared_secrets,
    errors_outermost,
    cache_outside_private,
    ratelimit_keys,
    duplicates,
    ratelimit_namespaces,
    ratelimit_escapes,
    ratelimit_behind_proxy_layer,
    ratelimit_behind_waitress_proxy,
    ratelimit_policies,
    cors_position,
    cors_scope_takes_preflights,
    cache_inside_cors,
    cache_inside_ratelimit,
    cache_identity,
    cache_sees_writes,
    proxy_position,
    cors_patterns,
    csrf_needs_session,
    csrf_header_allowed,
    auth_inside_session,
    versioning_before_cache,
    paths_inside_versioning,
    excluded_everywhere,
    proxyfix_trusts_every_peer,
    probes_first,
    shared_state,
    fail_open_security,
    auth_checks_nothing,
    operator_page_position,
    open_to_every_address,
    unknown_stores,
    proxy_twice,
    proxy_peers_can_connect,
    proxy_headers_kept,
    request_id_early,
    validation_first,
    headers_cover_refusals,
    hsts_outside_proxy,
    hsts_reachable,
    validation_limits,
    validation_vs_waitress,
    streams_leave_a_thread,
]


#: Rules that judge settings only serve.py applies (its sockets, their address families and whether
#: they are on loopback, its workers, Waitress's proxy trust, scheme, header clearing and body limit):
#: another WSGI server has its own, which wsgistack judges where it can (a hosted start's multiprocess
#: check; HOSTED's least safe settings, or $WSGISTACK_HOST_LISTEN's, for ProxyFix and for headers outside
#: a proxy layer).
SERVED_ONLY: tuple[Rule, ...] = (proxy_twice, ratelimit_behind_waitress_proxy, proxy_peers_can_connect,
                                 proxy_headers_kept, hsts_outside_proxy, hsts_reachable, shared_state,
                                 validation_vs_waitress, streams_leave_a_thread, proxyfix_trusts_every_peer)


def lint(cfg: StackConfig, *, hosted: bool = False) -> list[Problem]:
    """Run every rule (``hosted``: under another WSGI server, not the ``SERVED_ONLY`` ones); errors first,
    then warnings, each in pipeline order."""
    from .build import with_default_errors

    specs = with_default_errors(cfg.pipeline)
    rules = [rule for rule in RULES if rule not in SERVED_ONLY] if hosted else RULES
    found = [cfg.document.masked(p) for rule in rules for p in rule(cfg, specs)]  # (rules make Problems themselves)
    return sorted(found, key=lambda p: (p.severity != "error", p.line, p.column))
