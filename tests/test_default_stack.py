"""The shipped stack.yaml, built as `make serve` builds it: the API users expect from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from stack_support import secret
from webtest import TestApp

from config import build_from_file

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"SESSION_SECRET": secret("session"), "JWT_SECRET": secret("jwt")}


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One var/ (users, search index) for this module: the index is built once."""
    return tmp_path_factory.mktemp("var")


@pytest.fixture
def default_stack(var_dir: Path) -> Callable[..., TestApp]:
    """A TestApp over stack.yaml with the given environment overrides."""

    def make(**env: str) -> TestApp:
        environ = {**SECRETS, "WSGISTACK_VAR_DIR": str(var_dir), **env}
        built = build_from_file(ROOT / "stack.yaml", env=environ)
        app = TestApp(built.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        app.built = built
        return app

    return make


def test_the_default_stack_checks_clean(default_stack: Callable[..., TestApp]) -> None:
    assert default_stack().built.warnings == []


def test_missing_secret_names_the_variable_and_line() -> None:
    from config import ConfigError

    with pytest.raises(ConfigError) as info:
        build_from_file(ROOT / "stack.yaml", env={})
    text = str(info.value)
    assert "stack.yaml:" in text
    assert "session.secret_key: environment variable SESSION_SECRET is not set and has no default" in text


def test_search_returns_real_results(default_stack: Callable[..., TestApp]) -> None:
    response = default_stack().get("/api/v1/search?q=json")
    body = response.json
    assert body["query"] == "json"
    assert body["meta"]["query"] == "json" and body["meta"]["page"] == 1
    assert body["meta"]["total"] >= len(body["results"]) > 0
    assert set(body["results"][0]) == {"title", "url", "content", "engine"}
    assert response.headers["X-Cache"] == "MISS"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert len(response.headers["X-Request-ID"]) == 32


def test_v2_shape_and_cache_hit(default_stack: Callable[..., TestApp]) -> None:
    stack = default_stack()
    first = stack.get("/api/v2/search?q=decoder")
    again = stack.get("/api/v2/search?q=decoder")
    assert set(first.json) >= {"query", "data", "pagination"}
    assert again.headers["X-Cache"] == "HIT"
    assert again.body == first.body
    header_version = stack.get("/api/search?q=decoder", headers={"X-API-Version": "v2"})
    assert header_version.json == first.json


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        pytest.param("", 400, "q", id="empty q"),
        pytest.param("a" * 1001, 400, "1000", id="q over 1000 characters"),
        pytest.param(quote("\N{GRINNING FACE}" * 1001), 400, "1000",
                     id="q over 1000 four-byte characters: the app's 400, not 414"),
        pytest.param("json&page=0", 400, "page", id="page zero"),
    ],
)
def test_search_validation_errors_use_the_envelope(default_stack: Callable[..., TestApp], query: str, status: int,
                                                   message: str) -> None:
    response = default_stack().get(f"/api/v1/search?q={query}", status=status)
    error = response.json["error"]
    assert error["code"] == status
    assert message in error["message"]
    assert error["path"] == "/api/v1/search"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_query_of_1000_four_byte_characters_is_answered(default_stack: Callable[..., TestApp]) -> None:
    """The API takes 1000 characters of q; percent-encoded, a 4-byte character is 12 bytes of query string."""
    query = quote("\N{GRINNING FACE}" * 1000)
    assert len(query) == 12000
    default_stack().get(f"/api/v1/search?q={query}&page=1", status=200)


def test_rate_limit_after_five(default_stack: Callable[..., TestApp]) -> None:
    stack = default_stack(WSGISTACK_RATE_LIMIT="5/minute")
    statuses = [stack.get("/api/v1/health", expect_errors=True).status_int for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    refused = stack.get("/api/v1/health", status=429, headers={"Origin": "http://localhost:3000"})
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert refused.headers["RateLimit-Remaining"] == "0"


def test_every_request_is_counted_before_its_body_is_read(default_stack: Callable[..., TestApp]) -> None:
    """Any path, valid or not: a client past its limit gets 429 before validation parses a JSON body."""
    stack = default_stack(WSGISTACK_RATE_LIMIT="3/minute")
    body = json.dumps([[[[1]]]] * 1000).encode()
    statuses = [stack.post("/anywhere", body, headers={"Content-Type": "application/json"},
                           expect_errors=True).status_int for _ in range(4)]
    statuses.append(stack.post("/anywhere", b"{not json", headers={"Content-Type": "application/json"},
                               expect_errors=True).status_int)
    assert statuses == [404, 404, 404, 429, 429]


def test_unknown_route_and_method(default_stack: Callable[..., TestApp]) -> None:
    stack = default_stack()
    assert stack.get("/api/v1/nope", status=404).json["error"]["code"] == 404
    # The path the client asked for, as the access log has it, not the one versioning routed it to:
    assert stack.get("/api/nope", status=404).json["error"]["path"] == "/api/nope"
    refused = stack.post("/api/v1/health", status=405)
    assert "GET" in refused.headers["Allow"]
    assert stack.head("/api/v1/nope", status=404).body == b""


def test_stream_events(default_stack: Callable[..., TestApp]) -> None:
    response = default_stack().get("/api/v1/search/stream?q=json")
    assert response.content_type == "text/event-stream"
    events = [line.split(": ", 1)[1] for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "search_started" and events[-1] == "search_complete"
    assert "search_progress" in events
    assert "X-Cache" not in response.headers


def test_login_refresh_logout(default_stack: Callable[..., TestApp], var_dir: Path) -> None:
    from app.users import UserStore

    UserStore(str(var_dir / "users.sqlite3")).add("alice", "correct horse battery", roles=["user"])
    stack = default_stack()
    tokens = stack.post_json("/auth/login", {"username": "alice", "password": "correct horse battery"}).json
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert stack.get("/api/v1/search?q=json", headers=bearer).status_int == 200
    stack.post_json("/auth/logout", {"refresh_token": tokens["refresh_token"]}, headers=bearer)
    refused = stack.get("/api/v1/search?q=json", headers={**bearer, "Origin": "http://localhost:3000"}, status=401)
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    # The page's script may read why (RFC 6750 §3): the default stack exposes the header.
    assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"].split(", ")
    wrong = stack.post_json("/auth/login", {"username": "alice", "password": "nope"}, status=401)
    assert json.loads(wrong.body)["error"]["code"] == 401


def test_a_stale_bearer_token_does_not_stop_login_refresh_or_logout(default_stack: Callable[..., TestApp],
                                                                   var_dir: Path) -> None:
    """Clients keep sending the Authorization header of a token that expired or was revoked; the token
    endpoints check the credentials they are given themselves, so that header refuses nothing there."""
    from app.users import UserStore

    UserStore(str(var_dir / "users.sqlite3")).add("dora", "correct horse battery", roles=["user"])
    stack = default_stack()
    login = {"username": "dora", "password": "correct horse battery"}
    first = stack.post_json("/auth/login", login).json
    stale = {"Authorization": f"Bearer {first['access_token']}"}
    assert stack.post_json("/auth/logout", {"refresh_token": first["refresh_token"]}, headers=stale).status_int == 204
    assert stack.get("/api/v1/search?q=json", headers=stale, status=401)
    again = stack.post_json("/auth/login", login, headers=stale).json
    renewed = stack.post_json("/auth/refresh", {"refresh_token": again["refresh_token"]}, headers=stale).json
    # A retried logout (its first attempt revoked the bearer already) finishes.
    assert stack.post_json("/auth/logout", {"refresh_token": renewed["refresh_token"]}, headers=stale).status_int == 204
    refused = stack.post_json("/auth/refresh", {"refresh_token": renewed["refresh_token"]}, status=401)
    assert "revoked" in refused.json["error"]["message"]


def test_logout_with_only_a_refresh_token_revokes_it(default_stack: Callable[..., TestApp], var_dir: Path) -> None:
    from app.users import UserStore

    UserStore(str(var_dir / "users.sqlite3")).add("erin", "correct horse battery", roles=["user"])
    stack = default_stack()
    tokens = stack.post_json("/auth/login", {"username": "erin", "password": "correct horse battery"}).json
    stack.reset()  # a client without a cookie jar
    assert stack.post_json("/auth/logout", {"refresh_token": tokens["refresh_token"]}).status_int == 204
    stack.post_json("/auth/refresh", {"refresh_token": tokens["refresh_token"]}, status=401)


@pytest.mark.parametrize(("size", "readable"), [
    (2_000_000, True),  # over validation's 1 MiB, under Waitress's 4 MiB: the stack's own 413
    (5_000_000, False),  # over Waitress's cap: its plain-text 413, before any layer runs (documented)
])
def test_a_body_too_large_under_waitress(tmp_path: Path, size: int, readable: bool) -> None:
    import http.client
    import shutil

    from conftest import Served, free_port

    config = tmp_path / "stack.yaml"
    shutil.copy(ROOT / "stack.yaml", config)
    port = free_port()
    server = Served(config, {**SECRETS, "WSGISTACK_LISTEN": f"127.0.0.1:{port}",
                             "WSGISTACK_VAR_DIR": str(tmp_path / "var")}, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/auth/login")
        for name, value in (("Content-Type", "application/json"), ("Origin", "http://localhost:3000"),
                            ("Content-Length", str(size))):
            conn.putheader(name, value)
        conn.endheaders()
        if readable:  # Waitress reads the whole body before the stack runs
            conn.send(b"{" + b" " * (size - 2) + b"}")
        response = conn.getresponse()  # over its cap, Waitress answers without reading the body
        body = response.read()
        conn.close()
    finally:
        server.stop()
    assert response.status == 413
    if readable:
        assert response.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
        assert response.getheader("X-Request-ID")
        assert json.loads(body)["error"]["message"] == (
            f"The request body is {size} bytes long, more than max_body_bytes (1048576).")
    else:
        assert response.getheader("Content-Type", "").startswith("text/plain")
        assert response.getheader("Access-Control-Allow-Origin") is None


def test_a_doubled_slash_is_a_json_404_not_an_html_redirect(default_stack: Callable[..., TestApp]) -> None:
    response = default_stack().get("/api/v1//search?q=json", status=404)
    assert response.content_type == "application/json"
    assert response.json["error"]["path"] == "/api/v1//search"


@pytest.mark.parametrize(("target", "status"), [
    ("/api/v1/search?q=", "400 Bad Request"),  # refused by the Flask core
    ("/api/v1/search?q=%ZZ", "400 Bad Request"),  # refused by the validation layer
    ("/nope", "404 Not Found"),
])
def test_every_refusal_has_one_status_line(default_stack: Callable[..., TestApp], target: str, status: str) -> None:
    """The reason phrase a page reads as statusText does not depend on who refused."""
    assert default_stack().get(target, expect_errors=True).status == status
