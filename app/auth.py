"""The ``auth`` blueprint: log in, refresh and log out with the auth layer's tokens.

``POST /auth/login`` checks ``{"username", "password"}`` against the users
database and answers the token service's ``issue()`` dict; when the stack has
a session layer it also rotates the session id and stores
``session["user"] = {"sub", "roles", "iat", "fam"}`` (``fam``: the tokens' login
family).  Unknown users and wrong passwords get the same 401 after the same
amount of hashing, and so does a password set anew
while it was being checked; ``max_failed_logins`` wrong
passwords for one name within ``failed_login_window`` get 429 until it ends
(``Retry-After``: the seconds left of it); a
users database that cannot be read gets 503 with ``Retry-After``, as a refresh does.  ``POST /auth/refresh``
exchanges ``{"refresh_token"}`` for a pair carrying the user's roles as the
users database has them now; a user who was removed gets the 401 of a revoked
token, and the token's family is revoked.  ``POST /auth/logout`` revokes the
bearer token and the ``refresh_token`` of the body, and the tokens of the
session's login, and destroys the session, answering 204; every credential is
checked first, so a refused logout changes nothing.  Token responses carry ``Cache-Control: no-store``
and ``Pragma: no-cache`` (RFC 6749 §5.1).

The token service is the auth layer's ``context.services["tokens"]``, looked
up per request because layers are built after the app; without it these
endpoints answer 503.  Bodies are read from ``environ["wsgistack.json"]``
when the validation layer parsed them already.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from app.state import AppState
from app.users import NAME
from middleware.auth import MALFORMED_ERROR, _users_down, bearer_token, challenge
from middleware.base import SESSION, escape_control, refuse
from middleware.csrf import CSRF_TOKEN
from middleware.errors import status_line
from stores.base import StoreError

__all__ = ["auth_blueprint"]

JSON_BODY = "wsgistack.json"
_FAILED = "The user name or password is wrong."


class _Failures:
    """The wrong passwords of one user name, counted in the auth layer's store (``max_failed_logins``).

    The per-address rate limit cannot see a password spray from many
    addresses at one account (OWASP Authentication Cheat Sheet: throttle per
    account too).  Every attempt is counted *before* the password is checked,
    with one atomic increment, so concurrent guesses cannot all slip under the
    limit; a right password clears the count.  Known and unknown names are
    counted alike, so the 429 tells nothing about which names exist; a name no
    account can have (see ``app.users.NAME``) is not counted, nor stored.  The
    key holds a digest of the exact name (names are case-sensitive, as the
    lookup is), never the name itself; on a ``memory://`` store these keys may
    be evicted to make room, least recently counted first, so a flood of made-up
    names cannot fill it; cache entries evict them only while they hold more than
    half the store.  So a client that can spray made-up names from enough
    addresses (the login rule limits each) can push a count out: on a public
    server, keep the counts in Redis (``noeviction``, docs/stores.md).
    """

    def __init__(self, state: AppState, service: Any, username: str) -> None:
        self.limit, self.window = state.options.max_failed_logins, state.options.failed_login_window
        self.service = service
        store = getattr(service, "store", None)
        self.store = store if self.limit and NAME.fullmatch(username) else None
        digest = hashlib.blake2b(username.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        self.key = f"{_PREFIX}{digest}"
        allow_eviction = getattr(self.store, "allow_eviction", None)
        if allow_eviction is not None:
            allow_eviction(_PREFIX, lowest=False)  # pushed out by cache entries only past half the store

    def attempt(self) -> None:
        """Count this attempt; 429 past the limit, and 503 when the store cannot count it."""
        if self.store is None:
            return
        store, key, window = self.store, self.key, self.window
        # As the token service answers when it cannot record a login: a right and a wrong password
        # get the same 503, so an outage is no password oracle.
        count = self.service.call_store(lambda: store.incr(key, ttl=window))
        if count > self.limit:
            # Counted before the password is checked: more than the limit at once count too, right or wrong.
            left = self.left()
            raise refuse(429, f"Too many login attempts for this user name (wrong passwords, or more than "
                              f"{self.limit} at once); retry in {left} seconds or less.",
                         headers=[("Retry-After", str(left))])

    def left(self) -> int:
        """Whole seconds left in the count's window (it runs from the first attempt), at least 1.

        One more store call, on a refusal only; the whole window when the store cannot tell.
        """
        try:
            ttl = self.store.ttl(self.key) if self.store is not None else None
        except StoreError:
            ttl = None
        return max(1, math.ceil(ttl)) if ttl is not None else self.window

    def uncount(self) -> None:
        """Take back this attempt when no password was checked (the users database could not be read)."""
        if self.store is not None:
            with contextlib.suppress(StoreError):  # then it counts, until its window ends
                self.store.incr(self.key, ttl=self.window, amount=-1)

    def forget(self) -> None:
        if self.store is not None:
            with contextlib.suppress(StoreError):  # the count then runs out with its window
                self.store.delete(self.key)


_PREFIX = "login-failures:"


def _json_object(required: bool) -> dict[str, Any]:
    """The request's JSON object body; ``{}`` for an empty optional body; 400 otherwise."""
    environ = request.environ
    data_present = bool(request.content_length) or "HTTP_TRANSFER_ENCODING" in environ
    if data_present and request.mimetype != "application/json":
        # A cross-site HTML form can send text/plain or urlencoded bodies without a preflight;
        # insisting on JSON keeps login and logout out of reach of such forms (login CSRF).
        raise refuse(415, "The request body must be application/json.",
                     headers=[("Accept-Post", "application/json")])
    if JSON_BODY in environ:
        value = environ[JSON_BODY]
    else:
        data = request.get_data(cache=True)
        if not data.strip():
            value = _NO_BODY
        else:
            try:
                value = json.loads(data)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                raise refuse(400, "The request body is not valid JSON.") from None
    if value is _NO_BODY and not required:
        return {}
    if not isinstance(value, dict):  # (a body of null too: it is a JSON value, not no body)
        raise refuse(400, "The request body must be a JSON object.")
    return value


#: What a request without a body (or one of whitespace) reads as; ``null`` is a JSON value.
_NO_BODY = object()


def _session_login(user: Any) -> tuple[str, float] | None:
    """``(fam, iat)`` of the login a session's ``user`` was written by, if it says (logins since they did)."""
    if not isinstance(user, dict):
        return None
    fam, iat = user.get("fam"), user.get("iat")
    if isinstance(fam, str) and fam and isinstance(iat, int | float) and not isinstance(iat, bool):
        return fam, float(iat)
    return None


def _challenge(service: Any) -> str:
    """The auth layer's ``WWW-Authenticate`` challenge (its realm's; ``wsgistack`` without the layer)."""
    return challenge(str(getattr(service, "realm", "wsgistack")))


def _string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise refuse(400, f"The JSON body needs a non-empty string field {name!r}.",
                     details={"field": name})
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone \ud800 escape: no text, and no user name or password
            raise refuse(400, f"The field {name!r} is not valid text (it holds half of a surrogate pair).",
                         details={"field": name}) from None
    return value


def _token_field(body: dict[str, Any], service: Any) -> str:
    """The body's ``refresh_token``, held to the auth layer's ``max_token_bytes`` as a bearer token is.

    Past it, a 400 that names the field, before any parsing: a token no longer than the
    Authorization header may be is all the token service ever reads, wherever it came from.
    """
    token = _string_field(body, "refresh_token")
    limit = service.options.max_token_bytes if service is not None else None
    if limit is not None and len(token.encode("utf-8")) > limit:
        raise refuse(400, f"The field 'refresh_token' is longer than {limit} bytes (the auth layer's "
                          "max_token_bytes).", details={"field": "refresh_token"})
    return token


def _token_response(issued: dict[str, Any]) -> Response:
    """Tokens must never be stored by a cache: ``Cache-Control: no-store`` and ``Pragma: no-cache``
    (RFC 6749 section 5.1 asks for both; an HTTP/1.0 cache reads only the second)."""
    response = jsonify(issued)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def _csrf_token() -> str | None:
    """The double-submit token of this request's session, when the csrf layer hands one out."""
    getter = request.environ.get(CSRF_TOKEN)
    return None if getter is None else str(getter())


def auth_blueprint(state: AppState) -> Blueprint:
    """Build the ``/auth`` blueprint over the shared state."""
    bp = Blueprint("auth", __name__, url_prefix="/auth")

    def tokens(action: str, signs: bool = True) -> Any:
        service = state.service("tokens")
        if service is None:
            raise refuse(503, f"{action} needs the auth layer in the pipeline.")
        if signs and not state.can_issue_tokens():  # asked before any password is checked
            raise refuse(503, f"{action} needs an auth layer that signs tokens (secret or private_key); this one "
                              "only verifies them.")
        return service

    def wrong_password(service: Any) -> HTTPException:
        state.context.emit("auth.failure", reason="login")
        busy: HTTPException | None = service.unavailable()
        if busy is not None:  # a right password would get this 503 too: answer alike
            return busy
        return refuse(401, _FAILED, headers=[("WWW-Authenticate", _challenge(service))])

    @bp.post("/login")
    def login() -> Response:
        service = tokens("Login")
        body = _json_object(required=True)
        username = _string_field(body, "username")
        password = _string_field(body, "password")
        failures = _Failures(state, service, username)
        failures.attempt()
        try:
            user = state.users.verify_password(username, password)
        except (sqlite3.Error, OSError):
            # As a token and a refresh answer then: a 503 the client retries, not a 500; and the
            # attempt, which checked no password, does not count against the name.
            failures.uncount()
            state.context.logger.getChild("app.auth").exception(
                "could not check the password of user %s", escape_control(username))
            raise _users_down() from None
        if user is None:
            raise wrong_password(service)
        # `users passwd` dates the new credentials to the next whole second (tokens carry whole
        # seconds): a login within that second would get tokens and a session that are void at once.
        wait = user.credentials_at - time.time()
        if wait > 1.0:  # dated further ahead than rounding does: this clock stepped back since
            failures.forget()  # the password was right: retrying it must not run into the 429
            state.context.logger.getChild("app.auth").warning(
                "the credentials of user %s were changed %.0f s ahead of this clock (did it step back?): "
                "logins as that user wait for it", escape_control(user.name), wait)
            raise refuse(503, "This account's password was changed at a time this server's clock has not "
                              "reached yet; retry later.", headers=[("Retry-After", str(math.ceil(wait)))])
        if wait > 0:
            time.sleep(wait)
        # Read again, with nothing slow between this and the issuing: a password set while it was
        # checked (or while the login waited) is not the user's any more, and tokens issued for it
        # could reach the new credentials' whole second, so they would outlive the change.
        # The tokens and the session are dated from before this read: a change it did not see is
        # dated after it, so what is issued below is void (however long the issuing takes).
        read_at = time.time()
        try:
            user = state.users.current(user)
        except (sqlite3.Error, OSError):
            failures.uncount()  # no answer about the password: as when it could not be checked
            state.context.logger.getChild("app.auth").exception(
                "could not read user %s again after the password check", escape_control(username))
            raise _users_down() from None
        if user is None:
            raise wrong_password(service)  # the password it checked is no longer the user's
        issued, fam = service.issue_family(user.name, list(user.roles), issued_at=read_at)
        failures.forget()
        session = request.environ.get(SESSION)
        if session is not None:
            session.rotate(carry=False)  # a new session: nothing of the one before the login goes on
            # With the login's family: a logout with the session alone ends the tokens of this login too.
            session["user"] = {"sub": user.name, "roles": list(user.roles), "iat": read_at,
                               "fam": fam}
        token = _csrf_token()  # the new session's (csrf double_submit): the page's next writes send it
        return _token_response(issued if token is None else {**issued, "csrf_token": token})

    @bp.get("/csrf")
    def csrf() -> Response:
        """The page's CSRF token (csrf ``double_submit``), bound to its session.

        Only for a session the store has: a request without one (no cookie, or one whose session
        ended) needs no token for its writes, and the login's answer carries the new session's.
        Handing one out would store a session per anonymous request (a flood would fill the store).
        """
        if CSRF_TOKEN not in request.environ:
            raise refuse(404, "No CSRF token here: the csrf layer's double_submit is off (its origin checks need "
                              "no token).")
        session = request.environ.get(SESSION)
        if session is None or session.new:
            raise refuse(404, "No CSRF token yet: this browser has no session, so its writes need none; the "
                              "login's answer carries the token of the session it starts.")
        return _token_response({"csrf_token": _csrf_token()})

    @bp.post("/refresh")
    def refresh() -> Response:
        service = tokens("Token refresh")
        # An empty body is told which field is missing: a client used to sending the refresh
        # token as a bearer token learns where it goes.
        token = _token_field(_json_object(required=False), service)
        return _token_response(service.refresh(token, current_roles=state.user_roles,
                                               credentials_since=state.user_since))

    @bp.post("/logout")
    def logout() -> Response:
        # Everything that can refuse runs before anything changes: a logout answered with
        # 4xx or 503 leaves the session and every token as they were, so it can be retried.
        body = _json_object(required=False)
        service = state.service("tokens")
        refresh_token = _token_field(body, service) if body.get("refresh_token") is not None else None
        header = request.headers.get("Authorization")
        limit = service.options.max_token_bytes if service is not None else None
        if header and limit is not None and len(header) > limit:  # as the auth layer refuses it elsewhere
            raise refuse(431, f"The Authorization header is longer than {limit} bytes.")
        try:  # a header the auth layer would refuse is refused here too, not a 204 that revoked nothing
            bearer = bearer_token(header)
        except ValueError as exc:
            said = f'{_challenge(state.context.services.get("tokens"))}, {MALFORMED_ERROR}'
            raise refuse(400, str(exc), headers=[("WWW-Authenticate", said)]) from None
        session = request.environ.get(SESSION)
        # The session's login goes too: its tokens, which the client may have kept (another tab, an
        # API client given them), end with the session that was logged out.
        login = _session_login(session.get("user")) if session is not None else None
        revoked = [token for token in (bearer, refresh_token) if token]
        if revoked:
            # Verifies every token before it blocklists any; then every token of their logins goes.
            tokens("Logout", signs=False).revoke(*revoked, family=True)
        if login is not None and service is not None:
            service.revoke_family(*login)
        if session is not None:
            session.destroy()  # deleted when the response starts; a store failure there is a 503
        response = Response(status=status_line(204))  # werkzeug would say "204 NO CONTENT"
        del response.headers["Content-Type"]  # a 204 has no body, so no type
        return response

    return bp
