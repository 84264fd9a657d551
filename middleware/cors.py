"""Cross-origin resource sharing: answer preflights, label responses for allowed origins.

The layer answers an allowed preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) itself with ``204``, so layers inside it
(auth, rate limits) and the app never see preflights; it refuses a disallowed
one with ``403`` and no CORS headers.  Other requests pass through; when their
origin is allowed the response (errors included) carries
``Access-Control-Allow-Origin``.  Every response of a path in its scope gets
``Vary: Origin``, error responses to requests without ``Origin`` included.

A preflight may always ask for the CORS-safelisted methods (GET, HEAD, POST):
the Fetch standard's CORS check accepts them whatever
``Access-Control-Allow-Methods`` says.  Methods are compared case-sensitively,
as browsers compare them, against ``allow_methods`` upper-cased: Waitress
refuses a request whose method is not upper case, so ``patch`` could never
reach the app, and ``[patch]`` in the config means ``PATCH``.

Origins are compared after lowercasing scheme and host and dropping the
default port (``:80`` for http, ``:443`` for https), so ``HTTPS://App.Example.org:443``
is ``https://app.example.org``; nothing else is rewritten.

Do not use it for same-origin apps (browsers need no CORS there), and do not
use it as access control: CORS only tells browsers which pages may *read*
responses; a script outside a browser ignores it.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_list_header

from .base import (
    STRANGER_ORIGINS,
    TOKEN,
    Context,
    LayerOptions,
    UnstartedBody,
    add_vary,
    decoded_path,
    decorate_error,
    escape_control,
    note,
    parse_origin,
    refuse,
    rewrites_inside,
    routed_path,
    serialise_origin,
    wildcard_stranger,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

SAFELISTED_HEADERS = ("accept", "accept-language", "content-language", "content-type")
SAFELISTED_METHODS = ("GET", "HEAD", "POST")
_ACRM = "HTTP_ACCESS_CONTROL_REQUEST_METHOD"
_POLICY_KEYS = ("origins", "origin_regex", "allow_methods", "allow_headers", "expose_headers",
                "allow_credentials", "max_age", "allow_private_network")


def _regex_list(data: Any) -> Any:
    """``origin_regex`` given as one string: a list of it (at the top level and in a rule alike)."""
    if isinstance(data, dict) and isinstance(data.get("origin_regex"), str):
        data = {**data, "origin_regex": [data["origin_regex"]]}
    return data


class CORSRule(LayerOptions):
    """One entry of ``rules``: ``paths`` plus the policy keys that differ from the top level."""

    paths: tuple[str, ...] = Field(min_length=1)
    origins: tuple[str, ...] | None = None
    origin_regex: tuple[str, ...] | None = None
    allow_methods: tuple[str, ...] | None = None
    allow_headers: tuple[str, ...] | None = None
    expose_headers: tuple[str, ...] | None = None
    allow_credentials: bool | None = None
    max_age: int | None = Field(default=None, ge=0)
    allow_private_network: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_regex_is_a_list(cls, data: Any) -> Any:
        return _regex_list(data)


class CORSOptions(LayerOptions):
    """Options of the ``cors`` layer (see :class:`CORSMiddleware`)."""

    origins: tuple[str, ...] = ()
    origin_regex: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int = Field(default=600, ge=0)
    allow_private_network: bool = False
    rules: tuple[CORSRule, ...] = ()

    def policy(self, rule: CORSRule | None = None) -> dict[str, Any]:
        """The effective policy keys: the top level, overridden by ``rule``'s set keys.

        ``origins`` and ``origin_regex`` are one allow-list in two spellings: a rule
        that sets either replaces both (``origins: []`` alone allows no origin, not
        the top level's patterns).
        """
        data = {key: getattr(self, key) for key in _POLICY_KEYS}
        if rule is not None:
            if rule.origins is not None or rule.origin_regex is not None:
                data["origins"], data["origin_regex"] = (), ()
            data.update({k: v for k in _POLICY_KEYS if (v := getattr(rule, k)) is not None})
        return data

    @model_validator(mode="before")
    @classmethod
    def _one_regex_is_a_list(cls, data: Any) -> Any:
        return _regex_list(data)

    @model_validator(mode="after")
    def _policies_can_be_right(self) -> CORSOptions:
        places = [("", self.policy())]
        places += [(f"rules[{i}].", self.policy(rule)) for i, rule in enumerate(self.rules)]
        for where, policy in places:
            for origin in policy["origins"]:
                entry = _origin_entry(origin) if origin not in ("*", "null") else ("", "", None)
                if entry is None:
                    raise ValueError(
                        f"{where}origins entry {origin!r} is not an origin: " + (
                            "browsers send a host name in its ASCII form (its IDNA A-label, xn--…); write that"
                            if not origin.isascii() else
                            "write scheme://host[:port] with no path, or https://*.example.org"))
                stranger = wildcard_stranger(*entry)
                if policy["allow_credentials"] and stranger is not None:
                    raise ValueError(
                        f"{where}origins entry {origin!r} matches origins nobody listed ({stranger} too) "
                        f"while {where}allow_credentials is true: any site under it could read its visitors' "
                        "answers; name your own domain (https://*.example.co.uk)")
            for pattern in policy["origin_regex"]:
                try:
                    compiled = re.compile(pattern, _ORIGIN_FLAGS)
                except (re.error, OverflowError) as exc:  # OverflowError: a repeat count of 2**32 or more
                    raise ValueError(f"{where}origin_regex {pattern!r} is not a valid "
                                     f"regular expression: {exc}") from None
                anyone = next((o for o in _strangers(pattern) if compiled.fullmatch(o)), None)
                if policy["allow_credentials"] and anyone is not None:
                    raise ValueError(
                        f"{where}origin_regex {pattern!r} matches origins nobody listed ({anyone} too) "
                        f"while {where}allow_credentials is true: any site could read its visitors' "
                        "answers; name the hosts (https://app\\.example\\.org, https://.*\\.example\\.org)")
            for method in policy["allow_methods"]:
                if not TOKEN.fullmatch(method):
                    raise ValueError(f"{where}allow_methods entry {method!r} is not a method name")
            for key in ("allow_headers", "expose_headers"):  # one bad name and a browser refuses the whole list
                for header in policy[key]:
                    if not TOKEN.fullmatch(header):
                        raise ValueError(f"{where}{key} entry {header!r} is not a header name (letters, digits "
                                         "and !#$%&'*+-.^_`|~, no spaces)")
            if policy["allow_credentials"] and "*" in policy["origins"]:
                raise ValueError(f"{where}allow_credentials may not be true when "
                                 f"{where}origins contains '*'; list the origins instead")
            if policy["allow_credentials"] and "null" in policy["origins"]:
                raise ValueError(
                    f"{where}origins may not contain 'null' when {where}allow_credentials is "
                    "true: sandboxed iframes, file: pages and redirects all send Origin: null")
        return self


#: How ``origin_regex`` patterns are compiled: schemes and host names have no case, and the origin they are
#: matched against is lowercased, so ``https://App\.Example\.org`` (which matched nothing) means what it says.
_ORIGIN_FLAGS = re.IGNORECASE

#: The literal host name a pattern ends with (``example\.org`` in ``https://.*example\.org``).
_LITERAL_TAIL = re.compile(r"(?:[A-Za-z0-9-]|\\\.)+\Z")


def _strangers(pattern: str) -> list[str]:
    r"""Origins of other people's sites to try ``pattern`` on.

    Besides :data:`STRANGER_ORIGINS`, the name the pattern ends with glued to another
    (``https://wsgistackprobeexample.org`` for ``https://.*example\.org``): a
    pattern that matches it lets in any domain that ends with those letters.  A
    tail that starts with a dot (``\.example\.org``) asks for a subdomain: no probe.
    """
    found = [*STRANGER_ORIGINS]
    tail = _LITERAL_TAIL.search(pattern)
    if tail is not None and not tail.group().startswith("\\."):
        name = tail.group().replace("\\.", ".")
        if "." in name:
            found += [f"https://wsgistackprobe{name}", f"http://wsgistackprobe{name}"]
    return found


def _origin_entry(entry: str) -> tuple[str, str, int | None] | None:
    """Parse a configured origin; a wildcard entry gives a host starting with ``*.``."""
    wildcard = entry.lower().replace("://*.", "://x.", 1)
    parsed = parse_origin(wildcard)
    if parsed is None or "*" in wildcard:
        return None
    scheme, host, port = parsed
    if wildcard != entry.lower():
        if "." not in host[2:]:
            return None  # https://*.org would trust a whole top-level domain
        host = "*" + host[1:]
    return scheme, host, port


class _Policy:
    """One normalised policy: the top level or a rule merged over it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        origins = data["origins"]
        self.allow_all = "*" in origins
        self.exact: frozenset[str] = frozenset()
        self.wildcards: list[tuple[str, str, int | None]] = []
        for entry in origins:
            parsed = _origin_entry(entry) if entry not in ("*", "null") else None
            if entry == "null":
                self.exact |= {"null"}
            elif parsed and parsed[1].startswith("*."):
                self.wildcards.append((parsed[0], parsed[1][1:], parsed[2]))
            elif parsed:
                self.exact |= {serialise_origin(*parsed)}
        self.regexes = [re.compile(p, _ORIGIN_FLAGS) for p in data["origin_regex"]]
        self.seen: dict[str, bool] = {}
        self.active = bool(self.allow_all or self.exact or self.wildcards or self.regexes)
        methods = [m.upper() for m in data["allow_methods"]]
        self.all_methods = "*" in methods
        listed = [m for m in dict.fromkeys(methods) if m != "*"]
        # Browsers never preflight-check a safelisted method, so it passes without being listed.
        self.methods = frozenset(listed) | frozenset(SAFELISTED_METHODS)
        self.methods_value = ", ".join(listed)
        self.methods_shown = ", ".join(
            [*SAFELISTED_METHODS, *(m for m in listed if m not in SAFELISTED_METHODS)])
        headers = [h.lower() for h in data["allow_headers"]]
        self.all_headers = "*" in headers
        self.headers = frozenset(headers) | frozenset(SAFELISTED_HEADERS)
        self.headers_value = ", ".join(sorted(self.headers - {"*"}))
        self.credentials: bool = data["allow_credentials"]
        self.private_network: bool = data["allow_private_network"]
        self.max_age = str(data["max_age"])
        self.star = self.allow_all and not self.credentials
        self.extra: list[tuple[str, str]] = []
        if self.credentials:
            self.extra.append(("Access-Control-Allow-Credentials", "true"))
        if data["expose_headers"]:
            self.extra.append(("Access-Control-Expose-Headers", ", ".join(data["expose_headers"])))

    def allows(self, origin: str) -> bool:
        if self.allow_all or origin in self.exact:
            return True
        known = self.seen.get(origin)
        if known is None:
            if len(origin) > _LONGEST_ORIGIN:  # no origin is this long: not kept (1024 of 256 KiB each would
                return self._matches(origin)     # hold a quarter of a gigabyte until the next clear)
            if len(self.seen) >= 1024:
                self.seen.clear()  # bounded: random origins only cost a fresh match
            known = self.seen[origin] = self._matches(origin)
        return known

    def _matches(self, origin: str) -> bool:
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        scheme, host, port = parsed
        normal = serialise_origin(scheme, host, port)
        if normal in self.exact:
            return True
        for w_scheme, suffix, w_port in self.wildcards:
            if scheme == w_scheme and port == w_port and host.endswith(suffix):
                return True  # suffix starts with ".", so example.org itself never matches
        return any(rx.fullmatch(normal) for rx in self.regexes)

    def allow_origin(self, origin: str) -> list[tuple[str, str]]:
        return [("Access-Control-Allow-Origin", "*" if self.star else origin), *self.extra]


class _Both(_Policy):
    """What two policies both grant: for a request whose two spellings (see ``routed_path``) pick two rules.

    An origin must be allowed by both, a method or a header too; credentials and private
    network access only when both give them; the headers both expose; the shorter ``max_age``.
    """

    def __init__(self, a: _Policy, b: _Policy) -> None:
        x, y = a.data, b.data
        super().__init__({
            "origins": (), "origin_regex": (),  # origins: ``allows`` asks both policies
            "allow_methods": _both_lists(x["allow_methods"], y["allow_methods"], str.upper),
            "allow_headers": _both_lists(x["allow_headers"], y["allow_headers"], str.lower),
            "expose_headers": _both_lists(x["expose_headers"], y["expose_headers"], str.lower),
            "allow_credentials": x["allow_credentials"] and y["allow_credentials"],
            "max_age": min(x["max_age"], y["max_age"]),
            "allow_private_network": x["allow_private_network"] and y["allow_private_network"],
        })
        self.a, self.b = a, b
        self.allow_all = a.allow_all and b.allow_all
        self.star = self.allow_all and not self.credentials
        self.active = a.active and b.active

    def allows(self, origin: str) -> bool:
        return self.a.allows(origin) and self.b.allows(origin)


def _both_lists(x: Sequence[str], y: Sequence[str], fold: Callable[[str], str]) -> tuple[str, ...]:
    """The entries of two allow-lists that both grant (``*`` grants anything)."""
    if "*" in x:
        return tuple(y)
    if "*" in y:
        return tuple(x)
    folded = {fold(entry) for entry in y}
    return tuple(entry for entry in x if fold(entry) in folded)


class CORSMiddleware:
    """Answer CORS preflights and label responses for allowed origins.

    Options:
      ``origins``: exact origins (``https://app.example.org``), wildcard
      subdomains (``https://*.example.org``: any depth, never the bare
      domain), ``"null"`` or ``"*"``.  ``origin_regex``: patterns that must
      match the whole normalised origin, in either case (``https://pr-[0-9]+\\.example\\.org``).
      ``allow_methods`` (default GET, HEAD, POST; ``*`` for any; upper-cased,
      then compared case-sensitively; GET, HEAD and POST are always allowed),
      ``allow_headers`` (the CORS-safelisted ones are always allowed; ``*``
      echoes what was asked), ``expose_headers``, ``allow_credentials``
      (refused with ``*`` or ``null``), ``max_age`` (seconds, default 600),
      ``allow_private_network`` (default off; when on, answers
      ``Access-Control-Allow-Private-Network: true`` to allowed origins).
      ``rules``: ``[{paths: [...], <any key above>}]``; the *first* rule whose
      ``paths`` (shell patterns, ``*`` crosses ``/``, case-sensitive, on the
      percent-decoded path) match wins; its unset keys come from the top
      level.  A path whose policy allows no origin is outside the layer.

    Usage::

        opts = CORSMiddleware.Options(origins=("https://app.example.org",), allow_credentials=True)
        app = CORSMiddleware(app, opts, Context())
    """

    Options = CORSOptions
    #: The layer grants: with ``paths``/``exclude_paths``, a request is in its scope only when the path
    #: asked for and the path it is routed to (versioning inside) both are (see ``config.scope``).
    scope_every_spelling = True

    def __init__(self, app: WSGIApplication, options: CORSOptions, context: Context) -> None:
        self.app = app
        self.options = options
        self.logger = context.logger.getChild("cors")
        self.default = _Policy(options.policy())
        self.rules = [
            (re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in rule.paths)),
             _Policy(options.policy(rule)))
            for rule in options.rules
        ]
        self.rewrites = rewrites_inside(context)  # versioning inside: a rule holds for the path it routes to
        # ...and a preflight, which carries no version header, for every path the real request may reach
        self.alternatives = tuple(context.path_alternatives)
        #: The policy of a request whose two spellings pick two policies (rules), by their places.
        self.both: dict[tuple[int, int], _Policy] = {}
        self.both_alternatives: dict[tuple[int, int], _Policy] = {}  # (id of a policy, a rule's place) -> both

    @staticmethod
    def lint(options: CORSOptions) -> list[str]:
        """Warnings about settings that are allowed but probably wrong, as sentences."""
        warnings: list[str] = []
        places = [("", options.policy())]
        places += [(f"rules[{i}].", options.policy(r)) for i, r in enumerate(options.rules)]
        for where, policy in places:
            for pattern in policy["origin_regex"]:
                if _has_lone_dot(pattern):
                    warnings.append(
                        f"{where}origin_regex {pattern!r} has an unescaped '.', which matches "
                        "any character (https://appXexample.org too); write '\\.' for a dot")
            if policy["allow_credentials"] and "*" in policy["expose_headers"]:
                warnings.append(
                    f"{where}expose_headers '*' is read as a header named '*' on requests with credentials "
                    "(Fetch): browsers expose nothing by it here; list the header names")
            if policy["allow_credentials"]:
                warnings += [
                    f"{where}origins entry {o!r} is plain http while allow_credentials is "
                    "true; cookies then reach pages anyone on the network can alter"
                    for o in policy["origins"]
                    if o.lower().startswith("http://") and not _is_loopback(o)]
        seen: list[tuple[int, str]] = []
        for i, rule in enumerate(options.rules):
            for path in rule.paths:
                for j, earlier in seen:
                    if not any(c in earlier for c in "?[") and fnmatch.fnmatchcase(path, earlier):
                        warnings.append(
                            f"rules[{i}].paths {path!r} is already matched by rules[{j}] "
                            f"({earlier!r}); the first matching rule wins, so it never applies")
                        break
            seen += [(i, p) for p in rule.paths]
        return warnings

    def _policy(self, environ: WSGIEnvironment) -> _Policy:
        """The policy of the first rule matching the request path, met with the routed path's when they differ.

        A client chooses how to spell a versioned path (``/api/V2/x``, ``/api/x`` with a version
        header or media type): with the request path alone, it would pick a spelling no rule
        names to be granted what the rule for the resource it reaches withholds.
        """
        if not self.rules:
            return self.default
        path = decoded_path(environ)
        place = self._place(path)
        if self.rewrites:
            routed = routed_path(environ, self.rewrites)
            if routed != path:
                other = self._place(routed)
                if other != place:
                    both = self.both.get((place, other))
                    if both is None:
                        both = self.both[(place, other)] = _Both(self._at(place), self._at(other))
                    return both
        return self._at(place)

    def _preflight_policy(self, environ: WSGIEnvironment, policy: _Policy) -> _Policy:
        """``policy`` met with the rules of every path the real request may be routed to.

        A preflight carries neither the version header's value nor the page's ``Accept``:
        ``OPTIONS /api/x`` is judged with ``/api/v1/x``, the default's, and the request may then
        name v2 (``X-API-Version``, a vendor ``Accept``, which needs no preflight).  What it is
        granted, every version's rule must grant.
        """
        if not self.rules:
            return policy
        places = {self._place(decoded_path({"PATH_INFO": path}))
                  for alternatives in self.alternatives for path in alternatives(environ)}
        places -= {self._place(decoded_path(environ)), self._place(routed_path(environ, self.rewrites))}  # (met)
        for place in sorted(places):
            key = (id(policy), place)
            both = self.both_alternatives.get(key)
            if both is None:
                both = self.both_alternatives[key] = _Both(policy, self._at(place))
            policy = both
        return policy

    def _place(self, path: str) -> int:
        """The index of the first rule matching ``path``; -1 for the top level."""
        for i, (pattern, _) in enumerate(self.rules):
            if pattern.match(path):
                return i
        return -1

    def _at(self, place: int) -> _Policy:
        return self.default if place < 0 else self.rules[place][1]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        policy = self._policy(environ)
        if self.alternatives and _ACRM in environ and environ["REQUEST_METHOD"] == "OPTIONS":
            policy = self._preflight_policy(environ, policy)
        if not policy.active:
            return self.app(environ, start_response)
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            # A shared cache may keep this answer (a 404 too) for the next request to
            # the URL, one with an allowed Origin among them: so it varies on Origin.
            labelled = _Labelled(start_response, ())
            try:
                body = self.app(environ, labelled)
            except Exception as exc:
                _decorate(exc, ())
                raise
            return body if labelled.started else _unstarted(body, labelled)
        # (OPTIONS * asks about the server, not a resource: no preflight grants anything for it. An empty
        # PATH_INFO is the root of a url_prefix, SCRIPT_NAME, a resource like any other.)
        if environ["REQUEST_METHOD"] == "OPTIONS" and _ACRM in environ and environ.get("PATH_INFO") != "*":
            return self._preflight(environ, start_response, policy, origin)
        allowed = policy.allows(origin)
        added = policy.allow_origin(origin) if allowed else ()
        labelled = _Labelled(start_response, added)
        try:
            body = self.app(environ, labelled)
        except Exception as exc:
            _decorate(exc, added)
            raise
        return body if labelled.started else _unstarted(body, labelled)

    def _preflight(
        self, environ: WSGIEnvironment, start_response: StartResponse, policy: _Policy, origin: str,
    ) -> Iterable[bytes]:
        method = environ[_ACRM]
        asked = [h.strip().lower() for h in
                 parse_list_header(environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", ""))]
        asked = [h for h in asked if h]
        wants_private = environ.get("HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK") == "true"
        reason = None
        if not policy.allows(origin):
            reason = "the origin is not allowed"
        elif not (method in policy.methods or (policy.all_methods and TOKEN.fullmatch(method))):
            reason = f"the requested method is not allowed (allowed: {policy.methods_shown})"
            if method.upper() in policy.methods:
                reason += f"; method names are case-sensitive, so the page must send {method.upper()!r}"
        elif bad := [h for h in asked if not TOKEN.fullmatch(h)
                     or (h not in policy.headers and not policy.all_headers)]:
            shown = ", ".join(h for h in bad if TOKEN.fullmatch(h)) or "(not a token)"
            reason = f"the requested header {shown} is not allowed " \
                     f"(allowed: {policy.headers_value})"
        elif wants_private and not policy.private_network:
            reason = "private network access is not allowed (allow_private_network is false)"
        if reason is not None:
            self.logger.info("cors preflight refused: %s; origin %s, path %s", reason,
                             escape_control(origin), escape_control(decoded_path(environ)))
            note(environ, "cors", f"preflight refused: {reason}")
            exc = refuse(403, f"CORS preflight refused: {reason}.")
            add_vary(exc.wsgistack_headers, "Origin")  # type: ignore[attr-defined]
            raise exc
        headers = policy.allow_origin(origin)
        allow = method if policy.all_methods else policy.methods_value
        if allow:  # empty when only safelisted methods are allowed: browsers need none listed
            headers.append(("Access-Control-Allow-Methods", allow))
        if asked:
            allowed = ", ".join(asked) if policy.all_headers else policy.headers_value
            headers.append(("Access-Control-Allow-Headers", allowed))
        headers.append(("Access-Control-Max-Age", policy.max_age))
        if wants_private:
            headers.append(("Access-Control-Allow-Private-Network", "true"))
        headers.append(("Vary", "Origin, Access-Control-Request-Method, "
                                "Access-Control-Request-Headers"))
        note(environ, "cors", "preflight answered 204")
        start_response("204 No Content", headers)
        return []


#: The headers that grant a page access: on the layer's paths only the layer sends them.  An app's own
#: (Access-Control-Allow-Origin: * to an origin the layer does not allow, -Allow-Credentials: true where
#: the layer's policy gives none) would grant what the configuration withholds.
_OWN_NAMES = frozenset(("access-control-allow-origin", "access-control-allow-credentials",
                        "access-control-expose-headers"))
#: The lengths of those names and of "vary": a header name of another length is neither.
_OWN_SIZES = frozenset(len(n) for n in (*_OWN_NAMES, "vary"))
#: Longer than any origin (a scheme, a host name of at most 253 characters, a port).
_LONGEST_ORIGIN = 300


def _decorate(exc: BaseException, added: Sequence[tuple[str, str]]) -> None:
    """Give an exception on its way to ``errors`` the CORS headers ``added`` and ``Vary: Origin``.

    A response the exception carries (``abort(Response(...))``) is sent by ``errors`` as it is, the
    attached headers only where it has none of that name: its own ``Access-Control-Allow-Origin: *``
    would stand for ours (to an origin the policy leaves out too) and its own ``Vary`` would drop
    ``Origin``.  So that response is labelled in place, as ``_Labelled`` labels one the app starts.
    """
    decorate_error(exc, added)
    add_vary(getattr(exc, "wsgistack_headers", []), "Origin")
    own = exc.response if isinstance(exc, HTTPException) else None
    if own is not None and hasattr(own, "get_data"):
        headers = [(k, v) for k, v in own.headers.to_wsgi_list() if k.lower() not in _OWN_NAMES]
        add_vary(headers, "Origin")
        headers.extend(added)
        own.headers.clear()
        own.headers.extend(headers)


class _Labelled:
    """A ``start_response`` that replaces the app's ``Access-Control-Allow-Origin``, ``-Allow-Credentials``
    and ``-Expose-Headers`` with ``added`` (none for an origin not allowed) and merges Vary.  ``started`` tells whether
    the app has called it yet (a generator app calls it on the body's first iteration).
    """

    __slots__ = ("added", "start_response", "started")

    def __init__(self, start_response: StartResponse, added: Sequence[tuple[str, str]]) -> None:
        self.start_response, self.added = start_response, added
        self.started = False

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.started = True
        out: list[tuple[str, str]] = []
        vary = -1
        for header in headers:
            if len(header[0]) in _OWN_SIZES:
                name = header[0].lower()
                if name == "vary":
                    if vary < 0:
                        vary = len(out)
                elif name in _OWN_NAMES:
                    continue
            out.append(header)
        if vary < 0:
            out.append(("Vary", "Origin"))
        else:  # merge into the Vary header found above, without looking for it again
            found = [out[vary]]
            add_vary(found, "Origin")
            out[vary] = found[0]
        out.extend(self.added)
        return self.start_response(status, out, exc_info)


def _unstarted(body: Iterable[bytes], labelled: _Labelled) -> UnstartedBody:
    """A generator app's body: what it raises before starting the response gets the CORS headers and Vary."""
    return UnstartedBody(body, lambda: labelled.started, lambda exc: _decorate(exc, labelled.added))


def _is_loopback(origin: str) -> bool:
    parsed = parse_origin(origin)
    return parsed is not None and parsed[1] in ("localhost", "127.0.0.1", "[::1]")


def _has_lone_dot(pattern: str) -> bool:
    """Whether ``pattern`` has a ``.`` outside a class, unescaped and not before a quantifier."""
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 2 if pattern[i + 1 : i + 2] == "]" else 1  # "[]" starts a class holding "]"
            continue
        elif char == "." and pattern[i + 1 : i + 2] not in ("*", "+", "?", "{"):
            return True
        i += 1
    return False
