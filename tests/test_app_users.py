"""The users database and the ``serve.py users`` command."""

from __future__ import annotations

import io
import math
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import app.users as users_module
from app.users import User, UserError, UserStore, users_cli

ROOT = Path(__file__).resolve().parent.parent

FAST = "pbkdf2:sha256:1000"  # tests only: real stores use app.users.HASH_METHOD (scrypt)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UserStore]:
    """An empty user store with a cheap hash."""
    users = UserStore(tmp_path / "var" / "users.sqlite3", hash_method=FAST)
    yield users
    users.close()


def test_add_get_list_remove(store: UserStore) -> None:
    alice = store.add("alice", "pw-a", roles=["admin", "user", "admin"])
    store.add("bob", "pw-b")
    assert alice.roles == ("admin", "user")
    assert store.get("alice") == alice
    assert store.get("carol") is None
    assert [u.name for u in store.list()] == ["alice", "bob"]
    assert store.remove("bob") is True
    assert store.remove("bob") is False
    assert [u.name for u in store.list()] == ["alice"]


def test_passwords_are_hashed(store: UserStore) -> None:
    store.add("alice", "correct horse")
    raw = store.path.read_bytes()
    assert b"correct horse" not in raw
    assert b"pbkdf2:sha256:1000$" in raw


def test_verify_password(store: UserStore) -> None:
    store.add("alice", "s3cret", roles=["admin"])
    assert store.verify_password("alice", "s3cret") == store.get("alice")
    assert store.verify_password("alice", "S3cret") is None
    assert store.verify_password("nobody", "s3cret") is None


def test_a_hash_made_before_passwords_were_normalised_still_verifies(store: UserStore) -> None:
    """A password stored as typed, decomposed (é as e and an accent), goes on logging in typed so."""
    from werkzeug.security import generate_password_hash

    store.add("alice", "placeholder")
    db = sqlite3.connect(store.path, isolation_level=None)
    db.execute("UPDATE users SET password_hash = ?", (generate_password_hash("cafe\u0301-password", FAST),))
    db.close()
    assert store.verify_password("alice", "cafe\u0301-password") is not None
    assert store.verify_password("alice", "cafe-password") is None


def test_current_tells_a_user_whose_password_was_set_since_they_were_read(store: UserStore) -> None:
    store.add("alice", "s3cret", roles=["admin"])
    read = store.verify_password("alice", "s3cret")
    assert read is not None and "s3cret" not in repr(read) and read.password_tag not in repr(read)
    store.set_roles("alice", ["user"])  # no password change: the user as they are now
    assert store.current(read) == User("alice", ("user",), read.created_at, read.credentials_at)
    store.set_password("alice", "other")
    assert store.current(read) is None
    again = store.get("alice")
    assert again is not None and store.current(again) == again
    db = sqlite3.connect(store.path)  # set again, dated as before (a second passwd within one second)
    db.execute("UPDATE users SET password_hash = ? WHERE name = 'alice'", (store._hash("third"),))
    db.commit()
    db.close()
    assert store.current(again) is None
    store.remove("alice")
    assert store.current(again) is None


def test_unknown_user_costs_a_hash_check_too(store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("alice", "s3cret")
    calls: list[str] = []
    real = users_module.check_password_hash  # type: ignore[attr-defined]

    def counting(pwhash: str, password: str) -> bool:
        calls.append(pwhash.split("$", 1)[0])
        return real(pwhash, password)

    monkeypatch.setattr(users_module, "check_password_hash", counting)
    store.verify_password("alice", "wrong")
    store.verify_password("nobody", "wrong")
    assert calls == [FAST, FAST]
    calls.clear()  # a decomposed password is checked as given too (a hash from before normalising): both ways
    store.verify_password("alice", "wrong\u0301")
    store.verify_password("nobody", "wrong\u0301")
    assert calls == [FAST] * 4


def _with_hash(store: UserStore, name: str, password_hash: str) -> None:
    db = sqlite3.connect(store.path)
    db.execute("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name))
    db.commit()
    db.close()


@pytest.mark.parametrize(("made_with", "password", "padded"), [
    pytest.param("pbkdf2:sha256:10", "wrong", True, id="cheaper hash, wrong password"),
    pytest.param("pbkdf2:sha256:10", "s3cret", True, id="cheaper hash, right password"),
    pytest.param("pbkdf2:sha1:1000", "wrong", True, id="another method"),
    pytest.param(FAST, "wrong", False, id="the store's own method"),
    pytest.param(None, "wrong", False, id="unknown name"),
])
def test_a_hash_of_another_method_is_padded_to_the_time_of_the_stores_own(
        store: UserStore, monkeypatch: pytest.MonkeyPatch, made_with: str | None, password: str,
        padded: bool) -> None:
    """An older, cheaper hash must not answer sooner than the dummy an unknown name costs, right password or
    wrong (a name that never logs in would tell it exists): its check is made to last the median of the
    latest checks with the store's own method."""
    from werkzeug.security import generate_password_hash

    store.add("alice", "s3cret")
    if made_with is not None:
        _with_hash(store, "alice", generate_password_hash("s3cret", made_with))
    store.verify_password("nobody", "x")  # measures a check with the store's method
    assert len(store._costs) == 2  # (making the dummy, then checking it)
    store._costs = (0.2, 5.0, 0.4, 0.3, 9.0)  # (as measured before: the median is 0.4)
    slept: list[float] = []
    monkeypatch.setattr("app.users.time.sleep", slept.append)
    found = store.verify_password("alice" if made_with is not None else "nobody", password)
    assert (found is not None) is (password == "s3cret")
    assert len(slept) == padded
    if padded:
        assert 0.35 < slept[0] <= 0.4
        assert store._costs == (0.2, 5.0, 0.4, 0.3, 9.0)  # another method's check is no measure
    else:
        assert len(store._costs) == 5 and store._costs[:4] == (5.0, 0.4, 0.3, 9.0)  # the latest five


def test_a_cheaper_hash_takes_as_long_as_an_unknown_name(tmp_path: Path) -> None:
    """The same, timed: a store whose method costs some 40 ms against a hash that costs well under one."""
    import statistics
    import time

    from werkzeug.security import generate_password_hash

    store = UserStore(tmp_path / "users.sqlite3", hash_method="pbkdf2:sha256:40000")
    store.add("alice", "s3cret")
    _with_hash(store, "alice", generate_password_hash("s3cret", FAST))

    def took(name: str) -> float:
        started = time.perf_counter()
        assert store.verify_password(name, "wrong") is None
        return time.perf_counter() - started

    unknown = statistics.median(took("nobody") for _ in range(5))
    legacy = statistics.median(took("alice") for _ in range(5))
    store.close()
    assert legacy > 0.6 * unknown  # unpadded: some 2 %


def test_set_roles(store: UserStore) -> None:
    store.add("alice", "pw")
    assert store.set_roles("alice", ["editor", "viewer"]).roles == ("editor", "viewer")
    assert store.set_role("alice", "admin").roles == ("admin",)
    assert store.set_roles("alice", []).roles == ()
    with pytest.raises(UserError, match=r"^no user called 'bob'$"):
        store.set_roles("bob", ["admin"])


@pytest.mark.parametrize("change", ["set_roles", "set_password"])
def test_a_user_removed_as_a_change_lands_is_no_user_not_a_crash(store: UserStore, monkeypatch: pytest.MonkeyPatch,
                                                                 change: str) -> None:
    """`users remove` of another process between the change and its reading back: no user, not a traceback."""
    store.add("alice", "pw")
    real = store._conn

    class RemovedMeanwhile:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
            cursor = self.db.execute(sql, params)
            if sql.startswith("UPDATE users"):
                other = sqlite3.connect(store.path, isolation_level=None)
                other.execute("DELETE FROM users WHERE name = 'alice'")
                other.close()
            return cursor

    monkeypatch.setattr(store, "_conn", lambda: RemovedMeanwhile(real()))
    with pytest.raises(UserError, match=r"^no user called 'alice'$"):
        getattr(store, change)("alice", "pw-2" if change == "set_password" else ["admin"])


@pytest.mark.parametrize(
    ("name", "password", "roles", "message"),
    [
        pytest.param("alice", "pw", (), "user 'alice' already exists", id="duplicate"),
        pytest.param("bad name", "pw", (), "user name 'bad name' is not valid", id="space in name"),
        pytest.param("", "pw", (), "user name '' is not valid", id="empty name"),
        pytest.param("x" * 65, "pw", (), "is not valid: use 1 to 64 letters", id="long name"),
        pytest.param("bob", "", (), "the password may not be empty", id="empty password"),
        pytest.param("bob", "pw", ("ad min",), "role 'ad min' is not valid", id="bad role"),
        pytest.param("alice\n", "pw", (), "user name 'alice\\n' is not valid", id="a name ending in a newline"),
        pytest.param("bob", "pw", ("admin\n",), "role 'admin\\n' is not valid", id="a role ending in a newline"),
        pytest.param("Alice", "pw", (), "user name 'Alice' differs from user 'alice' only in case", id="capitalised"),
        pytest.param("ALICE", "pw", (), "user name 'ALICE' differs from user 'alice' only in case", id="upper case"),
    ],
)
def test_add_refusals(store: UserStore, name: str, password: str, roles: tuple[str, ...], message: str) -> None:
    store.add("alice", "pw")
    with pytest.raises(UserError, match=re.escape(message)):
        store.add(name, password, roles)
    assert [u.name for u in store.list()] == ["alice"]


def test_store_is_thread_safe(store: UserStore) -> None:
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            store.add(f"user{i}", "pw", [f"r{i}"])
            assert store.verify_password(f"user{i}", "pw") is not None
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list()) == 16


@pytest.mark.parametrize("use", [
    pytest.param(lambda store: store.get("alice"), id="get"),
    pytest.param(lambda store: store.verify_password("alice", "pw"), id="verify_password"),
    pytest.param(lambda store: store.set_roles("alice", ["ops"]), id="set_roles"),
])
def test_uses_waiting_for_another_process_s_lock_each_fail_within_the_busy_time(
        store: UserStore, monkeypatch: pytest.MonkeyPatch, use: Any) -> None:
    """Queued behind each other, four uses fail within BUSY_SECONDS each, not after 1, 2, 3 and 4 times it."""
    store.add("alice", "pw")
    monkeypatch.setattr(users_module, "BUSY_SECONDS", 0.3)
    holder = sqlite3.connect(store.path, isolation_level=None)  # as `sqlite3 users.sqlite3` with BEGIN EXCLUSIVE
    holder.execute("BEGIN EXCLUSIVE")
    took: list[tuple[float, str]] = []

    def attempt() -> None:
        started = time.monotonic()
        try:
            use(store)
            outcome = "answered"
        except sqlite3.OperationalError as exc:
            outcome = str(exc)
        took.append((time.monotonic() - started, outcome))

    try:
        threads = [threading.Thread(target=attempt) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [outcome for _, outcome in took] == ["database is locked"] * 4
    assert max(seconds for seconds, _ in took) < 0.55
    assert store.get("alice") is not None  # and the next use, the lock gone, is answered


def test_store_file_is_shared_between_instances(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    first = UserStore(path, hash_method=FAST)
    first.add("alice", "pw", ["admin"])
    second = UserStore(path, hash_method=FAST)
    alice = first.get("alice")
    assert alice is not None
    assert second.verify_password("alice", "pw") == User("alice", ("admin",), alice.created_at, alice.created_at)
    first.close()
    second.close()


# ----------------------------------------------------------------------- CLI


@pytest.fixture
def db(tmp_path: Path) -> str:
    """Path of a users database that does not exist yet."""
    return str(tmp_path / "var" / "users.sqlite3")


def run(argv: list[str], db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = users_cli(argv, db)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_list_set_role_remove(db: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(["add", "alice", "--role", "admin", "--role", "ops", "--password-stdin"], db, capsys, monkeypatch,
               stdin="hunter2-hunter2\n") == (0, "added user 'alice' with roles: admin, ops\n", "")
    assert run(["users", "add", "bob", "--password-stdin"], db, capsys, monkeypatch,
               stdin="pw-123456\n") == (0, "added user 'bob' with roles: (none)\n", "")
    code, out, err = run(["list"], db, capsys, monkeypatch)
    lines = out.splitlines()
    assert (code, err, len(lines)) == (0, "", 2)
    assert lines[0].startswith("alice  ") and lines[0].endswith("  admin, ops")
    assert lines[1].startswith("bob    ") and lines[1].endswith("  -")
    assert run(["set-role", "bob", "editor", "viewer"], db, capsys, monkeypatch) == (
        0, "user 'bob' now has roles: editor, viewer\n", "")
    assert run(["set-role", "alice", "--none"], db, capsys, monkeypatch) == (
        0, "user 'alice' now has roles: (none)\n", "")
    assert run(["list"], db, capsys, monkeypatch)[1].splitlines()[0].endswith("  -")
    assert run(["remove", "alice"], db, capsys, monkeypatch) == (0, "removed user 'alice'\n", "")
    store = UserStore(db)
    assert [(u.name, u.roles) for u in store.list()] == [("bob", ("editor", "viewer"))]
    assert store.verify_password("bob", "pw-123456") is not None
    store.close()


def test_cli_passwd_sets_a_new_password_and_voids_what_came_before(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(["add", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="leaked-password\n")[0] == 0
    before = UserStore(db).get("alice")
    assert before is not None and before.credentials_at == before.created_at
    assert run(["passwd", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="fresh one\n") == (
        0, "new password for 'alice': their sessions and the access and refresh tokens issued to them before now "
           "are void (refused within a second)\n", "")
    store = UserStore(db)
    after = store.get("alice")
    assert after is not None and after.credentials_at > before.credentials_at
    assert after.created_at == before.created_at
    assert store.verify_password("alice", "leaked-password") is None and store.verify_password("alice", "fresh one")
    store.close()
    assert run(["passwd", "nobody", "--password-stdin"], db, capsys, monkeypatch, stdin="x\n") == (
        1, "", "serve.py users passwd: no user called 'nobody'\n")
    assert run(["passwd", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="\n") == (
        1, "", "serve.py users passwd: the password may not be empty\n")


def test_a_database_from_before_credentials_at_is_brought_up_to_date(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "users.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, "
                "roles TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL)")
    old.execute("INSERT INTO users VALUES ('alice', 'x', '[\"admin\"]', 1700000000.5)")
    old.commit()
    old.close()
    store = UserStore(path)
    assert store.get("alice") == User("alice", ("admin",), 1700000000.5, 1700000000.5)
    store.close()


def test_a_database_brought_up_to_date_halfway_is_not_left_so(tmp_path: Path) -> None:
    """The new column is dated in the same transaction: a failure in between leaves the old table, and the next
    open adds and dates it (else every user's credentials would count from 1970, and stay so)."""
    path = tmp_path / "users.sqlite3"
    _sql(path, "CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, "
               "roles TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL)")
    _sql(path, "INSERT INTO users VALUES ('alice', 'x', '[\"admin\"]', 1700000000.5)")
    _sql(path, "CREATE TRIGGER dating BEFORE UPDATE ON users BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    store = UserStore(path)
    with pytest.raises(sqlite3.IntegrityError, match=r"^disk I/O error$"):
        store.get("alice")
    _sql(path, "DROP TRIGGER dating")
    assert store.get("alice") == User("alice", ("admin",), 1700000000.5, 1700000000.5)
    store.close()


def test_cli_password_prompt(db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["s3cret-s3cret", "s3cret-s3cret"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert run(["add", "carol"], db, capsys, monkeypatch)[0] == 0
    assert prompts == ["Password: ", "Repeat password: "]
    store = UserStore(db)
    assert store.verify_password("carol", "s3cret-s3cret") is not None
    store.close()


def test_cli_list_empty(db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The note goes to stderr: `users list | wc -l` counts the users, and no user called 'no' shows in a script."""
    assert run(["add", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="pw-123456\n")[0] == 0
    assert run(["remove", "alice"], db, capsys, monkeypatch)[0] == 0
    assert run(["list"], db, capsys, monkeypatch) == (0, "", f"serve.py users list: no users in {db}\n")


@pytest.mark.parametrize("argv", [["list"], ["remove", "alice"], ["set-role", "alice", "admin"]])
def test_cli_without_a_database_says_so_and_creates_nothing(db: str, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """A wrong var_dir must not look like an empty users database (nor leave one, owned by root, behind)."""
    assert run(argv, db, capsys, monkeypatch) == (1, "", (
        f"serve.py users {argv[0]}: there is no users database at {db} (`serve.py users add` creates it; is "
        "app.options.var_dir, or WSGISTACK_VAR_DIR, the one the server uses?)\n"))
    assert not Path(db).parent.exists()


@pytest.mark.parametrize(
    ("argv", "stdin", "getpass_answers", "expected"),
    [
        pytest.param(["add", "alice", "--password-stdin"], "x\n", None,
                     (1, "serve.py users add: user 'alice' already exists\n"), id="duplicate"),
        pytest.param(["add", "Alice"], "", [],  # (refused before the password is asked)
                     (1, "serve.py users add: user name 'Alice' differs from user 'alice' only in case: one of "
                         "them could pass for the other; choose another name\n"), id="a name differing in case"),
        pytest.param(["add", "bad name", "--password-stdin"], "x\n", None,
                     (1, "serve.py users add: user name 'bad name' is not valid: use 1 to 64 letters, digits, "
                         "'_', '.', '@' or '-', starting with a letter or digit\n"), id="bad name"),
        pytest.param(["add", "dave", "--password-stdin"], "", None,
                     (1, "serve.py users add: the password may not be empty\n"), id="empty password"),
        pytest.param(["add", "dave", "--password-stdin"], "seven77\n", None,
                     (1, "serve.py users add: the password must have at least 8 characters\n"), id="short password"),
        pytest.param(["add", "dave", "--password-stdin"], "cafe\u0301123\n", None,  # 8 code points, 7 characters
                     (1, "serve.py users add: the password must have at least 8 characters\n"),
                     id="short password, accents decomposed"),
        pytest.param(["passwd", "alice"], "", ["seven77", "seven77"],
                     (1, "serve.py users passwd: the password must have at least 8 characters\n"),
                     id="short password, typed"),
        pytest.param(["add", "dave"], "", ["one", "two"],
                     (1, "serve.py users add: the passwords do not match\n"), id="passwords differ"),
        pytest.param(["add", "dave"], "", [],
                     (1, "serve.py users add: no password was given\n"), id="no terminal"),
        pytest.param(["remove", "zed"], "", None,
                     (1, "serve.py users remove: no user called 'zed'\n"), id="remove unknown"),
        pytest.param(["set-role", "zed", "admin"], "", None,
                     (1, "serve.py users set-role: no user called 'zed'\n"), id="set-role unknown"),
        pytest.param(["add", "dave", "--password-stdin"], "caf\udce9-password\n", None,
                     (1, "serve.py users add: the password is not UTF-8 text\n"), id="a password that is not UTF-8"),
    ],
)
def test_cli_refusals(db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                      argv: list[str], stdin: str, getpass_answers: list[str] | None,
                      expected: tuple[int, str]) -> None:
    assert run(["add", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="pw-123456\n")[0] == 0
    if getpass_answers is not None:
        answers = iter(getpass_answers)

        def fake_getpass(prompt: str = "") -> str:
            try:
                return next(answers)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("getpass.getpass", fake_getpass)
    code, out, err = run(argv, db, capsys, monkeypatch, stdin=stdin)
    assert (code, err) == expected
    assert out == ""


@pytest.mark.parametrize("password", [
    pytest.param("eight888", id="exactly 8 characters"),
    pytest.param("cafe\u03011234", id="8 characters, one of them an e and a combining accent"),
])
def test_cli_accepts_a_password_of_exactly_the_minimum_length(db: str, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch, password: str) -> None:
    assert run(["add", "dave", "--password-stdin"], db, capsys, monkeypatch, stdin=f"{password}\n") == (
        0, "added user 'dave' with roles: (none)\n", "")
    assert run(["passwd", "dave", "--password-stdin"], db, capsys, monkeypatch, stdin=f"{password}\n")[0] == 0


@pytest.mark.parametrize("argv", [["add", "dave"], ["passwd", "alice"]])
def test_cli_interrupted_at_the_password_prompt_ends_quietly(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """Ctrl-C at the prompt: one line and 130, as a shell reports SIGINT, not a KeyboardInterrupt traceback."""
    assert run(["add", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="pw-123456\n")[0] == 0

    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("getpass.getpass", interrupted)
    assert run(argv, db, capsys, monkeypatch) == (130, "", f"\nserve.py users {argv[0]}: interrupted\n")
    store = UserStore(db, hash_method=FAST)
    try:  # nothing changed
        assert [u.name for u in store.list()] == ["alice"]
        assert store.verify_password("alice", "pw-123456") is not None
    finally:
        store.close()


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_cli_a_password_on_stdin_that_is_not_utf8_is_refused_in_any_locale(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, errors: str) -> None:
    """sys.stdin decodes strictly in a UTF-8 locale (en_US.UTF-8), with surrogateescape in C.UTF-8."""
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9-password\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr("sys.stdin", stdin)
    assert users_cli(["add", "dave", "--password-stdin"], db) == 1
    assert capsys.readouterr() == ("", "serve.py users add: the password is not UTF-8 text\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "the following arguments are required: COMMAND", id="no command"),
        pytest.param(["bogus"], "invalid choice: 'bogus'", id="unknown command"),
        pytest.param(["add"], "the following arguments are required: name", id="add without name"),
        pytest.param(["remove"], "the following arguments are required: name", id="remove without name"),
        pytest.param(["set-role", "alice"], "set-role: error: give the user's roles (ROLE ...), or --none to take "
                     "every role away", id="set-role without role: no roles only when --none says so"),
        pytest.param(["set-role", "alice", "admin", "--none"], "set-role: error: --none takes every role away: "
                     "give it without ROLE", id="set-role with roles and --none"),
        pytest.param(["add", "x", "--bogus"], "unrecognized arguments: --bogus", id="unknown flag"),
        pytest.param(["add", "x", "--rol", "admin"], "unrecognized arguments: --rol", id="no abbreviations"),
        pytest.param(["list", "extra"], "unrecognized arguments: extra", id="list with argument"),
    ],
)
def test_cli_usage_errors_exit_2(db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                 argv: list[str], message: str) -> None:
    code, _, err = run(argv, db, capsys, monkeypatch)
    assert code == 2
    assert err.startswith("usage: serve.py users")
    assert message in err
    assert not Path(db).exists(), "a usage error must not create the database"


def test_cli_help_exits_0(db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(["--help"], db, capsys, monkeypatch)
    assert code == 0
    assert "add" in out and "set-role" in out


def test_the_database_file_is_the_servers_alone(tmp_path: Path) -> None:
    """Password hashes: no other account on the machine reads them, whatever the umask."""
    import os

    old = os.umask(0o022)
    try:
        store = UserStore(tmp_path / "var" / "users.sqlite3")
        store.add("alice", "pw-123456")
        store.close()
    finally:
        os.umask(old)
    assert (tmp_path / "var" / "users.sqlite3").stat().st_mode & 0o777 == 0o600


def test_a_file_copied_in_by_rename_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rsync and install write a new file and rename it over the old one: the server reads the new one."""
    monkeypatch.setattr(users_module, "IDENTITY_CHECK_SECONDS", 0.0)
    served = UserStore(tmp_path / "users.sqlite3")
    served.add("alice", "pw-123456")
    assert served.get("alice") is not None
    other = UserStore(tmp_path / "copy.sqlite3")
    other.add("bob", "pw-123456")
    other.close()
    (tmp_path / "copy.sqlite3").rename(tmp_path / "users.sqlite3")
    assert served.get("alice") is None  # removed in the copy: no more logins
    assert served.verify_password("bob", "pw-123456") is not None
    served.close()


def test_reading_without_a_database_creates_none(tmp_path: Path) -> None:
    """A read-only var_dir without a users database: no such user (a login's 401), not an error."""
    store = UserStore(tmp_path / "ro" / "users.sqlite3")
    assert store.get("alice") is None and store.verify_password("alice", "pw") is None and store.list() == []
    assert not (tmp_path / "ro").exists()


@pytest.fixture
def real_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The method a store uses unless told otherwise (the suite's conftest names a cheap one)."""
    monkeypatch.delenv(users_module.HASH_ENV, raising=False)


@pytest.mark.usefixtures("real_hash")
def test_passwords_are_hashed_at_owasps_floor(tmp_path: Path) -> None:
    """scrypt N=2**15, r=8, p=3 (OWASP Password Storage Cheat Sheet); an older hash still verifies."""
    import sqlite3

    from werkzeug.security import generate_password_hash

    store = UserStore(tmp_path / "users.sqlite3")
    store.add("alice", "pw-123456")
    with sqlite3.connect(tmp_path / "users.sqlite3") as db:
        [(stored,)] = db.execute("SELECT password_hash FROM users").fetchall()
        assert stored.startswith("scrypt:32768:8:3$")
        db.execute("UPDATE users SET password_hash = ?", (generate_password_hash("pw-123456", "scrypt"),))
    db.close()
    assert store.verify_password("alice", "pw-123456") is not None
    store.close()


@pytest.mark.parametrize(("made_with", "password", "rehashed"), [
    ("scrypt", "pw-123456", True),  # werkzeug's default: scrypt with p=1, a third of the cost
    ("pbkdf2:sha256:1000", "pw-123456", True),
    (FAST, "wrong password", False),  # only a right password can be hashed again
    (users_module.HASH_METHOD, "pw-123456", False),
])
@pytest.mark.usefixtures("real_hash")
def test_a_right_password_with_an_older_hash_is_hashed_again(
        tmp_path: Path, made_with: str, password: str, rehashed: bool) -> None:
    """An old, cheaper hash verifies faster than the dummy an unknown name costs: a login would tell
    which accounts have one. Hashed again on a right password, with the credentials' date kept."""
    import sqlite3

    from werkzeug.security import generate_password_hash

    path = tmp_path / "users.sqlite3"
    store = UserStore(path)
    store.add("alice", "pw-123456", ["admin"])
    old = generate_password_hash("pw-123456", made_with)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE users SET password_hash = ?", (old,))
    db.close()
    before = store.get("alice")
    assert (store.verify_password("alice", password) == before) is (password == "pw-123456")
    with sqlite3.connect(path) as db:
        [(stored,)] = db.execute("SELECT password_hash FROM users").fetchall()
    db.close()
    assert (stored != old) is rehashed
    assert stored.startswith(users_module.HASH_METHOD + "$") is (rehashed or made_with == users_module.HASH_METHOD)
    assert store.get("alice") == before  # credentials_at too: no session or token of hers is void
    assert store.verify_password("alice", "pw-123456") == before
    store.close()


@pytest.mark.usefixtures("real_hash")
def test_a_hash_of_a_password_stored_decomposed_is_hashed_again_composed(tmp_path: Path) -> None:
    """A right password whose hash predates normalising, given as it was then, is hashed again in NFC:
    from then on it logs in however its accents are encoded."""
    from werkzeug.security import generate_password_hash

    nfc, nfd = "caf\u00e9-password", "cafe\u0301-password"
    store = UserStore(tmp_path / "users.sqlite3")
    store.add("alice", "placeholder")
    with sqlite3.connect(tmp_path / "users.sqlite3") as db:
        db.execute("UPDATE users SET password_hash = ?", (generate_password_hash(nfd, users_module.HASH_METHOD),))
    db.close()
    before = store.get("alice")
    assert store.verify_password("alice", nfc) is None  # (a hash of the other form: nothing to tell it by)
    assert store.verify_password("alice", nfd) == before
    assert store.verify_password("alice", nfc) == before
    store.close()


@pytest.mark.parametrize("stored", [
    pytest.param("md5-crypt:1$salt$0123abcd", id="a method werkzeug does not know"),
    pytest.param("pbkdf2:no-such-digest:1000$salt$0123abcd", id="a digest hashlib lacks"),
])
def test_a_stored_hash_that_cannot_be_checked_refuses_the_login_and_says_why(
        store: UserStore, stored: str, caplog: pytest.LogCaptureFixture) -> None:
    """A hash from elsewhere (another tool, a Python with other hashlib digests) is a wrong password, not a 500."""
    store.add("alice", "pw-123456")
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE users SET password_hash = ?", (stored,))
    db.close()
    assert store.verify_password("alice", "pw-123456") is None
    [record] = [r for r in caplog.records if r.name == "wsgistack.app"]
    assert (record.levelname, record.getMessage().split(" (")[0]) == (
        "ERROR", "users: the stored password hash of 'alice' cannot be checked here")
    assert record.getMessage().endswith("that user cannot log in until `serve.py users passwd` sets a new password")


@pytest.mark.parametrize(("value", "method"), [
    pytest.param(None, users_module.HASH_METHOD, id="unset: OWASP's floor"),
    pytest.param("", users_module.HASH_METHOD, id="empty: unset"),
    pytest.param(FAST, FAST, id="a cheap one for a test suite"),
])
def test_the_hash_method_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture, value: str | None,
                                                    method: str) -> None:
    import logging

    monkeypatch.setattr(users_module, "_warned_env", [])
    if value is None:
        monkeypatch.delenv(users_module.HASH_ENV, raising=False)
    else:
        monkeypatch.setenv(users_module.HASH_ENV, value)
    with caplog.at_level(logging.WARNING, logger="wsgistack.app"):
        store = UserStore(tmp_path / "users.sqlite3")
        UserStore(tmp_path / "other.sqlite3")
    assert store.hash_method == method
    store.add("alice", "pw-123456")
    row = store._row("alice")
    assert row is not None and row[1].startswith(method + "$")
    warned = [r.getMessage() for r in caplog.records if "WSGISTACK_PASSWORD_HASH" in r.getMessage()]
    assert warned == ([] if method == users_module.HASH_METHOD else
                      [f"new password hashes are made with {FAST} ($WSGISTACK_PASSWORD_HASH), not scrypt:32768:8:3"])
    store.close()


def test_a_hash_method_werkzeug_does_not_know_is_refused_when_the_store_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(users_module.HASH_ENV, "md5")
    with pytest.raises(ValueError, match=r"^\$WSGISTACK_PASSWORD_HASH='md5' is not a password hash method werkzeug "
                                         r"knows \(.*\); leave it unset for scrypt:32768:8:3$"):
        UserStore(tmp_path / "users.sqlite3")


def test_a_hash_method_from_the_environment_never_rewrites_a_stored_hash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set where it must not be (production), it would otherwise turn scrypt hashes into cheap ones at each login."""
    import sqlite3

    monkeypatch.delenv(users_module.HASH_ENV, raising=False)
    path = tmp_path / "users.sqlite3"
    strong = UserStore(path)
    strong.add("alice", "pw-123456")
    strong.close()
    monkeypatch.setenv(users_module.HASH_ENV, "pbkdf2:md5:1")
    weak = UserStore(path)
    assert weak.verify_password("alice", "pw-123456") is not None
    weak.close()
    with sqlite3.connect(path) as db:
        [(stored,)] = db.execute("SELECT password_hash FROM users").fetchall()
    db.close()
    assert stored.startswith(users_module.HASH_METHOD + "$")


def test_the_users_command_says_a_hash_method_werkzeug_does_not_know(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(users_module.HASH_ENV, "bogus")
    code, out, err = run(["add", "bob", "--password-stdin"], db, capsys, monkeypatch, stdin="pw-123456\n")
    assert (code, out) == (2, "")
    assert err.startswith("serve.py users add: $WSGISTACK_PASSWORD_HASH='bogus' is not a password hash method")


@pytest.mark.parametrize("mode", [
    pytest.param(0o644, id="644: everyone may read it"),
    pytest.param(0o640, id="640: its group may read it"),
    pytest.param(0o604, id="604: others outside the group may read it"),
    pytest.param(0o600, id="600: the server's alone, nothing to say"),
])
def test_a_database_other_accounts_may_read_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     mode: int) -> None:
    """One made before the file was created 0600: the server says so, once it opens it, and how to fix it."""
    import logging

    path = tmp_path / "users.sqlite3"
    made = UserStore(path, hash_method=FAST)
    made.add("bob", "pw-123456")
    made.close()
    path.chmod(mode)
    store = UserStore(path, hash_method=FAST)  # (not $WSGISTACK_PASSWORD_HASH: its once-a-process warning)
    with caplog.at_level(logging.WARNING, logger="wsgistack.app"):
        assert store.get("alice") is None
    store.close()
    assert caplog.messages == ([] if mode == 0o600 else [
        f"the users database {path} is readable by other accounts (mode {mode:o}): its password "
        f"hashes should be the server's alone; run: chmod 600 {path}"])


def test_password_stdin_on_a_terminal_is_not_echoed(tmp_path: Path) -> None:
    """``--password-stdin`` typed at a terminal: asked for without echo, as the prompt is, not read back onto it."""
    import pty
    import select

    code = f"import sys; from app.users import users_cli; sys.exit(users_cli(sys.argv[1:], {str(tmp_path / 'u.db')!r}))"
    pid, leader = pty.fork()  # the child's controlling terminal is the pty, as a shell's is
    if pid == 0:  # pragma: no cover - the child
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-c", code, "add", "tty-user", "--password-stdin"])
    seen = b""
    try:
        for asked in (1, 2):  # the password, and its repetition
            while seen.count(b"assword: ") < asked:
                ready, _, _ = select.select([leader], [], [], 10)
                assert ready, seen
                seen += os.read(leader, 1024)
            os.write(leader, b"tty-secret-9\n")
        while select.select([leader], [], [], 5)[0]:
            try:
                chunk = os.read(leader, 1024)
            except OSError:  # the child is gone
                break
            if not chunk:
                break
            seen += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(leader)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"added user 'tty-user'" in seen, seen
    assert b"tty-secret-9" not in seen, seen


# ------------------------------------------------------------- one change, one transaction


def _retired(path: str | Path) -> list[str]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return [name for (name,) in db.execute("SELECT name FROM retired_names ORDER BY name")]
    finally:
        db.close()


def _sql(path: str | Path, statement: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(statement)
    finally:
        db.close()


#: Each change that writes two tables, the table its second write goes to, and the command that makes it.
TWO_TABLE_CHANGES = [
    pytest.param("remove", "INSERT ON retired_names", ["remove", "alice"], id="remove: the name's retirement"),
    pytest.param("add", "INSERT ON users", ["add", "alice", "--password-stdin"], id="add of a removed name: the user"),
]


def _before(change: str, db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """alice, for `remove`; alice added and removed (her name retired), for `add`."""
    assert run(["add", "alice", "--password-stdin"], db, capsys, monkeypatch, stdin="pw-123456\n")[0] == 0
    if change == "add":
        assert run(["remove", "alice"], db, capsys, monkeypatch)[0] == 0


def _unchanged(change: str, db: str) -> None:
    """As :func:`_before` left it: neither of the change's two writes is there."""
    store = UserStore(db, hash_method=FAST)
    try:
        assert (store.get("alice") is not None) is (change == "remove")
        assert _retired(db) == ([] if change == "remove" else ["alice"])
    finally:
        store.close()


@pytest.mark.parametrize(("change", "second_write", "argv"), TWO_TABLE_CHANGES)
def test_a_change_whose_second_write_fails_leaves_neither_and_says_why(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, change: str,
        second_write: str, argv: list[str]) -> None:
    """A user removed without their name's retirement would let a later `add` of the name keep the old holder's
    tokens valid; a removed name's retirement dropped without the new user, the same at the `add` after."""
    _before(change, db, capsys, monkeypatch)
    _sql(db, f"CREATE TRIGGER second_write BEFORE {second_write} BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    assert run(argv, db, capsys, monkeypatch, stdin="pw-654321\n") == (
        1, "", f"serve.py users {change}: cannot use {db}: disk I/O error\n")
    _unchanged(change, db)
    store = UserStore(db, hash_method=FAST)  # the API: the store's error, and the store still answers after it
    try:
        with pytest.raises(sqlite3.IntegrityError, match=r"^disk I/O error$"):
            store.remove("alice") if change == "remove" else store.add("alice", "pw-654321")
        assert (store.get("alice") is not None) is (change == "remove")
        _sql(db, "DROP TRIGGER second_write")
        if change == "remove":
            assert store.remove("alice") is True
        else:  # the name's retirement was kept: the new alice's credentials count from the next whole second
            alice = store.add("alice", "pw-654321")
            assert alice.credentials_at == math.ceil(alice.created_at)
        assert store.get("alice") is None if change == "remove" else store.get("alice") == alice
        assert _retired(db) == (["alice"] if change == "remove" else [])
    finally:
        store.close()


@pytest.mark.parametrize(("change", "second_write", "argv"), TWO_TABLE_CHANGES)
def test_a_process_killed_between_a_change_s_two_writes_leaves_neither(
        tmp_path: Path, change: str, second_write: str, argv: list[str]) -> None:
    """SIGKILL (the OOM killer, a power cut) as the second write begins: SQLite rolls the first one back."""
    path = tmp_path / "users.sqlite3"
    store = UserStore(path, hash_method=FAST)
    store.add("alice", "pw-123456")
    if change == "add":
        store.remove("alice")
    store.close()
    _sql(path, f"CREATE TRIGGER second_write BEFORE {second_write} BEGIN SELECT die(); END")
    code = (
        "import os, signal, sys\n"
        "from app.users import UserStore\n"
        f"store = UserStore(sys.argv[1], hash_method={FAST!r})\n"
        "store.get('alice')\n"  # opens the connection: die() is its own, as the trigger calls it
        "store._db.create_function('die', 0, lambda: os.kill(os.getpid(), signal.SIGKILL))\n"
        "store.remove('alice') if sys.argv[2] == 'remove' else store.add('alice', 'pw-654321')\n"
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", code, str(path), change], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == -9, done.stderr
    _sql(path, "DROP TRIGGER second_write")
    _unchanged(change, str(path))


@pytest.mark.parametrize(("change", "second_write", "argv"), TWO_TABLE_CHANGES)
def test_a_change_whose_commit_waits_too_long_for_a_reader_is_rolled_back(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, change: str,
        second_write: str, argv: list[str]) -> None:
    """A reader (another process's read transaction) past BUSY_SECONDS: the commit fails within the time and
    the change is undone, not left open on the connection, where the store's next reads would see it."""
    _before(change, db, capsys, monkeypatch)
    monkeypatch.setattr(users_module, "BUSY_SECONDS", 0.3)
    store = UserStore(db, hash_method=FAST)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN")
    holder.execute("SELECT count(*) FROM users").fetchall()  # a shared lock, held until the ROLLBACK
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match=r"^database is locked$"):
            store.remove("alice") if change == "remove" else store.add("alice", "pw-654321")
        assert time.monotonic() - started < 0.55
        assert (store.get("alice") is not None) is (change == "remove")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.close()
    _unchanged(change, db)


@pytest.mark.parametrize(("use", "expected"), [
    pytest.param(lambda store: store.remove("alice"), [], id="remove"),
    pytest.param(lambda store: store.add("bob", "pw-123456"), [("alice", ("ops",)), ("bob", ())], id="add"),
    pytest.param(lambda store: store.set_password("alice", "pw-654321"), [("alice", ("ops",))], id="set_password"),
])
def test_a_change_waits_for_another_process_s_write_to_end(
        store: UserStore, monkeypatch: pytest.MonkeyPatch, use: Any,
        expected: list[tuple[str, tuple[str, ...]]]) -> None:
    """Another `users` command (or a login's rehash) writing: the change waits its turn, BUSY_SECONDS at most."""
    store.add("alice", "pw-123456")
    monkeypatch.setattr(users_module, "BUSY_SECONDS", 3.0)
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE users SET roles = '[\"ops\"]' WHERE name = 'alice'")
    ending = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    started = time.monotonic()
    ending.start()
    try:
        use(store)
    finally:
        ending.join()
        holder.close()
    assert 0.25 < time.monotonic() - started < 3.0
    assert [(u.name, u.roles) for u in store.list()] == expected


def test_two_users_commands_at_once_each_make_every_change(tmp_path: Path) -> None:
    """Two processes adding and removing users in the same file: each waits for the other's write lock."""
    import subprocess

    path = tmp_path / "users.sqlite3"
    code = (
        "import io, sys\n"
        "from app.users import users_cli\n"
        "for i in range(15):\n"
        "    sys.stdin = io.StringIO('pw-123456\\n')\n"
        "    assert users_cli(['add', f'{sys.argv[2]}{i}', '--password-stdin'], sys.argv[1]) == 0\n"
        "    if i % 3:\n"
        "        assert users_cli(['remove', f'{sys.argv[2]}{i}'], sys.argv[1]) == 0\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", code, str(path), prefix], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for prefix in ("a", "b")]
    outcomes = [(p.wait(timeout=120), p.communicate()[1].splitlines()) for p in runs]
    assert [(code, [line for line in err if not line.startswith("new password hashes are made with ")])
            for code, err in outcomes] == [(0, []), (0, [])]  # (the suite's cheap hash is named on stderr)
    kept = sorted(f"{p}{i}" for p in "ab" for i in range(0, 15, 3))
    removed = sorted(f"{p}{i}" for p in "ab" for i in range(15) if i % 3)
    store = UserStore(path, hash_method=FAST)
    assert sorted(u.name for u in store.list()) == kept
    store.close()
    assert _retired(path) == removed
