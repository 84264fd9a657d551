"""Server-side sessions: JSON in a store, a random id in a signed ``__Host-`` cookie.

The layer puts a lazy :class:`Session` (a ``MutableMapping``) in
``environ["wsgistack.session"]``.  Nothing is read from the store until the
session is first used, and a request without the cookie never touches the
store.  A used session costs one ``GETEX`` (read and idle-TTL refresh in one
round trip) and, when it changed, one ``SET`` made just before the response
headers go out, so a new session's ``Set-Cookie`` can still be added.

The id is 256 random bits; the cookie carries it signed with ``secret_key``
(``itsdangerous``), so a forged, tampered, unknown or expired id is never
adopted: the request gets an empty session with a fresh id instead (session
fixation).  Responses that used the session get ``Vary: Cookie``, and
``Cache-Control: private`` when they depend on a stored session, set a cookie or wrote to the session.

Do not use it for stateless APIs authenticated by bearer tokens only (the
``auth`` layer alone is enough), or to store large or non-JSON values.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from itsdangerous import BadSignature, Signer
from pydantic import Field, SecretStr, field_validator, model_validator
from werkzeug.exceptions import HTTPException
from werkzeug.http import dump_cookie

from stores.base import StoreError, StoreWrongType

from .base import (
    COOKIES,
    SESSION,
    SESSION_USER_HINT,
    Context,
    LayerOptions,
    add_vary,
    cookies,
    decorate_error,
    note,
    read_ahead,
    refuse,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["COOKIE_NAME", "Session", "SessionMiddleware", "check_cookie_name"]

KEY_PREFIX = "session:"
_NO_ENVIRON: dict[str, Any] = {}  # what a loaded session keeps of the request's environ: nothing
_COOKIE_KEYS = ("HTTP_COOKIE", COOKIES)  # what an unused session keeps of it once the response started
RETRY_AFTER = "5"
VERIFIED_CACHE_SIZE = 4096
#: A session cookie's value: an id (``secrets.token_urlsafe(32)``: 43 characters, at most 128 taken), ".",
#: and its HMAC-SHA256 in unpadded URL-safe base64 (43 characters).
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{1,128}\.[A-Za-z0-9_-]{43}")
#: A cookie's Domain: a host name (ASCII labels of letters, digits and '-'), a leading '.' allowed.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"\.?{_LABEL}(?:\.{_LABEL})*")
#: A cookie's name: an RFC 9110 token (RFC 6265 4.1.1).  Not a control character either: a line break makes the
#: server refuse the Set-Cookie header, and a browser drops a cookie whose name holds any other (RFC 6265bis 5.6).
COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_clock = time.time  # wall clock: created_at is shared by every process (tests may replace it)


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def check_cookie_name(name: str) -> str:
    """``name`` when browsers can store and send a cookie of that name, else a ValueError that says why."""
    if COOKIE_NAME.fullmatch(name) is None:
        raise ValueError(f"cookie_name {name!r} is not a valid cookie name: a token of ASCII letters, digits "
                         "and !#$%&'*+-.^_`|~ (RFC 6265)")
    return name


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


#: Reads a stored session as JSON is (RFC 8259 6): Python's own parser also takes NaN and Infinity, which a save
#: refuses, so a session holding one would fail every write to it.
_STORED = json.JSONDecoder(parse_constant=_not_json)


def _finite(value: Any) -> float | None:
    """A stored number as a finite float; None for anything else (text, true, 1e400, NaN, an int no float holds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class Session(MutableMapping[str, Any]):
    """The request's session: a lazy mapping of JSON values, loaded on first use.

    ``id`` (created on demand for a new session), ``new`` (not from the store),
    ``modified`` (set by writes; set it yourself after changing a nested value),
    ``accessed`` (the session was used: the response varies by cookie),
    ``rotate()`` (new id, same data, old key deleted: call it on privilege
    change; ``rotate(carry=False)``, a new empty session, at login) and
    ``destroy()`` (logout: key deleted, cookie expired).

        session = environ["wsgistack.session"]
        session["cart"] = [*session.get("cart", []), item_id]
    """

    __slots__ = ("_carried", "_created", "_data", "_environ", "_expire_cookie", "_id", "_issue", "_layer",
                 "_new", "_persist", "_rotated_from", "_sealed", "_stale", "_stored_id", "accessed", "modified")
    permanent = True  # for Flask's SessionMixin duck typing: lifetime is the layer's timeouts

    def __init__(self, layer: SessionMiddleware, environ: WSGIEnvironment) -> None:
        self._layer = layer
        self._environ = environ
        self._data: dict[str, Any] | None = None
        self._id: str | None = None
        self._stored_id: str | None = None
        self._created = 0.0
        self._new = True
        self._issue = True
        self._persist = True
        self._expire_cookie = False
        self._carried = False  # the request carried this layer's cookie (signed or not): it is ours to expire
        self._sealed = False  # the response has started: later changes cannot be saved
        self._stale: list[str] = []
        self._rotated_from: str | None = None  # the stored id whose data rotate() carried to a new id
        self.accessed = False
        self.modified = False

    def _load(self) -> dict[str, Any]:
        data = self._data
        if data is None:
            self.accessed = True
            self._data = data = {}
            self._created = _clock()
            environ = self._environ
            cookie_id = self._layer._cookie_id(environ)
            self._carried = self._layer.cookie_name in cookies(environ)
            self._environ = _NO_ENVIRON  # not needed any more: no Session <-> environ cycle to collect
            if cookie_id is not None:
                # Until the store answers, the cookie's session may be stored: if the read fails,
                # rotate() and destroy() must still delete it.
                self._stored_id = cookie_id
                loaded = self._layer._read(self, cookie_id, environ)
                if loaded is not None:
                    data.update(loaded)
                    self._id = cookie_id
                    self._new = self._issue = False
                elif self._persist:  # the store answered: no such session (or it was just deleted)
                    self._stored_id = None
        return data

    def get(self, key: str, default: Any = None) -> Any:
        """``session.get(key, default)`` without the KeyError round of ``Mapping.get``."""
        return self._load().get(key, default)

    @property
    def id(self) -> str:
        """The session id (a secret: never log it); a new session gets a fresh one."""
        self._load()
        if self._id is None:
            self._id = secrets.token_urlsafe(32)
        return self._id

    @property
    def new(self) -> bool:
        """True when the session did not come from the store."""
        self._load()
        return self._new

    @property
    def sets_cookie(self) -> bool:
        """Whether saving this session will set or expire its cookie (written, rotated or destroyed).

        A response that does must never be stored in a shared cache: the cookie
        belongs to one client, and so does what the app put in the body next to it
        (a CSRF token, the data it just wrote).
        """
        return self.modified or self._expire_cookie or bool(self._stale)

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session keys must be strings, not {type(key).__name__}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(
                f"session values must be JSON-serialisable: session[{key!r}] got a "
                f"{type(value).__name__} ({exc})"
            ) from None
        self._load()[key] = value
        self._changed()

    def __delitem__(self, key: str) -> None:
        del self._load()[key]
        self._changed()

    def _changed(self) -> None:
        self.modified = True
        if self._sealed:
            self._sealed = False  # warn once
            self._layer.context.logger.warning(
                "session layer: the session was changed after the response started, so the "
                "change is not saved; change the session before calling start_response")

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        return key in self._load()

    def rotate(self, carry: bool = True) -> None:
        """Give the session a new id; the old key is deleted on save.

        ``carry`` keeps its data (a privilege change): if another request ended the
        session meanwhile (a logout), the save is dropped rather than carry it on.
        ``carry=False`` starts empty, without reading the old data (a login: what
        it writes stands on a password just checked, whatever happened to the old
        session; nothing of an earlier user's session reaches the new one).
        """
        if not carry:
            self._start_over()
        else:
            self._load()
            stored = self._stored_id
            if stored is not None:
                if not self._new and self._rotated_from is None:
                    self._rotated_from = stored
                self._stale.append(stored)
                self._stored_id = None
        self._id = secrets.token_urlsafe(32)
        self._created = _clock()
        self._issue = True
        self._changed()

    def destroy(self) -> None:
        """End the session: delete its key and expire the cookie (logout).

        A request without this layer's cookie has no session to end, and its response
        expires no cookie: else a page on another site, whose cross-site POST a
        ``SameSite=Lax`` cookie stays off, could still sign the browser out (logout CSRF).
        A cookie that was sent is expired even when its signature no longer verifies.
        """
        self._changed()  # only warns when too late; destroy() leaves modified false
        self._start_over()
        self._id, self._created, self._issue = None, _clock(), True
        self._expire_cookie = self._carried
        self.modified = False

    def _start_over(self) -> None:
        """Retire the stored id, read or not (its key is deleted on save), and be a new, empty session
        (``session.created`` counts it whatever read the old one)."""
        if self._data is None:  # not read: the cookie's id is retired all the same
            stored = self._layer._cookie_id(self._environ)
            self._carried = self._layer.cookie_name in cookies(self._environ)
        else:
            stored = self._stored_id
        self._environ = _NO_ENVIRON
        if stored is not None:
            self._stale.append(stored)
        self.accessed = True
        self._data, self._stored_id, self._new = {}, None, True

    def __repr__(self) -> str:
        state = "unloaded" if self._data is None else f"keys={sorted(self._data)}"
        return f"<Session {state} new={self._new} modified={self.modified}>"


class SessionMiddleware:
    """Put a server-side :class:`Session` in ``environ["wsgistack.session"]``.

    Options: ``store`` (default ``"shared"``); ``secret_key`` (required, at least
    32 characters) and ``secret_key_fallbacks`` (older keys still accepted while
    rotating); ``cookie_name`` (``"__Host-session"``), ``cookie_secure`` (true;
    false only on a loopback-only server), ``cookie_httponly`` (true),
    ``cookie_samesite`` (``"Lax"``, ``"Strict"`` or ``"None"``), ``cookie_path``
    (``"/"``), ``cookie_domain`` (none); ``idle_timeout`` (1800 s, refreshed on
    every use) and ``absolute_timeout`` (12 h since creation or last rotate());
    ``on_store_error``: ``"closed"`` answers 503 with ``Retry-After``, ``"open"``
    goes on with an empty session that is not saved.  Either way, when the key of
    a session that ``rotate()`` or ``destroy()`` retired cannot be deleted, the
    answer is 503: a logout or login that cannot be recorded is not reported as done.

        opts = SessionMiddleware.Options(secret_key=os.environ["SECRET_KEY"])
        app = SessionMiddleware(app, opts, Context(stores={"shared": MemoryStore()}))
    """

    class Options(LayerOptions):
        store: str = "shared"
        secret_key: SecretStr = SecretStr("")
        secret_key_fallbacks: tuple[SecretStr, ...] = ()
        cookie_name: str = "__Host-session"
        cookie_secure: bool = True
        cookie_httponly: bool = True
        cookie_samesite: Literal["Lax", "Strict", "None"] = "Lax"
        cookie_path: str = "/"
        cookie_domain: str | None = None
        idle_timeout: float = Field(1800.0, gt=0)
        absolute_timeout: float = Field(12 * 3600.0, gt=0)
        on_store_error: Literal["open", "closed"] = "closed"

        @field_validator("cookie_domain")
        @classmethod
        def _domain(cls, value: str | None) -> str | None:
            """A host name or none: "" (``${COOKIE_DOMAIN:-}``) is none; ";" or "," would add attributes."""
            if value is None or not value.strip():
                return None
            if _DOMAIN.fullmatch(value) is None:
                raise ValueError(f"cookie_domain {value!r} is not a host name: letters, digits, '-' and "
                                 "'.' between labels, as example.org or .example.org (an international "
                                 "name in its xn-- form)")
            return value

        @model_validator(mode="after")
        def _check(self) -> SessionMiddleware.Options:
            hint = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            key = self.secret_key.get_secret_value()
            if not key:
                raise ValueError(f"secret_key is required for the session layer; {hint}")
            for name, value in [("secret_key", key)] + [
                (f"secret_key_fallbacks[{i}]", k.get_secret_value())
                for i, k in enumerate(self.secret_key_fallbacks)
            ]:
                if len(value) < 32:
                    raise ValueError(f"{name} must be at least 32 characters long "
                                     f"(it has {len(value)}); {hint}")
            name = check_cookie_name(self.cookie_name)
            if not self.cookie_path.startswith("/"):
                raise ValueError(f"cookie_path must start with '/' (got {self.cookie_path!r})")
            # Browsers match the prefixes without regard to case (RFC 6265bis 4.1.3): so do these checks.
            # (__Host-Http- starts with __Host-: it must be host-only at Path=/ too.)
            prefix = name[:9].lower()
            if prefix.startswith("__host-"):
                if not self.cookie_secure:
                    raise ValueError(f"cookie_name {name!r} needs cookie_secure: true (browsers "
                                     "drop __Host- cookies without Secure); a loopback-only "
                                     "development server must also pick another cookie_name")
                if self.cookie_domain is not None:
                    raise ValueError(f"cookie_name {name!r} may not be combined with "
                                     "cookie_domain (browsers drop __Host- cookies with a Domain)")
                if self.cookie_path != "/":
                    raise ValueError(f"cookie_name {name!r} needs cookie_path '/' "
                                     f"(got {self.cookie_path!r})")
            if prefix == "__secure-" and not self.cookie_secure:
                raise ValueError(f"cookie_name {name!r} needs cookie_secure: true")
            # The prefixes that say the cookie was set by a Set-Cookie header, never by a page's script.
            http = name[:12].lower()
            if http.startswith("__http-") or http == "__host-http-":
                if not self.cookie_secure:
                    raise ValueError(f"cookie_name {name!r} needs cookie_secure: true")
                if not self.cookie_httponly:
                    raise ValueError(f"cookie_name {name!r} needs cookie_httponly: true (browsers drop "
                                     "__Http- and __Host-Http- cookies without HttpOnly)")
            if self.cookie_samesite == "None" and not self.cookie_secure:
                raise ValueError("cookie_samesite 'None' needs cookie_secure: true")
            if self.idle_timeout > self.absolute_timeout:
                raise ValueError(f"idle_timeout ({self.idle_timeout:g} s) may not exceed "
                                 f"absolute_timeout ({self.absolute_timeout:g} s)")
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self._last_log = 0.0
        if not options.cookie_secure and (not context.loopback_only or context.proxied):
            raise ValueError("cookie_secure: false is only allowed when the server listens only "
                             "on loopback and trusts no proxy; on any other address, or behind a "
                             "proxy that forwards other clients' requests, the session cookie would "
                             "travel over plain HTTP")
        self.app = app
        self.options = options
        self.context = context
        self.store = context.store(options.store)
        context.offer_read(self.store, "getex", self._ahead)  # a rate limiter outside may read it for us
        self.closed = options.on_store_error == "closed"
        keys = [k.get_secret_value() for k in (*options.secret_key_fallbacks, options.secret_key)]
        self.signer = Signer(keys, salt="wsgistack.session", digest_method=hashlib.sha256)
        self.cookie_name = options.cookie_name
        # Cookie values whose signature already checked out (verification costs ~9 µs).
        self._verified: dict[str, str] = {}
        # The user (subject, roles) each session held when last read or saved here (for preview_environ).
        self._users: dict[str, tuple[str, frozenset[str]]] = {}
        self._attrs: dict[str, Any] = {
            "path": options.cookie_path, "domain": options.cookie_domain,
            "secure": options.cookie_secure, "httponly": options.cookie_httponly,
            "samesite": options.cookie_samesite,
        }
        self._expired_cookie = dump_cookie(self.cookie_name, "", max_age=0, expires=0,
                                           **self._attrs)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        session = Session(self, environ)
        environ[SESSION] = session
        added: list[tuple[str, str]] | None = None

        def session_start_response(status: str, headers: list[tuple[str, str]],
                                   exc_info: Any = None) -> Any:
            nonlocal added
            session._sealed = True
            if session._data is None:  # never used: keep only the cookie, to break the environ cycle
                session._environ = {k: environ[k] for k in _COOKIE_KEYS if k in environ}
            if not session.accessed:
                # Unused so far, but a streamed body may still read it, after these headers: a
                # response to a request that carries the cookie varies on it all the same.
                if self.cookie_name in environ.get("HTTP_COOKIE", "") and self.cookie_name in cookies(environ):
                    headers = list(headers)
                    add_vary(headers, "Cookie")
            else:
                headers = list(headers)
                if added is None:  # save once, even if start_response is called again
                    try:
                        added = self._save(session)
                    except HTTPException as exc:  # (a generator app's body calls this after __call__ returned)
                        _shape_refusal(exc, session)
                        raise
                headers.extend(added)
                add_vary(headers, "Cookie")
                # Personal data, a cookie set or expired, or a body made from what this request wrote
                # (also when on_store_error: open could not save it, and no cookie went out).
                if added or not session._new or session.sets_cookie:
                    _make_private(headers)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, session_start_response)
        except HTTPException as exc:  # a refusal from inside, which the session may have shaped too
            if session.accessed and added is None:  # (its changes are not saved: the request failed)
                _shape_refusal(exc, session)
            raise

    def _cookie_id(self, environ: WSGIEnvironment, quiet: bool = False) -> str | None:
        raw = cookies(environ).get(self.cookie_name)
        if not raw:
            return None
        sid = self._verified.get(raw)
        if sid is None:
            try:
                # Only a value shaped as this layer signs them: the signature's base64 decoder skips
                # characters outside its alphabet, so one cookie could be spelled in endless, endlessly
                # long ways, each verified and remembered (with Redis, read ahead before validation).
                if _COOKIE_VALUE.fullmatch(raw) is None:
                    raise BadSignature("not a signed session id")
                sid = self.signer.unsign(raw).decode("ascii")
            except (BadSignature, UnicodeError):
                if not quiet:
                    note(environ, "session", "cookie signature is invalid; starting a new session")
                return None
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[raw] = sid
        return sid

    def _ahead(self, environ: WSGIEnvironment) -> tuple[str, float | None] | None:
        """What :meth:`_read` will read for this request, for the rate limiter's round trip (see ReadAhead)."""
        sid = self._cookie_id(environ, quiet=True)  # the layer notes a bad cookie when it reads it
        return None if sid is None else (KEY_PREFIX + sid, self.options.idle_timeout)

    def preview_environ(self, environ: WSGIEnvironment) -> dict[str, Any]:
        """The user this cookie's session held when last seen here, as a hint (see ``ReadAhead``).

        The auth layer's preview turns it into the identity the cache keys on;
        a hint gone stale (the user logged out elsewhere) costs a wasted read.
        """
        sid = self._cookie_id(environ, quiet=True) if self._users else None
        user = self._users.get(sid) if sid is not None else None
        return {SESSION_USER_HINT: user} if user is not None else {}

    def _remember_user(self, sid: str, data: dict[str, Any]) -> None:
        user = data.get("user")
        subject = user.get("sub") if isinstance(user, dict) else None
        if isinstance(subject, str):
            if len(self._users) >= VERIFIED_CACHE_SIZE:
                self._users.clear()
            roles = user.get("roles") if isinstance(user, dict) else None
            held = frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset()
            self._users[sid] = (subject, held)
        else:
            self._users.pop(sid, None)

    def _read(self, session: Session, sid: str, environ: WSGIEnvironment | None = None) -> dict[str, Any] | None:
        """Load ``sid`` (refreshing its idle TTL); None when missing, expired or corrupt."""
        key = KEY_PREFIX + sid
        try:
            found, raw = read_ahead(environ, self.store, "getex", key) if environ else (False, None)
            try:
                if not found:
                    raw = self.store.getex(key, self.options.idle_timeout)
            except StoreWrongType:
                raw = b""  # a value of another type at the key (something else wrote it): corrupt
            if raw is None:
                self._users.pop(sid, None)  # gone (expired, or ended by another process): no more hints
                return None
            try:
                doc = _STORED.decode(raw.decode())  # (UnicodeDecodeError is a ValueError)
            except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
                doc, problem = None, "it is not valid JSON"
            else:
                problem = "it does not have the shape {created_at: number, data: object}"
            if isinstance(doc, dict):
                created, data = _finite(doc.get("created_at")), doc.get("data")
                if created is not None and isinstance(data, dict):
                    if _clock() - created < self.options.absolute_timeout:
                        session._created = created
                        self._remember_user(sid, data)
                        return data
                    problem = ""  # absolutely expired: not a fault
            if problem:
                self.context.logger.warning(
                    "session layer: the stored session %s was ignored because %s",
                    _fingerprint(sid), problem)
            self._users.pop(sid, None)
            self.store.delete(key)  # absolutely expired or corrupt: never adopt it again
            return None
        except StoreError as exc:
            self._store_failed(session, exc, "loaded")
            return None

    def _save(self, session: Session) -> list[tuple[str, str]]:
        """Write what changed; return the headers to add (``Set-Cookie``).

        Ids that ``rotate()`` or ``destroy()`` retired are deleted first, and a
        failed delete is a 503 in both ``on_store_error`` modes: the old id would
        stay valid (a stolen cookie would outlive the logout, a planted one the
        login), so the request must not be reported as done.  The new session is
        not saved and no cookie is set or expired, so the client can retry.
        """
        headers: list[tuple[str, str]] = []
        ended = False  # the session rotate() carried was ended while this request ran
        # Serialised before anything is deleted: a value JSON cannot hold fails the request with the
        # session as it was (a rotate's old id not deleted yet), so a retry finds it.
        payload = self._payload(session) if session.modified and session._data is not None and session._persist \
            else None
        if session._stale:
            try:
                for sid in session._stale:
                    self._users.pop(sid, None)
                    if not self.store.delete(KEY_PREFIX + sid) and sid == session._rotated_from:
                        ended = True
            except StoreError as exc:
                self._store_failed(session, exc, "ended" if session._expire_cookie else "rotated", always=True)
        if session._expire_cookie:
            headers.append(("Set-Cookie", self._expired_cookie))
        if ended and not session._expire_cookie:
            # A logout (or the timeout) ended it meanwhile: saving its data under the new id would log
            # the cookie back in.  Dropped, no cookie set, as a write-back of an ended session is.
            return headers
        if not session._persist:
            return headers
        try:
            if payload is not None:
                assert session._data is not None
                sid = session.id
                remaining = session._created + self.options.absolute_timeout - _clock()
                ttl = max(min(self.options.idle_timeout, remaining), 0.001)
                if sid != session._stored_id:
                    self.store.set(KEY_PREFIX + sid, payload, ttl)
                elif not self.store.replace(KEY_PREFIX + sid, payload, ttl):
                    # Ended while this request ran (a logout, a login's rotate, the timeout): writing
                    # it back would bring the old cookie back to life.  Its changes are dropped, and
                    # no cookie is expired: the browser may hold a newer one by now (the login's).
                    self._users.pop(sid, None)
                    return headers
                self._remember_user(sid, session._data)
                if session._issue:
                    headers[:] = [("Set-Cookie", dump_cookie(
                        self.cookie_name, self.signer.sign(sid).decode("ascii"), **self._attrs))]
                    if session._new:
                        self.context.emit("session.created")
        except StoreError as exc:
            self._store_failed(session, exc, "saved")
            headers = [h for h in headers if h[1] == self._expired_cookie]
        return headers

    @staticmethod
    def _payload(session: Session) -> bytes:
        """The stored form of ``session``; TypeError naming the key of a value JSON cannot hold."""
        data = session._data or {}
        try:
            return json.dumps({"created_at": session._created, "data": data},
                              separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            # A value changed in place (session["cart"].append(...)) is only seen now: the same
            # error an assignment gets, named; the response fails (500), nothing is saved.
            bad = next((key for key, value in data.items() if not _serialisable(value)), "?")
            raise TypeError(f"session values must be JSON-serialisable: session[{bad!r}] holds a value "
                            f"changed in place that is not ({exc})") from None

    def _store_failed(self, session: Session, exc: StoreError, action: str, *, always: bool = False) -> None:
        """Record a store failure; refuse with 503 when ``closed`` (or ``always``), else carry on unsaved."""
        session._persist = False
        self.context.emit("store.error", store=self.options.store, layer="session")
        now = time.monotonic()
        if now - self._last_log > 10:  # one line per 10 s while the store is down, as ratelimit and auth do
            self._last_log = now
            self.context.logger.warning("session layer: the session could not be %s: %s", action, exc)
        if self.closed or always:
            raise refuse(503, f"the session could not be {action} because the session store "
                              "is unavailable; try again shortly",
                         headers=[("Retry-After", RETRY_AFTER)]) from exc


def _shape_refusal(exc: HTTPException, session: Session) -> None:
    """A refusal of a request that used the session varies on the cookie, and is private for a stored session."""
    decorate_error(exc, ())
    extra = getattr(exc, "wsgistack_headers", None)
    if extra is not None:
        add_vary(extra, "Cookie")
        if not session._new:
            _make_private(extra)


def _make_private(headers: list[tuple[str, str]]) -> None:
    """Mark the response private, keeping a stricter ``no-store`` and dropping ``public`` and ``s-maxage``.

    Every Cache-Control field counts (an app may send several: they are one list, RFC 9110 §5.3),
    and they become one.  ``private="Set-Cookie"`` keeps only the fields it names from shared
    caches: it does not make the response private.  The fields a CDN obeys instead of
    Cache-Control (``CDN-Cache-Control`` of RFC 9213, a vendor's ``Cloudflare-CDN-Cache-Control``
    or ``Akamai-Cache-Control``, ``Surrogate-Control``, ``Edge-Control``) are dropped, or one of them
    would have the CDN store the response whatever Cache-Control says.
    """
    found: list[int] = []
    targeted: list[int] = []
    for i, (name, _) in enumerate(headers):  # one pass, and a name lowered only when it ends in "l"
        if name[-1:] in ("l", "L"):          # (every field here ends in "-Control"; most names do not)
            lower = name.lower()
            if lower == "cache-control":
                found.append(i)
            elif lower.endswith("-cache-control") or lower in _TARGETED:
                targeted.append(i)
    if targeted:
        headers[:] = [h for i, h in enumerate(headers) if i not in targeted]
        found = [i for i, (name, _) in enumerate(headers) if name.lower() == "cache-control"]
    if not found:
        headers.append(("Cache-Control", "private"))
        return
    parts = [p.strip() for i in found for p in headers[i][1].split(",") if p.strip()]
    names = [p.split("=", 1)[0].strip().lower() for p in parts]
    if "no-store" in names:
        return
    kept = [p for p, n in zip(parts, names, strict=True) if n not in ("public", "s-maxage")]
    if "private" not in [p.lower() for p in kept]:
        kept.insert(0, "private")
    headers[found[0]] = (headers[found[0]][0], ", ".join(kept))
    for i in reversed(found[1:]):
        del headers[i]


_TARGETED = frozenset({"surrogate-control", "edge-control"})


def _fingerprint(sid: str) -> str:
    """A short, non-reversible name for a session id, safe to put in logs."""
    return "#" + hashlib.sha256(sid.encode()).hexdigest()[:12]
