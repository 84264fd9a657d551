"""The auth layer and its TokenService: verification tables, rules, revocation, rotation, store failure.

Tokens that the service would never issue are forged here with PyJWT (or by
hand, where PyJWT refuses to make them).  Revocation and rotation run against
both backends (``store_url``: memory:// and a real redis-server).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import HTTPException

from middleware.auth import AuthMiddleware, TokenService, _AuthRule
from middleware.base import IDENTITY, SESSION, SESSION_USER_HINT, TRACE, Context, Identity
from middleware.errors import ErrorsMiddleware
from stores import Store, StoreError, store_from_url
from stores.breaker import CircuitBreaker
from stores.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-" * 10  # 70 bytes: long enough to forge HS512 tokens too
OTHER_SECRET = "other-" * 11
MISSING = 'Bearer realm="wsgistack"'


def challenge(description: str, realm: str = "wsgistack") -> str:
    return f'Bearer realm="{realm}", error="invalid_token", error_description="{description}"'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem(key: Any) -> str:
    return str(key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def private_pem(key: Any) -> str:
    return str(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key pair for the module."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_other() -> rsa.RSAPrivateKey:
    """An attacker's RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key pair."""
    return ec.generate_private_key(ec.SECP256R1())


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid access-token claims for ann, changed by ``overrides`` (None removes a claim)."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "ann", "roles": ["user"], "iat": now, "exp": now + 300,
                            "jti": f"j-{time.monotonic_ns()}", "typ": "access"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256", **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm=alg, headers=headers or None)


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes, digest: Any = hashlib.sha256) -> str:
    """A token signed by hand, for the ones PyJWT refuses to make."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), digest).digest() if key else b""
    return f"{signing_input}.{b64(signature)}"


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The app under the layer: tells who it saw."""
    identity = environ.get(IDENTITY)
    body = json.dumps(None if identity is None else {
        "sub": identity.subject, "roles": sorted(identity.roles), "source": identity.source,
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Stack:
    """errors → auth → echo, with the events the layer emitted."""

    def __init__(self, backend: Store | None = None, *, built: Any = None, **options: Any) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.context = Context(stores={"shared": backend if backend is not None else MemoryStore()},
                               listeners=[lambda e, f: self.events.append((e, f))])
        if not any(k in options for k in ("public_keys", "jwks_file", "private_key")):
            options.setdefault("secret", SECRET)
        self.layer = AuthMiddleware(echo, built or AuthMiddleware.Options(**options), self.context)
        self.tokens: TokenService = self.context.services["tokens"]
        self.app = TestApp(ErrorsMiddleware(self.layer, ErrorsMiddleware.Options(), self.context))

    def call(self, path: str = "/", token: str | None = None, method: str = "GET",
             headers: dict[str, str] | None = None, **environ: Any) -> Any:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.app.request(path, method=method, headers=headers, environ=environ, expect_errors=True)

    @property
    def reasons(self) -> list[str]:
        return [f["reason"] for e, f in self.events if e == "auth.failure"]


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A store of each backend, closed afterwards."""
    made = store_from_url(store_url)
    yield made
    made.close()


def expect(response: Any, status: int, www: str | None, reasons: list[str], stack: Stack) -> None:
    assert response.status_int == status, response.text
    assert response.headers.get("WWW-Authenticate") == www
    assert stack.reasons == reasons


# ------------------------------------------------------------------ the verification table


def _header(value: str) -> Callable[[Any], dict[str, str]]:
    return lambda keys: {"Authorization": value}


def _token(make: Callable[[Any], str]) -> Callable[[Any], dict[str, str]]:
    return lambda keys: {"Authorization": "Bearer " + make(keys)}


@pytest.mark.parametrize(("options", "request_headers", "expected"), [
    pytest.param({}, lambda k: {}, (401, MISSING, "missing"), id="missing token"),
    pytest.param({}, _header("Basic YW5uOnB3"), (401, MISSING, "missing"), id="basic credentials are no token"),
    pytest.param({}, _header("Basic \xe9"), (401, MISSING, "missing"),
                 id="basic credentials werkzeug cannot decode (a byte outside ASCII) are no token either"),
    pytest.param({}, _header("Bearer not-a-jwt"), (401, challenge("the token is malformed"), "malformed"),
                 id="malformed"),
    pytest.param({}, _header("Bearer "), (400, 'Bearer realm="wsgistack", error="invalid_request", '
                 'error_description="the Authorization header is malformed"', "invalid_request"),
                 id="no token: invalid_request (RFC 6750 §3.1)"),
    pytest.param({}, _header("Bearer a b"), (400, 'Bearer realm="wsgistack", error="invalid_request", '
                 'error_description="the Authorization header is malformed"', "invalid_request"),
                 id="two tokens: invalid_request"),
    pytest.param({}, _header("Bearer a.b.c"), (401, challenge("the token is malformed"), "malformed"),
                 id="three junk segments"),
    pytest.param({}, _token(lambda k: hand_signed({"alg": "none", "typ": "JWT"}, claims(), b"")),
                 (401, challenge("the token's algorithm is not accepted"), "invalid_algorithm"), id="alg none"),
    pytest.param({}, _token(lambda k: hand_signed({"alg": "NONE"}, claims(), b"")),
                 (401, challenge("the token's algorithm is not accepted"), "invalid_algorithm"), id="alg NONE"),
    pytest.param({}, _token(lambda k: hs(claims(), alg="HS512")),
                 (401, challenge("the token's algorithm is not accepted"), "invalid_algorithm"),
                 id="HS512 token, key pinned to HS256"),
    pytest.param({}, _token(lambda k: hs(claims(), OTHER_SECRET)),
                 (401, challenge("the token's signature is invalid"), "invalid_signature"), id="other secret"),
    pytest.param({}, _token(lambda k: hs(claims(exp=int(time.time()) - 5))),
                 (401, challenge("the token has expired"), "expired"), id="expired"),
    pytest.param({"leeway": 30}, _token(lambda k: hs(claims(exp=int(time.time()) - 5))),
                 (200, None, None), id="expired within leeway"),
    pytest.param({}, _token(lambda k: hs(claims(iat=int(time.time()) + 120))),
                 (401, challenge("the token is not valid yet"), "not_yet_valid"), id="issued in the future"),
    pytest.param({}, _token(lambda k: hs(claims(exp=None))),
                 (401, challenge("the token has no exp claim"), "missing_claim"), id="no exp"),
    pytest.param({}, _token(lambda k: hs(claims(iat=None))),
                 (401, challenge("the token has no iat claim"), "missing_claim"), id="no iat"),
    pytest.param({}, _token(lambda k: hs(claims(jti=None))),
                 (401, challenge("the token has no jti claim"), "missing_claim"), id="no jti"),
    pytest.param({}, _token(lambda k: hs(claims(sub=None))),
                 (401, challenge("the token has no sub claim"), "missing_claim"), id="no sub"),
    pytest.param({}, _token(lambda k: hs(claims(jti=""))),
                 (401, challenge("the token's jti claim is empty"), "missing_claim"),
                 id="empty jti (PyJWT takes it): no revocation could name the token alone"),
    pytest.param({}, _token(lambda k: hs(claims(sub=""))),
                 (401, challenge("the token's sub claim is empty"), "missing_claim"),
                 id="empty sub (PyJWT takes it): it names no one"),
    pytest.param({"issuer": "https://id.example.org"}, _token(lambda k: hs(claims(iss="https://evil.example"))),
                 (401, challenge("the token's issuer is not accepted"), "invalid_issuer"), id="wrong iss"),
    pytest.param({"issuer": "https://id.example.org"}, _token(lambda k: hs(claims())),
                 (401, challenge("the token has no iss claim"), "missing_claim"), id="no iss"),
    pytest.param({"issuer": "https://id.example.org"}, _token(lambda k: hs(claims(iss="https://id.example.org"))),
                 (200, None, None), id="right iss"),
    pytest.param({"audience": "api"}, _token(lambda k: hs(claims(aud="other"))),
                 (401, challenge("the token's audience is not accepted"), "invalid_audience"), id="wrong aud"),
    pytest.param({"audience": "api"}, _token(lambda k: hs(claims(aud=["other", "api"]))),
                 (200, None, None), id="aud list holding ours"),
    pytest.param({}, _token(lambda k: hs(claims(aud="api"))),
                 (401, challenge("the token's audience is not accepted"), "invalid_audience"),
                 id="aud present but none configured"),
    pytest.param({}, _token(lambda k: hs(claims(aud=[]))),
                 (401, challenge("the token's audience is not accepted"), "invalid_audience"),
                 id="aud an empty list, none configured (PyJWT lets an empty aud through)"),
    pytest.param({}, _token(lambda k: hs(claims(aud=""))),
                 (401, challenge("the token's audience is not accepted"), "invalid_audience"),
                 id="aud empty, none configured"),
    pytest.param({}, _token(lambda k: hs({**claims(), "aud": None})),
                 (401, challenge("the token's audience is not accepted"), "invalid_audience"),
                 id="aud null, none configured"),
    pytest.param({}, _token(lambda k: hs(claims(typ="refresh"))),
                 (401, challenge("a refresh token cannot be used as an access token"), "wrong_token_type"),
                 id="refresh token as access token"),
    pytest.param({}, _token(lambda k: hs(claims(typ=None, token_use="refresh"))),
                 (401, challenge("a refresh token cannot be used as an access token"), "wrong_token_type"),
                 id="token_use refresh"),
    pytest.param({}, _token(lambda k: hs(claims(typ=None, type="refresh"))),
                 (401, challenge("a refresh token cannot be used as an access token"), "wrong_token_type"),
                 id="type refresh (flask-jwt-extended's)"),
    pytest.param({}, _token(lambda k: hs(claims(type="refresh"))),
                 (401, challenge("the token is not an access token"), "wrong_token_type"),
                 id="two claims naming two kinds"),
    pytest.param({}, _token(lambda k: hs(claims(type="access"))), (200, None, None),
                 id="two claims naming the same kind"),
    pytest.param({}, _token(lambda k: hs(claims(typ="id"))),
                 (401, challenge("the token is not an access token"), "wrong_token_type"), id="id token"),
    pytest.param({}, _token(lambda k: hs(claims(typ=None))), (200, None, None), id="no typ counts as access"),
    pytest.param({}, _token(lambda k: hs(claims(typ=["access"]))),
                 (401, challenge("the token is not an access token"), "wrong_token_type"), id="typ a list"),
    pytest.param({}, _token(lambda k: hs(claims(typ=None, type={"kind": "access"}))),
                 (401, challenge("the token is not an access token"), "wrong_token_type"), id="type an object"),
    pytest.param({}, _token(lambda k: hs(claims(roles="admin"))),
                 (401, challenge("the token's roles claim is not a list of strings"), "invalid"),
                 id="roles not a list"),
    pytest.param({}, _token(lambda k: hs(claims(exp=str(int(time.time()) + 300)))),
                 (401, challenge("the token's exp claim is not a number"), "invalid"),
                 id="exp a string (PyJWT takes it; the next request would compare it with a number)"),
    pytest.param({}, _token(lambda k: hs(claims(iat=str(int(time.time()))))),
                 (401, challenge("the token's iat claim is not a number"), "invalid"), id="iat a string"),
    pytest.param({}, _token(lambda k: hs(claims(nbf="1790000000"))),
                 (401, challenge("the token's nbf claim is not a number"), "invalid"),
                 id="nbf a string (PyJWT takes it)"),
    pytest.param({}, _token(lambda k: hs(claims(nbf=True))),
                 (401, challenge("the token's nbf claim is not a number"), "invalid"), id="nbf a bool"),
    pytest.param({}, _token(lambda k: hs({**claims(), "nbf": None})),
                 (401, challenge("the token is malformed"), "malformed"), id="nbf null (PyJWT refuses it)"),
    pytest.param({"leeway": 30}, _token(lambda k: hs(claims(nbf=int(time.time()) + 120))),
                 (401, challenge("the token is not valid yet"), "not_yet_valid"), id="nbf past the leeway ahead"),
    pytest.param({"leeway": 30}, _token(lambda k: hs(claims(nbf=int(time.time()) + 20))),
                 (200, None, None), id="nbf within the leeway ahead"),
    pytest.param({}, _token(lambda k: hs(claims(nbf=int(time.time()) - 60))), (200, None, None), id="nbf past"),
    pytest.param({}, _token(lambda k: hs(claims(), kid="k1")),
                 (401, challenge("the token's key id is unknown"), "unknown_kid"), id="kid with a secret"),
    pytest.param({"realm": 'api "v2"'}, _token(lambda k: hs(claims(), OTHER_SECRET)),
                 (401, challenge("the token's signature is invalid", 'api \\"v2\\"'), "invalid_signature"),
                 id="realm is quoted"),
    pytest.param({"max_token_bytes": 300}, _header("Bearer " + "a" * 300), (431, None, "too_large"),
                 id="header too large"),
    pytest.param({"max_token_bytes": 300}, _header("Bearer " + "a" * 293), (401, challenge("the token is malformed"),
                 "malformed"), id="header of max_token_bytes exactly: read"),
    pytest.param({}, _token(lambda k: hs(claims())), (200, None, None), id="valid"),
    # RSA configuration
    pytest.param("rsa", _token(lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256")),
                 (200, None, None), id="rsa: valid without kid (one key)"),
    pytest.param("rsa", _token(lambda k: hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), k["rsa_pem"])),
                 (401, challenge("the token's algorithm is not accepted"), "invalid_algorithm"),
                 id="rsa: HS256 signed with the public key as secret"),
    pytest.param("rsa", _token(lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS512")),
                 (401, challenge("the token's algorithm is not accepted"), "invalid_algorithm"),
                 id="rsa: RS512 token, key pinned to RS256"),
    pytest.param("rsa", _token(lambda k: jwt.encode(claims(), k["other"], algorithm="RS256")),
                 (401, challenge("the token's signature is invalid"), "invalid_signature"),
                 id="rsa: signed by another key"),
    pytest.param("rsa2", _token(lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256", headers={"kid": "nope"})),
                 (401, challenge("the token's key id is unknown"), "unknown_kid"), id="rsa: unknown kid"),
    pytest.param("rsa2", _token(lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256")),
                 (401, challenge("the token names no key id and several keys are configured"), "unknown_kid"),
                 id="rsa: no kid, several keys"),
    pytest.param("rsa2", _token(lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256", headers={"kid": "main"})),
                 (200, None, None), id="rsa: kid picks the key"),
    pytest.param("rsa2", _token(lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256", headers={"kid": "old"})),
                 (401, challenge("the token's signature is invalid"), "invalid_signature"),
                 id="rsa: kid of another configured key"),
    pytest.param("rsa2", _token(lambda k: jwt.encode(
        claims(), k["other"], algorithm="RS256",
        headers={"kid": "attacker", "jku": "https://evil.example/jwks.json", "x5u": "https://evil.example/c"})),
                 (401, challenge("the token's key id is unknown"), "unknown_kid"), id="rsa: jku/x5u never fetched"),
    pytest.param("rsa2", _token(lambda k: jwt.encode(
        claims(), k["rsa"], algorithm="RS256", headers={"kid": "main", "jku": "https://evil.example/jwks.json"})),
                 (200, None, None), id="rsa: jku ignored on our own token"),
])
def test_verification(options: Any, request_headers: Callable[[Any], dict[str, str]],
                      expected: tuple[int, str | None, str | None], rsa_key: Any, rsa_other: Any) -> None:
    keys = {"rsa": rsa_key, "other": rsa_other, "rsa_pem": pem(rsa_key).encode()}
    if options == "rsa":
        options = {"public_keys": [pem(rsa_key)]}
    elif options == "rsa2":
        options = {"public_keys": {"main": pem(rsa_key), "old": pem(rsa_other)}}
    stack = Stack(**options)
    response = stack.call(headers=request_headers(keys))
    status, www, reason = expected
    expect(response, status, www, [reason] if reason else [], stack)
    if status == 401 and www is not None and www != MISSING:
        assert response.json["error"]["message"] == f"Unauthorized: {www.split('error_description=')[1][1:-1]}."
    if status == 200:
        assert response.json["sub"] == "ann"


@pytest.mark.parametrize("send", [
    pytest.param(lambda app, token: app.get(f"/?access_token={token}", expect_errors=True), id="query (RFC 6750 §2.3)"),
    pytest.param(lambda app, token: app.post("/", {"access_token": token}, expect_errors=True),
                 id="form body (RFC 6750 §2.2)"),
])
def test_a_token_outside_the_authorization_header_is_not_read(send: Callable[[TestApp, str], Any]) -> None:
    stack = Stack()
    token = hs(claims())
    assert stack.call(token=token).status_int == 200
    expect(send(stack.app, token), 401, MISSING, ["missing"], stack)


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack()
    token = hs(claims(exp=int(time.time()) + 60))
    assert stack.call(token=token).status_int == 200  # verified once, then remembered
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    expect(stack.call(token=token), 401, challenge("the token has expired"), ["expired"], stack)


def test_missing_token_message() -> None:
    stack = Stack()
    response = stack.call()
    assert response.json["error"]["message"] == "Unauthorized: this resource needs a bearer token."


def test_too_large_message() -> None:
    response = Stack(max_token_bytes=300).call(token="a" * 400)
    assert response.json["error"]["message"] == "The Authorization header is longer than 300 bytes."


# ------------------------------------------------------------------ rules


RULES = [
    {"paths": ["/public/*"], "auth": "none"},
    {"paths": ["/maybe/*"], "auth": "optional"},
    {"paths": ["/admin/*"], "methods": ["POST", "DELETE"], "roles": ["admin", "owner"]},
    {"paths": ["/admin/*"], "roles": ["admin", "owner", "viewer"]},
]


@pytest.mark.parametrize(("method", "path", "who", "expected"), [
    pytest.param("GET", "/public/x", None, (200, None, None), id="none: no token"),
    pytest.param("GET", "/public/x", "garbage", (200, None, None), id="none: a bad token is not even read"),
    pytest.param("GET", "/maybe/x", None, (200, None, None), id="optional: anonymous"),
    pytest.param("GET", "/maybe/x", "user", (200, "ann", None), id="optional: identified"),
    pytest.param("GET", "/maybe/x", "garbage", (401, None, "malformed"), id="optional: a bad token is refused"),
    pytest.param("GET", "/admin/x", "viewer", (200, "ann", None), id="roles: any listed role passes"),
    pytest.param("POST", "/admin/x", "viewer", (403, None, "insufficient_role"), id="roles: per method"),
    pytest.param("POST", "/admin/x", "owner", (200, "ann", None), id="roles: owner may post"),
    pytest.param("GET", "/admin/x", "user", (403, None, "insufficient_role"), id="roles: missing role"),
    pytest.param("GET", "/other", None, (401, None, "missing"), id="default: required"),
    # werkzeug routes //admin/x as /admin/x (Waitress merges the slashes itself, gunicorn does not)
    pytest.param("GET", "//admin/x", "user", (403, None, "insufficient_role"), id="leading slashes count as one"),
    pytest.param("GET", "///public/x", None, (200, None, None), id="leading slashes: a none rule still matches"),
    # and admin/x as /admin/x (Waitress passes `GET admin/x HTTP/1.1` on without its slash)
    pytest.param("GET", "admin/x", None, (401, None, "missing"), id="a path without its leading slash is rooted"),
    pytest.param("GET", "admin/x", "user", (403, None, "insufficient_role"), id="rooted: its roles are checked"),
    pytest.param("GET", "public/x", None, (200, None, None), id="rooted: a none rule still matches"),
])
def test_rules(method: str, path: str, who: str | None, expected: tuple[int, str | None, str | None]) -> None:
    stack = Stack(rules=RULES)
    stack.app.lint = path[:1] == "/"  # (WebTest's lint insists on the slash Waitress does not)
    token = None if who is None else "garbage" if who == "garbage" else hs(claims(roles=[who]))
    response = stack.call(path, token=token, method=method)
    status, sub, reason = expected
    assert response.status_int == status
    assert stack.reasons == ([reason] if reason else [])
    if status == 200:
        assert (response.json or {}).get("sub") == sub
    if status == 403:
        assert response.headers["WWW-Authenticate"] == (
            'Bearer realm="wsgistack", error="insufficient_scope", error_description="a role is missing"')
        needs = "admin, owner" if method == "POST" else "admin, owner, viewer"
        assert response.json["error"]["message"] == f"Forbidden: this resource needs one of the roles {needs}."


PREFLIGHT = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"}
OPTIONS_RULES = [{"paths": ["/dav/*"], "methods": ["OPTIONS"], "roles": ["admin"]}, *RULES]


@pytest.mark.parametrize(("path", "headers", "who", "expected"), [
    pytest.param("/admin/x", PREFLIGHT, None, (200, None, None, None), id="a CORS preflight is never refused"),
    pytest.param("/other", PREFLIGHT, "garbage", (200, None, None, None),
                 id="a CORS preflight: a bad token is not read"),
    pytest.param("/dav/x", PREFLIGHT, None, (200, None, None, None),
                 id="a CORS preflight passes a rule naming OPTIONS too"),
    pytest.param("/admin/x", {}, None, (401, None, "missing", MISSING),
                 id="an OPTIONS that is no preflight needs credentials where the rules say so"),
    pytest.param("/admin/x", {"Access-Control-Request-Method": "POST"}, None, (401, None, "missing", MISSING),
                 id="no Origin: no preflight"),
    pytest.param("/admin/x", {"Origin": "https://app.example.org"}, None, (401, None, "missing", MISSING),
                 id="no Access-Control-Request-Method: no preflight"),
    pytest.param("/other", {}, "garbage", (401, None, "malformed", challenge("the token is malformed")),
                 id="an OPTIONS that is no preflight: a bad token is refused"),
    pytest.param("/admin/x", {}, "user", (403, None, "insufficient_role",
                 'Bearer realm="wsgistack", error="insufficient_scope", error_description="a role is missing"'),
                 id="an OPTIONS that is no preflight: roles are checked"),
    pytest.param("/admin/x", {}, "viewer", (200, "ann", None, None),
                 id="an OPTIONS that is no preflight carries its identity to the app"),
    pytest.param("/dav/x", {}, "viewer", (403, None, "insufficient_role",
                 'Bearer realm="wsgistack", error="insufficient_scope", error_description="a role is missing"'),
                 id="a rule naming OPTIONS applies"),
    pytest.param("/dav/x", {}, "admin", (200, "ann", None, None), id="a rule naming OPTIONS: its role passes"),
    pytest.param("/public/x", {}, None, (200, None, None, None), id="an OPTIONS where auth is none"),
])
def test_options(path: str, headers: dict[str, str], who: str | None,
                 expected: tuple[int, str | None, str | None, str | None]) -> None:
    """Browsers send CORS preflights without credentials; any other OPTIONS is a request like the rest."""
    stack = Stack(rules=OPTIONS_RULES)
    token = None if who is None else "garbage" if who == "garbage" else hs(claims(roles=[who]))
    response = stack.call(path, token=token, method="OPTIONS", headers=headers)
    status, sub, reason, www = expected
    assert response.status_int == status
    assert response.headers.get("WWW-Authenticate") == www
    assert stack.reasons == ([reason] if reason else [])
    if status == 200:
        assert (response.json or {}).get("sub") == sub
    if who is None:  # the preview for reads ahead agrees: nothing is read for a 401 to come
        environ = {"REQUEST_METHOD": "OPTIONS", "PATH_INFO": path,
                   **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}}
        assert stack.layer.preview_environ(environ) == (None if status == 401 else {})


@pytest.mark.parametrize(("who", "status", "seen"), [
    pytest.param("user", 403, "ann", id="a missing role: refused, but known (the access line names ann)"),
    pytest.param("viewer", 200, "ann", id="a listed role"),
    pytest.param(None, 401, None, id="no credentials: no one"),
])
def test_the_identity_is_set_for_the_layers_outside_even_when_a_role_is_missing(
        who: str | None, status: int, seen: str | None) -> None:
    stack = Stack(rules=RULES)
    subjects: list[str | None] = []

    def recorder(environ: dict[str, Any], start_response: Any) -> Any:  # where access_log sits: outside auth
        try:
            return stack.layer(environ, start_response)
        finally:
            identity = environ.get(IDENTITY)
            subjects.append(None if identity is None else identity.subject)

    app = TestApp(ErrorsMiddleware(recorder, ErrorsMiddleware.Options(), stack.context))
    headers = {} if who is None else {"Authorization": f"Bearer {hs(claims(roles=[who]))}"}
    assert app.get("/admin/x", headers=headers, expect_errors=True).status_int == status
    assert subjects == [seen]


def test_default_optional_and_rules_first_match() -> None:
    stack = Stack(default="optional", rules=[{"paths": ["/a/*"], "auth": "required"},
                                             {"paths": ["/a/b"], "auth": "none"}])
    assert stack.call("/a/b").status_int == 401  # the first matching rule wins
    assert stack.call("/x").json is None


EC_PUBLIC_PEM = pem(ec.generate_private_key(ec.SECP256R1()))
#: A secret PyJWT refuses as an HMAC key: every token would meet a 500, and every login too.
SECRET_IS_A_KEY = ("secret is a public or private key or a certificate (PEM, SSH or DER), which PyJWT refuses as an "
                   "HMAC secret: RSA, EC and Ed25519 keys go in public_keys, private_key or jwks_file")
ROLES_NEED_REQUIRED = ("roles need auth: required (this rule has auth: {}): a request without credentials has no "
                       "roles to check, so it would pass where a user without the role gets 403; give anonymous "
                       "requests a rule of their own, without roles")


@pytest.mark.parametrize(("options", "who", "expected"), [
    pytest.param({"default": "optional"}, None, (401, "missing"),
                 id="default optional: a rule with roles still requires credentials"),
    pytest.param({"default": "none"}, None, (401, "missing"),
                 id="default none: a rule with roles still requires credentials"),
    pytest.param({"default": "optional"}, "user", (403, "insufficient_role"),
                 id="default optional: a user without the role"),
    pytest.param({"default": "optional"}, "admin", (200, None), id="default optional: an admin"),
    pytest.param({"rules": [_AuthRule.model_construct(paths=["/api/*/config"], methods=[], auth="optional",
                                                      roles=["admin"])]}, None, (401, "missing"),
                 id="a rule built past validation: anonymous still refused"),
    pytest.param({"rules": [_AuthRule.model_construct(paths=["/api/*/config"], methods=[], auth="none",
                                                      roles=["admin"])]}, "user", (403, "insufficient_role"),
                 id="a rule built past validation: the role is still checked"),
])
def test_anonymous_requests_never_skip_roles(options: dict[str, Any], who: str | None,
                                             expected: tuple[int, str | None]) -> None:
    """The rule's own level (``required`` unless it says otherwise) goes with its roles, whatever ``default`` is."""
    rules = options.pop("rules", [_AuthRule(paths=["/api/*/config"], roles=["admin"])])
    # model_copy does not validate: it can hand the layer rules that _AuthRule would refuse.
    stack = Stack(built=AuthMiddleware.Options(secret=SECRET, **options).model_copy(update={"rules": rules}))
    response = stack.call("/api/v1/config", token=None if who is None else hs(claims(roles=[who])))
    status, reason = expected
    assert response.status_int == status
    assert stack.reasons == ([reason] if reason else [])
    if status == 401:
        assert response.headers["WWW-Authenticate"] == MISSING


def test_roles_without_auth_required_are_refused_by_check(tmp_path: Path) -> None:
    config = tmp_path / "stack.yaml"
    config.write_text(textwrap.dedent(f"""\
        app: {{factory: "stack_support:echo_app"}}
        pipeline:
          - auth:
              secret: {SECRET}
              default: optional
              rules:
                - {{paths: ["/api/*/config"], auth: optional, roles: [admin]}}
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(config), "check"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{config}:7:"), first  # the rule's line
    assert " pipeline[0].auth.rules[0]" in first, first
    assert ROLES_NEED_REQUIRED.format("optional") in first, first


# ------------------------------------------------------------------ session identity


class FakeSession(dict):  # type: ignore[type-arg]
    """What the session layer puts in environ, as far as auth reads it."""


@pytest.mark.parametrize(("options", "session", "token", "expected"), [
    pytest.param({}, {"user": {"sub": "bob", "roles": ["admin"]}}, None,
                 (200, {"sub": "bob", "roles": ["admin"], "source": "session"}), id="session user accepted"),
    pytest.param({"accept_session": False}, {"user": {"sub": "bob"}}, None, (401, None), id="session not accepted"),
    pytest.param({}, {}, None, (401, None), id="session without user"),
    pytest.param({}, {"user": {"name": "bob"}}, None, (401, None), id="session user without sub"),
    pytest.param({}, {"user": {"sub": "bob", "roles": ["admin"]}}, "ann",
                 (200, {"sub": "ann", "roles": ["user"], "source": "jwt"}), id="bearer token wins"),
    pytest.param({"rules": [{"paths": ["*"], "roles": ["admin"]}]}, {"user": {"sub": "bob", "roles": ["user"]}},
                 None, (403, None), id="session roles checked"),
    pytest.param({}, {"user": {"sub": "bob", "roles": ["admin", ["user"], {"role": "x"}, 3]}}, None,
                 (200, {"sub": "bob", "roles": ["admin"], "source": "session"}),
                 id="only the names among the session's roles (a list in it was a 500)"),
])
def test_session_identity(options: dict[str, Any], session: dict[str, Any], token: str | None,
                          expected: tuple[int, Any]) -> None:
    stack = Stack(**options)
    environ: dict[str, Any] = {SESSION: FakeSession(session)}
    response = stack.call(token=hs(claims()) if token else None, **environ)
    assert response.status_int == expected[0]
    if expected[1] is not None:
        assert response.json == expected[1]
    if expected[0] == 403:
        assert "WWW-Authenticate" not in response.headers  # a session user is not challenged for a token


# ------------------------------------------------------------------ the token service


def test_issue_shape_and_claims(store: Store) -> None:
    stack = Stack(store, issuer="https://id.example.org", audience="api", access_ttl=600, refresh_ttl=7200)
    pair = stack.tokens.issue("ann", ["user", "admin", "user"])
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in", "refresh_expires_in"}
    assert (pair["token_type"], pair["expires_in"], pair["refresh_expires_in"]) == ("Bearer", 600, 7200)
    access = jwt.decode(pair["access_token"], SECRET, algorithms=["HS256"], audience="api")
    refresh = jwt.decode(pair["refresh_token"], SECRET, algorithms=["HS256"], audience="api")
    assert set(access) == {"sub", "roles", "iat", "exp", "jti", "typ", "fam", "auth_time", "iss", "aud"}
    assert access["auth_time"] == access["iat"] == refresh["auth_time"]
    assert (access["sub"], access["roles"], access["typ"], access["iss"], access["aud"]) == (
        "ann", ["admin", "user"], "access", "https://id.example.org", "api")
    assert access["exp"] - access["iat"] == 600 and isinstance(access["iat"], int)  # whole seconds: see _before
    assert (refresh["typ"], refresh["exp"] - refresh["iat"], refresh["fam"]) == ("refresh", 7200, access["fam"])
    assert access["jti"] != refresh["jti"]
    assert jwt.get_unverified_header(pair["access_token"]) == {"alg": "HS256", "typ": "JWT"}
    assert stack.call(token=pair["access_token"]).json == {"sub": "ann", "roles": ["admin", "user"], "source": "jwt"}


@pytest.mark.parametrize("options", [
    pytest.param({"issuer": ""}, id="issuer empty (${JWT_ISSUER:-})"),
    pytest.param({"audience": ""}, id="audience empty"),
    pytest.param({"issuer": " ", "audience": "\t"}, id="both blank"),
])
def test_an_empty_issuer_or_audience_is_none(options: dict[str, Any]) -> None:
    """The tokens were issued without the claim and then refused for lacking it: every login's tokens a 401."""
    stack = Stack(**options)
    assert (stack.layer.options.issuer, stack.layer.options.audience) == (None, None)
    pair = stack.tokens.issue("ann", ["user"])
    assert {"iss", "aud"}.isdisjoint(jwt.decode(pair["access_token"], SECRET, algorithms=["HS256"]))
    assert stack.call(token=pair["access_token"]).json == {"sub": "ann", "roles": ["user"], "source": "jwt"}
    assert stack.tokens.refresh(pair["refresh_token"])["token_type"] == "Bearer"
    assert stack.call(token=hs(claims(iss="https://id.example.org"))).status_int == 200  # as with no issuer


def test_defaults_and_published_service() -> None:
    stack = Stack()
    assert stack.context.services["tokens"] is stack.tokens
    pair = stack.tokens.issue("ann")
    assert (pair["expires_in"], pair["refresh_expires_in"]) == (900, 30 * 86400)
    assert stack.tokens.verify(pair["refresh_token"], kind="refresh")["typ"] == "refresh"
    with pytest.raises(HTTPException) as info:
        stack.tokens.verify(pair["refresh_token"])
    assert info.value.code == 401
    with pytest.raises(HTTPException) as info:
        stack.tokens.verify(pair["access_token"], kind="refresh")
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge("only a refresh token can be refreshed"))]


def test_revoked_access_token_is_refused(store: Store) -> None:
    stack = Stack(store)
    pair = stack.tokens.issue("ann", ["user"])
    assert stack.call(token=pair["access_token"]).status_int == 200
    stack.tokens.revoke(pair["access_token"])
    expect(stack.call(token=pair["access_token"]), 401, challenge("the token has been revoked"), ["revoked"], stack)
    jti = jwt.decode(pair["access_token"], SECRET, algorithms=["HS256"])["jti"]
    assert store.get(f"revoked:{jti}") == b"1"


def test_revoked_refresh_token_cannot_refresh(store: Store) -> None:
    stack = Stack(store)
    pair = stack.tokens.issue("ann")
    stack.tokens.revoke(pair["refresh_token"])
    with pytest.raises(HTTPException) as info:
        stack.tokens.refresh(pair["refresh_token"])
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge("the token has been revoked"))]


def _logged_out(tokens: TokenService, pair: dict[str, Any]) -> None:
    tokens.revoke(pair["access_token"], pair["refresh_token"], family=True)


def _reused(tokens: TokenService, pair: dict[str, Any]) -> None:
    tokens.refresh(tokens.refresh(pair["refresh_token"])["refresh_token"])
    with pytest.raises(HTTPException):  # stale: the pair it made was refreshed in turn
        tokens.refresh(pair["refresh_token"])


def _removed(tokens: TokenService, pair: dict[str, Any]) -> None:
    with pytest.raises(HTTPException):
        tokens.refresh(pair["refresh_token"], current_roles=lambda sub: None)


@pytest.mark.parametrize("end", [_logged_out, _reused, _removed], ids=["logout", "reuse", "user_removed"])
def test_verify_refuses_a_refresh_token_whose_family_was_revoked(
        store: Store, end: Callable[[TokenService, dict[str, Any]], None]) -> None:
    """A logout leaves no revoked:<jti> for the refresh token, only its family's mark: verify reads that too."""
    stack = Stack(store)
    pair = stack.tokens.issue("ann", ["user"])
    assert stack.tokens.verify(pair["refresh_token"], kind="refresh")["sub"] == "ann"
    end(stack.tokens, pair)
    with pytest.raises(HTTPException) as info:
        stack.tokens.verify(pair["refresh_token"], kind="refresh")
    assert info.value.code == 401
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge("the token has been revoked"))]


def test_an_access_token_check_reads_one_key() -> None:
    """The family's mark is read for refresh tokens only: an access token costs its one blocklist read."""

    class Counting(MemoryStore):
        keys: list[str]

        def get(self, key: str) -> bytes | None:
            self.keys.append(key)
            return super().get(key)

    store = Counting()
    stack = Stack(store)
    pair = stack.tokens.issue("ann", ["user"])
    store.keys = []
    assert stack.call(token=pair["access_token"]).status_int == 200
    jti = jwt.decode(pair["access_token"], SECRET, algorithms=["HS256"])["jti"]
    assert store.keys == [f"revoked:{jti}"]


def test_revoking_an_expired_token_stores_nothing(store: Store) -> None:
    stack = Stack(store)
    old = hs(claims(exp=int(time.time()) - 10, jti="gone"))
    stack.tokens.revoke(old)
    assert store.get("revoked:gone") is None
    with pytest.raises(HTTPException) as info:
        stack.tokens.revoke(hs(claims(), OTHER_SECRET))
    assert info.value.code == 401


YEAR_9999 = 253402300799  # 9999-12-31T23:59:59Z, the last second a NumericDate here may name


@pytest.mark.parametrize(("claim", "value", "refused"), [
    pytest.param("exp", YEAR_9999, False, id="exp at the end of the year 9999: a date"),
    pytest.param("exp", YEAR_9999 + 1, True, id="exp past the year 9999"),
    pytest.param("exp", 10**17, True, id="exp a hundred million years ahead"),
    pytest.param("exp", 10**400, True, id="exp no float can hold"),
    pytest.param("exp", 1e300, True, id="exp a huge float"),
    pytest.param("iat", -(10**400), True, id="iat no float can hold, in the past"),
    pytest.param("nbf", -YEAR_9999 - 1, True, id="nbf before the year -8000"),
    pytest.param("auth_time", 10**400, True, id="auth_time no float can hold"),
    pytest.param("auth_time", float("inf"), True, id="auth_time infinite (Python's JSON reads Infinity)"),
])
def test_a_token_dated_beyond_any_clock_is_refused_not_accepted_unrevocably(
        store: Store, claim: str, value: float, refused: bool) -> None:
    """A NumericDate past the year 9999 is no date any clock reaches: such a token (signed by a key the layer
    trusts) was accepted, and revoking one whose date no float holds (a logout with it) was a 500, so it
    could never be revoked.  Now it is refused, so it needs no revocation."""
    stack = Stack(store)
    token = hs(claims(**{claim: value}, jti="far"))
    if not refused:
        assert stack.call(token=token).status_int == 200
        stack.tokens.revoke(token)
        assert 0 < cast(float, store.ttl("revoked:far")) <= YEAR_9999 - time.time() + 1
        return
    said = challenge(f"the token's {claim} claim is out of range")
    expect(stack.call(token=token), 401, said, ["invalid"], stack)
    with pytest.raises(HTTPException) as info:
        stack.tokens.revoke(token)
    assert info.value.code == 401
    assert info.value.wsgistack_headers == [("WWW-Authenticate", said)]  # type: ignore[attr-defined]


def test_refresh_rotates_and_reuse_revokes_the_family(store: Store) -> None:
    stack = Stack(store)
    first = stack.tokens.issue("ann", ["user"])
    second = stack.tokens.refresh(first["refresh_token"])
    first_claims = jwt.decode(first["refresh_token"], SECRET, algorithms=["HS256"])
    second_claims = jwt.decode(second["refresh_token"], SECRET, algorithms=["HS256"])
    assert second_claims["fam"] == first_claims["fam"] and second_claims["jti"] != first_claims["jti"]
    assert jwt.decode(second["access_token"], SECRET, algorithms=["HS256"])["roles"] == ["user"]
    assert stack.call(token=second["access_token"]).status_int == 200
    third = stack.tokens.refresh(second["refresh_token"])

    with pytest.raises(HTTPException) as info:  # the first refresh token, used again
        stack.tokens.refresh(first["refresh_token"])
    assert info.value.code == 401
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge("the refresh token was already used; its family is revoked"))]
    assert store.get(f"family-revoked:{first_claims['fam']}") == b"swept"  # revoked, and its access tokens blocklisted
    with pytest.raises(HTTPException):  # the newest refresh token of the family is dead too
        stack.tokens.refresh(third["refresh_token"])
    for pair in (first, second, third):  # and so is every access token issued in it
        assert stack.call(token=pair["access_token"]).status_int == 401
    assert stack.reasons[:2] == ["refresh_reuse", "revoked"]
    other = stack.tokens.issue("ann", ["user"])  # a new login is a new family
    assert stack.call(token=other["access_token"]).status_int == 200
    assert stack.tokens.refresh(other["refresh_token"])["token_type"] == "Bearer"


def pair(answer: dict[str, Any]) -> tuple[str, str]:
    return answer["access_token"], answer["refresh_token"]


def test_a_refresh_sent_again_within_the_grace_gets_the_same_pair(store: Store) -> None:
    """Two tabs refreshing at once, or a retry: the pair the first use made, and no revocation."""
    stack = Stack(store)
    first = stack.tokens.issue("ann", ["user"])
    second = stack.tokens.refresh(first["refresh_token"])
    assert pair(stack.tokens.refresh(first["refresh_token"])) == pair(second)
    assert stack.reasons == []
    assert stack.call(token=second["access_token"]).status_int == 200
    third = stack.tokens.refresh(second["refresh_token"])  # the family goes on as usual
    assert stack.call(token=third["access_token"]).status_int == 200


def test_the_grace_allows_for_clocks_as_skewed_as_tokens(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second tab's refresh lands on a host whose clock is half a second behind the first one's."""
    stack = Stack(store)
    first = stack.tokens.issue("ann", ["user"])
    second = stack.tokens.refresh(first["refresh_token"])
    behind = time.time() - 0.99
    monkeypatch.setattr(time, "time", lambda: behind)
    assert pair(stack.tokens.refresh(first["refresh_token"])) == pair(second)
    assert stack.reasons == []


def test_the_grace_counts_from_the_first_use_not_from_its_whole_second(store: Store,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """iat is whole seconds: a first use at x.9 s and a retry 0.3 s later are 0.3 s apart, not 1.2 s."""
    stack = Stack(store, refresh_reuse_grace=1)
    first = stack.tokens.issue("ann", ["user"])
    clock = [int(time.time()) + 0.9]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    second = stack.tokens.refresh(first["refresh_token"])
    clock[0] += 0.3
    assert pair(stack.tokens.refresh(first["refresh_token"])) == pair(second)
    assert stack.reasons == []
    clock[0] += 0.75  # 1.05 s after the first use: past the grace, though 1.95 s after its iat
    with pytest.raises(HTTPException):
        stack.tokens.refresh(first["refresh_token"])
    assert stack.reasons == ["refresh_reuse"]


def test_a_remembered_token_is_refused_after_the_clock_stepped_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified once and remembered, a token issued "in the future" of a clock that stepped back is refused
    as a fresh decode would refuse it, not accepted on its exp alone."""
    stack = Stack(leeway=30)
    token = hs(claims(exp=int(time.time()) + 7200))
    assert stack.call(token=token).status_int == 200
    back = time.time() - 3600
    monkeypatch.setattr(time, "time", lambda: back)
    refused = stack.call(token=token)
    assert refused.status_int == 401
    assert refused.headers["WWW-Authenticate"] == challenge("the token is not valid yet")


def test_a_remembered_token_is_checked_in_whole_seconds_as_pyjwt_does() -> None:
    """An iat a fraction of a second ahead (an issuer's clock a moment fast) passes PyJWT: and then again."""
    stack = Stack()
    token = hs(claims(iat=int(time.time()) + 0.95))
    assert [stack.call(token=token).status_int for _ in range(3)] == [200, 200, 200]


def test_a_used_refresh_token_is_known_as_long_as_any_host_accepts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thief sends the used token to a host leeway behind, leeway past exp: still a reuse."""
    store = MemoryStore()
    stack = Stack(store, leeway=30, access_ttl=60, refresh_ttl=100)
    first = stack.tokens.issue("ann")
    second = stack.tokens.refresh(first["refresh_token"])
    later = time.monotonic() + 100 + 45  # past exp + leeway on the first host's clock, within 2 leeway
    monkeypatch.setattr("stores.memory._monotonic", lambda: later)
    fam = jwt.decode(first["refresh_token"], SECRET, algorithms=["HS256"])["fam"]
    newest = jwt.decode(second["refresh_token"], SECRET, algorithms=["HS256"])["jti"]
    assert store.get(f"family-head:{fam}") == newest.encode()  # the first token is not the family's newest


def test_a_chain_of_refreshes_keeps_a_few_keys_per_login_and_still_knows_every_old_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refreshing all day must not store a key per refresh for thirty days (a client could fill the store)."""
    store = MemoryStore()
    stack = Stack(store)
    first = pair = stack.tokens.issue("ann")
    for _ in range(30):
        pair = stack.tokens.refresh(pair["refresh_token"])
    later = time.monotonic() + 60  # past the retry grace and its margin, within the tokens' lives
    monkeypatch.setattr("stores.memory._monotonic", lambda: later)
    assert list(store.scan("refresh-used:")) == [] and len(list(store.scan("family-head:"))) == 1
    with pytest.raises(HTTPException) as refused:
        stack.tokens.refresh(first["refresh_token"])
    assert refused.value.code == 401 and stack.reasons == ["refresh_reuse"]
    with pytest.raises(HTTPException):  # the whole family went with it, the newest token too
        stack.tokens.refresh(pair["refresh_token"])


def test_a_logout_keeps_one_key_for_as_long_as_its_tokens_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging in and out in a loop must fill the store as slowly as can be: one key a logout, not three."""
    store = MemoryStore()
    stack = Stack(store)
    pair = stack.tokens.refresh(stack.tokens.issue("ann")["refresh_token"])
    stack.tokens.revoke(pair["access_token"], pair["refresh_token"], family=True)
    later = time.monotonic() + 3600  # past the access tokens' lives and the retry marks', within the family's
    monkeypatch.setattr("stores.memory._monotonic", lambda: later)
    fam = jwt.decode(pair["refresh_token"], SECRET, algorithms=["HS256"])["fam"]
    assert list(store.scan("")) == [f"family-revoked:{fam}"]
    with pytest.raises(HTTPException) as refused:
        stack.tokens.refresh(pair["refresh_token"])
    assert refused.value.code == 401


def test_a_revocation_outlives_the_token_by_twice_the_leeway(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose clock is leeway behind the revoker's accepts the token leeway past exp by its own clock."""
    store = MemoryStore()
    stack = Stack(store, leeway=30)
    token = hs(claims(exp=int(time.time()) + 5))
    stack.tokens.revoke(token)
    later = time.monotonic() + 5 + 30 + 10  # past exp + leeway on the revoker's clock, within exp + 2 leeway
    monkeypatch.setattr("stores.memory._monotonic", lambda: later)
    assert store.get(f"revoked:{jwt.decode(token, SECRET, algorithms=['HS256'])['jti']}") == b"1"


@pytest.mark.parametrize("sent", ["refresh token", "both tokens"])
def test_a_logout_outlives_tokens_issued_before_a_reload_shortened_their_lives(
        monkeypatch: pytest.MonkeyPatch, sent: str) -> None:
    """A reload that shortens access_ttl and refresh_ttl must not shorten the revocation of older tokens."""
    store = MemoryStore()
    before = Stack(store, access_ttl=900, refresh_ttl=86400)
    pair = before.tokens.issue("ann")
    after = Stack(store, access_ttl=60, refresh_ttl=600)  # the same store, the reloaded layer's options
    tokens = [pair["refresh_token"]] + ([pair["access_token"]] if sent == "both tokens" else [])
    after.tokens.revoke(*tokens, family=True)
    later = time.monotonic() + 700  # past the new lifetimes, within the tokens' own (900 s and a day)
    monkeypatch.setattr("stores.memory._monotonic", lambda: later)
    expect(after.call(token=pair["access_token"]), 401, challenge("the token has been revoked"), ["revoked"], after)
    with pytest.raises(HTTPException) as refused:
        after.tokens.refresh(pair["refresh_token"])
    assert refused.value.code == 401 and after.reasons[-1] == "revoked"


def test_a_token_rotated_out_before_a_reload_shortened_refresh_ttl_is_still_a_reuse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The family's head outlives every older refresh token of the family, whatever refresh_ttl is now."""
    store = MemoryStore()
    before = Stack(store, refresh_ttl=86400)
    first = before.tokens.issue("ann")
    after = Stack(store, access_ttl=60, refresh_ttl=600)
    newest = after.tokens.refresh(first["refresh_token"])
    later = time.monotonic() + 700  # past the newest token's life, within the first one's (a day)
    monkeypatch.setattr("stores.memory._monotonic", lambda: later)
    with pytest.raises(HTTPException) as refused:
        after.tokens.refresh(first["refresh_token"])
    assert refused.value.code == 401 and after.reasons == ["refresh_reuse"]
    fam = jwt.decode(newest["refresh_token"], SECRET, algorithms=["HS256"])["fam"]
    assert store.get(f"family-revoked:{fam}") == b"swept"


def test_a_family_record_lives_until_the_login_ends(store: Store) -> None:
    """Counted from auth_time + login_max_age, as the family's tokens are, not from now + refresh_ttl."""
    stack = Stack(store, access_ttl=60, refresh_ttl=600, login_max_age=3600)
    pair = stack.tokens.refresh(stack.tokens.issue("ann")["refresh_token"])
    claims_ = jwt.decode(pair["refresh_token"], SECRET, algorithms=["HS256"])
    left = claims_["auth_time"] + 3600 - time.time()
    assert left - 2 <= store.ttl(f"family-head:{claims_['fam']}") <= left + 1 + 1  # (the margin: 1 s)
    access = jwt.decode(pair["access_token"], SECRET, algorithms=["HS256"])
    assert 59 <= cast(float, store.ttl(f"family-access:{claims_['fam']}:{access['jti']}")) <= 60 + 1
    stack.tokens.revoke(pair["refresh_token"], family=True)
    assert left - 2 <= store.ttl(f"family-revoked:{claims_['fam']}") <= left + 1 + 1
    # what was left of the access token's record
    assert 58 <= cast(float, store.ttl(f"revoked:{access['jti']}")) <= 60 + 1


def test_a_store_that_cannot_tell_what_a_key_has_left_blocklists_for_the_access_ttl() -> None:
    """A store of one's own without ttl(): the sweep blocklists for the access_ttl of now, and the logout works."""
    class Untold(MemoryStore):
        ttl = Store.ttl  # raises StoreError: "cannot tell how long a key has left"

    store = Untold()
    stack = Stack(store, access_ttl=60)
    pair = stack.tokens.issue("ann")
    stack.tokens.revoke(pair["refresh_token"], family=True)
    jti = jwt.decode(pair["access_token"], SECRET, algorithms=["HS256"])["jti"]
    assert 59 <= cast(float, MemoryStore.ttl(store, f"revoked:{jti}")) <= 60 + 1
    expect(stack.call(token=pair["access_token"]), 401, challenge("the token has been revoked"), ["revoked"], stack)


@pytest.mark.parametrize(("grace", "later", "mark", "leeway"), [
    (0, 0, None, 0),                                # no grace: sent again at once is a reuse
    (10, 11, None, 0),                              # after the grace
    (10, 11, None, 300),                            # leeway widens the grace backwards only (clock skew)
    (10, 0, b"1", 0),                               # a mark that holds no pair (from an earlier version)
    (10, 0, b'{"iat":"x","access":1,"refresh":[],"roles":"ab"}', 0),  # a mark that is not ours
])
def test_a_refresh_sent_again_outside_the_grace_revokes_the_family(
        store: Store, monkeypatch: pytest.MonkeyPatch, grace: int, later: int, mark: bytes | None,
        leeway: int) -> None:
    stack = Stack(store, refresh_reuse_grace=grace, leeway=leeway)
    first = stack.tokens.issue("ann", ["user"])
    second = stack.tokens.refresh(first["refresh_token"])
    jti = jwt.decode(first["refresh_token"], SECRET, algorithms=["HS256"])["jti"]
    if mark is not None:
        store.set(f"refresh-used:{jti}", mark, 60)
    now = time.time() + later
    monkeypatch.setattr(time, "time", lambda: now)
    with pytest.raises(HTTPException) as info:
        stack.tokens.refresh(first["refresh_token"])
    assert info.value.code == 401
    assert stack.reasons == ["refresh_reuse"]
    assert stack.call(token=second["access_token"]).status_int == 401


def test_a_slow_second_use_within_the_grace_never_moves_the_family_head_back(store: Store) -> None:
    """Two tabs refresh R1 at once; the loser is slow, and the client refreshes R2 meanwhile.

    Had the loser then named R2 the family's newest, the client's next refresh (R3) would be
    taken for a reuse, and a thief's R2 for the newest token. Only the use that marks a token
    moves the head.
    """
    stack = Stack(store)
    first = stack.tokens.issue("ann")
    second = stack.tokens.refresh(first["refresh_token"])  # tab A wins
    service = stack.tokens
    looked_up = service._made_by_first_use
    later: list[dict[str, Any]] = []

    def slow(used: str) -> Any:
        again = looked_up(used)  # tab B: R1 was used, R2 not yet refreshed: a retry, the same pair
        later.append(service.refresh(second["refresh_token"]))  # the client goes on meanwhile (R2 -> R3)
        return again

    real_get = store.get
    stale = [True]

    def read_before_a_wrote(key: str) -> bytes | None:  # tab B read the head before tab A moved it
        if stale and key.startswith("family-head:"):
            stale.clear()
            return None
        return real_get(key)

    service._made_by_first_use = slow  # type: ignore[method-assign]
    store.get = read_before_a_wrote  # type: ignore[method-assign]
    retried = service.refresh(first["refresh_token"])
    store.get = real_get  # type: ignore[method-assign]
    service._made_by_first_use = looked_up  # type: ignore[method-assign]
    assert retried["refresh_token"] == second["refresh_token"]
    fam = jwt.decode(first["refresh_token"], SECRET, algorithms=["HS256"])["fam"]
    third = later[0]
    assert store.get(f"family-head:{fam}") == jwt.decode(third["refresh_token"], SECRET,
                                                          algorithms=["HS256"])["jti"].encode()
    assert service.refresh(third["refresh_token"])["token_type"] == "Bearer"  # the client keeps its login
    assert stack.reasons == []


def test_a_refresh_whose_answer_was_lost_can_be_sent_again(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store marked the token used, but its answer came too late: the client got a 503.

    Its retry (Retry-After: 5) gets the pair the lost attempt made, which the
    store knows of (a logout revokes it), instead of a reuse that would log
    the user out everywhere.
    """
    stack = Stack(store)
    first = stack.tokens.issue("ann", ["user"])
    real_add = store.add_then_write

    def add_then_time_out(key: str, value: bytes, ttl: float, sets: Any) -> bool:
        real_add(key, value, ttl, sets)
        raise StoreError("no answer in time")

    monkeypatch.setattr(store, "add_then_write", add_then_time_out)
    with pytest.raises(HTTPException) as info:
        stack.tokens.refresh(first["refresh_token"])
    assert info.value.code == 503
    monkeypatch.setattr(store, "add_then_write", real_add)
    retried = stack.tokens.refresh(first["refresh_token"])
    assert stack.reasons == []
    assert stack.call(token=retried["access_token"]).status_int == 200
    newer = stack.tokens.refresh(retried["refresh_token"])  # the pair it got is the family's newest
    assert stack.call(token=newer["access_token"]).status_int == 200
    stack.tokens.revoke(newer["refresh_token"], family=True)  # the lost attempt's access token was recorded
    assert stack.call(token=retried["access_token"]).status_int == 401


def test_no_token_of_a_login_outlives_login_max_age(store: Store) -> None:
    """Refreshing keeps a login going, but not forever: then the user logs in again."""
    stack = Stack(store, access_ttl=600, refresh_ttl=3600, login_max_age=5000)
    first = stack.tokens.issue("ann")
    assert (first["expires_in"], first["refresh_expires_in"]) == (600, 3600)
    again = stack.tokens.refresh(first["refresh_token"])

    def claims_of(token: str) -> dict[str, Any]:
        return dict(jwt.decode(token, SECRET, algorithms=["HS256"]))

    assert claims_of(again["refresh_token"])["auth_time"] == claims_of(first["refresh_token"])["auth_time"]
    # A login 4,900 seconds old: its new tokens end with it, 100 seconds from now.
    late = stack.tokens._pair("ann", [], claims_of(again["refresh_token"])["fam"], int(time.time()) - 4900)[0]
    assert (late["expires_in"], late["refresh_expires_in"]) == (100, 100)
    assert claims_of(late["access_token"])["exp"] - claims_of(late["access_token"])["auth_time"] == 5000
    # Past its end, however much leeway: log in again.
    over = Stack(store, access_ttl=600, refresh_ttl=3600, login_max_age=5000, leeway=60)
    ended = over.tokens._pair("ann", [], "fam-x", int(time.time()) - 5010)[0]  # exp 10 s ago, within the leeway
    with pytest.raises(HTTPException) as refused:
        over.tokens.refresh(ended["refresh_token"])
    assert refused.value.code == 401


def test_a_family_is_swept_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sending the same logout again must not walk the store's keys again."""
    stack = Stack(store)
    pair = stack.tokens.issue("ann")
    scans: list[str] = []
    real_scan = store.scan

    def scan(prefix: str) -> Iterator[str]:
        scans.append(prefix)
        return real_scan(prefix)

    monkeypatch.setattr(store, "scan", scan)
    for _ in range(3):
        stack.tokens.revoke(pair["access_token"], pair["refresh_token"], family=True)
    assert len(scans) == 1
    assert stack.call(token=pair["access_token"]).status_int == 401


def test_refresh_refuses_access_tokens_and_forgeries(store: Store) -> None:
    stack = Stack(store)
    pair = stack.tokens.issue("ann")
    for token in (pair["access_token"], hs(claims(typ="refresh", fam="f"), OTHER_SECRET),
                  hs(claims(typ="refresh"))):
        with pytest.raises(HTTPException) as info:
            stack.tokens.refresh(token)
        assert info.value.code == 401
    assert stack.reasons == ["wrong_token_type", "invalid_signature", "invalid"]


@pytest.mark.parametrize(("current", "expected_roles"), [
    pytest.param(["user", "admin", "user"], ["admin", "user"], id="a role was added"),
    pytest.param(("user",), ["user"], id="a role was taken away"),
    pytest.param((), [], id="every role was taken away"),
])
def test_refresh_carries_the_current_roles(store: Store, current: Iterable[str], expected_roles: list[str]) -> None:
    stack = Stack(store)
    first = stack.tokens.issue("ann", ["user", "auditor"])
    asked: list[str] = []

    def lookup(subject: str) -> Iterable[str]:
        asked.append(subject)
        return current

    second = stack.tokens.refresh(first["refresh_token"], current_roles=lookup)
    assert asked == ["ann"]
    for kind in ("access_token", "refresh_token"):
        assert jwt.decode(second[kind], SECRET, algorithms=["HS256"])["roles"] == expected_roles
    assert stack.call(token=second["access_token"]).json == {"sub": "ann", "roles": expected_roles, "source": "jwt"}
    third = stack.tokens.refresh(second["refresh_token"])  # without a lookup, the token's roles are kept
    assert jwt.decode(third["access_token"], SECRET, algorithms=["HS256"])["roles"] == expected_roles


def test_refresh_of_a_subject_that_no_longer_exists_revokes_the_family(store: Store) -> None:
    stack = Stack(store)
    first = stack.tokens.issue("ann", ["admin"])
    second = stack.tokens.refresh(first["refresh_token"])
    with pytest.raises(HTTPException) as info:
        stack.tokens.refresh(second["refresh_token"], current_roles=lambda sub: None)
    assert info.value.code == 401
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge("the token has been revoked"))]
    fam = jwt.decode(first["refresh_token"], SECRET, algorithms=["HS256"])["fam"]
    assert store.get(f"family-revoked:{fam}") == b"swept"
    for pair in (first, second):
        assert stack.call(token=pair["access_token"]).status_int == 401
    with pytest.raises(HTTPException) as again:  # and the refresh token stays refused, lookup or not
        stack.tokens.refresh(second["refresh_token"])
    assert again.value.code == 401
    assert stack.reasons == ["unknown_subject", "revoked", "revoked", "revoked"]


def test_a_failing_lookup_does_not_use_up_the_refresh_token(store: Store) -> None:
    stack = Stack(store)
    pair = stack.tokens.issue("ann", ["user"])

    def locked(subject: str) -> None:
        raise RuntimeError("the users database is locked")

    with pytest.raises(HTTPException) as info:  # a 503 to retry (logged), not a 500
        stack.tokens.refresh(pair["refresh_token"], current_roles=locked)
    assert (info.value.code, info.value.description) == (503, "The users database cannot be read; retry shortly.")
    assert stack.tokens.refresh(pair["refresh_token"])["token_type"] == "Bearer"


def test_revoke_checks_every_token_before_revoking_any(store: Store) -> None:
    stack = Stack(store)
    pair = stack.tokens.issue("ann", ["user"])
    jtis = [jwt.decode(pair[k], SECRET, algorithms=["HS256"])["jti"] for k in ("access_token", "refresh_token")]
    for bad in ("not.a.jwt", hs(claims(), OTHER_SECRET)):
        with pytest.raises(HTTPException) as info:
            stack.tokens.revoke(pair["access_token"], pair["refresh_token"], bad)
        assert info.value.code == 401
    assert [store.get(f"revoked:{jti}") for jti in jtis] == [None, None]
    assert stack.call(token=pair["access_token"]).status_int == 200
    stack.tokens.revoke(pair["access_token"], pair["refresh_token"])
    assert [store.get(f"revoked:{jti}") for jti in jtis] == [b"1", b"1"]
    stack.tokens.revoke(pair["access_token"])  # again: harmless, so a logout can be retried
    assert stack.call(token=pair["access_token"]).status_int == 401


@pytest.mark.parametrize(("claim", "use"), [
    pytest.param("jti", lambda tokens, token: tokens.revoke(token), id="revoke: an empty jti"),
    pytest.param("sub", lambda tokens, token: tokens.revoke(token), id="revoke: an empty sub"),
    pytest.param("jti", lambda tokens, token: tokens.refresh(token), id="refresh: an empty jti"),
    pytest.param("sub", lambda tokens, token: tokens.refresh(token), id="refresh: an empty sub"),
])
def test_a_token_with_an_empty_jti_or_sub_is_neither_revoked_nor_refreshed(
        store: Store, claim: str, use: Callable[[TokenService, str], Any]) -> None:
    """An empty jti would be blocklisted as ``revoked:``, which names every such token at once; an empty sub
    names no user to issue a pair to."""
    stack = Stack(store)
    token = hs(claims(typ="refresh", fam="f1", **{claim: ""}))
    with pytest.raises(HTTPException) as info:
        use(stack.tokens, token)
    assert info.value.code == 401
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge(f"the token's {claim} claim is empty"))]
    assert store.get("revoked:") is None and list(store.scan("family-")) == []


class FailingStore(MemoryStore):
    """A memory store whose writes of keys starting with one of ``failing`` raise StoreError."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: tuple[str, ...] = ()

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if key.startswith(self.failing):
            raise StoreError("connection refused")
        super().set(key, value, ttl)


@pytest.mark.parametrize(("mode", "call"), [
    pytest.param("closed", "issue", id="closed: login"),
    pytest.param("open", "issue", id="open: login"),
    pytest.param("closed", "refresh", id="closed: refresh"),
    pytest.param("open", "refresh", id="open: refresh"),
])
def test_a_token_that_cannot_be_recorded_in_its_family_is_not_issued(mode: str, call: str) -> None:
    store = FailingStore()
    stack = Stack(store, on_store_error=mode)
    pair = stack.tokens.issue("ann", ["user"])
    store.failing = ("family-access:",)
    with pytest.raises(HTTPException) as info:
        stack.tokens.issue("ann") if call == "issue" else stack.tokens.refresh(pair["refresh_token"])
    assert info.value.code == 503
    assert info.value.description == "The token store is unavailable; retry shortly."
    assert info.value.wsgistack_headers == [("Retry-After", "5")]  # type: ignore[attr-defined]
    assert [f for e, f in stack.events if e == "store.error"] == [{"store": "shared", "layer": "auth"}]
    assert len(list(store.scan("family-access:"))) == 1  # only the first login's access token
    store.failing = ()
    if call == "refresh":  # nothing was used up: the same refresh token works once the store answers
        assert stack.tokens.refresh(pair["refresh_token"])["token_type"] == "Bearer"


REVOKER = textwrap.dedent("""
    import sys
    from middleware.auth import AuthMiddleware, TokenService, _AuthRule
    from stores import store_from_url
    url, secret, token = sys.argv[1:4]
    store = store_from_url(url)
    TokenService(AuthMiddleware.Options(secret=secret), store).revoke(token)
    store.close()
""")


@pytest.mark.redis
def test_revocation_reaches_another_process_within_a_second(redis_url: str) -> None:
    store = store_from_url(redis_url)
    try:
        stack = Stack(store)
        pair = stack.tokens.issue("ann")
        assert stack.call(token=pair["access_token"]).status_int == 200  # verified and remembered
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", REVOKER, redis_url, SECRET, pair["access_token"]],
                       cwd=ROOT, env=env, check=True, timeout=30)
        revoked_at = time.monotonic()
        statuses = []
        while time.monotonic() - revoked_at < 1.0:
            statuses.append(stack.call(token=pair["access_token"]).status_int)
            if statuses[-1] == 401:
                break
        assert statuses == [401]  # the very next request already sees it
    finally:
        store.close()


@pytest.mark.redis
def test_revocation_seen_by_a_second_service_on_the_same_redis(redis_url: str) -> None:
    from stores.redis import RedisStore

    first, second = RedisStore(redis_url, key_prefix="app:"), RedisStore(redis_url, key_prefix="app:")
    try:
        a, b = Stack(first, refresh_reuse_grace=0), Stack(second, refresh_reuse_grace=0)
        pair = a.tokens.issue("ann")
        assert b.call(token=pair["access_token"]).status_int == 200
        a.tokens.revoke(pair["access_token"])
        assert b.call(token=pair["access_token"]).status_int == 401
        refreshed = b.tokens.refresh(pair["refresh_token"])
        with pytest.raises(HTTPException):
            a.tokens.refresh(pair["refresh_token"])  # reuse seen across instances
        assert b.call(token=refreshed["access_token"]).status_int == 401
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------ asymmetric keys


def test_rsa_private_key_issues_with_a_kid(rsa_key: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "signing.pem"
    key_file.write_text(private_pem(rsa_key))
    stack = Stack(private_key=str(key_file), issuer="https://id.example.org")
    pair = stack.tokens.issue("ann", ["user"])
    header = jwt.get_unverified_header(pair["access_token"])
    assert header["alg"] == "RS256" and len(header["kid"]) == 43  # RFC 7638 thumbprint
    assert stack.call(token=pair["access_token"]).status_int == 200
    verifier = Stack(public_keys={header["kid"]: pem(rsa_key)}, issuer="https://id.example.org")
    assert verifier.call(token=pair["access_token"]).status_int == 200
    with pytest.raises(RuntimeError, match="this auth layer only verifies tokens; set private_key to issue them"):
        verifier.tokens.issue("ann")


def test_a_verifying_layer_takes_another_issuers_tokens_as_they_are(rsa_key: Any) -> None:
    """The app's users database names its own users: an identity provider's are not in it."""
    issuer = Stack(private_key=private_pem(rsa_key))
    token = issuer.tokens.issue("ann", ["user"])["access_token"]
    header = jwt.get_unverified_header(token)
    verifier = Stack(public_keys={header["kid"]: pem(rsa_key)})
    verifier.context.services["user_roles"] = lambda subject: None  # "no such user" for everyone
    verifier.context.services["user_since"] = lambda subject: time.time() + 60
    response = verifier.call(token=token)
    assert response.status_int == 200 and response.json["roles"] == ["user"]


def test_private_key_reuses_the_kid_of_its_public_key(rsa_key: Any) -> None:
    stack = Stack(public_keys={"2024-06": pem(rsa_key)}, private_key=private_pem(rsa_key))
    pair = stack.tokens.issue("ann")
    assert jwt.get_unverified_header(pair["access_token"])["kid"] == "2024-06"
    assert stack.call(token=pair["access_token"]).status_int == 200


def test_ec_keys(ec_key: Any, rsa_key: Any) -> None:
    stack = Stack(private_key=private_pem(ec_key))
    pair = stack.tokens.issue("ann")
    assert jwt.get_unverified_header(pair["access_token"])["alg"] == "ES256"
    assert stack.call(token=pair["access_token"]).status_int == 200
    mixed = Stack(public_keys={"ec": pem(ec_key), "rsa": pem(rsa_key)})
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa"})
    expect(mixed.call(token=token), 401, challenge("the token's algorithm is not accepted"),
           ["invalid_algorithm"], mixed)


def test_jwks_file(rsa_key: Any, ec_key: Any, tmp_path: Path) -> None:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    enc_jwk = {**rsa_jwk, "kid": "enc", "use": "enc"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [
        {**rsa_jwk, "kid": "r1", "alg": "RS256"}, {**ec_jwk, "kid": "e1"}, enc_jwk]}))
    stack = Stack(jwks_file=str(tmp_path / "jwks.json"))
    assert sorted(k for k in stack.tokens.keys if k) == ["e1", "r1"]
    good_rsa = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    good_ec = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert [stack.call(token=t).status_int for t in (good_rsa, good_ec)] == [200, 200]
    encryption_key = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "enc"})
    assert stack.call(token=encryption_key).status_int == 401


def test_relative_key_paths_resolve_beside_the_config_file(rsa_key: Any, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "pub.pem").write_text(pem(rsa_key))
    context = Context(stores={"shared": MemoryStore()}, settings={"base_dir": str(tmp_path)})
    layer = AuthMiddleware(echo, AuthMiddleware.Options(public_keys=["keys/pub.pem"]), context)
    assert [k.alg for k in layer.tokens.keys.values()] == ["RS256"]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({}, "auth needs secret (HS256) or public_keys, jwks_file or private_key (RS256/ES256)",
                 id="no key"),
    pytest.param({"secret": "short"}, "secret must be at least 32 bytes for HS256 (it has 5); make one with: "
                 "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'", id="short secret"),
    pytest.param({"secret": "x" * 40, "algorithm": "HS512"}, "secret must be at least 64 bytes for HS512 (it has 40)",
                 id="short for HS512"),
    pytest.param({"secret": SECRET, "public_keys": ["k.pem"]},
                 "secret (HMAC) may not be mixed with public_keys, private_key or jwks_file (RSA/EC); "
                 "configure one kind of key", id="mixed key kinds"),
    pytest.param({"secret": EC_PUBLIC_PEM}, SECRET_IS_A_KEY, id="a PEM public key as secret (PyJWT refuses it)"),
    pytest.param({"secret": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"},
                 SECRET_IS_A_KEY, id="an SSH public key as secret"),
    pytest.param({"secret": json.dumps({"kty": "oct", "k": b64(b"k" * 32)})},
                 "secret looks like a JWK (JSON), which PyJWT refuses as an HMAC secret; secret takes random text: "
                 "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'",
                 id="a JWK as secret"),
    pytest.param({"secret": "s" * 32 + "-----BEGIN PUBLIC KEY-----"}, None, id="a secret that only names PEM"),
    pytest.param({"secret": SECRET, "algorithm": "none"}, "algorithm 'none' is not accepted (known: HS256, HS384, "
                 "HS512, ES256, ES384, ES512, EdDSA, PS256, PS384, PS512, RS256, RS384, RS512); 'none' never is",
                 id="alg none"),
    pytest.param({"secret": SECRET, "algorithm": "RS256"},
                 "algorithm RS256 needs public_keys, jwks_file or private_key; with secret use HS256, HS384 or HS512",
                 id="asymmetric algorithm with a secret"),
    pytest.param({"public_keys": ["k.pem"], "algorithm": "HS256"},
                 "algorithm HS256 needs secret; public_keys, jwks_file and private_key take RS256, PS256, ES256 or "
                 "EdDSA", id="HMAC algorithm with public keys"),
    pytest.param({"secret": SECRET, "access_ttl": 600, "refresh_ttl": 60},
                 "refresh_ttl must not be shorter than access_ttl", id="ttls"),
    pytest.param({"secret": SECRET, "default": "maybe"}, "Input should be 'required', 'optional' or 'none'",
                 id="default level"),
    pytest.param({"secret": SECRET, "rules": [{"paths": ["admin"], "roles": ["a"]}]},
                 "path pattern 'admin' must start with '/' (or be '*')", id="rule path"),
    pytest.param({"secret": SECRET, "rules": [{"paths": [], "auth": "none"}]},
                 "paths is empty: a rule must name at least one path pattern; leave paths out for every path ('*')",
                 id="a rule for no path: its pattern would match every path"),
    pytest.param({"secret": SECRET, "on_store_error": "ignore"}, "Input should be 'open' or 'closed'",
                 id="on_store_error"),
    pytest.param({"secret": SECRET, "rules": [{"paths": ["/api/*/config"], "auth": "optional", "roles": ["admin"]}]},
                 ROLES_NEED_REQUIRED.format("optional"), id="roles with auth optional"),
    pytest.param({"secret": SECRET, "rules": [{"paths": ["/api/*/config"], "auth": "none", "roles": ["admin"]}]},
                 ROLES_NEED_REQUIRED.format("none"), id="roles with auth none"),
    pytest.param({"secret": SECRET, "realm": "Search API \u2014 production"},
                 'realm is sent in the WWW-Authenticate header as realm="...": printable ASCII on one line',
                 id="a realm outside ASCII"),
])
def test_options_refused(options: dict[str, Any], message: str | None) -> None:
    if message is None:  # taken, and tokens signed with it verify
        assert Stack(**options).call(token=hs(claims(), options["secret"])).status_int == 200
        return
    with pytest.raises(ValidationError) as info:
        AuthMiddleware.Options(**options)
    assert message in str(info.value)
    said = " ".join(error["msg"] for error in info.value.errors())
    assert "secret" not in options or options["secret"] not in said


def test_key_material_refused(rsa_key: Any, tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"public_keys": [pem(weak)]}, "a public_keys entry is a 1024-bit RSA key; use at least 2048 bits"),
        ({"public_keys": {"k": "missing.pem"}}, f"public_keys['k']: cannot read {str(tmp_path / 'missing.pem')!r} "
                                               "(No such file or directory)"),
        ({"public_keys": {"k": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"}},
         "public_keys['k'] is not a PEM public key or certificate"),
        ({"public_keys": [pem(rsa_key)], "algorithm": "ES256"},
         "a public_keys entry cannot be used with algorithm ES256"),
        ({"private_key": pem(rsa_key)}, "private_key is not an unencrypted PEM private key"),
        ({"private_key": "missing.pem"}, f"private_key: cannot read {str(tmp_path / 'missing.pem')!r} "
                                         "(No such file or directory)"),
        ({"private_key": "."}, f"private_key: cannot read {str(tmp_path / '.')!r} (Is a directory)"),
        ({"public_keys": {"a": pem(rsa_key), "b": pem(rsa_key)}, "private_key": private_pem(rsa_key)}, ""),
    ]
    (tmp_path / "oct.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": b64(b"x" * 32), "kid": "h"}]}))
    cases.append(({"jwks_file": "oct.json"}, "jwks_file key h is a symmetric (oct) key; HMAC keys go in secret, "
                                            "and may not be mixed with RSA/EC keys"))
    (tmp_path / "bad.json").write_text("[]")
    cases.append(({"jwks_file": "bad.json"}, "jwks_file 'bad.json' is not a JSON object with a 'keys' list of "
                                            "objects"))
    (tmp_path / "numbers.json").write_text('{"keys": [1, 2]}')
    cases.append(({"jwks_file": "numbers.json"}, "jwks_file 'numbers.json' is not a JSON object with a 'keys' list "
                                                "of objects"))
    cases.append(({"jwks_file": "missing.json"}, f"jwks_file: cannot read {str(tmp_path / 'missing.json')!r} "
                                                "(No such file or directory)"))
    (tmp_path / "empty.json").write_text('{"keys": []}')
    cases.append(({"jwks_file": "empty.json"}, "jwks_file 'empty.json' holds no signing keys"))
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    (tmp_path / "enc.json").write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "e1", "use": "enc"},
                                                            {**rsa_jwk, "use": "wrap"}]}))
    cases.append(({"jwks_file": "enc.json", "public_keys": [pem(rsa_key)]},
                  "jwks_file 'enc.json' holds no signing keys: it skipped key e1 (use 'enc') and key 1 (use 'wrap'); "
                  "only keys without a use or with use 'sig' verify tokens"))
    (tmp_path / "kid.json").write_text(json.dumps({"keys": [{**rsa_jwk, "kid": 7}]}))
    cases.append(({"jwks_file": "kid.json"}, "jwks_file key 7: kid must be a string (RFC 7517 4.5), not 7; a token's "
                                            "kid header is one, so no token could name this key"))
    known = ("HS256, HS384, HS512, ES256, ES384, ES512, EdDSA, PS256, PS384, PS512, RS256, RS384, RS512; 'none' "
             "never is")
    (tmp_path / "none.json").write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "n", "alg": "none"}]}))
    cases.append(({"jwks_file": "none.json"},  # PyJWT's NoneAlgorithm raised a bare NotImplementedError
                  f"jwks_file key n is pinned to algorithm 'none', which is not accepted (known: {known})"))
    (tmp_path / "foo.json").write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "f", "alg": "None"}]}))
    cases.append(({"jwks_file": "foo.json"}, "jwks_file key f cannot be used: Unable to find an algorithm for key "
                                            "(alg 'None', kty 'RSA')"))
    for options, message in cases:
        context = Context(stores={"shared": MemoryStore()}, settings={"base_dir": str(tmp_path)})
        if not message:  # two kids for one key: allowed, the private key takes the first
            layer = AuthMiddleware(echo, AuthMiddleware.Options(**options), context)
            assert layer.tokens.signer is not None and layer.tokens.signer.kid == "a"
            continue
        with pytest.raises(ValueError) as info:
            AuthMiddleware(echo, AuthMiddleware.Options(**options), context)
        assert str(info.value) == message


# ------------------------------------------------------------------ store failure


@pytest.mark.redis
@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 200)])
def test_store_down(redis_server: Any, redis_url: str, mode: str, status: int) -> None:
    if redis_server is None:
        pytest.skip("needs the private redis-server to stop and start it")
    from stores.redis import RedisStore

    store = RedisStore(redis_url, breaker=CircuitBreaker(50, 0.2, name="test"))
    stack = Stack(store, on_store_error=mode)
    pair = stack.tokens.issue("ann")
    stack.events.clear()
    redis_server.stop()
    try:
        response = stack.call(token=pair["access_token"])
        with pytest.raises(HTTPException) as refresh:  # rotation cannot be checked: always 503
            stack.tokens.refresh(pair["refresh_token"])
        with pytest.raises(HTTPException) as revoke:  # nor can a revocation be stored
            stack.tokens.revoke(pair["access_token"])
        missing = stack.call()  # no token: the store is not needed to say 401
    finally:
        redis_server.start()
    assert response.status_int == status
    if status == 503:
        assert response.headers["Retry-After"] == "5"
        assert response.json["error"]["message"] == "The token store is unavailable; retry shortly."
        assert "WWW-Authenticate" not in response.headers
    else:
        assert response.json["sub"] == "ann"
    for exc in (refresh.value, revoke.value):
        assert exc.code == 503
        assert exc.wsgistack_headers == [("Retry-After", "5")]  # type: ignore[attr-defined]
    assert missing.status_int == 401
    errors = [f for e, f in stack.events if e == "store.error"]
    assert errors == [{"store": "shared", "layer": "auth"}] * 3
    # Back up: the blocklist answers again.
    stack.tokens.revoke(pair["access_token"])
    assert stack.call(token=pair["access_token"]).status_int == 401
    store.close()


# ------------------------------------------------------------------ YAML


def test_built_from_yaml(make_stack: Callable[..., TestApp], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    app = make_stack(textwrap.dedent("""
        app: {factory: "stack_support:echo_app"}
        pipeline:
          - auth:
              secret: ${JWT_SECRET}
              rules: [{paths: ["/public/*"], auth: none}]
    """))
    tokens = app.built.context.services["tokens"]
    pair = tokens.issue("ann", ["user"])
    assert app.get("/x", headers={"Authorization": f"Bearer {pair['access_token']}"}).json["identity"] == "ann"
    assert app.get("/x", expect_errors=True).status_int == 401
    assert app.get("/public/x").json["identity"] is None


def test_yaml_error_for_a_short_secret(make_stack: Callable[..., TestApp]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError, match="secret must be at least 32 bytes for HS256"):
        make_stack({"pipeline": [{"auth": {"secret": "too-short"}}]})


def test_a_pair_made_again_says_the_lifetime_it_has_left(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """expires_in counts from the answer (RFC 6749 5.1): a retry 9 s after the first use gets 891 s, not 900."""
    stack = Stack(store, access_ttl=900, refresh_ttl=3600)
    first = stack.tokens.issue("ann", ["user"])
    clock = [int(time.time()) + 0.5]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    second = stack.tokens.refresh(first["refresh_token"])
    assert (second["expires_in"], second["refresh_expires_in"]) == (900, 3600)
    clock[0] += 9
    again = stack.tokens.refresh(first["refresh_token"])
    assert pair(again) == pair(second)
    assert (again["expires_in"], again["refresh_expires_in"]) == (891, 3591)


def test_a_family_revoked_while_its_refresh_is_being_made_refuses_the_new_pair() -> None:
    """A reuse detected on another thread (or host) between the checks and the new pair: no live pair goes out."""

    class RevokedMeanwhile(MemoryStore):
        family = ""

        def add_then_write(self, key: str, value: bytes, ttl: float | None, sets: Any) -> bool:
            if key.startswith("refresh-used:") and self.family:
                self.set("family-revoked:" + self.family, b"1", ttl=3600)  # the other request's reuse detection
            return super().add_then_write(key, value, ttl, sets)

    store = RevokedMeanwhile()
    stack = Stack(store)
    pair = stack.tokens.issue("ann")
    store.family = jwt.decode(pair["refresh_token"], SECRET, algorithms=["HS256"])["fam"]
    with pytest.raises(HTTPException) as info:
        stack.tokens.refresh(pair["refresh_token"])
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("WWW-Authenticate", challenge("the token has been revoked"))]


@pytest.mark.parametrize(("leeway", "at", "expected"), [
    pytest.param(0, "exp", (401, "expired", "the token has expired"), id="at its exp to the second: expired"),
    pytest.param(0, "exp - 0.5", (200, None, None), id="half a second before its exp"),
    pytest.param(30, "exp + 30", (401, "expired", "the token has expired"), id="at exp plus the leeway: expired"),
    pytest.param(30, "exp + 29.5", (200, None, None), id="within exp plus the leeway"),
    pytest.param(0, "iat - 0.5", (401, "not_yet_valid", "the token is not valid yet"),
                 id="the clock stepped back before its iat"),
    pytest.param(30, "iat - 30", (200, None, None), id="back by the leeway exactly: still valid"),
    pytest.param(30, "iat - 30.5", (401, "not_yet_valid", "the token is not valid yet"),
                 id="back by more than the leeway"),
    pytest.param(0, "nbf - 0.5", (401, "not_yet_valid", "the token is not valid yet"),
                 id="before its nbf"),
])
def test_a_remembered_token_meets_the_bounds_pyjwt_applies(monkeypatch: pytest.MonkeyPatch, leeway: int, at: str,
                                                           expected: tuple[int, str | None, str | None]) -> None:
    """Verified once, then remembered: its exp, iat and nbf are compared with the clock as a fresh decode would."""
    stack = Stack(leeway=leeway)
    now = int(time.time())
    times = {"iat": now - 10, "exp": now + 600, **({"nbf": now - 1} if at.startswith("nbf") else {})}
    token = hs(claims(**times))
    assert stack.call(token=token).status_int == 200
    name, _, offset = at.partition(" ")
    moment = times[name] + float(offset.replace(" ", "") or 0)
    monkeypatch.setattr(time, "time", lambda: moment)
    status, reason, description = expected
    expect(stack.call(token=token), status, None if description is None else challenge(description),
           [reason] if reason else [], stack)


def test_the_remembered_tokens_are_bounded_the_oldest_forgotten_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("middleware.auth._VERIFIED_MAX", 2)
    stack = Stack()
    tokens = [hs(claims(sub=name)) for name in ("ann", "bob", "cy")]
    for token in tokens:
        assert stack.call(token=token).status_int == 200
    assert [(stack.tokens.known(t) or {}).get("sub") for t in tokens] == [None, "bob", "cy"]
    assert stack.tokens.revocation_key(tokens[0]) is None
    jti = jwt.decode(tokens[2], SECRET, algorithms=["HS256"])["jti"]
    assert stack.tokens.revocation_key(tokens[2]) == f"revoked:{jti}"


def _previewed(stack: Stack, token: str | None) -> Any:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    preview = stack.layer.preview_environ(environ)
    if not preview:
        return preview
    identity = preview[IDENTITY]
    return identity.subject, sorted(identity.roles), identity.source


@pytest.mark.parametrize(("lookup", "expected"), [
    pytest.param(None, ("ann", ["user"], "jwt"), id="the token's roles"),
    pytest.param(lambda subject: ["admin"], ("ann", ["admin"], "jwt"),
                 id="the roles the user had when last looked up"),
])
def test_the_preview_of_a_token_verified_before(lookup: Any, expected: Any) -> None:
    stack = Stack()
    if lookup is not None:
        stack.context.services["user_roles"] = lookup
    token = hs(claims(roles=["user"]))
    assert _previewed(stack, token) is None  # never verified: this layer may refuse it
    stack.call(token=token)
    assert _previewed(stack, token) == expected
    assert _previewed(stack, hs(claims(exp=int(time.time()) - 1))) is None


@pytest.mark.parametrize(("lookup", "expected"), [
    pytest.param(None, {IDENTITY: Identity("bob", frozenset({"user"}), "session")}, id="the roles the session hinted"),
    pytest.param(lambda subject: ["admin"], {IDENTITY: Identity("bob", frozenset({"admin"}), "session")},
                 id="the roles the user had when last looked up"),
])
def test_the_preview_of_a_session_user(lookup: Any, expected: dict[str, Any]) -> None:
    stack = Stack()
    if lookup is not None:
        stack.context.services["user_roles"] = lookup
        session: dict[str, Any] = {SESSION: FakeSession({"user": {"sub": "bob"}})}
        assert stack.call(**session).status_int == 200
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", SESSION_USER_HINT: ("bob", frozenset({"user"}))}
    assert stack.layer.preview_environ(environ) == expected


def test_the_preview_of_another_issuers_token_keeps_its_roles(rsa_key: Any) -> None:
    """A verifying layer takes such tokens as they are (see above): its preview does too."""
    issuer = Stack(private_key=private_pem(rsa_key))
    token = issuer.tokens.issue("ann", ["user"])["access_token"]
    verifier = Stack(public_keys={jwt.get_unverified_header(token)["kid"]: pem(rsa_key)})
    verifier.context.services["user_roles"] = lambda subject: ["admin"]
    assert verifier.call(token=token).json["roles"] == ["user"]
    session: dict[str, Any] = {SESSION: FakeSession({"user": {"sub": "ann"}})}
    assert verifier.call(**session).json["roles"] == ["admin"]
    assert _previewed(verifier, token) == ("ann", ["user"], "jwt")


def test_the_users_roles_are_looked_up_once_a_second_for_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack()
    calls: list[str] = []

    def user_roles(subject: str) -> list[str]:
        calls.append(subject)
        return ["admin"]

    stack.context.services["user_roles"] = user_roles
    token = hs(claims(roles=["user"]))
    assert [stack.call(token=token).json["roles"] for _ in range(3)] == [["admin"]] * 3
    assert calls == ["ann"]
    later = time.monotonic() + 1.5
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert stack.call(token=token).json["roles"] == ["admin"]
    assert calls == ["ann", "ann"]


@pytest.mark.parametrize(("path", "who", "session", "expected"), [
    pytest.param("/x", "user", None, "ann via jwt", id="a token's user"),
    pytest.param("/x", None, {"user": {"sub": "bob"}}, "bob via session", id="a session's user"),
    pytest.param("/x", None, None, "refused: no credentials", id="no credentials"),
    pytest.param("/x", "garbage", None, "refused: malformed", id="a token refused: its reason"),
    pytest.param("/x", "a b", None, "refused: the Authorization header is malformed", id="a header refused"),
    pytest.param("/admin/x", "user", None, "refused ann: needs one of ['admin', 'owner', 'viewer']",
                 id="a role missing"),
])
def test_what_the_layer_decided_is_traced(path: str, who: str | None, session: dict[str, Any] | None,
                                          expected: str) -> None:
    stack = Stack(rules=RULES)
    trace: list[tuple[str, str]] = []
    token = None if who is None else who if who in ("garbage", "a b") else hs(claims(roles=[who]))
    environ: dict[str, Any] = {TRACE: trace} if session is None else {TRACE: trace, SESSION: FakeSession(session)}
    stack.call(path, token=token, **environ)
    assert [decision for layer, decision in trace if layer == "auth"] == [expected]


def _locked(subject: str) -> Any:
    raise OSError("database is locked")


@pytest.mark.parametrize(("services", "expected", "decision"), [
    pytest.param({"user_roles": lambda subject: ["admin"]}, (200, None, []), "ann via jwt",
                 id="the roles the user has now"),
    pytest.param({"user_roles": lambda subject: None},
                 (401, challenge("the token has been revoked"), ["unknown_subject"]),
                 "refused: token user 'ann' no longer exists", id="a user no longer known"),
    pytest.param({"user_since": lambda subject: time.time() + 60},
                 (401, challenge("the token has been revoked"), ["credentials_changed"]),
                 "refused: token user 'ann' was issued before the credentials changed",
                 id="issued before the credentials changed"),
    pytest.param({"user_since": lambda subject: time.time() - 60}, (200, None, []), "ann via jwt",
                 id="issued after the credentials changed"),
    pytest.param({"user_roles": _locked}, (503, None, []), "refused: token user 'ann' could not be looked up",
                 id="a users database that cannot answer: 503, retry"),
])
def test_a_token_meets_the_users_database_of_now(services: dict[str, Any],
                                                  expected: tuple[int, str | None, list[str]], decision: str) -> None:
    stack = Stack()
    stack.context.services.update(services)
    trace: list[tuple[str, str]] = []
    traced: dict[str, Any] = {TRACE: trace}
    response = stack.call(token=hs(claims(roles=["user"])), **traced)
    status, www, reasons = expected
    expect(response, status, www, reasons, stack)
    assert [d for layer, d in trace if layer == "auth"] == [decision]
    if status == 200:
        assert response.json == {"sub": "ann", "roles": ["admin"] if "user_roles" in services else ["user"],
                                 "source": "jwt"}
    if status == 503:
        assert response.headers["Retry-After"] == "5"
        assert response.json["error"]["message"] == "The users database cannot be read; retry shortly."
