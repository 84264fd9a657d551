"""Bearer-token (JWT) authentication with per-path rules, and the token service behind it.

The layer verifies ``Authorization: Bearer`` tokens with PyJWT against keys
pinned to one algorithm each (an HMAC ``secret``, or RSA/EC ``public_keys`` /
``jwks_file``; never both), checks the token's ``jti`` against a blocklist in
the store (one read), and puts a :class:`~middleware.base.Identity` in
``environ["wsgistack.identity"]``.  Without a bearer token it accepts the
session's ``user`` (the session layer sits outside this one).  Rules per path
say whether authentication is ``required``, ``optional`` or ``none`` and which
roles may pass.  :class:`TokenService` issues, rotates, revokes and verifies the
tokens; the layer publishes it as ``context.services["tokens"]``.

When not to use it: when a gateway in front of the server already verifies
tokens and forwards identities (trust its header with a small layer of your
own instead), or for browser-only apps that never send bearer tokens (the
session layer alone serves them).  Keys are read once at build time: rotate
them by reloading the stack.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import secrets
import threading
import time
from base64 import urlsafe_b64encode
from collections import OrderedDict
from collections.abc import Iterable
from functools import partial
from hashlib import sha256
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from werkzeug.datastructures import Authorization
from werkzeug.exceptions import HTTPException

from middleware.base import (
    IDENTITY,
    SESSION,
    SESSION_USER_HINT,
    TRACE,
    Context,
    Identity,
    LayerOptions,
    Methods,
    RulePaths,
    decoded_path,
    escape_control,
    header_text,
    note,
    read_ahead,
    refuse,
    rewrites_inside,
    routed_path,
    with_head,
)
from stores.base import Store, StoreError
from stores.breaker import CLOSED

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ROLES_FRESH", "USER_ROLES", "USER_SINCE", "AuthMiddleware", "TokenService"]

_NO_ROLES: frozenset[str] = frozenset()
_RANK = {"none": 0, "optional": 1, "required": 2}
#: RFC 6750 §2.1: the credentials of a Bearer Authorization header (anything else is invalid_request, 400).
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: The refusal of an ``Authorization: Bearer`` header whose token is not one b64token, and its challenge's error.
MALFORMED_BEARER = ("Bad Request: the Authorization header must be 'Bearer <token>', the token one "
                    "b64token (RFC 6750 §2.1).")
MALFORMED_ERROR = 'error="invalid_request", error_description="the Authorization header is malformed"'


def _preflight(environ: WSGIEnvironment, method: str) -> bool:
    """Whether the request is a CORS preflight (as the cors layer tells one): browsers send those without
    credentials, so no rule may refuse them.  Any other ``OPTIONS`` is a request like the rest."""
    return method == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ and "HTTP_ORIGIN" in environ


def _authorization(header: str | None) -> Authorization | None:
    """werkzeug's reading of an ``Authorization`` header; None for none, or one it cannot read.

    (``Basic`` with a byte outside ASCII makes its base64 decoding raise a plain ValueError,
    which werkzeug lets through: credentials that are no bearer token, whatever they are.)
    """
    if not header:
        return None
    try:
        return Authorization.from_header(header)
    except ValueError:
        return None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None for no header or another scheme.

    ``ValueError`` when the scheme is Bearer but what follows is not one b64token
    (``Bearer``, ``Bearer a b``, ``Bearer token="…"``): the auth layer refuses those
    with 400, and so must everything else that reads the header (the core's logout).
    """
    parsed = _authorization(header)
    if parsed is None or parsed.type != "bearer":
        return None
    token = parsed.token or ""
    if not _B64TOKEN.fullmatch(token):
        raise ValueError(MALFORMED_BEARER)
    return token
#: ``context.services`` name of ``roles(subject) -> roles | None`` (None: no such user), which the
#: app publishes so that a session identity carries the user's roles of now (the Flask core does).
USER_ROLES = "user_roles"
#: ``context.services`` name of ``since(subject) -> timestamp | None``: when the user's credentials
#: last changed (the account was made, or its password reset). A refresh token or a session login
#: from before then is void: a password reset, or a name given to someone new, ends them all.
USER_SINCE = "user_since"
#: Seconds a looked-up user's roles are reused (per process) before the lookup runs again.
ROLES_FRESH = 1.0

Level = Literal["required", "optional", "none"]
_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}  # minimum secret bytes (RFC 7518 §3.2)
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_KNOWN = ", ".join([*_HMAC, *sorted(_ASYMMETRIC)])  # the algorithms, as refusals list them
#: What PyJWT knows and the layer never accepts (a name PyJWT does not know gets PyJWT's own refusal).
_PYJWT_ONLY = frozenset(jwt.algorithms.get_default_algorithms()) - _ASYMMETRIC - set(_HMAC)
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_STORE_RETRY_AFTER = "5"
_SWEPT = b"swept"  # family-revoked:<fam> once the family's access tokens are blocklisted
#: Why the users database voids a credential (the reason its refusal's event names), as notes say it.
_VOID = {"unknown_subject": "no longer exists", "credentials_changed": "was issued before the credentials changed"}
#: 9999-12-31T23:59:59Z: a NumericDate past it (or as far before 1970) is no date any clock reaches, and one
#: no float holds would make the records of the token's revocation fail to compute.
_LAST_DATE = 253402300799
_VERIFIED_MAX = 4096  # access tokens remembered as verified, per process
#: environ: ``(the HTTP_AUTHORIZATION parsed, its bearer token)``, parsed once per header (see _bearer)
_BEARER = "wsgistack.auth.bearer"
_JWT_ERRORS: list[tuple[type[Exception], str, str]] = [
    (jwt.ExpiredSignatureError, "expired", "the token has expired"),
    (jwt.InvalidSignatureError, "invalid_signature", "the token's signature is invalid"),
    (jwt.InvalidAlgorithmError, "invalid_algorithm", "the token's algorithm is not accepted"),
    (jwt.InvalidIssuerError, "invalid_issuer", "the token's issuer is not accepted"),
    (jwt.InvalidAudienceError, "invalid_audience", "the token's audience is not accepted"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "the token is not valid yet"),
    (jwt.DecodeError, "malformed", "the token is malformed"),
    (jwt.InvalidTokenError, "invalid", "the token is invalid"),
]


class _Invalid(Exception):
    """A token was refused: ``reason`` for events, ``description`` for the client."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason, self.description = reason, description


class _LookupFailed(Exception):
    """The users database (``USER_ROLES``, ``USER_SINCE``) could not answer; the failure is logged."""


class _Key(NamedTuple):
    kid: str | None
    alg: str
    key: Any  # bytes (HMAC) or a cryptography public key


class _AuthRule(BaseModel):
    """One entry of ``rules``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    paths: RulePaths = Field(default_factory=lambda: ["*"])
    methods: Methods = Field(default_factory=list)
    auth: Level = "required"
    roles: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _roles_need_required(self) -> _AuthRule:
        # Roles are checked against an identity; with optional or none, a request that
        # sends no credentials has none and would pass where a user without the role
        # gets 403.  Refusing the combination keeps that hole out of every config.
        if self.roles and self.auth != "required":
            raise ValueError(f"roles need auth: required (this rule has auth: {self.auth}): a request without "
                             "credentials has no roles to check, so it would pass where a user without the "
                             "role gets 403; give anonymous requests a rule of their own, without roles")
        return self


class AuthRules:
    """``rules`` and ``default`` as the layer applies them: the first rule that matches a path and method.

    Shared with the linter, which must read the rules as the layer does.
    """

    def __init__(self, rules: Iterable[_AuthRule], default: str) -> None:
        # A rule with roles always requires credentials: _AuthRule refuses anything else, and a
        # rule that reached the layer without validation must not let anonymous requests skip them.
        self.rules = [
            (None if "*" in r.paths else re.compile("|".join(fnmatch.translate(p) for p in r.paths)),
             with_head(r.methods) or None,
             "required" if r.roles else r.auth, frozenset(r.roles))
            for r in rules
        ]
        self.default = default

    def first(self, path: str, method: str) -> tuple[str, tuple[frozenset[str], ...]]:
        """The level and the role sets of the first rule that matches, else the default's."""
        for paths, methods, rule_level, rule_roles in self.rules:
            if (methods is None or method in methods) and (paths is None or paths.match(path)):
                return rule_level, (rule_roles,) if rule_roles else ()
        return self.default, ()


def _raise(exc: BaseException) -> Any:
    raise exc


def _ignore(event: str, **fields: Any) -> None:
    """The event sink of a token service built without a context."""


def _users_down() -> HTTPException:
    """A users database (``USER_ROLES``, ``USER_SINCE``, a refresh's lookups) that cannot answer: retry soon."""
    return refuse(503, "The users database cannot be read; retry shortly.",
                  headers=[("Retry-After", _STORE_RETRY_AFTER)])


def _store_down() -> HTTPException:
    return refuse(503, "The token store is unavailable; retry shortly.", headers=[("Retry-After", _STORE_RETRY_AFTER)])


def _auth_time(claims: Mapping[str, Any]) -> int:
    """When the login of a token's family was (``auth_time``; a token from before that claim: its ``iat``)."""
    auth_time = claims.get("auth_time")
    return int(auth_time) if isinstance(auth_time, int | float) and not isinstance(auth_time, bool) \
        else int(claims["iat"])


def _before(issued: Any, since: float | None) -> bool:
    """Whether a credential issued at ``issued`` predates ``since``.

    A token's ``iat`` is whole seconds (sub-second values would make every
    host whose clock is a millisecond behind refuse a fresh token as "not valid
    yet"): it predates ``since`` when its second is before ``since``'s.  That is
    why a password reset's ``since`` is rounded up to the next whole second (see
    ``UserStore.set_password``): a token issued in that very second is void too.
    A session's login time is exact.  A session written before logins recorded
    the time (no ``iat``) is let be.
    """
    if since is None or not isinstance(issued, int | float) or isinstance(issued, bool):
        return False
    if since == math.inf:
        return True
    return issued < (since if isinstance(issued, float) else math.floor(since))


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(realm: str) -> str:
    """The ``WWW-Authenticate`` challenge of a 401: ``Bearer realm="…"`` (the core's login and logout too)."""
    return f"Bearer realm={_quote(realm)}"


def _thumbprint(key: Any) -> str:
    """RFC 7638 JWK thumbprint: the kid of a key configured without one."""
    jwk = json.loads(_to_jwk(key))
    members = {k: jwk[k] for k in ("crv", "e", "kty", "n", "x", "y") if k in jwk}
    digest = sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode()


def _to_jwk(key: Any) -> str:
    algorithms = jwt.algorithms
    if isinstance(key, ec.EllipticCurvePublicKey):
        return algorithms.ECAlgorithm.to_jwk(key)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return algorithms.OKPAlgorithm.to_jwk(key)
    return algorithms.RSAAlgorithm.to_jwk(key)


def _alg_for(key: Any, wanted: str | None, where: str) -> str:
    """The one algorithm a public key is pinned to, or a sentence saying why not."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"{where} is a {key.key_size}-bit RSA key; use at least 2048 bits")
        alg = wanted or "RS256"
        ok = alg[:2] in ("RS", "PS")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        alg = _CURVES.get(key.curve.name, "")
        ok = bool(alg) and wanted in (None, alg)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        alg, ok = "EdDSA", wanted in (None, "EdDSA")
    else:
        raise ValueError(f"{where} is not an RSA, EC or Ed25519 key")
    if not ok:
        raise ValueError(f"{where} cannot be used with algorithm {wanted or alg}")
    return alg


class _Options(LayerOptions):
    store: str = "shared"
    secret: str = Field(default="", repr=False)
    algorithm: str | None = None
    public_keys: dict[str, str] | list[str] = Field(default_factory=list)
    private_key: str = Field(default="", repr=False)
    jwks_file: str = ""
    issuer: str | None = None
    audience: str | None = None
    leeway: float = Field(default=0, ge=0, le=300)
    access_ttl: int = Field(default=900, ge=1)
    refresh_ttl: int = Field(default=30 * 86400, ge=1)
    login_max_age: int = Field(default=90 * 86400, ge=1)
    """Seconds after a login when its tokens stop, however often they were refreshed (then log in again)."""
    refresh_reuse_grace: int = Field(default=10, ge=0, le=300)
    """Seconds in which a refresh token sent again gets the pair its first use made, not a revocation."""
    rules: list[_AuthRule] = Field(default_factory=list)
    default: Level = "required"
    accept_session: bool = True
    realm: str = "wsgistack"
    max_token_bytes: int = Field(default=8192, ge=256)
    on_store_error: Literal["open", "closed"] = "closed"

    @field_validator("issuer", "audience")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        """Empty or blank is none (``${JWT_ISSUER:-}``): tokens would be issued without the claim and
        refused for lacking it."""
        return value if value is None or value.strip() else None

    @field_validator("realm")
    @classmethod
    def _quotable(cls, value: str) -> str:
        """Sent as ``WWW-Authenticate: Bearer realm="value"``: printable ASCII (quotes are escaped)."""
        if not header_text(value):
            raise ValueError('realm is sent in the WWW-Authenticate header as realm="...": printable ASCII on one '
                             'line')
        return value

    @model_validator(mode="after")
    def _one_kind_of_key(self) -> _Options:
        asymmetric = bool(self.public_keys or self.private_key or self.jwks_file)
        alg = self.algorithm
        if alg is not None and alg not in _HMAC and alg not in _ASYMMETRIC:
            raise ValueError(f"algorithm {alg!r} is not accepted (known: {_KNOWN}); 'none' never is")
        if self.secret and asymmetric:
            raise ValueError("secret (HMAC) may not be mixed with public_keys, private_key or jwks_file "
                             "(RSA/EC); configure one kind of key")
        if self.secret:
            alg = alg or "HS256"
            if alg not in _HMAC:
                raise ValueError(f"algorithm {alg} needs public_keys, jwks_file or private_key; "
                                 "with secret use HS256, HS384 or HS512")
            size = len(self.secret.encode())
            if size < _HMAC[alg]:
                raise ValueError(f"secret must be at least {_HMAC[alg]} bytes for {alg} (it has {size}); "
                                 "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
            try:  # what PyJWT refuses as an HMAC key would make every token, and every login, a 500
                jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).prepare_key(self.secret)
            except jwt.InvalidKeyError:
                if self.secret.lstrip("\ufeff \t\r\n")[:1] in ("{", "["):
                    raise ValueError("secret looks like a JWK (JSON), which PyJWT refuses as an HMAC secret; secret "
                                     "takes random text: make one with: python3 -c 'import secrets; "
                                     "print(secrets.token_urlsafe(48))'") from None
                raise ValueError("secret is a public or private key or a certificate (PEM, SSH or DER), which "
                                 "PyJWT refuses as an HMAC secret: RSA, EC and Ed25519 keys go in public_keys, "
                                 "private_key or jwks_file") from None
        elif asymmetric:
            if alg in _HMAC:
                raise ValueError(f"algorithm {alg} needs secret; public_keys, jwks_file and private_key "
                                 "take RS256, PS256, ES256 or EdDSA")
        else:
            raise ValueError("auth needs secret (HS256) or public_keys, jwks_file or private_key (RS256/ES256)")
        if self.refresh_ttl < self.access_ttl:
            raise ValueError("refresh_ttl must not be shorter than access_ttl")
        if self.login_max_age < self.access_ttl:
            raise ValueError("login_max_age must not be shorter than access_ttl")
        return self


class _Minted(NamedTuple):
    """What makes a pair again (JWTs are signed from their claims): kept as the refresh-used mark."""

    iat: int
    access: str   # the access token's jti
    refresh: str  # the refresh token's jti
    roles: list[str]
    at: float = 0.0  # when the first use marked the token (the writer's clock, to the fraction)

    def mark(self) -> bytes:
        return json.dumps({"iat": self.iat, "access": self.access, "refresh": self.refresh, "roles": self.roles,
                           "at": time.time()}, separators=(",", ":")).encode()

    @classmethod
    def read(cls, raw: bytes | None) -> _Minted | None:
        """The mark's pair; None for a mark without one (written before marks held it, or foreign)."""
        try:
            data = json.loads(raw or b"")
            minted = cls(data["iat"], data["access"], data["refresh"], data["roles"], data.get("at", data["iat"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        texts = isinstance(minted.access, str) and isinstance(minted.refresh, str)
        roles = isinstance(minted.roles, list) and all(isinstance(r, str) for r in minted.roles)
        at = isinstance(minted.at, int | float) and not isinstance(minted.at, bool) and math.isfinite(minted.at)
        if type(minted.iat) is not int or not texts or not roles or not at:
            return None
        return minted


#: The claims that say what kind of token a JWT is, in the forms the usual issuers write.
_KIND_CLAIMS = ("typ", "type", "token_use")


class TokenService:
    """Issue, rotate, revoke and verify the stack's JWTs (``context.services["tokens"]``).

    Built from the ``auth`` layer's options and store.  Access tokens live
    ``access_ttl`` seconds, refresh tokens ``refresh_ttl``; both carry
    ``sub``, ``roles``, ``iat``, ``exp``, ``jti``, ``typ`` and ``fam`` (the
    login's family), plus ``iss``/``aud`` when configured.  ``refresh()``
    rotates: a refresh token works once, and presenting it again revokes its
    whole family (refresh and access tokens alike).  Errors are ``refuse()``
    exceptions (401, or 503 when the store cannot answer).

    Usage::

        tokens = TokenService(AuthMiddleware.Options(secret=SECRET), MemoryStore())
        pair = tokens.issue("alice", ["admin"]); claims = tokens.verify(pair["access_token"])
    """

    def __init__(
        self,
        options: _Options,
        store: Store,
        *,
        base_dir: Path | None = None,
        emit: Callable[..., None] | None = None,
        logger: Any = None,
    ) -> None:
        self.options, self.store = options, store
        self.emit: Callable[..., None] = emit or _ignore
        self.log = logger
        self.base = base_dir or Path.cwd()
        self.keys: dict[str | None, _Key] = {}
        self.signer: _Key | None = None
        self._load_keys(options)
        self.only = next(iter(self.keys.values())) if len(self.keys) == 1 else None
        self.closed = options.on_store_error == "closed"
        self.realm = options.realm
        #: How much longer than a token's lifetime the records of it live: a host whose clock is ``leeway``
        #: behind the writer's still accepts the token for ``leeway`` after ``exp`` by its own clock.
        self.margin = 2 * options.leeway + 1
        self.require = ["exp", "iat", "jti", "sub"]
        self._last_log = 0.0
        self._verified: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # -- keys ------------------------------------------------------------
    def _read(self, value: str, what: str) -> bytes:
        if value.lstrip().startswith("-----BEGIN"):
            return value.encode()
        path = self.base / Path(value).expanduser()  # ~ first: an absolute result ignores the base
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {str(path)!r} ({exc.strerror or exc})") from None

    def _load_keys(self, o: _Options) -> None:
        if o.secret:
            self.signer = _Key(None, o.algorithm or "HS256", o.secret.encode())
            self.keys[None] = self.signer
            return
        named = o.public_keys.items() if isinstance(o.public_keys, dict) else [(None, v) for v in o.public_keys]
        for kid, value in named:
            where = f"public_keys[{kid!r}]" if kid else "a public_keys entry"
            data = self._read(value, where)
            try:
                key = (load_pem_x509_certificate(data).public_key() if b"CERTIFICATE" in data
                       else load_pem_public_key(data))
            except ValueError:
                raise ValueError(f"{where} is not a PEM public key or certificate") from None
            self._add(kid, _alg_for(key, o.algorithm, where), key)
        if o.jwks_file:
            self._load_jwks(o)
        if o.private_key:
            data = self._read(o.private_key, "private_key")  # a file that is not there says so
            try:
                private = load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                raise ValueError("private_key is not an unencrypted PEM private key") from None
            public = private.public_key()
            alg = _alg_for(public, o.algorithm, "private_key")
            kid = next((k.kid for k in self.keys.values() if _thumbprint(k.key) == _thumbprint(public)), None)
            if kid is None:
                kid = self._add(None, alg, public)
            elif self.keys[kid].alg != alg:
                raise ValueError(f"private_key signs {alg} but its public key {kid!r} is pinned to "
                                 f"{self.keys[kid].alg}")
            self.signer = _Key(kid, alg, private)

    def _load_jwks(self, o: _Options) -> None:
        raw = self._read(o.jwks_file, "jwks_file")  # a file that is not there says so
        try:
            entries = json.loads(raw)["keys"]
        except (ValueError, KeyError, TypeError, RecursionError):
            entries = None
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError(f"jwks_file {o.jwks_file!r} is not a JSON object with a 'keys' list of objects")
        skipped: list[str] = []
        for i, entry in enumerate(entries):
            where = f"jwks_file key {entry.get('kid') or i}"
            if not isinstance(entry.get("kid", ""), str):  # PyJWT takes only a string kid, in a token and to sign
                raise ValueError(f"{where}: kid must be a string (RFC 7517 4.5), not {entry['kid']!r}; a token's "
                                 "kid header is one, so no token could name this key")
            if entry.get("kty") == "oct":
                raise ValueError(f"{where} is a symmetric (oct) key; HMAC keys go in secret, and may not be "
                                 "mixed with RSA/EC keys")
            if entry.get("use", "sig") != "sig":
                skipped.append(f"key {entry.get('kid') or i} (use {entry.get('use')!r})")
                continue
            alg = entry.get("alg")
            if alg in _PYJWT_ONLY:  # 'none': PyJWT takes it, and its key loading raises a bare NotImplementedError
                raise ValueError(f"{where} is pinned to algorithm {alg!r}, which is not accepted (known: "
                                 f"{_KNOWN}; 'none' never is)")
            try:
                jwk = jwt.PyJWK.from_dict(entry, entry.get("alg") or o.algorithm)
            except jwt.PyJWTError as exc:
                # PyJWT's text may go on to print the whole key, its private half included.
                reason = str(exc).partition(":")[0].strip() or type(exc).__name__
                raise ValueError(f"{where} cannot be used: {reason} (alg {entry.get('alg') or o.algorithm!r}, "
                                 f"kty {entry.get('kty')!r})") from None
            if entry.get("alg") and o.algorithm and entry["alg"] != o.algorithm:
                raise ValueError(f"{where} is pinned to {entry['alg']} but algorithm is {o.algorithm}")
            key = jwk.key.public_key() if hasattr(jwk.key, "private_bytes") else jwk.key
            self._add(entry.get("kid"), _alg_for(key, jwk.algorithm_name, where), key)
        if len(skipped) == len(entries):  # else every token would be refused, for want of a key to check it
            message = f"jwks_file {o.jwks_file!r} holds no signing keys"
            if skipped:
                listed = ", ".join(skipped[:-1]) + " and " + skipped[-1] if len(skipped) > 1 else skipped[0]
                message += f": it skipped {listed}; only keys without a use or with use 'sig' verify tokens"
            raise ValueError(message)

    def _add(self, kid: str | None, alg: str, key: Any) -> str:
        kid = kid or _thumbprint(key)
        if kid in self.keys:
            raise ValueError(f"key id {kid!r} is configured twice")
        self.keys[kid] = _Key(kid, alg, key)
        return kid

    # -- verification ----------------------------------------------------
    def _store(self, fn: Callable[[], Any], strict: bool = False) -> Any:
        """Run a store call; a failure is a 503 (closed or ``strict``) or logged and ignored (open)."""
        try:
            return fn()
        except StoreError as exc:
            self.emit("store.error", store=self.options.store, layer="auth")
            now = time.monotonic()
            if self.log is not None and now - self._last_log > 10:
                self._last_log = now
                self.log.warning("auth store %r failed (%s)", self.options.store, exc)
            if self.closed or strict:
                raise _store_down() from None
            return None

    def unavailable(self) -> HTTPException | None:
        """The 503 issuing would meet now (the store's circuit breaker is not closed), else None.

        The login view asks before it answers a wrong password: during a store
        outage every login then gets the same 503, so the answer does not tell
        a right password (whose tokens cannot be stored) from a wrong one.
        """
        breaker = getattr(self.store, "breaker", None)
        if breaker is None or breaker.state is CLOSED:
            return None
        return _store_down()

    def call_store(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` against the token store as issuing does: a failure is logged, counted and a 503.

        For the app's own records in this store (the login view's failure counts):
        one outage, one answer, whatever the request was.
        """
        return self._store(fn, strict=True)

    def _decode(self, token: str, kind: str | None, verify_exp: bool = True) -> dict[str, Any]:
        """Verify signature and claims; raise :class:`_Invalid`.  No store access."""
        o, key = self.options, self.only
        try:
            if key is None:  # several keys: the header's kid picks one
                kid = jwt.get_unverified_header(token).get("kid")
                key = self.keys.get(kid) if isinstance(kid, str) else None
                if key is None:
                    raise _Invalid("unknown_kid", "the token's key id is unknown" if kid is not None
                                   else "the token names no key id and several keys are configured")
            decoded = jwt.decode_complete(
                token, key.key, algorithms=[key.alg], issuer=o.issuer, audience=o.audience, leeway=o.leeway,
                options={"require": self.require, "verify_exp": verify_exp})
            kid = decoded["header"].get("kid")
            if kid is not None and kid != key.kid:  # one key: a token naming another is not ours
                raise _Invalid("unknown_kid", "the token's key id is unknown")
            claims: dict[str, Any] = decoded["payload"]
        except jwt.MissingRequiredClaimError as exc:
            raise _Invalid("missing_claim", f"the token has no {exc.claim} claim") from None
        except jwt.InvalidTokenError as exc:
            reason, text = next((r, t) for cls, r, t in _JWT_ERRORS if isinstance(exc, cls))
            raise _Invalid(reason, text) from None
        except UnicodeError:  # e.g. a lone surrogate in a token that came from JSON
            raise _Invalid("malformed", "the token is malformed") from None
        if o.audience is None and "aud" in claims:  # PyJWT lets an empty one ("", [], null) through
            raise _Invalid("invalid_audience", "the token's audience is not accepted")
        # PyJWT's require takes "" as present: an empty sub names no one, and an empty jti cannot be
        # revoked alone (its blocklist key, ``revoked:``, would name every such token at once).
        for name in ("sub", "jti"):
            if claims[name] == "":
                raise _Invalid("missing_claim", f"the token's {name} claim is empty")
        # The kind of token: ``typ`` (ours), ``type`` (flask-jwt-extended's), ``token_use`` (Cognito's).
        # A token that names two kinds is neither; one that names none is an access token.
        # A kind that is not a string (a list, an object) is no kind we know: neither access nor refresh.
        kinds = {claims[name] if type(claims[name]) is str else None for name in _KIND_CLAIMS if name in claims}
        typ = "access" if not kinds else next(iter(kinds)) if len(kinds) == 1 else None
        if kind == "access" and typ != "access":
            raise _Invalid("wrong_token_type", "a refresh token cannot be used as an access token"
                           if typ == "refresh" else "the token is not an access token")
        if kind == "refresh" and typ != "refresh":
            raise _Invalid("wrong_token_type", "only a refresh token can be refreshed")
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise _Invalid("invalid", "the token's roles claim is not a list of strings")
        for name in ("exp", "iat", "nbf", "auth_time"):  # PyJWT takes "1790000000" (a string) too
            value = claims.get(name, 0)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number and name != "auth_time":  # (an auth_time that is no number is none: see _auth_time)
                raise _Invalid("invalid", f"the token's {name} claim is not a number")
            if number and not -_LAST_DATE <= value <= _LAST_DATE:  # (NaN too)
                raise _Invalid("invalid", f"the token's {name} claim is out of range")
        return claims

    def revocation_key(self, token: str) -> str | None:
        """The blocklist key :meth:`check` will read for an access token it verified before, else None."""
        claims = self._verified.get(token)
        return None if claims is None else "revoked:" + str(claims["jti"])

    def known(self, token: str) -> dict[str, Any] | None:
        """The claims of an access token that verified before and has not expired, else None (no store read)."""
        claims = self._verified.get(token)
        return claims if claims is not None and int(claims["exp"]) > time.time() - self.options.leeway else None

    def check(self, token: str, kind: str = "access", environ: WSGIEnvironment | None = None) -> dict[str, Any]:
        """Verify a token and its revocation (one store read for an access token); raise ``_Invalid`` or a 503.

        Access tokens that verified once are remembered (bounded, per process),
        so a token sent again costs an expiry check instead of a signature check;
        the revocation read happens every time (with ``environ``, it may have been
        read ahead in the rate limiter's round trip: see ``ReadAhead``).  Any other
        kind is also refused when its family was revoked (a second read): a logout,
        a reuse or a removed user leaves ``family-revoked:<fam>``, not an entry per
        refresh token.  Access tokens need no such read: revoking a family
        blocklists each of them.
        """
        claims = self._verified.get(token) if kind == "access" else None
        if claims is None:
            claims = self._decode(token, kind)
            if kind == "access":
                with self._lock:
                    if len(self._verified) >= _VERIFIED_MAX:
                        self._verified.popitem(last=False)  # the oldest (an ordered dict: no scan)
                    self._verified[token] = claims
        else:  # what decoding checks of the time, again: the clock may have stepped since
            now, leeway = time.time(), self.options.leeway
            # As PyJWT compares them: whole seconds (a fractional iat counts from its second).
            if int(claims["exp"]) <= now - leeway:
                raise _Invalid("expired", "the token has expired")
            if int(claims.get("iat", 0)) > now + leeway or int(claims.get("nbf", 0)) > now + leeway:
                raise _Invalid("not_yet_valid", "the token is not valid yet")
        jti = "revoked:" + str(claims["jti"])
        try:
            found, revoked = read_ahead(environ, self.store, "get", jti) if environ else (False, None)
        except StoreError as exc:  # the outer round trip found the store down: the same policy, no wait
            found, revoked = True, self._store(partial(_raise, exc), strict=kind != "access")
        if not found:
            revoked = self._store(lambda: self.store.get(jti), strict=kind != "access")
        if revoked is None and kind != "access" and claims.get("fam"):
            family = "family-revoked:" + str(claims["fam"])
            revoked = self._store(lambda: self.store.get(family), strict=True)
        if revoked is not None:
            raise _Invalid("revoked", "the token has been revoked")
        return claims

    def _refuse(self, exc: _Invalid) -> HTTPException:
        self.emit("auth.failure", reason=exc.reason)
        said = f'{challenge(self.realm)}, error="invalid_token", error_description={_quote(exc.description)}'
        return refuse(401, f"Unauthorized: {exc.description}.", headers=[("WWW-Authenticate", said)])

    def verify(self, token: str, kind: str = "access") -> dict[str, Any]:
        """Return the claims of a valid, unrevoked token of ``kind``; otherwise refuse with 401."""
        try:
            return dict(self.check(token, kind))
        except _Invalid as exc:
            raise self._refuse(exc) from None

    # -- issuing ---------------------------------------------------------
    def _sign(self, claims: dict[str, Any]) -> str:
        assert self.signer is not None
        headers = {"kid": self.signer.kid} if self.signer.kid else None
        return jwt.encode(claims, self.signer.key, algorithm=self.signer.alg, headers=headers)

    def _pair(self, subject: str, roles: list[str], fam: str, auth_time: int | None = None,
              minted: _Minted | None = None, issued_at: float | None = None) -> tuple[dict[str, Any], _Minted]:
        """A new pair, its access token recorded in the family; with ``minted``, that pair made again."""
        if self.signer is None:
            raise RuntimeError("this auth layer only verifies tokens; set private_key to issue them")
        o = self.options
        clock = int(time.time())
        now = minted.iat if minted is not None else clock if issued_at is None else min(clock, int(issued_at))
        # auth_time (OpenID Connect's name): the login this family started with, carried by every
        # refresh; no token of the family lives past auth_time + login_max_age.
        auth_time = now if auth_time is None else auth_time
        end = auth_time + o.login_max_age
        base = {"sub": subject, "roles": roles, "iat": now, "fam": fam, "auth_time": auth_time}
        if o.issuer:
            base["iss"] = o.issuer
        if o.audience:
            base["aud"] = o.audience
        access_exp, refresh_exp = min(now + o.access_ttl, end), min(now + o.refresh_ttl, end)
        if minted is None:
            minted = _Minted(now, secrets.token_urlsafe(16), secrets.token_urlsafe(16), roles)
            # Recorded so that revoking the family can blocklist this access token too, for as long
            # as it lives (the sweep reads what is left of this key's life). Strict in both modes:
            # a token the store does not know of would outlive its family's revocation.
            key, ttl = f"family-access:{fam}:{minted.access}", max(1, access_exp - clock) + self.margin
            self._store(lambda: self.store.set(key, b"1", ttl), strict=True)
        access = self._sign({**base, "exp": access_exp, "jti": minted.access, "typ": "access"})
        refresh = self._sign({**base, "exp": refresh_exp, "jti": minted.refresh, "typ": "refresh"})
        return {"access_token": access, "refresh_token": refresh, "token_type": "Bearer",
                # counted from this answer (RFC 6749 5.1): a pair made again has lived a while already
                "expires_in": max(0, access_exp - clock), "refresh_expires_in": max(0, refresh_exp - clock)}, minted

    def issue(self, subject: str, roles: Iterable[str] = (), *, issued_at: float | None = None) -> dict[str, Any]:
        """Start a new family: an access token and a refresh token for ``subject``.

        The access token is recorded in its family before it is handed out (503
        when the store cannot take it, in both ``on_store_error`` modes), so that
        revoking the family always reaches it.  ``issued_at`` (a time before now)
        dates the pair from when the caller last read the user's credentials, so
        that a change of them since then voids it (see ``USER_SINCE``).
        """
        return self.issue_family(subject, roles, issued_at=issued_at)[0]

    def issue_family(self, subject: str, roles: Iterable[str] = (), *,
                     issued_at: float | None = None) -> tuple[dict[str, Any], str]:
        """:meth:`issue`, and the new family's id (``fam``): the login's session keeps it for its logout."""
        fam = secrets.token_urlsafe(12)
        return self._pair(subject, sorted(set(roles)), fam, issued_at=issued_at)[0], fam

    def refresh(
        self,
        refresh_token: str,
        *,
        current_roles: Callable[[str], Iterable[str] | None] | None = None,
        credentials_since: Callable[[str], float | None] | None = None,
    ) -> dict[str, Any]:
        """Trade a refresh token for a new pair; a reused one revokes its family (401).

        ``current_roles(sub)`` lets the caller say who the subject is *now*: it
        returns the subject's current roles, which the new pair carries, or
        ``None`` when the subject no longer exists, which revokes the family and
        refuses the refresh like a revoked token.  Without it, the new pair keeps
        the roles of the refresh token (for apps that have no user store).
        """
        try:
            claims = self.check(refresh_token, "refresh")
            fam = str(claims.get("fam", ""))
            if not fam:  # check() has read the family's revocation of a token that has one
                raise _Invalid("invalid", "the refresh token has no fam claim")
            jti, head_key = str(claims["jti"]), "family-head:" + fam
            used = "refresh-used:" + jti
            head = self._store(lambda: self.store.get(head_key), strict=True)
            again: _Minted | None = None
            if head is not None and head != jti.encode():
                # Not the family's newest refresh token: a retry within the grace gets the pair its
                # first use made; anything else is a reuse (stolen or replayed), and the family goes.
                again = self._made_by_first_use(used)
                if again is None:
                    self._revoke_family(fam, claims)
                    raise _Invalid("refresh_reuse", "the refresh token was already used; its family is revoked")
            subject = str(claims["sub"])
            roles: Iterable[str] = claims.get("roles", [])
            # Asked before the token is marked used, so a failing lookup does not burn it.
            try:
                found = current_roles(subject) if current_roles is not None else roles
                since = credentials_since(subject) if credentials_since is not None else None
            except Exception:  # the users database cannot answer: a 503 to retry, not a 500
                if self.log is not None:
                    self.log.exception("could not look up refresh token user %r", escape_control(subject))
                raise _users_down() from None
            if found is None:
                self._revoke_family(fam, claims)
                raise _Invalid("unknown_subject", "the token has been revoked")
            roles = found
            if _before(claims.get("iat"), since):
                self._revoke_family(fam, claims)  # issued before a password reset, or to an earlier holder of the name
                raise _Invalid("credentials_changed", "the token has been revoked")
            # The new pair is made (its access token recorded) before the refresh token is marked
            # used: a store failure while recording is a 503 the client can retry with the same token.
            auth_time = _auth_time(claims)
            if auth_time + self.options.login_max_age <= time.time():  # however much leeway exp had
                raise _Invalid("expired", "the token has expired")
            if again is not None:
                pair = self._pair(subject, again.roles, fam, auth_time, again)[0]
            else:
                pair = self._refresh_once(fam, subject, sorted(set(roles)), auth_time, used, claims)
            # A reuse detected while this pair was being made revoked the family: refuse it too.
            if self._store(lambda: self.store.get("family-revoked:" + fam), strict=True) is not None:
                raise _Invalid("revoked", "the token has been revoked")
            return pair
        except _Invalid as exc:
            raise self._refuse(exc) from None

    def _refresh_once(self, fam: str, subject: str, roles: list[str], auth_time: int, used: str,
                      claims: Mapping[str, Any]) -> dict[str, Any]:
        """The new pair of the family's newest refresh token, which this use marks used.

        The mark (set-if-absent: of two uses at once, one makes the pair) lives only as long
        as a retry may get that pair again; the family's head, one key per family, then
        names its newest refresh token, and every older one is a reuse. So the store holds
        a few keys per login, not one for every refresh its tokens' thirty days allow.
        """
        pair, minted = self._pair(subject, roles, fam, auth_time)
        o = self.options
        life = max(1.0, claims["exp"] - time.time() + self.margin)  # as long as any host may accept it
        mark_ttl = min(life, o.refresh_reuse_grace + self.margin + 1)
        # The mark and the new head in one step: a failure leaves neither (the token can be sent again), and
        # only the use that marks the token moves the head, so a slow second use cannot move it back.
        # Until the family's end, not the new token's expiry: a refresh_ttl shortened by a reload
        # leaves older tokens of the family living longer than the new one, and once the head is
        # gone nothing would tell them from the newest.
        head = [("family-head:" + fam, minted.refresh.encode(), self._family_life(claims))]
        if not self._store(lambda: self.store.add_then_write(used, minted.mark(), mark_ttl, head), strict=True):
            again = self._made_by_first_use(used)
            if again is None:
                self._revoke_family(fam, claims)
                raise _Invalid("refresh_reuse", "the refresh token was already used; its family is revoked")
            pair = self._pair(subject, again.roles, fam, auth_time, again)[0]
        return pair

    def _made_by_first_use(self, used: str) -> _Minted | None:
        """What the first use of a refresh token made, when sending it again is a retry, not a theft.

        A client whose refresh got a 503 after the store had marked the token
        used (its reply lost in a timeout), or two tabs refreshing at once,
        send the token again: within ``refresh_reuse_grace`` seconds of the
        first use, and while the pair that use made has not been refreshed in
        turn, they get that same pair again.  Later, it is a reuse.
        """
        grace = self.options.refresh_reuse_grace
        if not grace:
            return None
        minted = _Minted.read(self._store(lambda: self.store.get(used), strict=True))
        # Counted from the first use, by its host's clock: this host's may be up to leeway (and, with
        # leeway 0, a moment) behind that one.
        if minted is None or not -(self.options.leeway + 1) <= time.time() - minted.at <= grace:
            return None
        if self._store(lambda: self.store.get("refresh-used:" + minted.refresh), strict=True) is not None:
            return None  # that pair was refreshed already: this token is stale, whoever sends it
        return minted

    def _family_life(self, claims: Mapping[str, Any]) -> float:
        """Seconds the records of ``claims``' family must live: to the family's end, plus the margin.

        No token of a family outlives ``auth_time + login_max_age`` (a refresh refuses
        one past it by the current setting): the family's records are counted from that,
        not from the ``refresh_ttl`` of now, which a reload may have shortened.
        """
        return max(1.0, _auth_time(claims) + self.options.login_max_age - time.time()) + self.margin

    def _left(self, key: str) -> float | None:
        """What is left of ``key``'s life (None: gone); the ``access_ttl`` of now from a store that cannot tell."""
        try:
            return self.store.ttl(key)
        except StoreError:
            if type(self.store).ttl is not Store.ttl:
                raise  # the store is down: the revocation is a 503, to retry
            return self.options.access_ttl + self.margin

    def _revoke_family(self, fam: str, claims: Mapping[str, Any]) -> None:
        """Mark the family of ``claims`` (a token of it) revoked and blocklist its access tokens.

        One key records it for as long as a token of the family may live:
        ``family-revoked:<fam>``, ``1`` at once and ``swept`` once its access tokens
        are blocklisted (a logout keeps that one key, not one per token it ended).
        """
        prefix, key = f"family-access:{fam}:", "family-revoked:" + fam
        ttl = self._family_life(claims)

        def run() -> None:
            # Once swept, never again: the scan walks the store's keys, and an old token pair sent to
            # logout over and over must not make it walk them every time.
            if self.store.get(key) == _SWEPT:
                return
            self.store.set(key, b"1", ttl)
            for found in list(self.store.scan(prefix)):
                # As long as the token lives: its record was made to live that long (the access_ttl
                # of now may be shorter, after a reload, than the token's).
                left = self._left(found)
                if left is not None:
                    self.store.set("revoked:" + found[len(prefix):], b"1", left)
            # The head names no token any more: the family is refused before it is read.
            self.store.write([(key, _SWEPT, ttl)], ["family-head:" + fam])

        self._store(run, strict=True)

    def revoke_family(self, fam: str, auth_time: float) -> None:
        """Revoke the login ``fam`` that began at ``auth_time`` (its session's logout): every token of it.

        What ``revoke(..., family=True)`` does for the families of the tokens it is
        given, for a login known without one of its tokens (the session of the login).
        """
        self._revoke_family(fam, {"auth_time": int(auth_time), "iat": int(auth_time)})

    def revoke(self, token: str, *more: str, family: bool = False) -> None:
        """Blocklist access or refresh tokens' ``jti`` until they expire (401 if one is not ours).

        Every token is verified before any is blocklisted, so a refusal revokes
        none of them; the blocklist entries then go to the store in one write.
        Revoking a token again is harmless, so a 503 can simply be retried.
        With ``family`` (a logout), the families of the tokens go too: every
        token issued since that login, older access tokens included.
        """
        try:
            every = [self._decode(t, None, verify_exp=False) for t in (token, *more)]
        except _Invalid as exc:
            raise self._refuse(exc) from None
        now, margin = time.time(), self.margin
        # A refresh token whose family goes too needs no entry of its own (a refresh checks the family
        # first): a logout leaves one key for thirty days, not two.
        sets = [("revoked:" + str(c["jti"]), b"1", c["exp"] - now + margin)
                for c in every if c["exp"] - now + margin > 1
                and not (family and c.get("fam") and c.get("typ") == "refresh")]
        if sets:
            self._store(lambda: self.store.write(sets), strict=True)
        if family:
            latest = {str(c["fam"]): c for c in sorted(every, key=_auth_time) if c.get("fam")}  # latest auth_time
            for fam in sorted(latest):
                self._revoke_family(fam, latest[fam])


class AuthMiddleware:
    """Require, accept or ignore bearer tokens per path; enforce roles.

    Options: ``secret`` (HS256/384/512, at least 32/48/64 bytes; from the
    environment via ``${JWT_SECRET}``) or ``public_keys`` (kid → PEM or file,
    or a list), ``jwks_file`` and ``private_key`` (RS*/PS*/ES*/EdDSA);
    ``algorithm`` (pins every key; default derived from each key);
    ``issuer``, ``audience`` (checked when set); ``leeway`` (0 s);
    ``access_ttl`` (900 s), ``refresh_ttl`` (30 days); ``store``
    (``"shared"``: blocklist and refresh rotation); ``rules``
    (``{paths, methods?, auth: required|optional|none, roles: [...]}``, first
    match wins, any listed role passes, roles only with ``auth: required``)
    and ``default`` (``required``);
    ``accept_session`` (true: the session's ``user`` counts when no bearer
    token is sent); ``realm`` (``"wsgistack"``); ``max_token_bytes`` (8192:
    longer Authorization headers get 431); ``on_store_error`` (``closed``:
    a token that cannot be checked against the blocklist gets 503).

    CORS preflights (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) are never
    refused; any other ``OPTIONS`` follows the rules.  Usage::

        opts = AuthMiddleware.Options(secret=os.environ["JWT_SECRET"], rules=[{"paths": ["/public/*"], "auth": "none"}])
        app = AuthMiddleware(app, opts, Context(stores={"shared": MemoryStore()}))
    """

    Options = _Options

    def __init__(self, app: WSGIApplication, options: _Options, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        base_dir = context.settings.get("base_dir")
        base = Path(base_dir) if base_dir else None
        self.tokens = TokenService(options, context.store(options.store), base_dir=base, emit=context.emit,
                                   logger=context.logger.getChild("auth"))
        context.services["tokens"] = self.tokens
        context.offer_read(self.tokens.store, "get", self._ahead)  # a rate limiter outside may read it for us
        self.rules = AuthRules(options.rules, options.default)
        self.rewrites = rewrites_inside(context)  # versioning inside: rules hold for the path it routes to
        self.accept_session = options.accept_session
        self.max_bytes = options.max_token_bytes
        self.challenge = challenge(options.realm)
        self._roles_now: dict[str, tuple[float, Any]] = {}  # subject -> (until, roles or None)
        self._since_now: dict[str, tuple[float, Any]] = {}  # subject -> (until, credentials since or None)

    def _bearer(self, environ: WSGIEnvironment) -> str | None:
        """The bearer token of the request, or None; over ``max_token_bytes`` too.

        Parsed once per request, and kept with the header it was parsed from (as
        :func:`~middleware.base.cookies` keeps the cookies): the reads ahead parse it
        before the layers in between ran, and one of them may drop or replace the header.
        """
        header = environ.get("HTTP_AUTHORIZATION")
        cached: tuple[str | None, str | None] | None = environ.get(_BEARER)
        if cached is not None and (cached[0] is header or cached[0] == header):
            return cached[1]
        parsed = _authorization(header) if header and len(header) <= self.max_bytes else None
        token = (parsed.token or "") if parsed is not None and parsed.type == "bearer" else None
        environ[_BEARER] = (header, token)
        return token

    def _ahead(self, environ: WSGIEnvironment) -> tuple[str, float | None] | None:
        """The blocklist read :meth:`TokenService.check` will make for this request's token, if known."""
        token = self._bearer(environ)
        key = self.tokens.revocation_key(token) if token else None
        return None if key is None else (key, None)

    def preview_environ(self, environ: WSGIEnvironment) -> dict[str, Any] | None:
        """The identity a known bearer token will give (for reads ahead, see ``ReadAhead``).

        Without a token, the session user the session layer's preview hinted at
        (with the roles this process last looked up for it), else ``{}``; None for a token not
        verified before, which this layer may refuse, and for a request without
        credentials where they are required (a 401 to come: nothing to read).
        """
        method = environ.get("REQUEST_METHOD", "GET").upper()
        level = "none" if _preflight(environ, method) else self._level(environ, method)[0]
        if level == "none":
            return {}
        token = self._bearer(environ)
        if token is None:
            hint = environ.get(SESSION_USER_HINT) if self.accept_session else None
            if hint is not None:
                subject, roles = hint
                if self.context.services.get(USER_ROLES) is not None:  # the roles it has now, as last looked up
                    roles = self._roles_known(subject)
                return {IDENTITY: Identity(subject, roles or _NO_ROLES, "session")}
            return None if level == "required" and "HTTP_COOKIE" not in environ else {}  # None: a 401 to come
        claims = self.tokens.known(token)
        if claims is None:
            return None
        roles = frozenset(claims.get("roles", ()))
        if self.tokens.signer is not None and self.context.services.get(USER_ROLES) is not None:
            known = self._roles_known(claims["sub"])  # the roles it has now, as last looked up
            roles = roles if known is None else known
        return {IDENTITY: Identity(claims["sub"], roles, "jwt", claims)}

    def _session_identity(self, environ: WSGIEnvironment) -> Identity | None:
        session = environ.get(SESSION)
        user: Mapping[str, Any] | None = session.get("user") if session is not None else None
        if not isinstance(user, dict) or not isinstance(user.get("sub"), str):
            return None
        subject: str = user["sub"]
        roles = user.get("roles")
        held = _NO_ROLES
        if isinstance(roles, list | tuple):
            try:
                held = frozenset(roles)
            except TypeError:  # roles are names: anything else (a list, an object: unhashable) is none, not a 500
                held = frozenset(r for r in roles if isinstance(r, str))
        try:  # the roles the user has now, not those copied into the session at login
            held, void = self._user_now(subject, user.get("iat"), held)
        except _LookupFailed:  # the users database cannot say who it is: no one (fail closed), logged
            note(environ, "auth", f"session user {subject!r} could not be looked up: no identity")
            return None
        if void is not None:
            note(environ, "auth", f"session user {subject!r} {_VOID[void]}: no identity")
            return None
        return Identity(subject, held, "session", user)

    def _user_now(self, subject: str, issued: Any, held: frozenset[str]) -> tuple[frozenset[str], str | None]:
        """The roles the user has now (``held`` when the app publishes none), and why a credential
        ``issued`` then is void, if it is (``unknown_subject``, ``credentials_changed``); else None.

        Raises :class:`_LookupFailed` when the users database cannot answer.
        """
        services = self.context.services
        lookup, since = services.get(USER_ROLES), services.get(USER_SINCE)
        if lookup is not None:
            current = self._current_roles(lookup, subject)
            if current is None:
                return held, "unknown_subject"
            held = current
        if since is not None and _before(issued, self._current_since(since, subject)):
            return held, "credentials_changed"
        return held, None

    def _roles_known(self, subject: str) -> frozenset[str] | None:
        """The roles ``subject`` had when last looked up, while that is fresh; else None (a hint, no lookup)."""
        known = self._roles_now.get(subject)
        return known[1] if known is not None and known[0] > time.monotonic() else None

    def _token_identity(self, environ: WSGIEnvironment, claims: dict[str, Any]) -> Identity:
        """The identity of a verified access token; 401 when the users database has voided it since.

        A token this layer issued (it holds a signing key) names a user of the
        app's users database: as a session's, its identity takes the roles the user
        has now, and a token of a user removed since, or issued before the user's
        password was last set (or before the name was given to someone new), is
        refused within a second of the change, not at its ``exp``.  Tokens of
        another issuer (a layer with public keys only) are taken as they are.
        """
        subject: str = claims["sub"]
        roles = frozenset(claims.get("roles", ()))
        if self.tokens.signer is not None:
            try:
                roles, void = self._user_now(subject, claims.get("iat"), roles)
            except _LookupFailed:
                # Not the token's fault: a client told invalid_token drops it. A 503 it retries instead.
                note(environ, "auth", f"refused: token user {subject!r} could not be looked up")
                raise _users_down() from None
            if void is not None:
                note(environ, "auth", f"refused: token user {subject!r} {_VOID[void]}")
                raise self.tokens._refuse(_Invalid(void, "the token has been revoked"))
        return Identity(subject, roles, "jwt", MappingProxyType(claims))

    def _current_since(self, lookup: Any, subject: str) -> float | None:
        """``lookup(subject)`` (see ``USER_SINCE``), reused for ``ROLES_FRESH`` seconds."""
        since: float | None = self._looked_up(self._since_now, lookup, subject,
                                              lambda found: None if found is None else float(found),
                                              "the credentials of")
        return since

    def _current_roles(self, lookup: Any, subject: str) -> frozenset[str] | None:
        """``lookup(subject)`` as a frozenset (None: no such user), reused for ``ROLES_FRESH`` seconds."""
        roles: frozenset[str] | None = self._looked_up(self._roles_now, lookup, subject,
                                                       lambda found: None if found is None else frozenset(found),
                                                       "the roles of user")
        return roles

    def _looked_up(self, cache: dict[str, tuple[float, Any]], lookup: Any, subject: str,
                   convert: Callable[[Any], Any], what: str) -> Any:
        """``convert(lookup(subject))``, kept in ``cache`` for ``ROLES_FRESH`` seconds.

        A lookup that raises is logged and raises :class:`_LookupFailed`: a session then
        identifies no one (fail closed), a token gets a 503 (its holder retries).
        """
        now = time.monotonic()
        cached = cache.get(subject)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = convert(lookup(subject))
        except Exception:
            self.context.logger.getChild("auth").exception("could not look up %s %r", what, escape_control(subject))
            raise _LookupFailed from None
        if len(cache) >= 10_000:
            cache.clear()
        cache[subject] = (now + ROLES_FRESH, found)
        return found

    def _level(self, environ: WSGIEnvironment, method: str) -> tuple[str, tuple[frozenset[str], ...]]:
        """The auth level and the role sets (one role of each needed) of the rules that apply.

        The first rule that matches the path (else the default); when a layer
        inside rewrites the path (versioning routes ``/api/config`` to
        ``/api/v2/config``), the first rule that matches the routed path applies
        too, and the stricter level and both rules' roles hold.
        """
        if not self.rules.rules:
            return self.rules.default, ()
        path = decoded_path(environ)
        level, roles = self.rules.first(path, method)
        if self.rewrites:
            routed = routed_path(environ, self.rewrites)
            if routed != path:
                other, other_roles = self.rules.first(routed, method)
                if _RANK[other] > _RANK[level]:
                    level = other
                roles = tuple(dict.fromkeys((*roles, *other_roles)))
        return level, roles

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()  # as werkzeug routes it
        if method == "OPTIONS" and _preflight(environ, method):
            return self.app(environ, start_response)
        level, roles = self._level(environ, method)
        if level == "none":
            return self.app(environ, start_response)
        header = environ.get("HTTP_AUTHORIZATION")
        if header and len(header) > self.max_bytes:
            self.context.emit("auth.failure", reason="too_large")
            raise refuse(431, f"The Authorization header is longer than {self.max_bytes} bytes.")
        token = self._bearer(environ)
        identity: Identity | None = None
        if token is not None and not _B64TOKEN.fullmatch(token):
            self.context.emit("auth.failure", reason="invalid_request")
            note(environ, "auth", "refused: the Authorization header is malformed")
            raise refuse(400, MALFORMED_BEARER,
                         headers=[("WWW-Authenticate", f"{self.challenge}, {MALFORMED_ERROR}")])
        if token is not None:
            try:
                claims = self.tokens.check(token, "access", environ)
            except _Invalid as exc:
                note(environ, "auth", f"refused: {exc.reason}")
                raise self.tokens._refuse(exc) from None
            identity = self._token_identity(environ, claims)
        elif self.accept_session:
            identity = self._session_identity(environ)
        if identity is None:
            if level == "required":
                self.context.emit("auth.failure", reason="missing")
                note(environ, "auth", "refused: no credentials")
                raise refuse(401, "Unauthorized: this resource needs a bearer token.",
                             headers=[("WWW-Authenticate", self.challenge)])
            return self.app(environ, start_response)
        # Known before the roles are checked: a 403 for a missing role is this user's (the access line names them).
        environ[IDENTITY] = identity
        for needed in roles:
            if needed & identity.roles:
                continue
            self.context.emit("auth.failure", reason="insufficient_role")
            note(environ, "auth", f"refused {identity.subject}: needs one of {sorted(needed)}")
            headers = [("WWW-Authenticate", f'{self.challenge}, error="insufficient_scope", '
                        f'error_description="a role is missing"')] if identity.source == "jwt" else []
            raise refuse(403, f"Forbidden: this resource needs one of the roles {', '.join(sorted(needed))}.",
                         headers=headers)
        if TRACE in environ:
            note(environ, "auth", f"{identity.subject} via {identity.source}")
        return self.app(environ, start_response)
