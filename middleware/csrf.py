"""Cross-origin request protection for cookie sessions, without tokens in forms.

Browsers label every request with ``Sec-Fetch-Site`` (and, for unsafe methods,
``Origin``).  For an unsafe method (anything but GET, HEAD and OPTIONS) that
carries the session cookie, this layer:

1. allows ``Sec-Fetch-Site: same-origin`` or ``none`` (typed URL, bookmark);
2. refuses ``cross-site`` and ``same-site`` unless ``Origin`` is in
   ``trusted_origins`` (exact origins and ``https://*.example.org``);
3. without ``Sec-Fetch-Site`` (older browsers), compares ``Origin`` with the
   request's own origin (scheme + Host) and the trusted list;
4. with neither header, compares the origin of ``Referer`` the same way (a
   browser that sends no ``Origin`` on a form POST still names the page there);
   a request with none of the three is allowed: it does not come from a
   browser, so no browser can be tricked into sending it.

Requests without the session cookie (for example those authenticated by a
bearer token only) carry no ambient credential and pass.  With
``double_submit: true`` the ``X-CSRF-Token`` header must also carry an HMAC of
the session id, which the app reads from ``environ["wsgistack.csrf_token"]``.

Do not use it for APIs that never use cookies (there is nothing to forge), and
do not rely on it for safe methods: GET handlers must not change state.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, field_validator, model_validator

from .base import (
    SESSION,
    SESSION_BOUND,
    Context,
    LayerOptions,
    cookies,
    normalise_origin,
    note,
    own_origin,
    parse_origin,
    refuse,
    serialise_origin,
    shown,
    target_authority,
    wildcard_stranger,
)
from .session import check_cookie_name

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CSRF_TOKEN", "CSRFMiddleware"]

CSRF_TOKEN = "wsgistack.csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _trusted_entry(entry: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host or .suffix, port)`` of a configured origin; None when malformed."""
    entry = entry.lower()  # HTTPS://*.Example.org: scheme and host are case-insensitive
    wildcard = entry.startswith(("http://*.", "https://*."))
    parsed = parse_origin(entry.replace("://*.", "://x.", 1) if wildcard else entry)
    if parsed is None or parsed[0] not in _DEFAULT_PORTS:
        return None
    scheme, host, port = parsed
    if wildcard:
        host = host[1:]  # ".example.org": example.org itself and example.org.evil.net never match
        if "." not in host[1:]:
            return None  # https://*.org would trust a whole top-level domain
    return scheme, host, port


class CSRFMiddleware:
    """Refuse cross-origin unsafe requests that carry the session cookie (403).

    Options: ``trusted_origins`` (origins allowed to send cross-origin writes:
    ``https://app.example.org`` or ``https://*.example.org``); ``cookie_name``
    (``"__Host-session"``, the session layer's cookie); ``check_without_cookie``
    (false; true also checks requests without the cookie, which covers login
    forms); ``double_submit`` (false; true also requires the ``header`` to equal
    ``environ["wsgistack.csrf_token"]()``, an HMAC of the session id with
    ``secret_key``); ``header`` (``"X-CSRF-Token"``).

        opts = CSRFMiddleware.Options(trusted_origins=["https://*.example.org"])
        app = CSRFMiddleware(app, opts, Context())
    """

    class Options(LayerOptions):
        trusted_origins: tuple[str, ...] = ()
        cookie_name: str = "__Host-session"
        check_without_cookie: bool = False
        double_submit: bool = False
        secret_key: SecretStr | None = None
        header: str = "X-CSRF-Token"

        @field_validator("cookie_name")
        @classmethod
        def _cookie_name(cls, value: str) -> str:
            """A name no browser sends a cookie under would leave every request unchecked, in silence."""
            return check_cookie_name(value)

        @model_validator(mode="after")
        def _check(self) -> CSRFMiddleware.Options:
            for origin in self.trusted_origins:
                if origin in ("*", "null"):
                    raise ValueError(f"trusted_origins may not contain {origin!r}: that would "
                                     "let any page send writes with the user's cookie")
                entry = _trusted_entry(origin)
                if entry is None:
                    raise ValueError(f"trusted_origins entry {origin!r} is not an origin: write "
                                     "http(s)://host[:port] with no path, or https://*.example.org")
                scheme, host, port = entry
                stranger = wildcard_stranger(scheme, "*" + host, port) if host.startswith(".") else None
                if stranger is not None:  # https://*.co.uk: a suffix anyone registers names under
                    raise ValueError(f"trusted_origins entry {origin!r} matches origins nobody listed "
                                     f"({stranger} too): any site under it could send writes with the "
                                     "user's cookie; name your own domain (https://*.example.co.uk)")
            key = self.secret_key.get_secret_value() if self.secret_key else ""
            if self.double_submit and len(key) < 32:
                raise ValueError("double_submit needs a secret_key of at least 32 characters; "
                                 "generate one with: python3 -c 'import secrets; "
                                 "print(secrets.token_urlsafe(32))'")
            if not self.header or not all((c.isascii() and c.isalnum()) or c == "-" for c in self.header):
                raise ValueError(f"header {self.header!r} is not a header name "
                                 "(ASCII letters, digits and '-')")
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app = app
        self.options = options
        self.cookie_name = options.cookie_name
        self.check_all = options.check_without_cookie
        self.exact: frozenset[str] = frozenset()
        self.wildcards: list[tuple[str, str, int | None]] = []
        for entry in options.trusted_origins:
            scheme, host, port = _trusted_entry(entry) or ("", "", None)
            if host.startswith("."):
                self.wildcards.append((scheme, host, port))
            else:
                self.exact |= {serialise_origin(scheme, host, port)}
        self.double_submit = options.double_submit
        self.key = options.secret_key.get_secret_value().encode() if options.secret_key else b""
        self.header_key = "HTTP_" + options.header.upper().replace("-", "_")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        if self.double_submit:
            environ[CSRF_TOKEN] = lambda: self._hand_out(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        if method in SAFE_METHODS:
            return self.app(environ, start_response)
        if self.cookie_name not in cookies(environ) and (
            not self.check_all or environ.get("HTTP_AUTHORIZATION", "")[:7].lower() == "bearer "
        ):
            return self.app(environ, start_response)
        self._check_origin(environ, method)
        if self.double_submit and self.cookie_name in cookies(environ) and not self._unknown_session(environ):
            self._check_token(environ)  # (without the cookie, or its session, there is no session to match)
        return self.app(environ, start_response)

    @staticmethod
    def _unknown_session(environ: WSGIEnvironment) -> bool:
        """Whether the cookie names a session the store does not have (ended, expired): it holds nothing a
        forged request could use, and a page cannot know its token; the request starts a new session."""
        session = environ.get(SESSION)
        return session is not None and bool(session.new)

    def _check_origin(self, environ: WSGIEnvironment, method: str) -> None:
        site = environ.get("HTTP_SEC_FETCH_SITE")
        origin = environ.get("HTTP_ORIGIN")
        if site is not None:
            site = site.strip().lower()
            if site in ("same-origin", "none"):
                return
            if origin is not None and self.trusted(origin):
                note(environ, "csrf", f"Sec-Fetch-Site {site}, trusted Origin {origin}")
                return
            label = site if site in ("cross-site", "same-site") else "cross-origin"
            why = (f"Origin {shown(origin)} is not trusted" if origin is not None
                   else "the request has no Origin header")
            raise refuse(403, f"{label} {method} refused: Sec-Fetch-Site is {shown(site)} "
                              f"and {why}")
        own = own_origin(environ)
        if origin is None:
            self._check_referer(environ, method, own)
            return
        if normalise_origin(origin) == own or self.trusted(origin):
            return
        raise refuse(403, f"cross-origin {method} refused: Origin {shown(origin)} is not this "
                          f"site's origin ({own}) and is not trusted")

    def _check_referer(self, environ: WSGIEnvironment, method: str, own: str) -> None:
        """Neither header: a client that is no browser, or one that sends no ``Origin`` on a form POST
        (Firefox before 70, Internet Explorer).  Such a browser still names the sending page in
        ``Referer`` (unless its policy is ``no-referrer``): one of another origin is refused."""
        referer = environ.get("HTTP_REFERER")
        if not referer:
            note(environ, "csrf", "neither Sec-Fetch-Site, Origin nor Referer: not a browser request")
            return
        authority = target_authority(referer)  # (a URL's authority, as the validation layer reads a target's)
        origin = normalise_origin(f"{referer.partition('://')[0]}://{authority.rpartition('@')[2]}") \
            if authority else None
        if origin is None or not origin.startswith(("http://", "https://")):
            raise refuse(403, f"cross-origin {method} refused: no Origin header, and the Referer "
                              "names no http(s) origin")
        if origin == own or self.trusted(origin):
            note(environ, "csrf", f"no Origin, Referer from {origin}")
            return
        raise refuse(403, f"cross-origin {method} refused: no Origin header, and the Referer's origin "
                          f"{shown(origin)} is not this site's origin ({own}) and is not trusted")

    def trusted(self, origin: str) -> bool:
        """Whether ``origin`` is in ``trusted_origins`` (exactly or by wildcard)."""
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        scheme, host, port = parsed
        if serialise_origin(scheme, host, port) in self.exact:
            return True
        return any(scheme == w_scheme and port == w_port and host.endswith(suffix)
                   for w_scheme, suffix, w_port in self.wildcards)

    def _hand_out(self, environ: WSGIEnvironment) -> str:
        """The token for the page: the response now holds something of this session alone."""
        environ[SESSION_BOUND] = True  # a per_user cache must not give it to the user's other sessions
        return self.token(environ)

    def token(self, environ: WSGIEnvironment) -> str:
        """The double-submit token for this request's session (creating the session if new)."""
        session = environ.get(SESSION)
        if session is None:
            raise RuntimeError("csrf double_submit needs a session layer outside the csrf layer")
        if session.new and not session.modified:
            session.modified = True  # the token is bound to the id, so the session must persist
        digest = hmac.new(self.key, b"wsgistack.csrf:" + session.id.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")

    def _check_token(self, environ: WSGIEnvironment) -> None:
        sent = environ.get(self.header_key)
        header = self.options.header
        if not sent:
            raise refuse(403, f"CSRF token missing: send the {header} header with this session's token "
                              "(the Flask core gives it in the login answer's csrf_token and at GET /auth/csrf)")
        # No session object (a session layer scoped to fewer paths): no token can match, and asking for
        # one would raise the getter's RuntimeError for what is a request's doing.
        if environ.get(SESSION) is None or not hmac.compare_digest(
                sent.encode("latin-1"), self.token(environ).encode("ascii")):
            raise refuse(403, f"CSRF token in {header} does not match this session; "
                              "reload the page to get a fresh token")
