"""Rules and scopes outside versioning hold for the path the request is routed to, in every spelling.

versioning routes ``/api/config`` (no version: the default), ``/api/V2/config``
and ``/api/config`` with ``X-API-Version: v1`` to ``/api/v2/config`` and
``/api/v1/config``.  The auth and rate-limit layers and every layer's scope sit
outside it in the documented order, so they see the request path: a rule
written for the routed path must not be stepped around with another spelling.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from webtest import TestApp

from config import build_from_text

SECRET = "routed-paths-secret-" * 3
HEAD = 'app: {factory: "stack_support:echo_app"}\nstores: {shared: "memory://"}\npipeline:\n  - errors: {}\n'
VERSIONING = "  - versioning: {supported: [v1, v2], default: v2}\n"


def token(*roles: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "bob", "roles": list(roles), "iat": now, "exp": now + 300, "jti": f"j{time.time_ns()}",
                       "typ": "access"}, SECRET, algorithm="HS256")


def stack(layers: str) -> TestApp:
    return TestApp(build_from_text(HEAD + layers + VERSIONING).app)


AUTH = f"""  - auth:
      secret: {SECRET}
      default: optional
      rules:
        - {{paths: [/api/*/config], methods: [PUT, DELETE], roles: [admin]}}
        - {{paths: ["/api/v1/*"], roles: [auditor]}}
        - {{paths: [/api/status], roles: [ops]}}
"""


@pytest.mark.parametrize(("method", "path", "headers", "who", "status"), [
    pytest.param("PUT", "/api/v2/config", {}, "user", 403, id="the rule's own spelling"),
    pytest.param("PUT", "/api/config", {}, "user", 403, id="no version: routed to the default"),
    pytest.param("PUT", "/api/V2/config", {}, "user", 403, id="upper-case version"),
    pytest.param("PUT", "/api/config", {"X-API-Version": "v2"}, "user", 403, id="version in a header"),
    pytest.param("PUT", "/api/config", {}, "admin", 200, id="the role passes in any spelling"),
    pytest.param("GET", "/api/config", {}, None, 200, id="what no rule covers stays optional"),
    pytest.param("GET", "/api/V1/config", {}, None, 401, id="a rule on the v1 prefix: upper case"),
    pytest.param("GET", "/api/config", {"X-API-Version": "v1"}, None, 401, id="a rule on the v1 prefix: header"),
    pytest.param("GET", "/api/config", {"Accept": "application/vnd.wsgistack.v1+json"}, "user", 403,
                 id="a rule on the v1 prefix: media type"),
    pytest.param("PUT", "/api/config", {"X-API-Version": "v1"}, "auditor", 403,
                 id="the first rule for the routed path wins, as ever"),
    pytest.param("GET", "/api/status", {"X-API-Version": "v1"}, "ops", 403,
                 id="a rule for each spelling: both hold (ops is not auditor)"),
    pytest.param("GET", "/api/status", {"X-API-Version": "v1"}, "auditor", 403,
                 id="a rule for each spelling: both hold (auditor is not ops)"),
])
def test_auth_rules_hold_for_the_routed_path(method: str, path: str, headers: dict[str, str], who: str | None,
                                             status: int) -> None:
    if who is not None:
        headers = {**headers, "Authorization": f"Bearer {token(who)}"}
    response = stack(AUTH).request(path, method=method, headers=headers, expect_errors=True)
    assert response.status_int == status, response.body


def test_both_roles_pass_both_rules() -> None:
    headers = {"X-API-Version": "v1", "Authorization": f"Bearer {token('ops', 'auditor')}"}
    assert stack(AUTH).get("/api/status", headers=headers).json["path"] == "/api/v1/status"


RATELIMIT = """  - ratelimit:
      store: shared
      limits: ["100/minute"]
      rules:
        - {paths: ["/api/v2/search"], limits: ["2/minute"]}
"""


@pytest.mark.parametrize("spellings", [
    pytest.param(["/api/v2/search"] * 3, id="the rule's own spelling"),
    pytest.param(["/api/v2/search", "/api/search", "/api/V2/search"], id="every spelling counts against it"),
])
def test_rate_limit_rules_hold_for_the_routed_path(spellings: list[str]) -> None:
    app = stack(RATELIMIT)
    statuses = [app.get(path, expect_errors=True).status_int for path in spellings]
    assert statuses == [200, 200, 429]
    assert app.get("/api/v1/search").headers["RateLimit-Limit"] == "100"  # another resource, the default limit


LOOSER_RULE_FIRST = """  - ratelimit:
      store: shared
      limits: ["100/minute"]
      rules:
        - {paths: ["/api/v2/*"], limits: ["1000/minute"]}
        - {paths: ["/api/v1/*"], limits: ["2/minute"]}
  - versioning: {supported: [v1, v2], default: v2, precedence: [accept, url, header]}
"""
AS_V1 = {"Accept": "application/vnd.wsgistack.v1+json"}


@pytest.mark.parametrize("requests", [
    pytest.param([("/api/v1/config", {})] * 3, id="the rule's own spelling"),
    pytest.param([("/api/v2/config", AS_V1)] * 3, id="a v2 path served as v1: the v1 rule holds"),
    pytest.param([("/api/v1/config", {}), ("/api/config", AS_V1), ("/api/v2/config", AS_V1)],
                 id="every spelling counts against the v1 rule"),
])
def test_a_request_whose_spellings_pick_two_rules_meets_both(requests: list[tuple[str, dict[str, str]]]) -> None:
    app = TestApp(build_from_text(HEAD + LOOSER_RULE_FIRST).app)
    answers = [app.get(path, headers=headers, expect_errors=True) for path, headers in requests]
    assert [a.status_int for a in answers] == [200, 200, 429]
    assert answers[1].headers["RateLimit-Limit"] == "2"  # the tighter of the two it met
    assert answers[2].headers["Retry-After"]
    assert app.get("/api/v2/config").headers["RateLimit-Limit"] == "1000"  # v2 itself: its own rule


CORS = """  - cors:
      origins: ["https://app.example.org"]
      allow_credentials: true
      {extra}
"""
NO_CORS_ON_V2_CONFIG = {
    "rule": "rules: [{paths: [/api/v2/config], origins: []}]",
    "exclusion": "exclude_paths: [/api/v2/config]",
    "scope": "paths: [/api/v1/*]",
}
SPELLINGS_OF_V2_CONFIG = [
    pytest.param("/api/v2/config", {}, id="the rule's own spelling"),
    pytest.param("/api/V2/config", {}, id="upper-case version"),
    pytest.param("/api/config", {}, id="no version: routed to the default"),
    pytest.param("/api/config", {"X-API-Version": "v2"}, id="version in a header"),
    pytest.param("/api/config", {"Accept": "application/vnd.wsgistack.v2+json"}, id="version in a media type"),
    pytest.param("/api/v1/config", {"Accept": "application/vnd.wsgistack.v2+json"},
                 id="another version's path, served as v2 (accept first)"),
]


@pytest.mark.parametrize("how", sorted(NO_CORS_ON_V2_CONFIG))
@pytest.mark.parametrize(("path", "headers"), SPELLINGS_OF_V2_CONFIG)
def test_cors_withheld_from_a_path_is_withheld_in_every_spelling(how: str, path: str, headers: dict[str, str]) -> None:
    layers = CORS.format(extra=NO_CORS_ON_V2_CONFIG[how])
    accept_first = "  - versioning: {supported: [v1, v2], default: v2, precedence: [accept, url, header]}\n"
    app = TestApp(build_from_text(HEAD + layers + (accept_first if "v1" in path else VERSIONING)).app)
    response = app.get(path, headers={**headers, "Origin": "https://app.example.org"})
    assert response.json["path"] == "/api/v2/config"
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers
    granted = app.get("/api/v1/status", headers={"Origin": "https://app.example.org"})  # elsewhere it is granted
    assert granted.headers["Access-Control-Allow-Origin"] == "https://app.example.org"


@pytest.mark.parametrize(("rules", "expected"), [
    pytest.param("[{paths: [/api/v2/*], allow_credentials: false, expose_headers: [X-A, X-B]}]",
                 {"Access-Control-Allow-Origin": "https://app.example.org", "Access-Control-Expose-Headers": "X-A"},
                 id="the request path's rule gives no credentials, the routed one's exposes less"),
    pytest.param("[{paths: [/api/v2/*], origins: [https://other.example.org]}]", {},
                 id="an origin one of them does not allow"),
])
def test_two_rules_for_two_spellings_grant_what_both_grant(rules: str, expected: dict[str, str]) -> None:
    layers = CORS.format(extra=f"expose_headers: [X-A]\n      rules: {rules}")
    accept_first = "  - versioning: {supported: [v1, v2], default: v2, precedence: [accept, url, header]}\n"
    app = TestApp(build_from_text(HEAD + layers + accept_first).app)
    response = app.get("/api/v2/config", headers={"Origin": "https://app.example.org",
                                                  "Accept": "application/vnd.wsgistack.v1+json"})
    assert response.json["path"] == "/api/v1/config"  # /api/v2/* for the request path, the top level for v1
    assert {k: v for k, v in response.headers.items() if k.startswith("Access-Control-")} == expected


ROUTED_RULES = """  - ratelimit:
      store: shared
      limits: ["2/minute"]
      rules:
        - {paths: ["/api/v1/status"], limits: []}
        - {paths: ["/api/v1/search"], limits: ["1000/minute"]}
  - versioning: {supported: [v1, v2], default: v1}
"""
CATCH_ALL_AFTER = """  - ratelimit:
      store: shared
      limits: ["100/minute"]
      rules:
        - {paths: ["/api/v1/*"], limits: ["2/minute"]}
        - {methods: [GET], limits: ["500/minute"]}
  - versioning: {supported: [v1, v2], default: v2, precedence: [accept, url, header]}
"""


@pytest.mark.parametrize(("layers", "path", "headers", "limit", "statuses"), [
    pytest.param(ROUTED_RULES, "/api/status", {}, None, [200, 200, 200],
                 id="an exemption of the routed path holds for the path as asked, which no rule names"),
    pytest.param(ROUTED_RULES, "/api/search", {}, "1000", [200, 200, 200],
                 id="a looser rule of the routed path holds for the path as asked, which no rule names"),
    pytest.param(CATCH_ALL_AFTER, "/api/v1/config", {"Accept": "application/vnd.wsgistack.v2+json"}, "2",
                 [200, 200, 429], id="a rule of the path as asked holds when a catch-all takes the routed one"),
])
def test_the_rule_each_spelling_picks(layers: str, path: str, headers: dict[str, str], limit: str | None,
                                      statuses: list[int]) -> None:
    app = TestApp(build_from_text(HEAD + layers).app)
    answers = [app.get(path, headers=headers, expect_errors=True) for _ in statuses]
    assert [a.status_int for a in answers] == statuses
    assert answers[0].headers.get("RateLimit-Limit") == limit


@pytest.mark.parametrize(("precedence", "alone"), [
    pytest.param("[url, header, accept]", "600", id="the URL's version holds: the top level alone"),
    pytest.param("[accept, url, header]", "30",
                 id="a media type may outrank the URL's version: every version's rule, whatever was asked"),
])
def test_a_preflight_whose_spellings_pick_two_rules_gets_what_both_grant(precedence: str, alone: str) -> None:
    """The shorter max_age, and private network access only when both rules give it."""
    layers = CORS.format(extra="max_age: 600\n      allow_private_network: true\n"
                               "      rules: [{paths: [/api/v2/*], max_age: 30, allow_private_network: false}]")
    versioning = f"  - versioning: {{supported: [v1, v2], default: v2, precedence: {precedence}}}\n"
    app = TestApp(build_from_text(HEAD + layers + versioning).app)
    asked = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "GET"}
    first = app.options("/api/v1/config", headers={**asked, "Access-Control-Request-Private-Network": "true"},
                        expect_errors=True)
    assert (first.status_int, first.headers.get("Access-Control-Max-Age")) == \
        ((204, "600") if alone == "600" else (403, None))
    assert app.options("/api/v1/config", headers=asked).headers["Access-Control-Max-Age"] == alone
    both = {**asked, "Accept": "application/vnd.wsgistack.v2+json"}  # /api/v1/config served as v2 when accept first
    assert app.options("/api/v1/config", headers=both).headers["Access-Control-Max-Age"] == alone
    app.options("/api/v2/config", headers={**both, "Access-Control-Request-Private-Network": "true"}, status=403)


NARROWER_ON_V2 = """  - cors:
      origins: ["https://app.example.org"]
      allow_methods: [GET, DELETE]
      allow_headers: [X-API-Version]
      rules: [{paths: ["/api/v2/*"], allow_methods: [GET]}]
"""


@pytest.mark.parametrize(("path", "headers", "status"), [
    pytest.param("/api/v2/config", {}, 403, id="the rule's own spelling"),
    pytest.param("/api/config", {"Access-Control-Request-Headers": "x-api-version"}, 403,
                 id="no version in the URL, the header to come: any version may be named"),
    pytest.param("/api/config", {}, 403, id="no version and no header asked: a vendor Accept needs no preflight"),
    pytest.param("/api/v1/config", {}, 204, id="the URL's version holds: v1 allows DELETE"),
    pytest.param("/other", {}, 204, id="outside the prefix: the top level"),
])
def test_a_preflight_meets_the_rule_of_every_version_the_request_may_name(path: str, headers: dict[str, str],
                                                                          status: int) -> None:
    """A preflight carries no version header's value: what it grants, every version's rule must grant."""
    v1_default = "  - versioning: {supported: [v1, v2], default: v1}\n"  # /api/config is /api/v1/config
    app = TestApp(build_from_text(HEAD + NARROWER_ON_V2 + v1_default).app)
    asked = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "DELETE", **headers}
    response = app.options(path, headers=asked, status=status)
    if status == 204:
        assert response.headers["Access-Control-Allow-Methods"] == "GET, DELETE"
    granted = app.options(path, headers={"Origin": "https://app.example.org", "Access-Control-Request-Method": "GET"})
    assert granted.status_int == 204  # what every version allows is granted


@pytest.mark.parametrize(("scope", "path", "applies"), [
    pytest.param({"paths": ["/api/v2/*"]}, "/api/v2/x", True, id="the scope's own spelling"),
    pytest.param({"paths": ["/api/v2/*"]}, "/api/x", True, id="routed into the scope"),
    pytest.param({"paths": ["/api/v2/*"]}, "/api/v1/x", False, id="another version stays out"),
    pytest.param({"paths": ["/api/v2/*"]}, "/other", False, id="outside the prefix"),
    pytest.param({"paths": ["/api/*"], "exclude_paths": ["/api/v2/health"]}, "/api/v2/health", False,
                 id="excluded"),
])
def test_scopes_hold_for_the_routed_path(scope: dict[str, Any], path: str, applies: bool) -> None:
    options = ", ".join(f"{k}: [{', '.join(v)}]" for k, v in scope.items())
    app = stack(f"  - stack_support:Tag: {{name: scoped, {options}}}\n")
    assert app.get(path).json["layers"] == (["scoped"] if applies else [])


@pytest.mark.parametrize("path_info", [
    pytest.param("/api/v1/items/caf\u00c3\u00a9", id="UTF-8"),
    pytest.param("/api/v1/items/caf\u00e9", id="a byte that is not UTF-8"),
    pytest.param("/api/v1/items/\u00ff\u00fe/\u00c3\u00a9", id="bad bytes beside good ones"),
    pytest.param("/api/v1/items/caf\u00c3", id="a sequence cut short"),
    pytest.param("//api/v1/items/x", id="leading slashes"),
])
def test_layers_read_the_path_the_router_reads(path_info: str) -> None:
    from werkzeug.wrappers import Request

    from middleware.base import decoded_path

    environ = {"PATH_INFO": path_info, "REQUEST_METHOD": "GET", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http"}
    assert decoded_path(dict(environ)) == "/" + Request(dict(environ)).path.lstrip("/")


def test_paths_the_router_tells_apart_are_cached_apart() -> None:
    # /caf%E9 (not UTF-8) reads as "caf\ufffd", /caf%C3%A9 as "café": two resources, two entries.
    app = stack("  - cache: {store: shared, ttl: 60}\n")
    first = app.get("/api/v1/items/caf%E9")
    second = app.get("/api/v1/items/caf%C3%A9")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "MISS")
    assert app.get("/api/v1/items/caf%C3%A9").headers["X-Cache"] == "HIT"


STRIP = "  - stack_support:StripPrefix: {prefix: /public}\n"
REQUIRED = f"""  - auth:
      secret: {SECRET}
      default: optional
      rules:
        - {{paths: ["/api/*/config"], auth: required}}
"""
SCOPED = '  - ratelimit: {store: shared, limits: ["100/minute"], paths: ["/public/*"]}\n'


@pytest.mark.parametrize(("layers", "path", "status"), [
    pytest.param(REQUIRED + STRIP, "/api/v1/config", 401, id="auth outside: the rule's own spelling"),
    pytest.param(REQUIRED + STRIP, "/public/api/v1/config", 401, id="auth outside: the mounted spelling"),
    pytest.param(STRIP + REQUIRED, "/public/api/v1/config", 401, id="auth inside"),
    pytest.param(SCOPED + STRIP + REQUIRED, "/public/api/v1/config", 401,
                 id="auth inside, a scoped layer outside read the path first"),
    pytest.param(SCOPED + STRIP + REQUIRED, "/public/api/v1/health", 200, id="what no rule covers stays open"),
])
def test_rules_hold_for_a_path_a_layer_of_ones_own_rewrites(layers: str, path: str, status: int) -> None:
    """The decoded path a layer read before the rewrite is not what the layers after it read."""
    app = TestApp(build_from_text(HEAD + layers).app)
    assert app.get(path, expect_errors=True).status_int == status


def test_the_decoded_path_follows_a_rewrite_of_path_info() -> None:
    from middleware.base import decoded_path

    environ = {"PATH_INFO": "/t/a%20b"}
    assert decoded_path(environ) == "/t/a%20b"
    environ["PATH_INFO"] = "/api/caf\u00c3\u00a9"  # a layer rewrote it, and dropped nothing
    assert decoded_path(environ) == "/api/caf\u00e9"



CORE_SPELLINGS = [
    "/api/v1/config", "//api/v1/config", "///api/config", "/api/V1/config", "/api/config", "/api",
    "/api/v1/config/", "/api/v1//config", "/api//v1/config", "/api/./v1/config", "/api/v1/x/../config",
    "/api/v1/config;x", "/API/v1/config", "/api/v1/Config", "/api/v1/config\n", "/api/v1/conf\xc3\xadg",
    "/api/v1/config\xff",
]


@pytest.fixture(scope="module")
def core_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Flask core behind versioning, with and without an auth rule requiring credentials for its config."""
    from config import build_from_dict

    base = tmp_path_factory.mktemp("core")
    rule = {"paths": ["/api/*/config"], "auth": "required"}
    auth = {"auth": {"secret": SECRET, "default": "optional", "rules": [rule]}}
    built = {
        name: build_from_dict({
            "app": {"factory": "app:create_app", "options": {"var_dir": str(base / name)}},
            "stores": {"shared": "memory://"},
            "pipeline": [{"errors": {}}, *layers, {"versioning": {"supported": ["v1", "v2"], "default": "v1"}}],
        }, base_dir=base)
        for name, layers in (("open", []), ("ruled", [auth]))
    }
    yield built
    for stack_built in built.values():
        stack_built.close()


def _status(app: Any, method: str, path_info: str) -> int:
    """The status of a request whose PATH_INFO is as the server hands it over (percent-decoded, latin-1)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path_info, "QUERY_STRING": "", "SCRIPT_NAME": "",
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
               "REMOTE_ADDR": "127.0.0.1"}
    seen: list[str] = []
    b"".join(app(environ, lambda status, headers, exc_info=None: seen.append(status)))
    return int(seen[0][:3])


@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
@pytest.mark.parametrize("path_info", CORE_SPELLINGS)
def test_no_spelling_the_core_routes_to_a_view_steps_around_its_rule(core_stacks: dict[str, Any], path_info: str,
                                                                     method: str) -> None:
    """Whatever spelling the Flask core's router sends to the config view gets the rule's 401 (the rule's own
    spelling and the versioned ones route); the rest gets the router's 404, or the 401 of a glob that spans
    segments (``/api/v1//config``)."""
    routed = _status(core_stacks["open"].app, method, path_info)
    assert routed in (200, 404)
    assert _status(core_stacks["ruled"].app, method, path_info) in ((401,) if routed == 200 else (401, 404))
    if path_info in ("/api/v1/config", "//api/v1/config", "/api/V1/config", "/api/config"):
        assert routed == 200


@pytest.mark.parametrize(("path", "routed"), [
    pytest.param("", "/", id="empty"),
    pytest.param("/", "/", id="the root"),
    pytest.param("/api/v1/search", "/api/v1/search", id="a common path"),
    pytest.param("/.well-known/x", "/.well-known/x", id="a second character below '/'"),
    pytest.param("/0", "/0", id="a second character just above '/'"),
    pytest.param("/\xff", "/\xff", id="the highest latin-1 character second"),
    pytest.param("/x//y", "/x//y", id="slashes further in are kept"),
    pytest.param("//healthz", "/healthz", id="two leading slashes"),
    pytest.param("///", "/", id="slashes alone"),
    pytest.param("healthz", "/healthz", id="no leading slash"),
    pytest.param("0", "/0", id="a first character just above '/'"),
    pytest.param(".", "/.", id="a first character just below '/'"),
    pytest.param("\xff/", "/\xff/", id="a first character past ASCII"),
])
def test_rooted_path_reads_a_path_as_the_router_does(path: str, routed: str) -> None:
    """The comparisons that spare health, metrics and operator_page a slice per request say what the slices said."""
    from middleware.base import rooted_path

    assert rooted_path(path) == routed
