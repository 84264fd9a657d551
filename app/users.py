"""The users who may log in: a small SQLite table, and the ``users`` command.

Passwords are stored as ``werkzeug.security`` hashes of their Unicode NFC form (:func:`_normal`).
:meth:`UserStore.verify_password` hashes a dummy password for unknown names so that both failures take the
same time, makes the check of a hash made with other (older, cheaper) parameters
last as long as one with the store's own, and hashes a right password again when
its hash was made with older parameters.  The store is thread-safe (one connection behind a lock) and
creates its file and table on first use.

``python serve.py users add NAME --role admin`` is :func:`users_cli`.
Do not use this store for many thousands of users or for self-service
sign-up: it is meant for an operator-managed list.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

from middleware.base import file_identity

__all__ = ["User", "UserError", "UserStore", "users_cli"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # whole: fullmatch ($ would take a final newline)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    credentials_at REAL NOT NULL DEFAULT 0
)
"""


# Names removed since: one given to someone new counts its credentials from the next whole second
# (a token's iat is whole seconds), so no token of the old holder's lasts into the new account.
_RETIRED = "CREATE TABLE IF NOT EXISTS retired_names (name TEXT PRIMARY KEY, at REAL NOT NULL)"


#: scrypt with N=2**15, r=8, p=3: OWASP's Password Storage Cheat Sheet's floor (32 MiB per hash, about
#: 0.3 s on the bench machine); werkzeug's default p=1 is a third of it. Hashes made with other
#: parameters are still checked with their own (the parameters are in the hash).
HASH_METHOD = "scrypt:32768:8:3"
#: Names another werkzeug method for the hashes made from now on: for test suites only, where a cheap one
#: (pbkdf2:sha256:1000) saves a third of a second per login, as Django's test settings swap their hasher.
#: Stored hashes are then never hashed again (a login only ever rehashes towards HASH_METHOD), and a store
#: given it logs a warning once per process.
HASH_ENV = "WSGISTACK_PASSWORD_HASH"
_warned_env: list[str] = []


def default_hash_method() -> str:
    """The method new hashes are made with: ``$WSGISTACK_PASSWORD_HASH`` when set, else :data:`HASH_METHOD`.

    A value werkzeug does not know is refused here (ValueError), when the store is made,
    rather than at the first login.
    """
    method = os.environ.get(HASH_ENV, "").strip()
    if not method or method == HASH_METHOD:
        return HASH_METHOD
    try:
        generate_password_hash("", method=method)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"${HASH_ENV}={method!r} is not a password hash method werkzeug knows ({exc}); "
                         f"leave it unset for {HASH_METHOD}") from None
    if method not in _warned_env:
        _warned_env.append(method)
        logging.getLogger("wsgistack.app").warning(
            "new password hashes are made with %s ($%s), not %s", method, HASH_ENV, HASH_METHOD)
    return method
#: How often (seconds) the file at the path is compared with the one the connection has open.
IDENTITY_CHECK_SECONDS = 1.0
#: The longest (seconds) one use of the database waits: for this process's other uses, then for a lock
#: another process holds (SQLite's busy timeout gets what is left).
BUSY_SECONDS = 5.0
#: How many of the latest checks with a store's own method the check of another method's hash is made
#: to last the median of.
COST_SAMPLES = 5


def _warn_if_readable(path: Path) -> None:
    """Say so when other accounts may read the password hashes (a file made before it was created 0600)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        logging.getLogger("wsgistack.app").warning(
            "the users database %s is readable by other accounts (mode %o): its password hashes should be the "
            "server's alone; run: chmod 600 %s", path, mode, path)


class UserError(ValueError):
    """A user operation that cannot be done (bad name, duplicate, unknown user)."""


@dataclass(frozen=True, slots=True)
class User:
    """A user as the store keeps it (never the password hash)."""

    name: str
    roles: tuple[str, ...]
    created_at: float
    #: When the credentials last changed (the account was made, or its password set): sessions,
    #: access tokens and refresh tokens from before then are void.
    credentials_at: float = 0.0
    #: Which password hash the user was read with (a digest of it, not the hash): :meth:`UserStore.current`
    #: tells by it that the password was set since, even within one whole second.
    password_tag: str = field(default="", repr=False, compare=False)


def _tag(password_hash: str) -> str:
    return hashlib.blake2b(password_hash.encode(), digest_size=16).hexdigest()


def _user(row: tuple[str, str, str, float, float], password_hash: str | None = None) -> User:
    """The user of a row of ``_row``, tagged with ``password_hash`` (the row's own by default)."""
    return User(row[0], tuple(json.loads(row[2])), row[3], row[4], _tag(row[1] if password_hash is None
                                                                          else password_hash))


def _check_name(kind: str, value: str) -> str:
    if not NAME.fullmatch(value):
        raise UserError(
            f"{kind} {value!r} is not valid: use 1 to 64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    return value


def _lookalike(db: sqlite3.Connection, name: str) -> None:
    """:class:`UserError` when another user's name differs from ``name`` only in case (names are ASCII: SQLite's
    ``lower`` folds them all): "Admin" beside "admin" would pass for it in a list, a log or a login form."""
    row = db.execute("SELECT name FROM users WHERE lower(name) = lower(?) AND name != ?", (name, name)).fetchone()
    if row is not None:
        raise UserError(f"user name {name!r} differs from user {row[0]!r} only in case: one of them could pass for "
                        "the other; choose another name")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, wait_ms: Callable[[], int] | None = None) -> Iterator[None]:
    """The block's writes as one transaction on ``db``: committed together or, on any error (the commit's
    too), rolled back together.

    ``db`` is opened with ``isolation_level=None``, so the sqlite3 module begins and commits nothing of
    its own: each statement outside this is its own transaction.  ``BEGIN IMMEDIATE`` takes the database's
    write lock before the block reads anything (waiting the busy timeout for another process's), so two
    writers queue instead of one failing at once on a lock it cannot upgrade.  ``wait_ms`` gives the busy
    timeout of the commit (which waits for readers to finish): what is left of the use's time.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        if wait_ms is not None:
            db.execute(f"PRAGMA busy_timeout = {wait_ms()}")
        db.execute("COMMIT")  # a failed COMMIT (SQLITE_BUSY) leaves the transaction open: rolled back below
    except BaseException:
        if db.in_transaction:  # (SQLite rolls some failures back itself: SQLITE_FULL, SQLITE_IOERR)
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _columns(db: sqlite3.Connection) -> set[str]:
    return {str(row[1]) for row in db.execute("PRAGMA table_info(users)")}


def _normal(password: str) -> str:
    """``password`` as it is hashed and checked: in Unicode NFC, as RFC 8265's OpaqueString profile for
    passwords has it, so "é" typed as one code point or as "e" and a combining accent (a paste from a
    macOS file name, some keyboards) is one password."""
    return password if password.isascii() else unicodedata.normalize("NFC", password)


def _roles(roles: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_check_name("role", r) for r in roles))


class UserStore:
    """Users in the SQLite file at ``path``.

        users = UserStore("var/users.sqlite3")
        users.add("alice", "s3cret", roles=["admin"]); users.verify_password("alice", "s3cret")
    """

    def __init__(self, path: str | Path, *, hash_method: str | None = None) -> None:
        self.path = Path(path)
        self.hash_method = hash_method or default_hash_method()
        self._lock = threading.Lock()
        self._deadline = 0.0  # (time.monotonic()) of the use holding the lock: see _locked
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file the connection reads
        self._checked = 0.0
        self._dummy_hash: str | None = None
        #: How long the latest checks with ``hash_method`` took (seconds), in this process; replaced whole.
        self._costs: tuple[float, ...] = ()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's lock, for one use of the database that waits :data:`BUSY_SECONDS` at most in all.

        A use waits its turn behind this process's others, and SQLite then waits what is left for a
        lock another process holds: while one is held (a write transaction left open), each use fails
        within BUSY_SECONDS, instead of after every use queued ahead of it has waited its own.
        """
        deadline = time.monotonic() + BUSY_SECONDS
        if not self._lock.acquire(timeout=BUSY_SECONDS):
            raise sqlite3.OperationalError("database is locked")
        try:
            self._deadline = deadline
            yield
        finally:
            self._lock.release()

    def _left_ms(self) -> int:
        """What is left of this use's time, in milliseconds (call under :meth:`_locked`)."""
        return max(0, math.floor((self._deadline - time.monotonic()) * 1000))

    def _conn(self) -> sqlite3.Connection:
        """The connection, waiting for another process's lock what is left of this use's time (call under
        :meth:`_locked`)."""
        db = self._open()
        db.execute(f"PRAGMA busy_timeout = {self._left_ms()}")
        return db

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The connection, in one write transaction (:func:`_transaction`) for the block: a change that writes
        two tables writes both or neither, however it fails (call under :meth:`_locked`)."""
        db = self._conn()
        try:
            with _transaction(db, self._left_ms):
                yield db
        finally:
            if db.in_transaction:  # its ROLLBACK failed too: closing the connection ends the transaction
                db.close()
                self._db = None

    def _open(self) -> sqlite3.Connection:
        db = self._db
        if db is not None:
            now = time.monotonic()
            if now - self._checked < IDENTITY_CHECK_SECONDS:
                return db
            self._checked = now
            if file_identity(self.path) == self._identity:
                return db
            # Another file at the path now (copied in by rename, as rsync and install do): read that one,
            # or a user removed there could go on logging in here until a restart.
            db.close()
            self._db = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # password hashes: readable by the server's user alone
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            _warn_if_readable(self.path)
        db = sqlite3.connect(self.path, timeout=max(0.0, self._deadline - time.monotonic()), check_same_thread=False,
                             isolation_level=None)
        try:
            db.execute(_SCHEMA)
            db.execute(_RETIRED)
            if "credentials_at" not in _columns(db):  # a database made before the column existed
                with _transaction(db):  # the column with its dates, or neither; one process does it
                    if "credentials_at" not in _columns(db):
                        db.execute("ALTER TABLE users ADD COLUMN credentials_at REAL NOT NULL DEFAULT 0")
                        db.execute("UPDATE users SET credentials_at = created_at")
        except BaseException:
            db.close()
            raise
        self._db, self._identity, self._checked = db, file_identity(self.path), time.monotonic()
        return db

    def _reader(self) -> sqlite3.Connection | None:
        """The connection to read with, or None when there is no database yet (no users: nothing is created,
        so a read-only var_dir without one answers 'no such user', not an error)."""
        if self._db is None and not self.path.exists():
            return None
        return self._conn()

    def _hash(self, password: str) -> str:
        return generate_password_hash(_normal(password), method=self.hash_method)

    def add(self, name: str, password: str, roles: Iterable[str] = ()) -> User:
        """Create a user; :class:`UserError` if the name is taken (in any case) or invalid."""
        _check_name("user name", name)
        if not password:
            raise UserError("the password may not be empty")
        now = time.time()
        password_hash = self._hash(password)
        user_roles = _roles(roles)
        # One transaction: the name's retirement is dropped with the new user written, or kept.
        with self._locked(), self._writing() as db:
            _lookalike(db, name)
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None:
                raise UserError(f"user {name!r} already exists")
            reused = db.execute("DELETE FROM retired_names WHERE name = ?", (name,)).rowcount > 0
            since = float(math.ceil(now)) if reused else now
            db.execute(
                "INSERT INTO users(name, password_hash, roles, created_at, credentials_at) VALUES (?, ?, ?, ?, ?)",
                (name, password_hash, json.dumps(list(user_roles)), now, since),
            )
        return User(name, user_roles, now, since)

    def _check_lookalike(self, name: str) -> None:
        """:class:`UserError` when another user's name differs from ``name`` only in case."""
        with self._locked():
            db = self._reader()
            if db is not None:
                _lookalike(db, name)

    def get(self, name: str) -> User | None:
        """The user called ``name``, or ``None``."""
        row = self._row(name)
        return None if row is None else _user(row)

    def current(self, user: User) -> User | None:
        """``user`` as the database has them now; None when their password was set since ``user`` was read
        (even to the same date), or the account removed or made again.

        A login asks it after the password check and issues to what it answers: the password it
        checked, when set anew meanwhile, must get no tokens nor session (their ``iat`` could reach
        the new credentials' whole second, so they would outlive the change).  One read, no hashing.
        """
        row = self._row(user.name)
        if row is None or row[4] != user.credentials_at or _tag(row[1]) != user.password_tag:
            return None
        return _user(row)

    def _row(self, name: str) -> tuple[str, str, str, float, float] | None:
        with self._locked():
            db = self._reader()
            row = None if db is None else db.execute(
                "SELECT name, password_hash, roles, created_at, credentials_at FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]), float(row[3]), float(row[4]))

    def list(self) -> builtins.list[User]:
        """Every user, by name."""
        with self._locked():
            db = self._reader()
            query = "SELECT name, roles, created_at FROM users ORDER BY name"
            rows = [] if db is None else db.execute(query).fetchall()
        return [User(str(n), tuple(json.loads(r)), float(c)) for n, r, c in rows]

    def remove(self, name: str) -> bool:
        """Delete a user; return whether it existed."""
        # One transaction: the user goes with their name's retirement written, or stays.
        with self._locked(), self._writing() as db:
            removed = db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0
            if removed:
                db.execute("INSERT OR REPLACE INTO retired_names(name, at) VALUES (?, ?)", (name, time.time()))
            return removed

    def set_roles(self, name: str, roles: Iterable[str]) -> User:
        """Replace the roles of a user; :class:`UserError` if there is no such user."""
        return self._update(name, "roles = ?", json.dumps(list(_roles(roles))))

    def set_password(self, name: str, password: str) -> User:
        """Give a user a new password; every session and token of the user's from before it is void."""
        if not password:
            raise UserError("the password may not be empty")
        # Rounded up: a token's iat is whole seconds, so one issued in this very second is void too.
        return self._update(name, "password_hash = ?, credentials_at = ?", self._hash(password),
                            float(math.ceil(time.time())))

    def _update(self, name: str, assignments: str, *values: object) -> User:
        """``UPDATE users SET <assignments>`` for ``name``; the user as it is now, or :class:`UserError`."""
        with self._locked():  # assignments are this module's own text; values are bound
            db = self._conn()
            changed = db.execute(f"UPDATE users SET {assignments} WHERE name = ?", (*values, name)).rowcount
            # Read back on the same connection: a `users remove` of another process may land in between.
            row = db.execute("SELECT name, password_hash, roles, created_at, credentials_at FROM users "
                             "WHERE name = ?", (name,)).fetchone() if changed else None
        if row is None:
            raise UserError(f"no user called {name!r}")
        return _user(row)

    def set_role(self, name: str, role: str) -> User:
        """Make ``role`` the user's only role."""
        return self.set_roles(name, [role])

    def verify_password(self, name: str, password: str) -> User | None:
        """The user when ``password`` is right, else ``None`` (same cost for unknown names).

        An unknown name costs the check of a dummy hash made with ``hash_method``.  A hash
        made with other parameters (werkzeug's cheaper default, before HASH_METHOD) is
        checked with its own, and the answer waits until the check has lasted as long as
        the latest checks with ``hash_method`` (their median): else an old hash, verifying
        sooner, would tell which names have one, and a name that never logs in would go on
        telling it.  Waiting, rather than checking the dummy too, costs no CPU and does not
        make such names the slow ones.  A right password with such a hash is hashed again
        with HASH_METHOD.

        ``password`` is checked in NFC; one given otherwise ("e" and a combining accent) is
        checked as given too, for a hash made before passwords were normalised (an unknown
        name's dummy as well), and such a hash is replaced by the NFC form's on a right one.
        """
        if self._dummy_hash is None:  # made on the first login of either kind: it costs both the same
            started = time.perf_counter()
            dummy = self._hash("not a real password")
            self._costs = (time.perf_counter() - started,)  # about a check's cost: a measure to begin with
            self._dummy_hash = dummy  # (last: a thread that finds it set finds the costs set too)
        given, password = password, _normal(password)
        row = self._row(name)
        if row is None:
            self._measured(self._dummy_hash, password)
            if given != password:  # as a user's check of the password as given (below)
                self._measured(self._dummy_hash, given)
            return None
        right = self._check(name, row[1], password)
        legacy = not right and given != password and self._check(name, row[1], given)
        if not (right or legacy):
            return None
        # A legacy hash (of a password stored as given, before passwords were normalised) is replaced by
        # the normalised password's, as an older method's is (only towards HASH_METHOD: never down to an
        # override's).
        if self.hash_method == HASH_METHOD and (legacy or row[1].partition("$")[0] != HASH_METHOD):
            return _user(row, self._rehash(row, password))
        return _user(row)

    def _check(self, name: str, password_hash: str, password: str) -> bool:
        """``check_password_hash``, as long as one with ``hash_method`` takes whatever the hash's method."""
        if password_hash.partition("$")[0] == (self._dummy_hash or "").partition("$")[0]:  # hash_method, as named
            return self._measured(password_hash, password)
        started = time.perf_counter()
        try:
            right = check_password_hash(password_hash, password)
        except ValueError as exc:  # a method this Python's hashlib lacks, or no method werkzeug knows
            logging.getLogger("wsgistack.app").error(
                "users: the stored password hash of %r cannot be checked here (%s): that user cannot log "
                "in until `serve.py users passwd` sets a new password", name, exc)
            right = False
        costs = sorted(self._costs)
        left = costs[len(costs) // 2] - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
        return right

    def _measured(self, password_hash: str, password: str) -> bool:
        """``check_password_hash``, its time kept among the latest :data:`COST_SAMPLES` (``password_hash``
        is made with ``hash_method``)."""
        started = time.perf_counter()
        right = check_password_hash(password_hash, password)
        self._costs = (*self._costs[1 - COST_SAMPLES:], time.perf_counter() - started)
        return right

    def _rehash(self, row: tuple[str, str, str, float, float], password: str) -> str:
        """Store ``password`` hashed with ``hash_method`` in place of the row's hash; the hash of
        ``password`` the database holds now (the row's when it holds another).

        The credentials' date stays: the password is the same, so no session or token
        of the user's is void.  Only a hash that is still the row's is replaced (a
        ``users passwd`` meanwhile wins), and a database that cannot be written to
        leaves the old one, which goes on working.
        """
        name, old_hash = row[0], row[1]
        new_hash = self._hash(password)
        try:
            with self._locked():
                replaced = self._conn().execute(
                    "UPDATE users SET password_hash = ? WHERE name = ? AND password_hash = ?",
                    (new_hash, name, old_hash)).rowcount
        except (sqlite3.Error, OSError) as exc:
            logging.getLogger("wsgistack.app").warning(
                "could not store the password of user %r hashed again with %s (%s): it keeps its older hash",
                name, self.hash_method, exc)
            return old_hash
        if replaced:
            return new_hash
        # Changed meanwhile: by another login's rehash of the same password (whose hash is then this
        # password's, and the login goes on), or by a `users passwd` (the login is refused). Rare: one
        # more hash to tell them apart.
        now = self._row(name)
        if now is not None and now[4] == row[4] and check_password_hash(now[1], password):
            return now[1]
        return old_hash

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# ------------------------------------------------------------------ CLI


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{prog} users", description="Manage the users who may log in.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", help="add a user (asks for the password twice)", allow_abbrev=False)
    add.add_argument("name")
    add.add_argument("--role", action="append", default=[], dest="roles", metavar="ROLE",
                     help="give the user this role (repeatable)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    passwd = sub.add_parser("passwd", help="set a user's password (ends the user's sessions and tokens)",
                            allow_abbrev=False)
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    sub.add_parser("list", help="list users and their roles")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    set_role = sub.add_parser("set-role", help="replace a user's roles (--none: take every role away)",
                              allow_abbrev=False)
    set_role.add_argument("name")
    # No ROLE is no roles only when --none says so: a ROLE left out by mistake must not take every one away.
    set_role.add_argument("roles", nargs="*", metavar="ROLE")
    set_role.add_argument("--none", action="store_true", help="take every role away")
    set_role.set_defaults(check=_check_set_role, subparser=set_role)
    return parser


def _check_set_role(args: argparse.Namespace) -> None:
    """``set-role`` takes ROLE... or ``--none``, one of them: a usage error (exit 2) otherwise."""
    if args.none and args.roles:
        args.subparser.error("--none takes every role away: give it without ROLE")
    if not args.none and not args.roles:
        args.subparser.error("give the user's roles (ROLE ...), or --none to take every role away")


#: The shortest password the CLI sets (NIST SP 800-63B §5.1.1.2: at least 8 characters).
MIN_PASSWORD = 8


def _read_password(from_stdin: bool) -> str:
    if from_stdin and not sys.stdin.isatty():  # a pipe, a file; on a terminal the prompt does not echo it
        try:
            password = sys.stdin.readline().rstrip("\r\n")
        except UnicodeDecodeError:  # a UTF-8 locale's strict stdin (C.UTF-8's escapes them: checked below)
            raise UserError("the password is not UTF-8 text") from None
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise UserError("the passwords do not match")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, read with surrogateescape
        raise UserError("the password is not UTF-8 text") from None
    if 0 < len(_normal(password)) < MIN_PASSWORD:  # characters, however their accents are encoded
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")
    return password


def users_cli(argv: list[str], db_path: str, prog: str = "serve.py") -> int:
    """Run ``users add|passwd|list|remove|set-role``; return 0 (done), 1 (refused), 2 (usage) or 130 (Ctrl-C).

    ``prog`` is the program as the operator ran it (``wsgistack``, ``serve.py``): usage and errors name it.
    """
    if argv[:1] == ["users"]:
        argv = argv[1:]
    try:
        args = _parser(prog).parse_args(argv)
        if hasattr(args, "check"):
            args.check(args)
    except SystemExit as stop:  # argparse has printed usage or help
        return stop.code if isinstance(stop.code, int) else 2
    if args.command != "add" and not os.path.exists(db_path):  # only `add` creates the database
        print(f"{prog} users {args.command}: there is no users database at {db_path} (`{prog} users add` creates "
              "it; is app.options.var_dir, or WSGISTACK_VAR_DIR, the one the server uses?)", file=sys.stderr)
        return 1
    try:
        store = UserStore(db_path)
    except ValueError as exc:  # $WSGISTACK_PASSWORD_HASH names a method werkzeug does not know
        print(f"{prog} users {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "add":
            _check_name("user name", args.name)
            _roles(args.roles)
            if store.get(args.name) is not None:
                raise UserError(f"user {args.name!r} already exists")
            store._check_lookalike(args.name)  # before the password is asked for
            user = store.add(args.name, _read_password(args.password_stdin), args.roles)
            print(f"added user {user.name!r} with roles: {', '.join(user.roles) or '(none)'}")
        elif args.command == "list":
            users = store.list()
            if not users:
                print(f"{prog} users list: no users in {db_path}", file=sys.stderr)  # stdout: one line a user
            width = max((len(u.name) for u in users), default=4)
            for u in users:
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(u.created_at))
                print(f"{u.name:<{width}}  {created}  {', '.join(u.roles) or '-'}")
        elif args.command == "passwd":
            if store.get(args.name) is None:
                raise UserError(f"no user called {args.name!r}")
            user = store.set_password(args.name, _read_password(args.password_stdin))
            print(f"new password for {user.name!r}: their sessions and the access and refresh tokens issued to "
                  "them before now are void (refused within a second)")
        elif args.command == "remove":
            if not store.remove(args.name):
                raise UserError(f"no user called {args.name!r}")
            print(f"removed user {args.name!r}")
        else:
            user = store.set_roles(args.name, args.roles)
            print(f"user {user.name!r} now has roles: {', '.join(user.roles) or '(none)'}")
    except UserError as exc:
        print(f"{prog} users {args.command}: {exc}", file=sys.stderr)
        return 1
    except EOFError:
        print(f"{prog} users {args.command}: no password was given", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, at the prompt most likely (whose line it ends): 130, as shells say SIGINT
        print(f"\n{prog} users {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, sqlite3.Error) as exc:
        print(f"{prog} users {args.command}: cannot use {db_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
