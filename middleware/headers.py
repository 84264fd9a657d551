"""Add browser security headers to every response, error responses included.

Headers (each can be switched off): ``Strict-Transport-Security`` (HTTPS
requests only: ``wsgi.url_scheme`` must be ``https``, so put the ``proxy``
layer or Waitress's ``trusted_proxy_headers`` in charge of that first),
``X-Content-Type-Options: nosniff``, ``Referrer-Policy``, ``X-Frame-Options``,
``Content-Security-Policy`` (or its ``-Report-Only`` form),
``Permissions-Policy``, ``Cross-Origin-Opener-Policy`` and
``Cross-Origin-Resource-Policy``.

The header list is built once, at start-up.  A header the app already set
is left alone, so a view can loosen or tighten one for itself.  Headers also
reach responses the ``errors`` layer renders for refusals raised further in.

When not to use it: when a reverse proxy (nginx, a CDN) already adds these
headers to every response; two sources of truth drift apart.  HSTS in
particular is hard to take back: start with a short ``hsts_max_age`` and
turn on ``hsts_include_subdomains``/``hsts_preload`` only when every
subdomain serves HTTPS.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from werkzeug.exceptions import HTTPException

from middleware.base import (
    Context,
    Headers,
    LayerOptions,
    add_missing,
    call_with_headers,
    header_text,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["SecurityHeadersMiddleware"]

ONE_YEAR = 31536000
# What each frame_options value means as a CSP frame-ancestors source list.
_FRAME_ANCESTORS = {"deny": "'none'", "sameorigin": "'self'"}

ReferrerPolicy = Literal[
    "no-referrer", "no-referrer-when-downgrade", "origin", "origin-when-cross-origin",
    "same-origin", "strict-origin", "strict-origin-when-cross-origin", "unsafe-url",
]


def _frame_ancestors(policy: str) -> list[str] | None:
    """The source list of the ``frame-ancestors`` directive in ``policy``, if any.

    An empty list is ``'none'`` (CSP3: an empty source list matches nothing).
    """
    for directive in policy.split(";"):
        words = directive.split()
        if words and words[0].lower() == "frame-ancestors":
            return [w.lower() for w in words[1:]] or ["'none'"]
    return None


# Permissions-Policy is a structured-field dictionary (RFC 9651 §3.2): feature=allowlist members, separated
# by commas; an allowlist is an inner list of tokens and strings, or one of them (``*``, ``self``).
_SF_KEY = r"[a-z*][a-z0-9_.*-]*"
_SF_ITEM = r'(?:[A-Za-z*][!#$%&\'*+.^_`|~0-9A-Za-z:/-]*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"|\?[01])'
_SF_PARAMS = rf"(?:; *{_SF_KEY}(?:={_SF_ITEM})?)*"
_SF_INNER = rf"\( *(?:{_SF_ITEM}{_SF_PARAMS}(?: +{_SF_ITEM}{_SF_PARAMS})*)? *\)"
_SF_MEMBER = rf"{_SF_KEY}(?:=(?:{_SF_INNER}|{_SF_ITEM}))?{_SF_PARAMS}"
_PERMISSIONS = re.compile(rf"{_SF_MEMBER}(?:[ \t]*,[ \t]*{_SF_MEMBER})*")


class SecurityHeadersMiddleware:
    """Add security headers, prebuilt at start-up, to every response.

    Options:

    ``hsts`` (True), ``hsts_max_age`` (31536000), ``hsts_include_subdomains``
    (False), ``hsts_preload`` (False)
        ``Strict-Transport-Security`` on HTTPS requests.  ``hsts_preload``
        needs ``hsts_include_subdomains`` and a max-age of at least a year.
    ``content_type_options`` (True)
        ``X-Content-Type-Options: nosniff``.
    ``referrer_policy`` (``"strict-origin-when-cross-origin"``; null: none)
    ``frame_options`` (``"deny"``, ``"sameorigin"`` or ``"none"``)
        ``X-Frame-Options``.  When ``content_security_policy`` is set without
        a ``frame-ancestors`` directive, the matching one is appended to it;
        when it has one, the two must agree.
    ``content_security_policy`` (null) and ``csp_report_only`` (False)
        The policy text, sent as ``Content-Security-Policy`` or
        ``Content-Security-Policy-Report-Only``.
    ``permissions_policy`` (``"geolocation=(), camera=(), microphone=()"``; null: none)
    ``cross_origin_opener_policy`` and ``cross_origin_resource_policy`` (null)

    Example::

        opts = SecurityHeadersMiddleware.Options(content_security_policy="default-src 'self'")
        app = SecurityHeadersMiddleware(app, opts, Context())
    """

    class Options(LayerOptions):
        hsts: bool = True
        hsts_max_age: int = Field(default=ONE_YEAR, ge=0)
        hsts_include_subdomains: bool = False
        hsts_preload: bool = False
        content_type_options: bool = True
        referrer_policy: ReferrerPolicy | None = "strict-origin-when-cross-origin"
        frame_options: Literal["deny", "sameorigin", "none"] = "deny"
        content_security_policy: str | None = None
        csp_report_only: bool = False
        permissions_policy: str | None = "geolocation=(), camera=(), microphone=()"
        cross_origin_opener_policy: (
            Literal["same-origin", "same-origin-allow-popups", "noopener-allow-popups",
                    "unsafe-none"] | None
        ) = None
        cross_origin_resource_policy: Literal["same-site", "same-origin", "cross-origin"] | None = (
            None
        )

        @field_validator("permissions_policy")
        @classmethod
        def _dictionary(cls, value: str | None) -> str | None:
            value = cls._printable(value)
            if value is not None and not _PERMISSIONS.fullmatch(value):
                hint = ("members are separated by ',', not ';' (';' starts a parameter)" if ";" in value else
                        "each member is feature=allowlist, the allowlist *, self, () or a list such as "
                        '(self "https://a.example")')
                raise ValueError(f"{value!r} is not a Permissions-Policy (a structured-field dictionary): "
                                 f"{hint}; browsers ignore the whole header. Write, for instance, "
                                 "'geolocation=(), camera=(self)'")
            return value

        @field_validator("content_security_policy")
        @classmethod
        def _one_policy(cls, value: str | None) -> str | None:
            if value is not None and "," in value:  # CSP3 §2.2.1: a comma starts a second policy, enforced too
                raise ValueError(
                    "must be one policy: a ',' starts a second policy, which browsers enforce too, and in "
                    "which this layer cannot see frame-ancestors; separate directives with ';' "
                    f"(got {value!r})")
            return cls._printable(value)

        @classmethod
        def _printable(cls, value: str | None) -> str | None:
            if value is None:
                return None
            if not (header_text(value) and value.strip()):
                raise ValueError(
                    "must be non-empty printable ASCII on one line (no control characters)"
                )
            cleaned = "; ".join(part.strip() for part in value.split(";") if part.strip())
            if not cleaned:
                raise ValueError(f"must hold a directive, not only separators (got {value!r})")
            return cleaned

        @model_validator(mode="after")
        def _coherent(self) -> SecurityHeadersMiddleware.Options:
            if self.hsts_preload and not (
                self.hsts and self.hsts_include_subdomains and self.hsts_max_age >= ONE_YEAR
            ):
                raise ValueError(
                    "hsts_preload requires hsts: true, hsts_include_subdomains: true and "
                    f"hsts_max_age of at least {ONE_YEAR} (one year); got hsts: "
                    f"{str(self.hsts).lower()}, hsts_include_subdomains: "
                    f"{str(self.hsts_include_subdomains).lower()}, "
                    f"hsts_max_age: {self.hsts_max_age}"
                )
            if self.csp_report_only and self.content_security_policy is None:
                raise ValueError("csp_report_only needs a content_security_policy to report on")
            policy = self.content_security_policy
            sources = _frame_ancestors(policy) if policy else None
            if sources is not None and not self.csp_report_only and (
                (self.frame_options == "deny" and sources != ["'none'"])
                or (self.frame_options == "sameorigin" and "'self'" not in sources)
            ):
                raise ValueError(
                    f"frame_options {self.frame_options!r} contradicts 'frame-ancestors "
                    f"{' '.join(sources)}' in content_security_policy; make them agree or set "
                    "frame_options to 'none'"
                )
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        o = options
        common: Headers = []
        if o.content_type_options:
            common.append(("X-Content-Type-Options", "nosniff"))
        if o.referrer_policy is not None:
            common.append(("Referrer-Policy", o.referrer_policy))
        if o.frame_options != "none":
            common.append(("X-Frame-Options", o.frame_options.upper()))
        # When this layer adds frame-ancestors to match frame_options, a view that sets its own
        # X-Frame-Options gets the policy that matches the view's instead: browsers follow
        # frame-ancestors over X-Frame-Options, so ours would silently overrule the view.
        variants: dict[str, str] | None = None
        if o.content_security_policy is not None:
            policy = o.content_security_policy
            if o.frame_options != "none" and not o.csp_report_only and (
                _frame_ancestors(policy) is None
            ):
                variants = {"": policy, **{value.upper(): f"{policy}; frame-ancestors {sources}"
                                          for value, sources in _FRAME_ANCESTORS.items()}}
                policy = f"{policy}; frame-ancestors {_FRAME_ANCESTORS[o.frame_options]}"
            name = "Content-Security-Policy" + ("-Report-Only" if o.csp_report_only else "")
            common.append((name, policy))
        if o.permissions_policy is not None:
            common.append(("Permissions-Policy", o.permissions_policy))
        if o.cross_origin_opener_policy is not None:
            common.append(("Cross-Origin-Opener-Policy", o.cross_origin_opener_policy))
        if o.cross_origin_resource_policy is not None:
            common.append(("Cross-Origin-Resource-Policy", o.cross_origin_resource_policy))
        secure = list(common)
        if o.hsts:
            hsts = f"max-age={o.hsts_max_age}"
            hsts += "; includeSubDomains" if o.hsts_include_subdomains else ""
            hsts += "; preload" if o.hsts_preload else ""
            secure.insert(0, ("Strict-Transport-Security", hsts))
        self.headers_http: Headers = common
        self.headers_https: Headers = secure
        self._add_http = self._adder(common, variants)
        self._add_https = self._adder(secure, variants)
        self._error_http = self._for_error(self._add_http, common)
        self._error_https = self._for_error(self._add_https, secure)

    @staticmethod
    def _adder(extra: Headers, variants: dict[str, str] | None = None) -> Callable[[str, Headers], None]:
        pairs = [(name.lower(), (name, value)) for name, value in extra]
        sizes = frozenset(len(name) for name, _ in extra)

        def add(status: str, headers: Headers) -> None:
            # Only names as long as one of ours can be one of ours: most are never lowercased.
            present = {name.lower() for name, _ in headers if len(name) in sizes}
            if not present:
                headers.extend(extra)
                return
            missing = [pair for lower, pair in pairs if lower not in present]
            if variants is not None and "x-frame-options" in present and "content-security-policy" not in present:
                theirs = next(v for n, v in headers if n.lower() == "x-frame-options").strip().upper()
                policy = variants.get(theirs, variants[""])  # (ALLOW-FROM, say: no frame-ancestors of ours)
                missing = [(n, policy) if n == "Content-Security-Policy" else (n, v) for n, v in missing]
            headers.extend(missing)

        return add

    @staticmethod
    def _for_error(add: Callable[[str, Headers], None], extra: Headers) -> Callable[[BaseException], Headers]:
        """The headers a refusal from inside carries: ``extra``, or, for one that carries a response of its own
        (``abort(Response(...))``, which ``errors`` sends as it is), what ``add`` would add to that response:
        a policy whose frame-ancestors follow the response's own X-Frame-Options, as a view's would get."""

        def headers_for(exc: BaseException) -> Headers:
            own = exc.response if isinstance(exc, HTTPException) else None
            if own is None or not hasattr(own, "get_data"):
                return extra
            headers = own.headers.to_wsgi_list()
            add_missing(headers, getattr(exc, "wsgistack_headers", None))  # (what layers inside attached)
            size = len(headers)
            add(own.status, headers)
            return headers[size:]

        return headers_for

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        https = environ.get("wsgi.url_scheme") == "https"
        # (a refusal from inside gets the headers of the scheme this layer saw, as a response would)
        return call_with_headers(self.app, environ, start_response, self._add_https if https else self._add_http,
                                 self._error_https if https else self._error_http)
