"""The store interface every stateful layer uses, and the one error type it raises.

Values are ``bytes``; layers encode JSON themselves.  Nothing is ever pickled.
A backend wraps its own exceptions in :class:`StoreError` at the boundary, so
a layer only has to decide what ``on_store_error: open | closed`` means for it.
"""

from __future__ import annotations

import abc
import numbers
import re
import secrets
import time
from collections.abc import Iterator, Sequence

# ?name=: a parameter whose value is masked when the name is a secret's (see _masked_param)
_SECRET_PARAM = r"([?&]([^=&\s'\"]*)=)"
_QUERY_PASSWORD = re.compile(_SECRET_PARAM + r"[^&\s'\"]*(?:&[^=&\s'\"]*(?=[&\s'\"]|\Z))*", re.IGNORECASE)
# In one URL: the value, and any "&segment" without "=" after it (an unencoded "&" in the password).
_QUERY_PASSWORD_TO_AMPERSAND = re.compile(_SECRET_PARAM + r"[^&]*(?:&[^=&]*(?=&|\Z))*", re.IGNORECASE)
# In free text: the userinfo up to the last "@" of the line before another URL (a password with / ? #
# spaces or quotes too).
_URL_PASSWORD = re.compile(r"(://[^/@:\s'\"]*:)(?:(?!://)[^\n])*@")
# In free text: a URL's user without a password, a token as often as a name (https://ghp_…@github.com,
# a Sentry DSN's key, redis://pw@host with the colon forgotten).
_URL_USER = re.compile(r"(://)[^/@:\s'\"]+@")
_ONE_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\n]*\Z")
# In free text: "password=…" after a space or ";", as libpq ("host=db password=pw") and ODBC
# ("Uid=u;Pwd=pw;") connection strings write them; the value is quoted ('…', "…", with backslash
# escapes: libpq), braced ({…}, }} for a }: ODBC), or ends at a space, ";" or a quote.
_DSN_PASSWORD = re.compile(r"((?:^|[\s;'\"])[^=&?\s'\";]*(?:passw(?:or)?d|passphrase|pwd|secret|token|credential|"
                           r"(?:api|secret|private|access)_?key)s?\s*=\s*)"
                           r"(?:'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|\{(?:[^}]|\}\})*\}?|[^\s;'\"]+)",
                           re.IGNORECASE)


#: A name (an option, a nested key, a query parameter) whose value is never shown: in config
#: errors, logs and the operator page alike (``secret_key``, ``password``, ``api_key``, ``signingKey``…).
#: (``pass``, ``auth`` and ``cookie`` as words of a name: ``smtp_pass``, ``X-Auth``, ``Cookie``, not
#: ``passage``, ``author``, ``cookie_name`` or the auth rules' ``auth: required``.)
SECRET_NAME = re.compile(r"secret|passw(?:or)?d|passphrase|passcode|pwd|token|credential|authorization|key|bearer"
                         r"|salt|hmac|signing|private"
                         r"|(?:^|[_-])(?:pass|creds?|sig|pin|otp)(?:$|[_-])|[_-]auth(?:$|[_-])|^auth[_-]"
                         r"|(?:^|[_-])cookie$", re.IGNORECASE)
#: The stack's own options that the words above catch but that hold no secret.
NOT_SECRET = frozenset({"key_prefix", "key_headers", "max_token_bytes", "allow_credentials", "check_without_cookie"})
#: A public key's file name (``keys/jwt.pem``): shown in errors, where other text in ``public_keys`` is not.
_KEY_FILE = re.compile(r"[^\s]+\.(?:pem|crt|cer|pub|der)", re.IGNORECASE)
#: What the rate limiter's ``key`` option holds: shown; any other ``key`` is a secret.
_KEY_FUNCTION = re.compile(r"client_ip|user|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def secret_name(name: str) -> bool:
    """Whether a value named ``name`` is a secret (see :data:`SECRET_NAME`, :data:`NOT_SECRET`)."""
    return name not in NOT_SECRET and SECRET_NAME.search(name) is not None


def secret_value(name: str, value: object) -> bool:
    """Whether ``value``, named ``name``, is a secret: by its name, but a rate-limit ``key`` is not."""
    if name == "key":
        parts = value if isinstance(value, list | tuple) else [value]
        return not all(isinstance(part, str) and _KEY_FUNCTION.fullmatch(part) for part in parts)
    if name == "public_keys":  # names of key files are shown; anything else may be a secret pasted by mistake
        parts = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list | tuple) \
            else [value]
        return not all(isinstance(part, str) and _KEY_FILE.fullmatch(part) for part in parts)
    return secret_name(name)


def mask_url(url: str, mask: str = "***") -> str:
    """One URL with its password (userinfo, and ``?password=``-like query values) replaced by ``mask``.

    Read as a whole, not parsed: a password with characters that should have
    been percent-encoded (``/ ? # @ &``, spaces) is masked all the same, up to
    the last ``@`` and, in the query, up to the next ``&``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = _QUERY_PASSWORD_TO_AMPERSAND.sub(lambda m: _masked_param(m, mask), rest)
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:{mask}@{after}"
    elif at and userinfo and not any(c in userinfo for c in "/?#"):  # a user alone: a token as often as a name
        rest = f"{mask}@{after}"
    return f"{scheme}://{rest}"


def _masked_param(match: re.Match[str], mask: str) -> str:
    """A query parameter (``?name=value``) with its value masked when the name is a secret's (``?sig=``,
    ``?api_key=``, ``?auth=``), else as it was."""
    name = match.group(2)
    return f"{match.group(1)}{mask}" if secret_name(name) or name.lower() == "auth" else match.group(0)


def mask_url_passwords(text: str, mask: str = "***") -> str:
    """``text`` with every URL password in it masked: one URL as :func:`mask_url` does, else each URL in it.

    In free text it masks too much rather than too little: up to the line's last ``@``.
    """
    if "://" not in text:
        return text
    if _ONE_URL.match(text):
        return mask_url(text, mask)
    if "=" in text:
        text = _QUERY_PASSWORD.sub(lambda m: _masked_param(m, mask), text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{mask}@", text)
    return _URL_USER.sub(lambda m: f"{m.group(1)}{mask}@", text) if "@" in text else text


#: Userinfo without "://" before it: "redis:/:pw@host", "searx:pw@host" (a URL written wrongly).
_BARE_USERINFO = re.compile(r":(?!//)[^\s@'\"]+@")


def mask_secrets(text: str, mask: str = "***") -> str:
    """``text`` with passwords masked wherever they may be: URLs (:func:`mask_url_passwords`), a
    ``user:password@`` without a scheme, secret query parameters (``token=``) anywhere, and the
    ``password=`` of a connection string (``host=db password=pw``, ``Uid=u;Pwd=pw``)."""
    text = mask_url_passwords(text, mask)
    if "@" in text:
        text = _BARE_USERINFO.sub(f":{mask}@", text)
    if "=" in text:
        text = _QUERY_PASSWORD.sub(lambda m: _masked_param(m, mask), text)
        text = _DSN_PASSWORD.sub(lambda m: f"{m.group(1)}{mask}", text)
    return text


def new_mark() -> bytes:
    """A value no mark or lock held before (see :meth:`Store.get_or_lock`): 16 random hex digits."""
    return secrets.token_hex(8).encode()


class StoreError(Exception):
    """A store could not answer (connection refused, timeout, circuit open…)."""


class StoreBusy(StoreError):
    """Every connection of the pool was taken (too many callers at once): the backend was not asked.

    Not an outage, and no sign of recovery either: the circuit breaker counts it neither way.
    """


class StoreWrongType(StoreError):
    """The key holds a value of another type (Redis's ``WRONGTYPE``): something else wrote it.

    Not an outage (the store answered): a layer reading its own key treats it as a
    value that does not decode, as corrupt, and writes over it.
    """


#: The longest TTL a store keeps (2^31 s, 68 years): a longer one, ``inf`` included, counts as this.
#: Redis takes expiries in milliseconds up to 2^63; memory:// and Redis must agree.
MAX_TTL = 2.0**31
#: The shortest TTL a store keeps (1 ms, Redis's resolution): a shorter one above 0 counts as this.
MIN_TTL = 0.001


def ttl_seconds(ttl: float) -> float:
    """``ttl`` as every store keeps it: at least :data:`MIN_TTL`, at most :data:`MAX_TTL`.

    ``ValueError`` for anything but a number above 0 (0, a negative one, ``-inf``,
    ``nan``, ``None``, text): Redis refuses a ``PX`` of 0 or less, and the two backends
    must agree.  Each method checks its TTLs before it writes anything.
    """
    kind = type(ttl)
    if (kind is float or kind is int) and 0 < ttl < MAX_TTL:  # the usual case, without the ABC's check
        return float(ttl) if ttl >= MIN_TTL else MIN_TTL
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real) or not ttl > 0:
        raise ValueError(f"a store TTL is a number of seconds above 0, got {ttl!r}")
    if ttl >= MAX_TTL:  # (compared before float(): an int past 1e308 has no float)
        return MAX_TTL
    return max(float(ttl), MIN_TTL)


def optional_ttl(ttl: float | None) -> float | None:
    """:func:`ttl_seconds`, or ``None`` (no expiry) for ``None``."""
    return None if ttl is None else ttl_seconds(ttl)


def _bytes(value: bytes) -> None:
    """``TypeError`` for a value, token or mark that is not bytes, as the built-in stores raise."""
    if not isinstance(value, bytes):
        raise TypeError("store values are bytes; encode JSON in the layer")


class Store(abc.ABC):
    """A small key/value interface with TTLs, counters and prefix deletion.

    A TTL is a number of seconds above 0 (:func:`ttl_seconds`: from :data:`MIN_TTL` to
    :data:`MAX_TTL`, a ``ValueError`` for any other); ``None``, where a method takes it, is
    no expiry.
    """

    #: The URL this store was made from, with any password masked.
    url: str = ""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """Return the value, or ``None`` when it is missing or expired."""

    def getex(self, key: str, ttl: float) -> bytes | None:
        """Return the value and reset its TTL in one round trip (Redis ``GETEX``)."""
        ttl_seconds(ttl)  # (a missing key too: the same ValueError as the built-in stores)
        value = self.get(key)
        if value is not None:
            self.expire(key, ttl)
        return value

    @abc.abstractmethod
    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value``; ``ttl`` in seconds (``None``: no expiry)."""

    def replace(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` exists (Redis ``SET XX``); return whether it did.

        A writer that read a value earlier uses it so that a delete in between
        (a logout) stays deleted.  This default is two calls; the built-in
        stores do it in one step.
        """
        if self.get(key) is None:
            return False
        self.set(key, value, ttl)
        return True

    def get_or_lock(self, key: str, lock_key: str, ttl: float, mark: str | None = None,
                    mark_ttl: float | None = None) -> tuple[bytes | None, bytes | None, bytes | None]:
        """Read ``key``; when it is missing, also try to take ``lock_key`` for ``ttl`` seconds.

        Returns ``(value, lock token, mark's value)``.  The token is the new random
        value (:func:`new_mark`) the lock was taken with, ``None`` when it was not
        taken: its holder gives the lock back with it (:meth:`unlock`), so that a
        holder whose lock expired meanwhile leaves the next holder's alone.  With
        ``mark``, the value that key holds as of the same read, for
        :meth:`write_unless_marked` to compare with later; a missing mark is set to
        a new random value (for ``mark_ttl`` seconds) and that is returned, so that
        a mark that goes later (expired, evicted) is a change too.  ``None`` without
        ``mark``, or when the mark could not be set.
        One step on the built-in stores (one round trip on Redis), so a cache miss
        that leads a single flight costs no extra read; this default is several calls.
        """
        ttl_seconds(ttl)  # both TTLs before anything is written (a lock with no expiry would never go)
        mark_ttl = ttl if mark_ttl is None else ttl_seconds(mark_ttl)
        seen = None
        if mark is not None:  # the mark first: a write between the calls then counts as one after the read
            seen = self.get(mark)
            if seen is None:
                fresh = new_mark()
                seen = fresh if self.add(mark, fresh, mark_ttl) else self.get(mark)
        value = self.get(key)
        if value is not None:
            return value, None, seen
        token = new_mark()
        return None, token if self.add(lock_key, token, ttl) else None, seen

    def unlock(self, lock_key: str, token: bytes, leave: tuple[bytes, float] | None = None) -> bool:
        """Give a lock back, if it still holds ``token`` (its holder's): delete it, or, with ``leave``
        (``(value, ttl)``), set it to that value for that many seconds; return whether it did.

        A lock that expired and was taken again holds another token: it is left as it
        is.  One step on the built-in stores (a Lua script on Redis, the store's lock in
        memory://); this default is two calls: a store of your own should override it.
        """
        _bytes(token)  # (text never equals what the store holds: the lock would stay taken without a word)
        if leave is not None:
            _bytes(leave[0])
            ttl_seconds(leave[1])  # a lock left with no expiry would never go
        if self.get(lock_key) != token:
            return False
        if leave is None:
            self.delete(lock_key)
        else:
            self.set(lock_key, leave[0], leave[1])
        return True

    def write(self, sets: Sequence[tuple[str, bytes, float | None]] = (), deletes: Sequence[str] = ()) -> None:
        """Several ``set`` and ``delete`` calls applied together, in one round trip.

        The built-in stores apply them as one step (a ``MULTI``/``EXEC`` transaction
        on Redis, the store's lock in memory://): no reader sees some of them without
        the others.  This default is one call each (every set checked before the first goes).
        """
        for _, value, ttl in sets:
            _bytes(value)
            optional_ttl(ttl)
        for key, value, ttl in sets:
            self.set(key, value, ttl)
        for key in deletes:
            self.delete(key)

    def write_unless_marked(self, mark: str, seen: bytes | None, sets: Sequence[tuple[str, bytes, float]],
                            deletes: Sequence[str] = (), unlock: tuple[str, bytes] | None = None) -> bool:
        """:meth:`write`, leaving ``sets`` out unless ``mark`` still holds ``seen``; return whether they went.

        With ``unlock`` (``(lock key, token)``), the lock goes too, in the same step, if it
        still holds the token (as :meth:`unlock` gives it back), whether the sets go or not.

        ``seen`` is what :meth:`get_or_lock` found at ``mark``; ``None`` (it found
        nothing) never matches: a mark that was not there cannot tell a write from an
        eviction.  A writer stores what it made of a read only if nobody marked the
        data as changed since (the cache's fills and writes).  When the sets go, the
        mark lives at least as long as the longest of them (what is stored under a
        mark is checked against it, and a mark gone would make it stale).  One step
        on the built-in stores (a Lua script on Redis, the store's lock in memory://),
        which only ever lengthen the mark's life; this default is several calls, and
        sets its life to the longest of this write's (it cannot read what is left):
        a store of your own should override it.
        """
        for _, value, ttl in sets:  # before anything is written; None too: an entry under a mark always ends
            _bytes(value)
            ttl_seconds(ttl)
        for given in (seen, unlock and unlock[1]):
            if given is not None:
                _bytes(given)
        if seen is None or self.get(mark) != seen:
            sets = ()
        self.write(sets, deletes)
        if sets and self.get(mark) == seen:  # (its TTL only: setting the value could undo a write's new one)
            self.expire(mark, max(ttl for _, _, ttl in sets))
        if unlock is not None:
            self.unlock(*unlock)
        return bool(sets)

    def add_then_write(self, key: str, value: bytes, ttl: float | None,
                       sets: Sequence[tuple[str, bytes, float | None]]) -> bool:
        """:meth:`add`, and when it succeeds the ``sets`` too, as one step; return whether it did.

        A TTL of ``None`` (the key's or a set's) is no expiry, as with :meth:`add` and :meth:`write`.

        No reader sees the key without the sets, and a failure leaves neither (the
        refresh token service marks a token used and names its successor the
        family's newest at once).  One step on the built-in stores (a Lua script on
        Redis, the store's lock in memory://); this default is several calls: a
        store of your own should override it.
        """
        if not self.add(key, value, ttl):
            return False
        try:
            self.write(sets)
        except Exception:
            self.delete(key)
            raise
        return True

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""

    @abc.abstractmethod
    def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
        """Add ``amount`` to an integer counter and return the new value.

        ``ttl`` is set when the counter is created and left alone afterwards.
        """

    @abc.abstractmethod
    def expire(self, key: str, ttl: float) -> bool:
        """Reset the time to live of an existing key; return whether it existed."""

    def ttl(self, key: str) -> float | None:
        """Seconds ``key`` has left before it expires (Redis ``PTTL``); ``None`` when it is missing or never expires.

        Above 0 for a key that is there (a TTL the store takes back: less than a millisecond left is 1 ms on Redis).

        The built-in stores answer it; this default raises :class:`StoreError` (a store
        of your own should override it): callers that read it fall back as they do when
        the store is down (the login lockout's ``Retry-After`` is then the whole window).
        """
        raise StoreError(f"{type(self).__name__} cannot tell how long a key has left")

    @abc.abstractmethod
    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Set ``key`` only if it does not exist (a lock primitive); return success."""

    @abc.abstractmethod
    def scan(self, prefix: str) -> Iterator[str]:
        """Yield the keys that start with ``prefix``."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; return how many."""
        return sum(1 for key in list(self.scan(prefix)) if self.delete(key))

    @abc.abstractmethod
    def ping(self) -> bool:
        """Return ``True`` when the backend answers; never raises."""

    def health(self) -> dict[str, object]:
        """Readiness facts for ``/readyz``.

        Every backend answers with the same keys: ``ok``, ``backend``, ``url``
        (password masked), ``breaker`` (its state, or ``None`` without one) and
        ``latency_ms`` (how long the ping took).
        """
        started = time.perf_counter()
        ok = self.ping()
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return {"ok": ok, "backend": type(self).__name__, "url": self.url, "breaker": None,
                "latency_ms": latency_ms}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (called at shutdown and on reload)."""
