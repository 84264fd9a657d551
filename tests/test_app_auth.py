"""Login, refresh and logout against the real auth, session and errors layers."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from webtest import TestApp

from app import create_app
from app.users import UserStore
from middleware.auth import AuthMiddleware, TokenService
from middleware.base import Context
from middleware.cache import CacheMiddleware
from middleware.csrf import CSRFMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.session import SessionMiddleware
from middleware.validation import ValidationMiddleware
from stores import StoreError
from stores.memory import MemoryStore

SECRET = "s" * 48
COOKIE = "sid"
WRONG = "The user name or password is wrong."


@pytest.fixture
def users(tmp_path: Path) -> Iterator[UserStore]:
    """The users database the app will read, with alice (admin) and bob (no role)."""
    store = UserStore(tmp_path / "users.sqlite3", hash_method="pbkdf2:sha256:1000")
    store.add("alice", "wonderland", ["admin", "user"])
    store.add("bob", "builder")
    yield store
    store.close()


class Stack:
    """errors → session → auth → Flask core, over one memory store."""

    def __init__(self, tmp_path: Path, users: UserStore, *, validation: bool = False,
                 store: MemoryStore | None = None, on_store_error: str = "closed",
                 rules: list[dict[str, Any]] | None = None, csrf: CSRFMiddleware.Options | None = None,
                 **app_options: Any) -> None:
        self.store = store if store is not None else MemoryStore()
        self.context = Context(stores={"shared": self.store})
        self.flask = create_app({"var_dir": str(tmp_path), "users_db": str(users.path),
                                 "search": {"index_sources": ["json"]}, **app_options}, self.context)
        auth = AuthMiddleware(self.flask, AuthMiddleware.Options(
            secret=SECRET, rules=[{"paths": ["/auth/*", "/api/*/health"], "auth": "none"}, *(rules or [])],
            on_store_error=on_store_error), self.context)
        inside: Any = auth if csrf is None else CSRFMiddleware(auth, csrf, self.context)
        session = SessionMiddleware(inside, SessionMiddleware.Options(
            secret_key="k" * 40, cookie_name=COOKIE, cookie_secure=False, on_store_error=on_store_error),
            self.context)
        inner: Any = ValidationMiddleware(session, ValidationMiddleware.Options(), self.context) \
            if validation else session
        self.app = TestApp(ErrorsMiddleware(inner, ErrorsMiddleware.Options(), self.context))

    @property
    def tokens(self) -> TokenService:
        service: TokenService = self.context.services["tokens"]
        return service

    def login(self, username: str = "alice", password: str = "wonderland", **kw: Any) -> Any:
        return self.app.post_json("/auth/login", {"username": username, "password": password}, **kw)


@pytest.fixture
def stack(tmp_path: Path, users: UserStore) -> Stack:
    """The app inside the errors, session and auth layers."""
    return Stack(tmp_path, users)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------- login


def test_login_issues_tokens_from_the_auth_layer(stack: Stack) -> None:
    response = stack.login()
    body = response.json
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in", "refresh_expires_in"}
    assert body["token_type"] == "Bearer"
    assert response.headers["Cache-Control"] == "no-store"
    claims = stack.tokens.verify(body["access_token"])
    assert (claims["sub"], claims["roles"]) == ("alice", ["admin", "user"])
    found = stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(body["access_token"])).json
    assert found["meta"]["total"] > 0


def _login(stack: Stack) -> Any:
    return stack.login()


def _refresh(stack: Stack) -> Any:
    login = stack.login().json
    return stack.app.post_json("/auth/refresh", {"refresh_token": login["refresh_token"]},
                               headers={"X-CSRF-Token": login["csrf_token"]})


def _csrf(stack: Stack) -> Any:
    stack.login()
    return stack.app.get("/auth/csrf")


@pytest.mark.parametrize("answer", [_login, _refresh, _csrf], ids=["login", "refresh", "csrf token"])
def test_every_answer_with_a_token_forbids_caching_as_rfc_6749_asks(tmp_path: Path, users: UserStore,
                                                                     answer: Callable[[Stack], Any]) -> None:
    """RFC 6749 §5.1: Cache-Control: no-store and Pragma: no-cache (HTTP/1.0 caches read only that)."""
    response = answer(Stack(tmp_path, users, csrf=DOUBLE_SUBMIT))
    assert response.status_int == 200
    assert any(key.endswith("token") for key in response.json)
    assert (response.headers.get("Cache-Control"), response.headers.get("Pragma")) == ("no-store", "no-cache")


def test_login_stores_the_user_in_a_rotated_session(stack: Stack) -> None:
    stack.app.get("/api/v1/search", {"q": "json"}, status=401)  # no credentials yet
    response = stack.login(headers={"Cookie": f"{COOKIE}=planted-by-an-attacker"})
    assert response.headers["Set-Cookie"].startswith(f"{COOKIE}=")
    assert stack.app.cookies[COOKIE] != "planted-by-an-attacker"
    stored = list(stack.store.scan("session:"))
    assert len(stored) == 1
    assert b'"user":{"sub":"alice","roles":["admin","user"],"iat":' in (stack.store.get(stored[0]) or b"")
    # The session alone now authenticates (accept_session), without a bearer token.
    assert stack.app.get("/api/v1/search", {"q": "json"}).status_int == 200


def test_a_login_hashes_an_older_password_hash_again_and_logs_no_one_out(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hash made with werkzeug's cheaper default (scrypt p=1) is replaced by one made with HASH_METHOD
    at the account's next right password; that is no password change, so what was issued before stays."""
    from werkzeug.security import generate_password_hash

    from app.users import HASH_ENV, HASH_METHOD

    monkeypatch.delenv(HASH_ENV, raising=False)  # the stack's store uses the real method
    monkeypatch.setattr("middleware.auth.ROLES_FRESH", 0.0)  # every request asks the users database
    stack = Stack(tmp_path, users)
    before = stack.login().json  # alice's session is in stack.app's cookies

    def stored() -> str:
        with sqlite3.connect(users.path) as db:
            [(found,)] = db.execute("SELECT password_hash FROM users WHERE name = 'alice'").fetchall()
        db.close()
        return str(found)

    with sqlite3.connect(users.path) as db:
        db.execute("UPDATE users SET password_hash = ? WHERE name = 'alice'",
                   (generate_password_hash("wonderland", "scrypt"),))
    db.close()
    assert stored().startswith("scrypt:32768:8:1$")
    since = users.get("alice").credentials_at  # type: ignore[union-attr]
    TestApp(stack.app.app).post_json("/auth/login", {"username": "alice", "password": "wonderland"}, status=200)
    assert stored().startswith(HASH_METHOD + "$")
    assert users.get("alice").credentials_at == since  # type: ignore[union-attr]
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(before["access_token"]), status=200)
    stack.app.get("/api/v1/search", {"q": "json"}, status=200)  # the session
    stack.app.post_json("/auth/refresh", {"refresh_token": before["refresh_token"]}, status=200)


DOUBLE_SUBMIT = CSRFMiddleware.Options(cookie_name=COOKIE, double_submit=True, secret_key="c" * 40)


def test_a_page_gets_the_csrf_token_at_login_and_from_auth_csrf(tmp_path: Path, users: UserStore) -> None:
    """With csrf double_submit, the core hands the page its token: in the login answer (the new session's)
    and from GET /auth/csrf; the session's writes then need it."""
    stack = Stack(tmp_path, users, csrf=DOUBLE_SUBMIT)
    refused = stack.app.get("/auth/csrf", status=404)  # no session yet: none is made for it
    assert refused.json["error"]["message"].startswith("No CSRF token yet: this browser has no session")
    assert "Set-Cookie" not in refused.headers and list(stack.store.scan("session:")) == []
    token = stack.login().json["csrf_token"]
    assert stack.app.get("/auth/csrf").json == {"csrf_token": token}
    refused = stack.app.post("/auth/logout", status=403)
    assert refused.json["error"]["message"].startswith("CSRF token missing")
    logout = stack.app.post("/auth/logout", headers={"X-CSRF-Token": token}, status=204)
    assert logout.status == "204 No Content"  # RFC 9110's phrase, not werkzeug's "NO CONTENT"


def test_a_cookie_whose_session_ended_needs_no_csrf_token(tmp_path: Path, users: UserStore) -> None:
    """A browser still sends the cookie of a session the store no longer has (expired, ended elsewhere): its
    page cannot know a token for it, and it holds nothing to misuse, so the login goes through."""
    stack = Stack(tmp_path, users, csrf=DOUBLE_SUBMIT)
    stack.login()
    for key in list(stack.store.scan("session:")):
        stack.store.delete(key)  # ended elsewhere
    assert "csrf_token" in stack.login().json


def test_no_csrf_token_without_double_submit(stack: Stack) -> None:
    refused = stack.app.get("/auth/csrf", status=404)
    assert refused.json["error"]["message"] == ("No CSRF token here: the csrf layer's double_submit is off (its "
                                                "origin checks need no token).")
    assert "csrf_token" not in stack.login().json


def test_login_rotates_an_existing_session_id(stack: Stack) -> None:
    stack.login("bob", "builder")
    before = stack.app.cookies[COOKIE]
    stack.login()
    after = stack.app.cookies[COOKIE]
    assert before != after
    fresh = TestApp(stack.app.app)  # a client that only has the old cookie
    fresh.get("/api/v1/search", {"q": "json"}, headers={"Cookie": f"{COOKIE}={before}"}, status=401)
    fresh.get("/api/v1/search", {"q": "json"}, headers={"Cookie": f"{COOKIE}={after}"}, status=200)


def test_a_login_starts_its_session_empty(stack: Stack) -> None:
    """Nothing the session held before the login (another user's, or a planted one's) goes on into it."""
    stack.login("bob", "builder")
    (key,) = stack.store.scan("session:")
    doc = json.loads(stack.store.get(key) or b"")
    doc["data"]["cart"] = ["left by bob"]
    stack.store.set(key, json.dumps(doc).encode())
    stack.login()
    (key,) = stack.store.scan("session:")
    assert set(json.loads(stack.store.get(key) or b"")["data"]) == {"user"}


@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param("alice", "wrong", id="wrong password"),
        pytest.param("mallory", "wonderland", id="unknown user"),
        pytest.param("ALICE", "wonderland", id="name is case-sensitive"),
    ],
)
def test_wrong_credentials_get_one_401(stack: Stack, username: str, password: str) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    stack.context.listeners.append(lambda event, fields: events.append((event, fields)))
    response = stack.login(username, password, status=401)
    assert response.json["error"]["message"] == WRONG
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="wsgistack"'
    assert "Set-Cookie" not in response.headers
    assert ("auth.failure", {"reason": "login"}) in events


NFC, NFD = "caf\u00e9-cr\u00e8me", "cafe\u0301-cre\u0300me"  # one password: é as one code point, or e and an accent


@pytest.mark.parametrize(("set_as", "typed_as"), [
    pytest.param(NFC, NFD, id="set composed, typed decomposed"),
    pytest.param(NFD, NFC, id="set decomposed, typed composed"),
    pytest.param(NFD, NFD, id="set and typed decomposed"),
])
def test_a_password_logs_in_however_its_accents_are_encoded(tmp_path: Path, users: UserStore, set_as: str,
                                                            typed_as: str) -> None:
    """A keyboard, a paste from a macOS file name and a password manager may each encode "é" their own way."""
    users.add("carol", set_as)
    stack = Stack(tmp_path, users)
    assert stack.tokens.verify(stack.login("carol", typed_as).json["access_token"])["sub"] == "carol"
    stack.login("carol", typed_as.replace("\u00e9", "e").replace("\u0301", ""), status=401)


def test_wrong_passwords_are_throttled_per_user_name(tmp_path: Path, users: UserStore) -> None:
    """A password spray from many addresses at one account meets a limit the per-address one cannot see."""
    stack = Stack(tmp_path, users, max_failed_logins=3, failed_login_window=600)
    assert [stack.login(password="guess", status="*").status_int for _ in range(3)] == [401, 401, 401]
    refused = stack.login(status=429)  # the right password too, until the window ends
    assert refused.headers["Retry-After"] == "600"
    assert refused.json["error"]["message"] == (
        "Too many login attempts for this user name (wrong passwords, or more than 3 at once); retry in 600 "
        "seconds or less.")
    assert stack.login("ALICE", "guess", status=401)  # another name (names are case-sensitive), counted apart
    assert stack.login("bob", "builder").status_int == 200  # another account is not touched
    for _ in range(3):
        stack.login("nobody", "guess", status=401)
    assert stack.login("nobody", "guess", status=429)  # unknown names alike: nothing tells them apart
    # One counter per name, each under a digest of the name, never the name itself:
    keys = sorted(stack.store.scan("login-failures:"))
    assert keys == sorted(f"login-failures:{hashlib.blake2b(name.encode(), digest_size=16).hexdigest()}"
                          for name in ("alice", "ALICE", "nobody"))


@pytest.mark.parametrize(("later", "retry_after"), [(0.0, 600), (450.2, 150), (599.5, 1)])
def test_a_locked_out_name_is_told_what_is_left_of_its_window(tmp_path: Path, users: UserStore,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              later: float, retry_after: int) -> None:
    """The count of wrong passwords runs in a fixed window from the first one: the 429 names the seconds
    left in it (rounded up), not the whole window, in Retry-After and in its message alike."""
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    stack = Stack(tmp_path, users, max_failed_logins=3, failed_login_window=600)
    for _ in range(3):
        stack.login(password="guess", status=401)
    now[0] += later
    refused = stack.login(status=429)
    assert refused.headers["Retry-After"] == str(retry_after)
    assert refused.json["error"]["message"] == (
        "Too many login attempts for this user name (wrong passwords, or more than 3 at once); retry in "
        f"{retry_after} seconds or less.")
    now[0] = 1000.0 + 600
    assert stack.login().status_int == 200  # the window ended when it said


def test_a_lockout_whose_time_left_cannot_be_read_names_the_whole_window(tmp_path: Path, users: UserStore,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack(tmp_path, users, max_failed_logins=3, failed_login_window=600)
    for _ in range(3):
        stack.login(password="guess", status=401)
    reads: list[str] = []

    def unreadable(key: str) -> float | None:
        reads.append(key)
        raise StoreError("the store is down")

    monkeypatch.setattr(stack.store, "ttl", unreadable)
    refused = stack.login(status=429)
    assert refused.headers["Retry-After"] == "600"
    assert refused.json["error"]["message"].endswith("; retry in 600 seconds or less.")
    assert reads == [f"login-failures:{hashlib.blake2b(b'alice', digest_size=16).hexdigest()}"]
    stack.login("bob", "guess", status=401)
    stack.login("bob", "builder")
    assert len(reads) == 1  # read on a refusal only


def test_a_flood_of_cache_entries_does_not_reset_the_count(tmp_path: Path, users: UserStore) -> None:
    """On a full memory store the response cache's entries make room for each other, never by
    evicting a count of wrong passwords: anonymous searches cannot buy a sprayer more guesses."""
    store = MemoryStore(max_entries=50)
    stack = Stack(tmp_path, users, store=store, max_failed_logins=3)
    for _ in range(3):
        stack.login(password="guess", status=401)
    cache = CacheMiddleware(stack.flask, CacheMiddleware.Options(), stack.context)
    searches = TestApp(cache)
    for i in range(200):
        assert searches.get(f"/api/v1/search?q=json{i}").headers["X-Cache"] == "MISS"
    assert len(store) >= 49  # full (a fill lock comes and goes): cache entries take room from each other
    stack.login(password="guess", status=429)


def test_a_login_right_after_a_password_change_is_not_void(tmp_path: Path, users: UserStore) -> None:
    """`users passwd` dates the change to the next whole second: a login within it waits that second out,
    instead of getting tokens and a session that identify no one."""
    stack = Stack(tmp_path, users, rules=[{"paths": ["/api/*/config"], "roles": ["admin"]}])
    while time.time() % 1 > 0.1:  # early in a second: the login surely comes before the next one
        time.sleep(0.01)
    users.set_password("alice", "new password")
    since = users.get("alice").credentials_at  # type: ignore[union-attr]
    assert since - time.time() > 0.8
    login = stack.login(password="new password")
    assert time.time() >= since
    stack.app.get("/api/v1/config", status=200)  # the session cookie identifies alice
    stack.app.post_json("/auth/refresh", {"refresh_token": login.json["refresh_token"]}, status=200)


def _change_password(users: UserStore) -> None:
    users.set_password("alice", "new password")


def _make_again(users: UserStore) -> None:  # the same password, but another account
    users.remove("alice")
    users.add("alice", "wonderland", ["admin", "user"])


def _set_within_its_second(users: UserStore) -> None:
    """A second `users passwd` within the whole second the first dated the credentials to: the same date."""
    since = users.get("alice").credentials_at  # type: ignore[union-attr]
    users.set_password("alice", "newer password")
    with sqlite3.connect(users.path) as db:
        db.execute("UPDATE users SET credentials_at = ? WHERE name = 'alice'", (since,))
    db.close()


@pytest.mark.parametrize("change", [_change_password, _make_again, _set_within_its_second])
def test_a_login_whose_password_is_changed_while_it_is_checked_gets_the_401_of_a_wrong_one(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch,
        change: Callable[[UserStore], None]) -> None:
    """The password checked is no longer the user's: tokens and a session issued for it would outlive the
    change (their iat can reach its whole second), so the login issues nothing."""
    from app import users as users_module

    stack = Stack(tmp_path, users, max_failed_logins=5)
    real = users_module.check_password_hash  # type: ignore[attr-defined]
    checked: list[bool] = []

    def changed_meanwhile(stored: str, password: str) -> bool:
        checked.append(real(stored, password))
        if len(checked) == 1:
            change(users)  # another process's `users passwd`, while this login hashes
        return checked[-1]

    monkeypatch.setattr(users_module, "check_password_hash", changed_meanwhile)
    events: list[tuple[str, dict[str, Any]]] = []
    stack.context.listeners.append(lambda event, fields: events.append((event, fields)))
    refused = stack.login(status=401)
    assert checked[0] is True  # the password was right when it was checked
    assert refused.json["error"]["message"] == WRONG
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="wsgistack"'
    assert "Set-Cookie" not in refused.headers
    assert ("auth.failure", {"reason": "login"}) in events
    assert list(stack.store.scan("family-access:")) == [] and list(stack.store.scan("session:")) == []
    # Counted as a wrong password: the count was not cleared.
    digest = hashlib.blake2b(b"alice", digest_size=16).hexdigest()
    assert stack.store.get(f"login-failures:{digest}") is not None


@pytest.mark.parametrize("change", [_change_password, _make_again])
def test_a_login_whose_password_is_changed_right_after_it_was_read_again_issues_only_void_credentials(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch,
        change: Callable[[UserStore], None]) -> None:
    """The change lands after the login's last read and the login goes on past the change's whole second
    (a slow token store, a busy thread): its tokens and session are dated from before that read, so they
    are void, not valid under the password the login checked."""
    monkeypatch.setattr("middleware.auth.ROLES_FRESH", 0.0)
    stack = Stack(tmp_path, users, rules=[{"paths": ["/api/*/config"], "roles": ["admin"]}])
    real = UserStore.current
    changed: list[float] = []

    def changed_right_after(self: UserStore, user: Any) -> Any:
        found = real(self, user)
        if not changed:
            change(users)  # another process's change, just after this login read the user again
            changed.append(users.get("alice").credentials_at)  # type: ignore[union-attr]
            time.sleep(max(0.0, changed[0] - time.time()) + 0.05)  # this login goes on past its second
        return found

    monkeypatch.setattr(UserStore, "current", changed_right_after)
    login = stack.login(status=200).json
    assert changed and time.time() > changed[0]
    revoked = 'Bearer realm="wsgistack", error="invalid_token", error_description="the token has been revoked"'
    refused = stack.app.get("/api/v1/config", headers=bearer(login["access_token"]), status=401)
    assert refused.headers["WWW-Authenticate"] == revoked
    refused = stack.app.post_json("/auth/refresh", {"refresh_token": login["refresh_token"]}, status=401)
    assert refused.headers["WWW-Authenticate"] == revoked
    refused = stack.app.get("/api/v1/config", status=401)  # the session's cookie identifies no one
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="wsgistack"'


def test_a_login_that_waits_for_its_credentials_date_refuses_a_password_set_again_meanwhile(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The password was set a moment ago (its date is the next whole second, which the login waits for) and
    is set again within that second: what the login checked is looked at again after the wait."""
    stack = Stack(tmp_path, users)
    users.set_password("alice", "new password")
    with sqlite3.connect(users.path) as db:  # dated half a second ahead, however the clock stands
        db.execute("UPDATE users SET credentials_at = ? WHERE name = 'alice'", (time.time() + 0.5,))
    db.close()
    real = time.sleep
    waits: list[float] = []

    def set_again_meanwhile(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            _set_within_its_second(users)
        real(seconds)

    monkeypatch.setattr(time, "sleep", set_again_meanwhile)
    refused = stack.login(password="new password", status=401)
    assert waits and 0 < waits[0] <= 0.5
    assert refused.json["error"]["message"] == WRONG and "Set-Cookie" not in refused.headers
    assert list(stack.store.scan("family-access:")) == []


def test_a_login_whose_older_hash_another_login_hashes_again_meanwhile_is_not_refused(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two logins of one account with an older hash at once: the one whose hash the other replaced (the same
    password, hashed again) still logs in."""
    from werkzeug.security import generate_password_hash

    from app import users as users_module
    from app.users import HASH_ENV, HASH_METHOD

    monkeypatch.delenv(HASH_ENV, raising=False)  # the stack's store hashes towards the real method
    stack = Stack(tmp_path, users)
    with sqlite3.connect(users.path) as db:
        db.execute("UPDATE users SET password_hash = ? WHERE name = 'alice'",
                   (generate_password_hash("wonderland", "pbkdf2:sha256:1000"),))
    db.close()
    real = users_module.check_password_hash  # type: ignore[attr-defined]
    calls: list[str] = []

    def rehashed_meanwhile(stored: str, password: str) -> bool:
        calls.append(stored)
        if len(calls) == 1:  # the other login stores its hash first
            with sqlite3.connect(users.path) as db:
                db.execute("UPDATE users SET password_hash = ? WHERE name = 'alice'",
                           (generate_password_hash("wonderland", HASH_METHOD),))
            db.close()
        return real(stored, password)

    monkeypatch.setattr(users_module, "check_password_hash", rehashed_meanwhile)
    login = stack.login(status=200)
    assert stack.tokens.verify(login.json["access_token"])["sub"] == "alice"
    assert len(calls) == 2 and calls[1].startswith(HASH_METHOD + "$")  # the hash found in place of its own


def test_a_password_changed_ahead_of_the_clock_is_a_503_not_void_tokens(tmp_path: Path, users: UserStore,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The clock stepped back after `users passwd`: tokens issued now would be void at once."""
    stack = Stack(tmp_path, users, max_failed_logins=3)
    db = sqlite3.connect(users.path)
    db.execute("UPDATE users SET credentials_at = ? WHERE name = 'alice'", (time.time() + 3600,))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING):
        for _ in range(4):  # retried with the right password: never the throttle's 429
            refused = stack.login(status=503)
    assert 3590 <= int(refused.headers["Retry-After"]) <= 3600
    assert refused.json["error"]["message"] == (
        "This account's password was changed at a time this server's clock has not reached yet; retry later.")
    assert "the credentials of user alice were changed" in caplog.text


def test_concurrent_guesses_do_not_slip_under_the_limit(tmp_path: Path, users: UserStore) -> None:
    """Each attempt is counted before its password is checked, with one atomic increment."""
    from concurrent.futures import ThreadPoolExecutor

    from werkzeug.test import Client

    stack = Stack(tmp_path, users, max_failed_logins=3)
    body = json.dumps({"username": "alice", "password": "guess"})

    def guess(_: int) -> int:
        return Client(stack.app.app).post("/auth/login", data=body, content_type="application/json").status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(guess, range(24)))
    assert statuses == [401] * 3 + [429] * 21


def test_names_no_account_can_have_are_not_stored(tmp_path: Path, users: UserStore) -> None:
    stack = Stack(tmp_path, users, max_failed_logins=3)
    for name in ("x" * 500, "\uff41\uff4c\uff49\uff43\uff45", "a b"):
        stack.login(name, "guess", status=401)
    assert list(stack.store.scan("login-failures:")) == []


def test_a_store_that_cannot_count_answers_every_login_alike(tmp_path: Path, users: UserStore) -> None:
    """A store that reads but refuses writes (full, or Redis at maxmemory): no uncounted guesses, no oracle."""
    from stores import StoreError as Refused

    class Full(MemoryStore):
        def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
            raise Refused("the store is full")

    stack = Stack(tmp_path, users, store=Full(), max_failed_logins=3)
    wrong, right = stack.login(password="guess", status=503), stack.login(status=503)
    assert wrong.json["error"]["message"] == right.json["error"]["message"]


def test_a_right_password_forgets_the_wrong_ones(tmp_path: Path, users: UserStore) -> None:
    stack = Stack(tmp_path, users, max_failed_logins=3)
    for _ in range(2):
        stack.login(password="guess", status=401)
    stack.login()
    assert [stack.login(password="guess", status="*").status_int for _ in range(3)] == [401, 401, 401]


@pytest.mark.parametrize(
    ("path", "body", "content_type", "message"),
    [
        pytest.param("/auth/login", b"{not json", "application/json", "The request body is not valid JSON.",
                     id="login malformed"),
        pytest.param("/auth/login", b"", "application/json", "The request body must be a JSON object.",
                     id="login empty"),
        pytest.param("/auth/login", b"[1, 2]", "application/json", "The request body must be a JSON object.",
                     id="login array"),
        pytest.param("/auth/login", b'{"username": "alice"}', "application/json",
                     "The JSON body needs a non-empty string field 'password'.", id="login no password"),
        pytest.param("/auth/login", b'{"username": 7, "password": "x"}', "application/json",
                     "The JSON body needs a non-empty string field 'username'.", id="login number"),
        pytest.param("/auth/login", b'{"username": "", "password": "x"}', "application/json",
                     "The JSON body needs a non-empty string field 'username'.", id="login empty name"),
        pytest.param("/auth/refresh", b"{}", "application/json",
                     "The JSON body needs a non-empty string field 'refresh_token'.", id="refresh missing"),
        pytest.param("/auth/refresh", b"", "application/json",
                     "The JSON body needs a non-empty string field 'refresh_token'.",
                     id="refresh with no body (the token sent as a bearer token instead)"),
        pytest.param("/auth/refresh", b"[1]", "application/json", "The request body must be a JSON object.",
                     id="refresh array"),
        pytest.param("/auth/refresh", b"\xff\xfe", "application/json", "The request body is not valid JSON.",
                     id="refresh not utf-8"),
        pytest.param("/auth/logout", b"nope", "application/json", "The request body is not valid JSON.",
                     id="logout malformed"),
        pytest.param("/auth/logout", b"null", "application/json", "The request body must be a JSON object.",
                     id="logout null: a JSON value, not no body"),
        pytest.param("/auth/refresh", b" null ", "application/json", "The request body must be a JSON object.",
                     id="refresh null"),
        pytest.param("/auth/logout", b'{"refresh_token": 5}', "application/json",
                     "The JSON body needs a non-empty string field 'refresh_token'.", id="logout number"),
        pytest.param("/auth/login", b'{"username": "\\ud800", "password": "x"}', "application/json",
                     "The field 'username' is not valid text (it holds half of a surrogate pair).",
                     id="login lone surrogate in the name"),
        pytest.param("/auth/login", b'{"username": "alice", "password": "\\udfff"}', "application/json",
                     "The field 'password' is not valid text (it holds half of a surrogate pair).",
                     id="login lone surrogate in the password"),
        pytest.param("/auth/login", b"[" * 100_000, "application/json", "The request body is not valid JSON.",
                     id="login nested too deeply"),
        pytest.param("/auth/refresh", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json",
                     "The request body is not valid JSON.", id="refresh nested too deeply"),
        pytest.param("/auth/logout", b"[" * 100_000 + b"]" * 100_000, "application/json",
                     "The request body is not valid JSON.", id="logout nested too deeply"),
    ],
)
def test_bad_bodies_are_400(stack: Stack, path: str, body: bytes, content_type: str, message: str) -> None:
    response = stack.app.post(path, body, content_type=content_type, status=400)
    assert response.json["error"]["message"] == message


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        pytest.param("/auth/login", "text/plain", id="login from a cross-site text/plain form"),
        pytest.param("/auth/login", "application/x-www-form-urlencoded", id="login from a cross-site form"),
        pytest.param("/auth/logout", "text/plain", id="logout from a cross-site form"),
    ],
)
def test_bodies_that_are_not_json_are_415(stack: Stack, path: str, content_type: str) -> None:
    body = b'{"username": "alice", "password": "correct horse battery staple"}'
    response = stack.app.post(path, body, content_type=content_type, status=415)
    assert response.json["error"]["message"] == "The request body must be application/json."
    assert response.headers["Accept-Post"] == "application/json"


def test_body_parsed_by_the_validation_layer_is_used(tmp_path: Path, users: UserStore) -> None:
    stack = Stack(tmp_path, users, validation=True)
    assert "access_token" in stack.login().json
    stack.login("alice", "nope", status=401)
    stack.app.post("/auth/login", b'{"username": "a", "username": "b"}', content_type="application/json",
                   status=400)  # the layer refuses duplicate keys before the app sees them


def test_login_prefers_the_already_parsed_body(tmp_path: Path, users: UserStore) -> None:
    stack = Stack(tmp_path, users)
    parsed = {"username": "alice", "password": "wonderland"}
    response = stack.app.post("/auth/login", b"unparseable", content_type="application/json",
                              extra_environ={"wsgistack.json": parsed})
    assert "access_token" in response.json


# ----------------------------------------------------------------- refresh


def test_refresh_rotates_and_reuse_is_refused(stack: Stack) -> None:
    first = stack.login().json
    refreshed = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]})
    second = refreshed.json
    assert refreshed.headers["Cache-Control"] == "no-store"
    assert second["refresh_token"] != first["refresh_token"]
    assert stack.tokens.verify(second["access_token"])["sub"] == "alice"
    # Sent again at once (a retry after a lost answer, another tab): the same pair, nothing revoked.
    again = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert [again.json[k] for k in ("access_token", "refresh_token")] == [second[k] for k in ("access_token",
                                                                                              "refresh_token")]
    third = stack.app.post_json("/auth/refresh", {"refresh_token": second["refresh_token"]}).json
    # Once the pair it made was refreshed in turn, the first token is stale: a reuse.
    reused = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]}, status=401)
    assert reused.json["error"]["message"] == (
        "Unauthorized: the refresh token was already used; its family is revoked.")
    # Reuse revoked the whole family, including the pairs issued by the refreshes.
    for pair in (second, third):
        stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=401)


def test_an_access_token_cannot_be_refreshed(stack: Stack) -> None:
    access = stack.login().json["access_token"]
    response = stack.app.post_json("/auth/refresh", {"refresh_token": access}, status=401)
    assert response.json["error"]["message"] == "Unauthorized: only a refresh token can be refreshed."


@pytest.mark.parametrize("kind", [["refresh"], {"typ": "refresh"}], ids=["a list", "an object"])
def test_a_token_whose_kind_is_not_a_string_is_no_kind(stack: Stack, kind: Any) -> None:
    """Refused where a kind is needed; logout, which takes either kind, revokes it and its login."""
    refresh = stack.login().json["refresh_token"]
    claims = jwt.decode(refresh, options={"verify_signature": False})
    signed = jwt.encode({**claims, "typ": kind}, SECRET, algorithm="HS256")
    response = stack.app.post_json("/auth/refresh", {"refresh_token": signed}, status=401)
    assert response.json["error"]["message"] == "Unauthorized: only a refresh token can be refreshed."
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(signed), status=401)
    stack.app.post("/auth/logout", headers=bearer(signed), status=204)
    stack.app.post_json("/auth/refresh", {"refresh_token": refresh}, status=401)  # its login is gone


@pytest.mark.parametrize(
    ("change", "roles"),
    [
        pytest.param(lambda users: users.set_roles("alice", ["user"]), ["user"], id="set-role takes admin away"),
        pytest.param(lambda users: users.set_roles("alice", []), [], id="every role taken away"),
        pytest.param(lambda users: users.set_roles("alice", ["admin", "ops", "user"]), ["admin", "ops", "user"],
                     id="a role added"),
    ],
)
def test_refresh_carries_the_roles_the_user_has_now(stack: Stack, users: UserStore,
                                                    change: Callable[[UserStore], Any], roles: list[str]) -> None:
    first = stack.login().json
    change(users)
    second = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]}, status=200).json
    assert stack.tokens.verify(second["access_token"])["roles"] == roles
    assert stack.tokens.verify(second["refresh_token"], kind="refresh")["roles"] == roles


def test_refresh_of_a_removed_user_is_refused_and_revokes_the_family(stack: Stack, users: UserStore) -> None:
    first = stack.login().json
    second = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]}).json
    users.remove("alice")
    refused = stack.app.post_json("/auth/refresh", {"refresh_token": second["refresh_token"]}, status=401)
    assert refused.json["error"]["message"] == "Unauthorized: the token has been revoked."
    assert refused.headers["WWW-Authenticate"] == (
        'Bearer realm="wsgistack", error="invalid_token", error_description="the token has been revoked"')
    for pair in (first, second):  # the access tokens of the family are refused at once, not in 15 minutes
        stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=401)
    users.add("alice", "wonderland", ["admin"])  # a new user of the same name does not revive the family
    stack.app.post_json("/auth/refresh", {"refresh_token": second["refresh_token"]}, status=401)


@pytest.mark.parametrize(
    ("user", "change", "before", "after"),
    [
        pytest.param("alice", lambda users: users.set_roles("alice", ["user"]), 200, 403, id="admin taken away"),
        pytest.param("bob", lambda users: users.set_roles("bob", ["admin"]), 403, 200, id="admin given"),
        pytest.param("alice", lambda users: users.remove("alice"), 200, 401, id="user removed"),
        pytest.param("alice", lambda users: users.set_password("alice", "new password"), 200, 401,
                     id="password reset"),
        pytest.param("alice", lambda users: (users.remove("alice"), users.add("alice", "other", ["admin"])), 200,
                     401, id="the name given to someone new"),
    ],
)
def test_a_session_carries_the_roles_the_user_has_now(tmp_path: Path, users: UserStore,
                                                      monkeypatch: pytest.MonkeyPatch, user: str,
                                                      change: Callable[[UserStore], Any], before: int,
                                                      after: int) -> None:
    """`serve.py users set-role/remove` reaches logged-in sessions, not only the next refresh."""
    monkeypatch.setattr("middleware.auth.ROLES_FRESH", 0.0)
    stack = Stack(tmp_path, users, rules=[{"paths": ["/api/*/config"], "roles": ["admin"]}])
    stack.login(user, {"alice": "wonderland", "bob": "builder"}[user])
    stack.app.get("/api/v1/config", status=before)  # the session cookie is the only credential
    change(users)
    response = stack.app.get("/api/v1/config", status=after)
    if after == 401:
        assert response.json["error"]["message"] == "Unauthorized: this resource needs a bearer token."


@pytest.mark.parametrize(
    ("user", "change", "before", "after", "reason"),
    [
        pytest.param("alice", lambda users: users.set_roles("alice", ["user"]), 200, 403, "insufficient_role",
                     id="admin taken away"),
        pytest.param("bob", lambda users: users.set_roles("bob", ["admin"]), 403, 200, None, id="admin given"),
        pytest.param("alice", lambda users: users.remove("alice"), 200, 401, "unknown_subject", id="user removed"),
        pytest.param("alice", lambda users: users.set_password("alice", "new password"), 200, 401,
                     "credentials_changed", id="password reset"),
        pytest.param("alice", lambda users: (users.remove("alice"), users.add("alice", "other")), 200, 401,
                     "credentials_changed", id="the name given to someone new, without the old holder's roles"),
    ],
)
def test_an_access_token_follows_the_users_database(tmp_path: Path, users: UserStore,
                                                    monkeypatch: pytest.MonkeyPatch, user: str,
                                                    change: Callable[[UserStore], Any], before: int, after: int,
                                                    reason: str | None) -> None:
    """As a session does: `serve.py users set-role/remove/passwd` reach tokens issued already, not at their exp."""
    monkeypatch.setattr("middleware.auth.ROLES_FRESH", 0.0)
    stack = Stack(tmp_path, users, rules=[{"paths": ["/api/*/config"], "roles": ["admin"]}])
    token = stack.login(user, {"alice": "wonderland", "bob": "builder"}[user]).json["access_token"]
    stack.app.reset()  # the token is the only credential
    stack.app.get("/api/v1/config", headers=bearer(token), status=before)
    change(users)
    reasons: list[str] = []
    stack.context.listeners.append(
        lambda event, fields: reasons.append(fields["reason"]) if event == "auth.failure" else None)
    response = stack.app.get("/api/v1/config", headers=bearer(token), status=after)
    assert reasons == ([reason] if reason else [])
    if after == 401:
        assert response.headers["WWW-Authenticate"] == (
            'Bearer realm="wsgistack", error="invalid_token", error_description="the token has been revoked"')


@pytest.mark.parametrize(("change", "apart"), [
    # A reset counts from the next whole second: a token of the very second of the reset is void too.
    pytest.param(lambda users: users.set_password("alice", "new password"), 0.0, id="password reset"),
    # A name given to someone new counts from the next whole second too.
    pytest.param(lambda users: (users.remove("alice"), users.add("alice", "other", ["admin"])), 0.0,
                 id="the name given to someone new"),
])
def test_refresh_tokens_from_before_the_credentials_changed_are_void(stack: Stack, users: UserStore,
                                                                     change: Callable[[UserStore], Any],
                                                                     apart: float) -> None:
    """A leaked password's holder keeps nothing once the operator resets it (OWASP: renew on credential change)."""
    stolen = stack.login().json
    time.sleep(apart)
    change(users)
    since = users.get("alice").credentials_at  # type: ignore[union-attr]
    time.sleep(max(0.0, since - time.time()))  # a login in the second of a reset is void as well
    refused = stack.app.post_json("/auth/refresh", {"refresh_token": stolen["refresh_token"]}, status=401)
    assert refused.json["error"]["message"] == "Unauthorized: the token has been revoked."
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(stolen["access_token"]), status=401)  # family
    password = "new password" if users.verify_password("alice", "new password") else "other"
    fresh = stack.login(password=password).json
    assert stack.app.post_json("/auth/refresh", {"refresh_token": fresh["refresh_token"]}).status_int == 200


@pytest.mark.parametrize("service", ["user_roles", "user_since"])
def test_a_users_database_that_cannot_answer_is_a_503_for_a_token_and_no_identity_for_a_session(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch, service: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Not the token's fault: a 401 invalid_token would make its client drop it; a 503 it retries."""
    monkeypatch.setattr("middleware.auth.ROLES_FRESH", 0.0)
    stack = Stack(tmp_path, users, rules=[{"paths": ["/api/*/config"], "auth": "required"}])
    token = stack.login().json["access_token"]

    def broken(name: str) -> Any:
        raise sqlite3.OperationalError("database is locked")

    stack.context.services[service] = broken
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        refused = stack.app.get("/api/v1/config", headers=bearer(token), status=503)
        session_only = stack.app.get("/api/v1/config", status=401)  # the session: no one, as before
    assert refused.json["error"]["message"] == "The users database cannot be read; retry shortly."
    assert refused.headers["Retry-After"] == "5" and "WWW-Authenticate" not in refused.headers
    assert session_only.json["error"]["message"] == "Unauthorized: this resource needs a bearer token."
    assert "could not look up" in caplog.text and "session user" not in caplog.text


@pytest.mark.parametrize("lookup", ["user_roles", "user_since"])
def test_a_refresh_whose_users_lookup_fails_is_a_503_and_keeps_the_token(tmp_path: Path, users: UserStore,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         lookup: str) -> None:
    stack = Stack(tmp_path, users)
    pair = stack.login().json
    state = stack.flask.extensions["wsgistack"]

    def broken(name: str) -> Any:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(state, lookup, broken)
    refused = stack.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]}, status=503)
    assert refused.json["error"]["message"] == "The users database cannot be read; retry shortly."
    assert refused.headers["Retry-After"] == "5"
    monkeypatch.undo()
    assert stack.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]}).status_int == 200


def test_a_login_whose_users_database_cannot_be_read_is_a_503_and_counts_no_attempt(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """As a token and a refresh answer then: the client retries, and the outage uses up none of its attempts."""
    monkeypatch.setattr("app.users.IDENTITY_CHECK_SECONDS", 0.0)
    stack = Stack(tmp_path, users, max_failed_logins=2)
    kept = users.path.with_name("kept.sqlite3")
    users.close()
    users.path.rename(kept)
    users.path.write_bytes(b"not a database " * 100)
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        refused = [stack.login(password=password, status="*") for password in ("wonderland", "guess") * 2]
    assert [r.status_int for r in refused] == [503] * 4  # never the throttle's 429
    assert {r.json["error"]["message"] for r in refused} == {"The users database cannot be read; retry shortly."}
    assert {r.headers["Retry-After"] for r in refused} == {"5"}
    assert "could not check the password" in caplog.text
    kept.replace(users.path)
    stack.login(password="guess", status=401)
    assert stack.login().status_int == 200  # the second attempt since the outage: under the limit


def test_hosts_that_serve_one_copied_users_file_agree_and_a_command_run_on_each_does_not(
        tmp_path: Path, users: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/production.md: change the users file on one host and copy it to the others (a snapshot
    renamed over theirs); the same `users passwd` run on a second host dates the change by that
    host's clock, and voids there what the first host issued in between."""
    monkeypatch.setattr("app.users.IDENTITY_CHECK_SECONDS", 0.0)
    monkeypatch.setattr("middleware.auth.ROLES_FRESH", 0.0)
    shared = MemoryStore()  # the hosts' one Redis
    (tmp_path / "b").mkdir()
    other = UserStore(tmp_path / "b" / "users.sqlite3", hash_method="pbkdf2:sha256:1000")

    def copy() -> None:  # as `sqlite3 users.sqlite3 ".backup users.copy"`, then rsync's rename
        snapshot = tmp_path / "b" / "users.copy"
        source, target = sqlite3.connect(users.path), sqlite3.connect(snapshot)
        source.backup(target)
        source.close()
        target.close()
        snapshot.replace(other.path)

    copy()
    a, b = Stack(tmp_path, users, store=shared), Stack(tmp_path / "b", other, store=shared)
    users.set_password("alice", "new password")
    copy()
    pair = a.login(password="new password").json  # waits out the second the change is dated to
    b.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)
    pair = b.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]}, status=200).json
    time.sleep(1.0)
    other.set_password("alice", "new password")  # the same command, run on host B a moment later
    refused = b.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=401)
    assert refused.headers["WWW-Authenticate"].endswith('error_description="the token has been revoked"')
    a.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)  # A disagrees


def test_every_key_of_the_session_and_auth_state_is_one_the_cache_may_never_evict(tmp_path: Path,
                                                                                   users: UserStore) -> None:
    """A key the cache's list of kept namespaces misses could be evicted for cached answers (memory://)."""
    from middleware.cache import KEPT_NAMESPACES

    stack = Stack(tmp_path, users)
    stack.login(password="wrong", status=401)  # a count of wrong passwords
    first = stack.login().json
    pair = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]}).json
    stack.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]})
    stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]}, status=401)  # a reuse
    again = stack.login().json
    stack.app.post_json("/auth/refresh", {"refresh_token": again["refresh_token"]})
    stack.login(password="wrong", status=401)
    keys = list(stack.store.scan(""))
    assert {key.split(":", 1)[0] + ":" for key in keys} >= {
        "session:", "family-revoked:", "family-head:", "family-access:", "refresh-used:", "login-failures:"}
    assert [key for key in keys if not key.startswith(KEPT_NAMESPACES)] == []


def test_session_roles_are_looked_up_at_most_once_a_second(tmp_path: Path, users: UserStore) -> None:
    stack = Stack(tmp_path, users, rules=[{"paths": ["/api/*/config"], "roles": ["admin"]}])
    stack.login()
    calls: list[str] = []
    lookup = stack.context.services["user_roles"]

    def counting_lookup(name: str) -> tuple[str, ...] | None:
        calls.append(name)
        roles: tuple[str, ...] | None = lookup(name)
        return roles

    stack.context.services["user_roles"] = counting_lookup
    for _ in range(5):
        stack.app.get("/api/v1/config", status=200)
    assert calls == ["alice"]


# ------------------------------------------------------------------ logout


def test_logout_revokes_both_tokens_and_destroys_the_session(stack: Stack) -> None:
    pair = stack.login().json
    response = stack.app.post_json("/auth/logout", {"refresh_token": pair["refresh_token"]},
                                   headers=bearer(pair["access_token"]), status=204)
    assert response.body == b""
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    assert list(stack.store.scan("session:")) == []
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=401)
    refused = stack.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]}, status=401)
    assert refused.json["error"]["message"] == "Unauthorized: the token has been revoked."
    stack.app.get("/api/v1/search", {"q": "json"}, status=401)  # the session no longer authenticates


@pytest.mark.parametrize("sent", ["refresh", "access"])
def test_logout_ends_every_token_of_the_login(stack: Stack, sent: str) -> None:
    """An access token from before a refresh, or the pair of a logout that sent only one token, goes too."""
    first = stack.login().json
    second = stack.app.post_json("/auth/refresh", {"refresh_token": first["refresh_token"]}).json
    other_login = stack.login().json
    stack.app.reset()  # a client of the tokens alone: the session cookie is the other login's
    if sent == "refresh":
        stack.app.post_json("/auth/logout", {"refresh_token": second["refresh_token"]}, status=204)
    else:
        stack.app.post("/auth/logout", headers=bearer(second["access_token"]), status=204)
    for token in (first["access_token"], second["access_token"]):
        stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(token), status=401)
    stack.app.post_json("/auth/refresh", {"refresh_token": second["refresh_token"]}, status=401)
    assert stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(other_login["access_token"])).status_int == 200


@pytest.mark.parametrize("sent", ["the session alone", "the session and another login's tokens"])
def test_logout_with_the_session_ends_the_tokens_of_its_login(stack: Stack, sent: str) -> None:
    """A browser that logs out with its cookie ends the tokens its login gave, wherever they went."""
    kept = stack.login().json  # tokens of an earlier login, kept by an API client
    stack.app.reset()
    login = stack.login().json  # the session's login
    refreshed = stack.app.post_json("/auth/refresh", {"refresh_token": login["refresh_token"]}).json
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(refreshed["access_token"]), status=200)
    sessions = set(stack.store.scan("session:"))  # the earlier login's (its cookie dropped) and this one's
    if sent == "the session alone":
        stack.app.post("/auth/logout", status=204)
    else:
        stack.app.post_json("/auth/logout", {"refresh_token": kept["refresh_token"]},
                            headers=bearer(kept["access_token"]), status=204)
    assert len(sessions - set(stack.store.scan("session:"))) == 1
    for token in (login["access_token"], refreshed["access_token"]):
        refused = stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(token), status=401)
        assert refused.json["error"]["message"] == "Unauthorized: the token has been revoked."
    refused = stack.app.post_json("/auth/refresh", {"refresh_token": refreshed["refresh_token"]}, status=401)
    assert refused.json["error"]["message"] == "Unauthorized: the token has been revoked."
    kept_works = sent == "the session alone"
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(kept["access_token"]),
                  status=200 if kept_works else 401)


def test_logout_with_a_session_from_before_logins_named_their_family_ends_the_session_alone(stack: Stack) -> None:
    """A session whose user has no fam (written by an earlier version): its tokens cannot be told; they stay."""
    pair = stack.login().json
    [key] = stack.store.scan("session:")
    data = json.loads(stack.store.get(key) or b"{}")
    del data["data"]["user"]["fam"]
    stack.store.set(key, json.dumps(data).encode(), 3600)
    stack.app.post("/auth/logout", status=204)
    assert list(stack.store.scan("session:")) == [] and list(stack.store.scan("family-revoked:")) == []
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)


def test_logout_with_nothing_to_revoke_is_fine(stack: Stack) -> None:
    response = stack.app.post("/auth/logout", status=204)
    assert response.body == b""
    assert response.headers.getall("Set-Cookie") == []  # no session, no cookie to expire: no logout CSRF


def test_logout_with_a_forged_token_is_refused(stack: Stack) -> None:
    response = stack.app.post("/auth/logout", headers=bearer("not.a.jwt"), status=401)
    assert response.json["error"]["message"] == "Unauthorized: the token is malformed."


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        pytest.param("refresh_token", "Unauthorized: the token is malformed.", id="malformed refresh_token"),
        pytest.param("bearer", "Unauthorized: the token is malformed.", id="malformed bearer token"),
        pytest.param("forged refresh_token", "Unauthorized: the token's signature is invalid.",
                     id="refresh_token signed with another key"),
    ],
)
def test_a_refused_logout_changes_nothing(stack: Stack, bad: str, message: str) -> None:
    pair = stack.login().json
    token = pair["refresh_token"]
    forged = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]  # one character of the signature
    body = {"refresh_token": {"refresh_token": "not.a.jwt", "forged refresh_token": forged}.get(
        bad, pair["refresh_token"])}
    headers = bearer("not.a.jwt" if bad == "bearer" else pair["access_token"])
    response = stack.app.post_json("/auth/logout", body, headers=headers, status=401)
    assert response.json["error"]["message"] == message
    assert "Set-Cookie" not in response.headers
    assert len(list(stack.store.scan("session:"))) == 1
    assert list(stack.store.scan("revoked:")) == []
    stack.app.get("/api/v1/search", {"q": "json"}, status=200)  # the session still authenticates
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)
    stack.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]}, status=200)


@pytest.mark.parametrize("path", ["/auth/refresh", "/auth/logout"])
def test_a_refresh_token_in_the_body_is_held_to_max_token_bytes_as_a_bearer_token_is(stack: Stack,
                                                                                      path: str) -> None:
    """The body's refresh_token gets no more than the Authorization header's max_token_bytes (8192): past it,
    a 400 naming the field, before any token is parsed, and a logout so refused changes nothing."""
    pair = stack.login().json
    at_limit = pair["refresh_token"] + "A" * (8192 - len(pair["refresh_token"]))
    read = stack.app.post_json(path, {"refresh_token": at_limit}, status=401)  # at the limit: read, not ours
    assert read.headers["WWW-Authenticate"].startswith('Bearer realm="wsgistack", error="invalid_token"')
    response = stack.app.post_json(path, {"refresh_token": at_limit + "A"}, headers=bearer(pair["access_token"]),
                                   status=400)
    assert response.json["error"]["message"] == (
        "The field 'refresh_token' is longer than 8192 bytes (the auth layer's max_token_bytes).")
    assert response.json["error"]["details"] == {"field": "refresh_token"}
    assert "WWW-Authenticate" not in response.headers and "Set-Cookie" not in response.headers
    assert len(list(stack.store.scan("session:"))) == 1 and list(stack.store.scan("revoked:")) == []
    stack.app.post_json("/auth/refresh", {"refresh_token": pair["refresh_token"]}, status=200)


@pytest.mark.parametrize("header", [
    pytest.param('Bearer token="{token}"', id="auth-param instead of a token"),
    pytest.param("Bearer {token} {token}", id="two tokens"),
    pytest.param("Bearer", id="no token"),
])
def test_a_logout_with_a_malformed_bearer_header_is_400_not_a_204_that_revoked_nothing(stack: Stack,
                                                                                        header: str) -> None:
    pair = stack.login().json
    response = stack.app.post("/auth/logout", headers={"Authorization": header.format(token=pair["access_token"])},
                              status=400)
    assert response.json["error"]["message"] == (
        "Bad Request: the Authorization header must be 'Bearer <token>', the token one b64token (RFC 6750 §2.1).")
    assert response.headers["WWW-Authenticate"] == ('Bearer realm="wsgistack", error="invalid_request", '
                                                    'error_description="the Authorization header is malformed"')
    assert "Set-Cookie" not in response.headers and len(list(stack.store.scan("session:"))) == 1
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)


def test_a_logout_with_an_oversized_authorization_header_is_431_as_elsewhere(stack: Stack) -> None:
    """Past the auth layer's max_token_bytes (8192), logout refuses the header as every other path does."""
    pair = stack.login().json
    header = "Bearer " + "a" * (8192 - len("Bearer "))
    stack.app.post("/auth/logout", headers={"Authorization": header}, status=401)  # at the limit: read, not ours
    response = stack.app.post("/auth/logout", headers={"Authorization": header + "a"}, status=431)
    assert response.json["error"]["message"] == (
        "The Authorization header is longer than 8192 bytes.")
    assert "WWW-Authenticate" not in response.headers and "Set-Cookie" not in response.headers
    assert len(list(stack.store.scan("session:"))) == 1 and list(stack.store.scan("revoked:")) == []
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)
    assert stack.app.get("/api/v1/search", {"q": "json"}, headers={"Authorization": header + "a"},
                         status=431).json["error"]["message"] == response.json["error"]["message"]


@pytest.mark.parametrize("credentials", ["Basic YWxpY2U6d29uZGVybGFuZA==", "Basic \xe9"])
def test_a_logout_with_another_authorization_scheme_ends_the_session_and_revokes_no_token(stack: Stack,
                                                                                         credentials: str) -> None:
    """Basic credentials are not a bearer token: not refused, and not read as one."""
    pair = stack.login().json  # tokens of another login than the session's
    stack.app.reset()
    stack.login()
    sessions = set(stack.store.scan("session:"))
    stack.app.post("/auth/logout", headers={"Authorization": credentials}, status=204)
    assert len(sessions - set(stack.store.scan("session:"))) == 1
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=200)


class SessionDeletesFail(MemoryStore):
    """A memory store that cannot delete sessions while ``failing`` is true."""

    failing = False

    def delete(self, key: str) -> bool:
        if self.failing and key.startswith("session:"):
            raise StoreError("connection refused")
        return super().delete(key)


def test_a_logout_whose_session_cannot_be_deleted_is_a_503_that_can_be_retried(tmp_path: Path,
                                                                               users: UserStore) -> None:
    store = SessionDeletesFail()
    stack = Stack(tmp_path, users, store=store, on_store_error="open")
    pair = stack.login().json
    store.failing = True
    response = stack.app.post_json("/auth/logout", {"refresh_token": pair["refresh_token"]},
                                   headers=bearer(pair["access_token"]), status=503)
    assert response.json["error"]["message"] == (
        "the session could not be ended because the session store is unavailable; try again shortly")
    assert response.headers["Retry-After"] == "5"
    assert "Set-Cookie" not in response.headers
    assert len(list(store.scan("session:"))) == 1
    store.failing = False
    retried = stack.app.post_json("/auth/logout", {"refresh_token": pair["refresh_token"]},
                                  headers=bearer(pair["access_token"]), status=204)
    assert "Max-Age=0" in retried.headers["Set-Cookie"]
    assert list(store.scan("session:")) == []
    stack.app.get("/api/v1/search", {"q": "json"}, headers=bearer(pair["access_token"]), status=401)


class FamilyWritesFail(MemoryStore):
    """A memory store that cannot record access tokens in their family."""

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if key.startswith("family-access:"):
            raise StoreError("connection refused")
        super().set(key, value, ttl)


def test_login_answers_503_when_its_access_token_cannot_be_recorded(tmp_path: Path, users: UserStore) -> None:
    store = FamilyWritesFail()
    stack = Stack(tmp_path, users, store=store, on_store_error="open")
    response = stack.login(status=503)
    assert response.json["error"]["message"] == "The token store is unavailable; retry shortly."
    assert response.headers["Retry-After"] == "5"
    assert "Set-Cookie" not in response.headers
    assert list(store.scan("session:")) == []


# ---------------------------------------------------- without the auth layer


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        pytest.param("/auth/login", {"username": "alice", "password": "wonderland"}, {},
                     "Login needs the auth layer in the pipeline.", id="login"),
        pytest.param("/auth/refresh", {"refresh_token": "x"}, {},
                     "Token refresh needs the auth layer in the pipeline.", id="refresh"),
        pytest.param("/auth/logout", {}, {"Authorization": "Bearer x"},
                     "Logout needs the auth layer in the pipeline.", id="logout with a token"),
    ],
)
def test_without_the_auth_layer_token_endpoints_are_503(tmp_path: Path, users: UserStore, path: str,
                                                        body: dict[str, str], headers: dict[str, str],
                                                        message: str) -> None:
    client = TestApp(create_app({"var_dir": str(tmp_path), "users_db": str(users.path)}))
    response = client.post_json(path, body, headers=headers, status=503)
    assert response.json["error"]["message"] == message


@pytest.mark.parametrize(("password", "path"), [
    pytest.param("wonderland", "/auth/login", id="right password"),
    pytest.param("wrong", "/auth/login", id="wrong password: the same answer"),
    pytest.param(None, "/auth/refresh", id="refresh"),
])
def test_an_auth_layer_that_only_verifies_cannot_log_in(tmp_path: Path, users: UserStore, password: str | None,
                                                       path: str) -> None:
    """Tokens issued by another service (public_keys only): login and refresh are refused before any check."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    context = Context(stores={"shared": MemoryStore()})
    core = create_app({"var_dir": str(tmp_path), "users_db": str(users.path)}, context)
    app = TestApp(ErrorsMiddleware(AuthMiddleware(core, AuthMiddleware.Options(
        public_keys=[pem], algorithm="RS256", rules=[{"paths": ["/auth/*"], "auth": "none"}]), context),
        ErrorsMiddleware.Options(), context))
    body = {"username": "alice", "password": password} if password else {"refresh_token": "x"}
    response = app.post_json(path, body, status=503)
    action = "Login" if path == "/auth/login" else "Token refresh"
    assert response.json["error"]["message"] == (
        f"{action} needs an auth layer that signs tokens (secret or private_key); this one only verifies them.")
    assert app.post("/auth/logout", status=204).body == b""  # nothing to sign: logout still works


def test_without_the_auth_layer_plain_logout_still_works(tmp_path: Path) -> None:
    client = TestApp(create_app({"var_dir": str(tmp_path)}))
    assert client.post("/auth/logout", status=204).body == b""


def test_a_store_outage_does_not_tell_a_right_password_from_a_wrong_one(tmp_path: Path, users: UserStore) -> None:
    """Every login reads the user name's failure count first: during an outage a right and a wrong
    password get the same 503, from the first request on, so the outage is no password oracle."""
    from conftest import free_port

    from stores.redis import RedisStore

    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.05, socket_connect_timeout=0.05)
    try:
        stack = Stack(tmp_path, users, store=dead)  # type: ignore[arg-type]
        wrong, right = stack.login(password="nope", status=503), stack.login(status=503)
        for _ in range(3):  # failure_threshold: the breaker opens
            stack.login(status=503)
        after = stack.login(password="nope", status=503), stack.login(status=503)  # the breaker open
    finally:
        dead.close()
    assert {r.json["error"]["message"] for r in (wrong, right, *after)} == {
        "The token store is unavailable; retry shortly."}
    assert wrong.headers["Retry-After"] == right.headers["Retry-After"] == "5"
