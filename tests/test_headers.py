"""The headers layer: which security headers, never duplicated, on errors too, bad configs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from webtest import TestApp

from middleware.base import Context, refuse
from middleware.errors import ErrorsMiddleware
from middleware.headers import SecurityHeadersMiddleware
from middleware.request_id import RequestIdMiddleware
from middleware.validation import ValidationMiddleware

SECURITY = (
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "Referrer-Policy",
    "X-Frame-Options",
    "Content-Security-Policy",
    "Content-Security-Policy-Report-Only",
    "Permissions-Policy",
    "Cross-Origin-Opener-Policy",
    "Cross-Origin-Resource-Policy",
)
DEFAULTS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "geolocation=(), camera=(), microphone=()",
}
HSTS = {"Strict-Transport-Security": "max-age=31536000"}
HTTPS = {"wsgi.url_scheme": "https"}


def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer by path: plain, with its own security headers, a refusal, a crash, a stream."""
    path = environ["PATH_INFO"]
    if path == "/limited":
        raise refuse(429, "Slow down.", headers=[("Retry-After", "7")])
    if path == "/crash":
        raise RuntimeError("inner failure")
    headers = [("Content-Type", "text/plain")]
    if path.startswith("/frame/"):  # a view that sets its own X-Frame-Options, and no CSP
        headers.append(("X-Frame-Options", path.rpartition("/")[2]))
    if path == "/own":
        headers += [("x-frame-options", "SAMEORIGIN"),
                    ("Content-Security-Policy", "default-src 'none'")]
    start_response("200 OK", headers)
    if path == "/stream":
        return stream()
    return [b"ok"]


def stream() -> Iterator[bytes]:
    """A streamed body."""
    yield b"a"
    yield b"b"


def security(response: Any) -> dict[str, str]:
    """The security headers of a response (each must appear at most once)."""
    found: dict[str, str] = {}
    for name, value in response.headerlist:
        canonical = next((s for s in SECURITY if s.lower() == name.lower()), None)
        if canonical is not None:
            assert canonical not in found, f"{canonical} appears twice"
            found[canonical] = value
    return found


def make(**options: Any) -> TestApp:
    """errors -> headers -> inner."""
    layer = SecurityHeadersMiddleware(inner, SecurityHeadersMiddleware.Options(**options), Context())
    return TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(format="envelope"), Context()))


@pytest.mark.parametrize(
    ("options", "request_environ", "expected"),
    [
        pytest.param({}, {}, DEFAULTS, id="defaults over http: no HSTS"),
        pytest.param({}, HTTPS, {**HSTS, **DEFAULTS}, id="defaults over https"),
        pytest.param(
            {"hsts_max_age": 63072000, "hsts_include_subdomains": True, "hsts_preload": True},
            HTTPS,
            {"Strict-Transport-Security": "max-age=63072000; includeSubDomains; preload",
             **DEFAULTS},
            id="hsts preload",
        ),
        pytest.param({"hsts_max_age": 31536000, "hsts_include_subdomains": True, "hsts_preload": True}, HTTPS,
                     {"Strict-Transport-Security": "max-age=31536000; includeSubDomains; preload", **DEFAULTS},
                     id="hsts preload with a max-age of exactly one year"),
        pytest.param({"hsts_include_subdomains": True, "hsts_max_age": 300}, HTTPS,
                     {"Strict-Transport-Security": "max-age=300; includeSubDomains", **DEFAULTS},
                     id="hsts include subdomains"),
        pytest.param({"hsts": False}, HTTPS, DEFAULTS, id="hsts off"),
        pytest.param({"hsts_max_age": 0}, HTTPS,
                     {"Strict-Transport-Security": "max-age=0", **DEFAULTS},
                     id="hsts max-age 0 withdraws the policy"),
        pytest.param({"frame_options": "sameorigin"}, {},
                     {**DEFAULTS, "X-Frame-Options": "SAMEORIGIN"}, id="sameorigin"),
        pytest.param({"frame_options": "none"}, {},
                     {k: v for k, v in DEFAULTS.items() if k != "X-Frame-Options"},
                     id="no frame options"),
        pytest.param({"content_security_policy": "default-src 'self'"}, {},
                     {**DEFAULTS,
                      "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"},
                     id="csp gains frame-ancestors matching deny"),
        pytest.param({"content_security_policy": "default-src 'self';", "frame_options":
                      "sameorigin"}, {},
                     {**DEFAULTS, "X-Frame-Options": "SAMEORIGIN",
                      "Content-Security-Policy": "default-src 'self'; frame-ancestors 'self'"},
                     id="csp gains frame-ancestors matching sameorigin"),
        pytest.param({"content_security_policy": "default-src 'self'; frame-ancestors 'none'"},
                     {},
                     {**DEFAULTS,
                      "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"},
                     id="csp frame-ancestors agrees with deny"),
        pytest.param({"content_security_policy": "default-src 'self'; frame-ancestors"}, {},
                     {**DEFAULTS, "Content-Security-Policy": "default-src 'self'; frame-ancestors"},
                     id="csp frame-ancestors with no sources is 'none' (CSP3): agrees with deny"),
        pytest.param({"content_security_policy": "frame-ancestors https://a.example",
                      "frame_options": "none"}, {},
                     {**{k: v for k, v in DEFAULTS.items() if k != "X-Frame-Options"},
                      "Content-Security-Policy": "frame-ancestors https://a.example"},
                     id="csp frame-ancestors alone"),
        pytest.param({"content_security_policy": "default-src 'self'", "frame_options": "none"},
                     {},
                     {**{k: v for k, v in DEFAULTS.items() if k != "X-Frame-Options"},
                      "Content-Security-Policy": "default-src 'self'"},
                     id="csp untouched without frame options"),
        pytest.param({"content_security_policy": "default-src 'self'", "csp_report_only": True},
                     {},
                     {**DEFAULTS, "Content-Security-Policy-Report-Only": "default-src 'self'"},
                     id="report-only csp is not given frame-ancestors"),
        pytest.param({"referrer_policy": None, "permissions_policy": None,
                      "content_type_options": False, "frame_options": "none", "hsts": False},
                     HTTPS, {}, id="everything off"),
        pytest.param({"referrer_policy": "no-referrer", "permissions_policy": "camera=(self)"},
                     {},
                     {**DEFAULTS, "Referrer-Policy": "no-referrer",
                      "Permissions-Policy": "camera=(self)"}, id="custom policies"),
        pytest.param({"cross_origin_opener_policy": "same-origin",
                      "cross_origin_resource_policy": "same-site"}, {},
                     {**DEFAULTS, "Cross-Origin-Opener-Policy": "same-origin",
                      "Cross-Origin-Resource-Policy": "same-site"}, id="cross-origin policies"),
    ],
)
def test_headers(options: dict[str, Any], request_environ: dict[str, str],
                 expected: dict[str, str]) -> None:
    app = make(**options)
    assert security(app.get("/", extra_environ=request_environ)) == expected
    refused = app.get("/limited", extra_environ=request_environ, status=429)
    assert security(refused) == expected
    assert refused.headers["Retry-After"] == "7"


def test_app_headers_win() -> None:
    response = make(content_security_policy="default-src 'self'").get("/own")
    assert security(response) == {
        **DEFAULTS,
        "X-Frame-Options": "SAMEORIGIN",
        "Content-Security-Policy": "default-src 'none'",
    }


@pytest.mark.parametrize(("frame_options", "view_sets", "frame_ancestors"), [
    pytest.param("sameorigin", "DENY", "'none'", id="a view that tightens"),
    pytest.param("deny", "SAMEORIGIN", "'self'", id="a view that loosens"),
    pytest.param("deny", "sameorigin", "'self'", id="in any case"),
    pytest.param("deny", "ALLOWALL", None, id="a value with no frame-ancestors twin"),
])
def test_the_policy_added_agrees_with_a_views_own_frame_options(frame_options: str, view_sets: str,
                                                                 frame_ancestors: str | None) -> None:
    # Browsers follow frame-ancestors over X-Frame-Options: the policy this layer adds must not
    # overrule what the view chose.
    app = make(content_security_policy="default-src 'self'", frame_options=frame_options)
    found = security(app.get("/frame/" + view_sets))
    assert found["X-Frame-Options"] == view_sets
    assert found["Content-Security-Policy"] == "default-src 'self'" + (
        f"; frame-ancestors {frame_ancestors}" if frame_ancestors else "")


def test_crash_gets_headers() -> None:
    response = make().get("/crash", extra_environ=HTTPS, status=500)
    assert security(response) == {**HSTS, **DEFAULTS}
    assert response.json["error"]["code"] == 500


def test_stream_passes_unbuffered() -> None:
    layer = SecurityHeadersMiddleware(inner, SecurityHeadersMiddleware.Options(), Context())
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda data: None

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream", "wsgi.url_scheme": "http"}
    body = layer(environ, start_response)
    assert not isinstance(body, list)  # the app's generator itself, not a buffered copy
    assert list(body) == [b"a", b"b"]
    assert ("X-Frame-Options", "DENY") in started[0][1]


def test_refusal_from_inner_layer_gets_headers() -> None:
    """errors -> request_id -> headers -> validation: a 413 from validation carries them."""
    validation = ValidationMiddleware(inner, ValidationMiddleware.Options(max_body_bytes=10),
                                      Context())
    headers = SecurityHeadersMiddleware(validation, SecurityHeadersMiddleware.Options(),
                                        Context())
    rid = RequestIdMiddleware(headers, RequestIdMiddleware.Options(), Context())
    app = TestApp(ErrorsMiddleware(rid, ErrorsMiddleware.Options(format="problem"), Context()))
    response = app.post("/", b"x" * 11, content_type="text/plain", extra_environ=HTTPS,
                        status=413)
    assert security(response) == {**HSTS, **DEFAULTS}
    assert response.headers["X-Request-ID"] == response.json["request_id"]
    assert response.json["detail"] == (
        "The request body is 11 bytes long, more than max_body_bytes (10)."
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"hsts_preload": True},
                     "hsts_preload requires hsts: true, hsts_include_subdomains: true and "
                     "hsts_max_age of at least 31536000 (one year); got hsts: true, "
                     "hsts_include_subdomains: false, hsts_max_age: 31536000",
                     id="preload without subdomains"),
        pytest.param({"hsts_preload": True, "hsts_include_subdomains": True,
                      "hsts_max_age": 86400},
                     "got hsts: true, hsts_include_subdomains: true, hsts_max_age: 86400",
                     id="preload with a short max-age"),
        pytest.param({"hsts_preload": True, "hsts_include_subdomains": True, "hsts": False},
                     "got hsts: false", id="preload with hsts off"),
        pytest.param({"hsts_max_age": -1}, "greater than or equal to 0", id="negative max-age"),
        pytest.param({"csp_report_only": True},
                     "csp_report_only needs a content_security_policy to report on",
                     id="report-only without policy"),
        pytest.param({"content_security_policy": "frame-ancestors 'self'"},
                     "frame_options 'deny' contradicts 'frame-ancestors 'self'' in "
                     "content_security_policy; make them agree or set frame_options to 'none'",
                     id="deny against frame-ancestors self"),
        pytest.param({"content_security_policy": "default-src 'self'; frame-ancestors 'none'",
                      "frame_options": "sameorigin"},
                     "frame_options 'sameorigin' contradicts 'frame-ancestors 'none''",
                     id="sameorigin against frame-ancestors none"),
        pytest.param({"content_security_policy": "default-src 'self'; frame-ancestors", "frame_options": "sameorigin"},
                     "frame_options 'sameorigin' contradicts 'frame-ancestors 'none'' in content_security_policy",
                     id="sameorigin against frame-ancestors with no sources, which is 'none'"),
        pytest.param({"content_security_policy": "default-src 'self'; FRAME-ANCESTORS *", "frame_options": "deny"},
                     "frame_options 'deny' contradicts 'frame-ancestors *' in content_security_policy; make them "
                     "agree or set frame_options to 'none'",
                     id="deny against frame-ancestors written in capitals (directive names ignore case)"),
        pytest.param({"content_security_policy": "frame-ancestors 'none' https://a.example"},
                     "frame_options 'deny' contradicts 'frame-ancestors 'none' https://a.example' in "
                     "content_security_policy; make them agree or set frame_options to 'none'",
                     id="deny against 'none' beside a source, where browsers ignore 'none'"),
        pytest.param({"content_security_policy": "default-src 'self'\r\nX-Evil: 1"},
                     "must be non-empty printable ASCII on one line", id="csp with newline"),
        pytest.param({"content_security_policy": "  "},
                     "must be non-empty printable ASCII on one line", id="blank csp"),
        pytest.param({"content_security_policy": ";", "frame_options": "none"},
                     "must hold a directive, not only separators (got ';')", id="csp of separators"),
        pytest.param({"content_security_policy": " ; ; "},
                     "must hold a directive, not only separators", id="csp of spaced separators"),
        pytest.param({"content_security_policy": "default-src 'self', frame-ancestors *", "frame_options": "deny"},
                     "must be one policy: a ',' starts a second policy, which browsers enforce too",
                     id="csp of two policies: frame-ancestors * out of the frame check's sight"),
        pytest.param({"permissions_policy": ";"},
                     "must hold a directive, not only separators", id="permissions policy of a separator"),
        pytest.param({"permissions_policy": "camera=()\x00"},
                     "must be non-empty printable ASCII on one line",
                     id="permissions policy with control character"),
        pytest.param({"permissions_policy": "geolocation=(); camera=()"},
                     "'geolocation=(); camera=()' is not a Permissions-Policy (a structured-field dictionary): "
                     "members are separated by ',', not ';' (';' starts a parameter); browsers ignore the whole "
                     "header. Write, for instance, 'geolocation=(), camera=(self)'",
                     id="permissions policy with CSP separators"),
        pytest.param({"permissions_policy": "geolocation 'none'"},
                     "each member is feature=allowlist, the allowlist *, self, () or a list such as "
                     '(self "https://a.example")', id="permissions policy in Feature-Policy syntax"),
        pytest.param({"permissions_policy": 'camera=(self"https://a.example")'}, "is not a Permissions-Policy",
                     id="permissions policy list items without a space between"),
        pytest.param({"permissions_policy": "camera=(self,)"}, "is not a Permissions-Policy",
                     id="permissions policy with a comma in a list"),
        pytest.param({"permissions_policy": "Camera=()"}, "is not a Permissions-Policy",
                     id="permissions policy with an upper-case feature"),
        pytest.param({"permissions_policy": "camera=(),"}, "is not a Permissions-Policy",
                     id="permissions policy with a trailing comma"),
        pytest.param({"permissions_policy": "camera=self)"}, "is not a Permissions-Policy",
                     id="permissions policy with a list that is never opened"),
        pytest.param({"referrer_policy": "always"}, "Input should be 'no-referrer'",
                     id="unknown referrer policy"),
        pytest.param({"frame_options": "allow-from"}, "Input should be 'deny', 'sameorigin'",
                     id="unknown frame option"),
        pytest.param({"x_xss_protection": True}, "Extra inputs are not permitted",
                     id="unknown option"),
    ],
)
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        SecurityHeadersMiddleware.Options(**options)
    assert message in str(info.value)


@pytest.mark.parametrize(("frame_options", "policy"), [
    pytest.param("deny", "frame-ancestors 'NONE'", id="deny and 'NONE'"),
    pytest.param("sameorigin", "default-src 'self'; frame-ancestors 'Self' https://a.example",
                 id="sameorigin and 'Self' among others"),
])
def test_frame_ancestors_keywords_agree_in_any_case(frame_options: str, policy: str) -> None:
    # CSP source keywords ignore case: 'NONE' is 'none' and agrees with X-Frame-Options DENY.
    options = SecurityHeadersMiddleware.Options(content_security_policy=policy, frame_options=frame_options)
    response = TestApp(SecurityHeadersMiddleware(inner, options, Context())).get("/")
    assert security(response) == {**DEFAULTS, "X-Frame-Options": frame_options.upper(),
                                  "Content-Security-Policy": policy}


def test_report_only_may_differ_from_frame_options() -> None:
    options = SecurityHeadersMiddleware.Options(
        content_security_policy="frame-ancestors 'self'", csp_report_only=True)
    assert options.frame_options == "deny"


def test_yaml_stack(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"errors": {}},
                     {"headers": {"content_security_policy": "default-src 'self'",
                                  "frame_options": "sameorigin"}}],
    })
    response = stack.get("/", extra_environ=HTTPS)
    assert security(response) == {
        **HSTS, **DEFAULTS, "X-Frame-Options": "SAMEORIGIN",
        "Content-Security-Policy": "default-src 'self'; frame-ancestors 'self'",
    }


def test_yaml_refuses_preload_without_subdomains(make_stack: Callable[..., TestApp]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_stack({"pipeline": [{"headers": {"hsts_preload": True}}]})
    assert "hsts_preload requires hsts: true, hsts_include_subdomains: true" in str(info.value)


@pytest.mark.parametrize("policy", [
    "geolocation=(), camera=(), microphone=()",
    'camera=(self "https://a.example"), fullscreen=*',
    "geolocation=(self);report-to=main",
    "geolocation=(self) ,  camera=()",
])
def test_permissions_policy_dictionaries_accepted(policy: str) -> None:
    assert SecurityHeadersMiddleware.Options(permissions_policy=policy).permissions_policy


def refusing_generator(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app (PEP 3333): it starts its response on its first iteration, and may refuse there."""
    if environ["PATH_INFO"] == "/limited":
        raise refuse(429, "Slow down.", headers=[("Retry-After", "7")])
    if environ["PATH_INFO"] == "/crash":
        raise RuntimeError("inner failure")
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"ok"


def refusing_start_response(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app under a layer that refuses when the response starts (the session's failed save)."""

    def refuse_at_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        raise refuse(503, "The session could not be saved.", headers=[("Retry-After", "1")])

    return refusing_generator(environ, refuse_at_start)


@pytest.mark.parametrize("app", [refusing_generator, refusing_start_response])
@pytest.mark.parametrize(("path", "status"), [("/limited", 429), ("/crash", 500), ("/", 200)])
def test_generator_app_refusal_gets_headers(app: Callable[..., Any], path: str, status: int) -> None:
    # errors takes a generator app's first chunk itself: what is raised there must carry the headers as
    # a refusal from the call does, HSTS included over https.
    if app is refusing_start_response and path == "/":
        status = 503
    layer = SecurityHeadersMiddleware(app, SecurityHeadersMiddleware.Options(), Context())
    stack = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(format="envelope"), Context()))
    response = stack.get(path, extra_environ=HTTPS, status=status)
    assert security(response) == {**HSTS, **DEFAULTS}
    plain = stack.get(path, status=status)
    assert security(plain) == DEFAULTS


@pytest.mark.parametrize("name", [
    "strict-transport-security", "X-CONTENT-TYPE-OPTIONS", "referrer-policy", "x-frame-options",
    "content-security-policy", "PERMISSIONS-POLICY", "cross-origin-opener-policy", "Cross-Origin-Resource-Policy",
])
def test_a_header_the_app_set_is_kept_in_any_case_and_not_doubled(name: str) -> None:
    def own(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), (name, "the app's")])
        return [b"ok"]

    options = SecurityHeadersMiddleware.Options(content_security_policy="default-src 'self'",
                                                cross_origin_opener_policy="same-origin",
                                                cross_origin_resource_policy="same-site")
    stack = TestApp(SecurityHeadersMiddleware(own, options, Context()))
    found = security(stack.get("/", extra_environ=HTTPS))
    assert len(found) == 8
    assert [v for k, v in found.items() if k.lower() == name.lower()] == ["the app's"]


def test_a_views_frame_options_is_read_without_the_spaces_around_it() -> None:
    def own(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Frame-Options", " sameorigin ")])
        return [b"ok"]

    options = SecurityHeadersMiddleware.Options(content_security_policy="default-src 'self'")
    found = security(TestApp(SecurityHeadersMiddleware(own, options, Context())).get("/"))
    assert found["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'self'"


def test_the_apps_header_list_is_left_as_it_was() -> None:
    # A view may pass the same list to every response: this layer adds to a copy, so an https response's
    # HSTS never reaches a later http one through it.
    shared = [("Content-Type", "text/plain")]

    def constant(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", shared)
        return [b"ok"]

    stack = TestApp(SecurityHeadersMiddleware(constant, SecurityHeadersMiddleware.Options(), Context()))
    assert security(stack.get("/", extra_environ=HTTPS)) == {**HSTS, **DEFAULTS}
    assert security(stack.get("/")) == DEFAULTS
    assert shared == [("Content-Type", "text/plain")]


def test_exc_info_reaches_the_server() -> None:
    # PEP 3333: an app that fails after start_response calls it again with exc_info to replace the status.
    def failing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late")
        except ValueError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"failed"]

    calls: list[tuple[str, Any]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        calls.append((status, exc_info and exc_info[0]))
        return lambda data: None

    layer = SecurityHeadersMiddleware(failing, SecurityHeadersMiddleware.Options(), Context())
    assert layer({"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}, start_response) == [b"failed"]
    assert calls == [("200 OK", None), ("500 Internal Server Error", ValueError)]


def aborting_app(options: dict[str, Any] | None = None) -> Callable[..., Iterable[bytes]]:
    """A plain WSGI app that aborts with a response of its own: framing given by the path's last segment."""
    from werkzeug.exceptions import abort
    from werkzeug.wrappers import Response

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        framing = environ["PATH_INFO"].rpartition("/")[2]
        headers = {"X-Frame-Options": framing} if framing else {}
        abort(Response("moved on", status=409, headers=headers))
        raise AssertionError("abort returned")  # pragma: no cover

    return app


@pytest.mark.parametrize(("frame_options", "response_sets", "frame_ancestors"), [
    pytest.param("deny", "SAMEORIGIN", "'self'", id="a response that loosens"),
    pytest.param("sameorigin", "DENY", "'none'", id="a response that tightens"),
    pytest.param("deny", "sameorigin", "'self'", id="in any case"),
    pytest.param("deny", "ALLOWALL", None, id="a value with no frame-ancestors twin"),
    pytest.param("deny", "", "'none'", id="a response without its own: the layer's"),
])
def test_an_aborted_responses_own_frame_options_gets_the_policy_that_agrees(
        make_stack: Callable[..., TestApp], frame_options: str, response_sets: str,
        frame_ancestors: str | None) -> None:
    # abort(Response(...)) from a plain WSGI app: errors renders that response as it is, and the
    # headers layer's policy must not overrule the framing it chose, as for a view's own response.
    stack = make_stack({
        "app": {"factory": f"{__name__}:aborting_app"},
        "pipeline": [{"errors": {}},
                     {"headers": {"content_security_policy": "default-src 'self'",
                                  "frame_options": frame_options}}],
    })
    response = stack.get("/framed/" + response_sets, status=409)
    assert response.text == "moved on"
    found = security(response)
    assert found["X-Frame-Options"] == (response_sets or frame_options.upper())
    assert found["Content-Security-Policy"] == "default-src 'self'" + (
        f"; frame-ancestors {frame_ancestors}" if frame_ancestors else "")
