"""The ``local`` search engine: an embedded SQLite FTS5 index of Python docstrings.

It needs no network, so the default configuration serves real results
offline.  The index is built on first use (or by :meth:`LocalEngine.ensure_index`)
from the docstrings :mod:`app.search.docstrings` reads, into a temporary file
that replaces ``index_path`` atomically; a thread lock and, where the
platform has one, a file lock make sure only one builder runs.  The index
remembers which sources it holds (their names, the schema, the Python version)
and is rebuilt when that list changes; a source whose files were edited is not
noticed: delete the index file, and the next search builds it again.

An up-to-date index is only ever read, so a prebuilt one works in a
read-only directory.  An index that must be built in a directory that is not
writable gives ``503 Service Unavailable`` (logged once).  A query that finds
the file damaged (SQLite reports corruption) rebuilds it, once however many
threads or processes notice, and is answered from the new index.

Each thread reads through a connection of its own, closed when the thread
ends (a server that runs each request in a thread or greenlet of its own opens
one per search) or when the engine closes (the app's ``close()``: a reload's
retired pipeline keeps no file open).

User text never becomes FTS5 syntax: each whitespace-separated term is
quoted as a phrase and passed as a parameter, so ``"`` or ``AND(`` are
searched for, not parsed.  Results are ranked by ``bm25``: a match in the
object's own name weighs 20 times one in its docstring, a match elsewhere in
its qualified name 5 times.

Do not use it as a general document store: it indexes what the sources
name and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import unicodedata
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unicodedata import ucd_3_2_0

from werkzeug.exceptions import HTTPException

from app.search import Progress, SearchEngine, SearchPage, SearchResult
from app.search.docstrings import iter_entries
from middleware.base import file_identity, refuse

if TYPE_CHECKING:
    from app.options import SearchOptions

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LocalEngine", "fts_query"]

SCHEMA_VERSION = 2
MAX_TERMS = 32

#: Seconds a build that ran out of room waits before the next try: searches meanwhile get the 503 at
#: once, instead of each building the whole index again (seconds of CPU) to fail the same way.
BUILD_RETRY_SECONDS = 30
FULL = "the disk is full"
_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE VIRTUAL TABLE docs USING fts5(
    name, title, body, url UNINDEXED, kind UNINDEXED,
    tokenize = 'porter unicode61 remove_diacritics 2'
);
"""
_COUNT = "SELECT count(*) FROM docs WHERE docs MATCH ?"
_PAGE = (
    "SELECT title, url, snippet(docs, 2, '', '', '…', 32) FROM docs WHERE docs MATCH ? "
    # bm25 (lower is better), then a nudge towards shallow names and the standard library, so
    # `json` finds the json module before pydantic.json.
    "ORDER BY bm25(docs, 20.0, 5.0, 1.0) + 0.3 * (length(title) - length(replace(title, '.', ''))) "
    "+ (CASE WHEN url LIKE 'https://docs.python.org/%' THEN 0.0 ELSE 1.0 END) LIMIT ? OFFSET ?"
)


#: Characters Python's Unicode tables call letters and SQLite's (Unicode 6.1, for the unicode61
#: tokenizer) split words at: New Tai Lue and Vedic signs that were marks until Unicode 8.
WORD_SPLITTERS = "\u19b0-\u19c0\u19c8\u19c9\u1cf2\u1cf3"
#: Combining marks the tokenizer keeps inside a word (``remove_diacritics`` folds them away) where
#: Python's ``\w`` sees a break: the accents of decomposed (NFD) Latin and Vietnamese text.
WORD_MARKS = "\u0300-\u0304\u0306-\u030c\u030f\u0311\u031b\u0323-\u0328\u032d\u032e\u0330\u0331"
#: tests/test_app_search.py asks the running SQLite for every character where the tables may disagree.
_WORD = re.compile(f"(?:[^\\W_{WORD_SPLITTERS}]|[{WORD_MARKS}])+")
_NOT_WORD = re.compile(r"[^\w]")


def _words(term: str) -> list[str]:
    """The runs of letters, digits and the marks SQLite keeps in words: never fewer than the words the
    unicode61 tokenizer finds (more where it keeps a character Python does not call a letter: a
    symbol or a code point newer than its tables), so the cap holds."""
    return _WORD.findall(term)


@functools.cache
def _key_table() -> dict[int, str | None]:
    """What ``str.translate`` needs to compare terms as the tokenizer does, asked of the running SQLite.

    unicode61 folds each character on its own, by its own (Unicode 6.1) tables: the case of many
    letters, and with ``remove_diacritics 2`` the accents of Latin letters and the marks of decomposed
    text (which it drops).  It applies no compatibility folding (the ligature U+FB01, fullwidth
    letters and superscript digits stay as they are) and keeps Greek tonos and Cyrillic breves.  So
    the folds are read from SQLite itself, for every character that has a case or a decomposition
    or is a mark (a few thousand: a tenth of a second, once per process, at its first query that is
    not ASCII).  Characters that were punctuation, symbols or spaces in Unicode 3.2 and still are
    (SQLite splits words at them) become spaces.
    """
    # SQLite folds case in the BMP and Deseret only, and removes diacritics in the BMP (not Hangul's).
    probe = [c for c in (*map(chr, range(0x80, 0xAC00)), *map(chr, range(0xD7A4, 0xD800)),
                         *map(chr, range(0xE000, 0x10000)), *map(chr, range(0x10400, 0x10450))) if _may_fold(c)]
    table: dict[int, str | None] = {c: (chr(c).lower() if chr(c).isalnum() else " ") for c in range(0x80)}
    later = "".join(map(chr, (*range(0x80, 0xD800), *range(0xE000, 0x30000))))
    table.update((ord(c), " ") for c in _NOT_WORD.findall(later) if _separates(c))
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'unicode61 remove_diacritics 2')")
        db.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((ord(c), f"q{c}q") for c in probe))
        db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        folds = dict(db.execute("SELECT doc, term FROM v WHERE length(term) <= 3 AND term GLOB 'q*q'"))
    for code, term in folds.items():
        if term != f"q{chr(code)}q":
            table[code] = term[1:-1] or None  # a mark it drops
    return table


def _may_fold(c: str) -> bool:
    return (c.casefold() != c or c.lower() != c or unicodedata.category(c) == "Mn"
            or unicodedata.decomposition(c)[:1] not in ("", "<"))


def _separates(c: str) -> bool:
    """A character SQLite's tables (Unicode 6.1) put between words: one Unicode 3.2 already had as
    neither letter, digit nor private use, and that is none of these still (never one newer than 6.1:
    SQLite keeps those in words)."""
    old = ucd_3_2_0.category(c)
    return old[0] not in "LNM" and old not in ("Co", "Cn") and unicodedata.category(c)[0] not in "LNM"


def _key(term: str, words: list[str]) -> str:
    """``term`` as the tokenizer reads it (folded by its rules, not Python's): terms with the same key
    search for the same thing.  Never equal for two terms it reads differently (a key that is equal
    too seldom only costs a copy of the term)."""
    if term.isascii():
        return " ".join(words).lower()  # SQLite folds A-Z only; every other ASCII character splits
    return " ".join(term.translate(_key_table()).split())


def fts_query(text: str) -> str | None:
    """Turn user text into an FTS5 query of quoted terms (all must match); None if no term.

    A term with punctuation (``json.loads``) is a phrase of the words the index
    has in it; more than ``MAX_TERMS`` words in all (a term again counts once;
    ``a.a.a…`` is as many words as it has) is refused with ``400 Bad Request``.
    """
    # Control characters (a NUL ends the query string inside SQLite) separate terms.
    text = "".join(c if c.isprintable() else " " for c in text)
    terms, count, seen = [], 0, set()
    for term in text.split():
        words = _words(term)  # as written: the index holds the documents' text as they wrote it
        if not words:
            continue
        # A term again (in any case or accent the tokenizer folds) matches nothing new, but each copy
        # multiplies the ranking's work: "the" 32 times took half a second.
        key = _key(term, words)
        if key in seen:
            continue
        seen.add(key)
        terms.append('"' + term.replace('"', '""') + '"')
        count += len(words)
    if count > MAX_TERMS:
        raise refuse(400, f"The query parameter 'q' may have at most {MAX_TERMS} words (it has {count}).",
                     details={"parameter": "q", "max_words": MAX_TERMS})
    return " ".join(terms) or None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (across processes) where the OS offers one."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LocalEngine(SearchEngine):
    """Search the FTS5 index at ``options.index_path``, building it on first use.

    Options used: ``index_path``, ``index_sources`` (``None``: the standard
    library and the project's dependencies) and ``per_page``.  ``logger``
    gets the index's rebuilds and build failures.

        engine = LocalEngine(SearchOptions(index_path="/tmp/i.sqlite3", index_sources=["json"]))
        engine.search("decode").results[0].title   # 'json.decoder.JSONDecoder.decode' or similar
    """

    name = "local"

    def __init__(self, options: SearchOptions, logger: logging.Logger | None = None) -> None:
        self.path = Path(options.index_path or "var/search-index.sqlite3")
        self.logger = logger if logger is not None else logging.getLogger("wsgistack.app.search")
        self.sources = list(options.index_sources) if options.index_sources is not None else None
        self.per_page = options.per_page
        self.signature = json.dumps(
            {"schema": SCHEMA_VERSION, "sources": self.sources, "python": sys.version_info[:2]},
            sort_keys=True,
        )
        self._lock = threading.Lock()  # held by a build, for as long as it takes
        self._local = threading.local()  # .held: the thread's _Held connection
        #: Every thread's connection, for close(); weak: a thread that ends takes its connection with it.
        self._connections: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._connections_lock = threading.Lock()  # never held long: close() must not wait for a build
        self._ready = False
        #: Bumped each time a damaged index is replaced; connections opened before are reopened.
        self._generation = 0
        self._build_failure_logged = False
        self._retry_at = 0.0  # a failed build is not tried again before this (time.monotonic())
        self._why = ""

    # ------------------------------------------------------------ index

    def ensure_index(self) -> None:
        """Build the index unless an up-to-date one exists; safe from many threads and processes.

        Reading the signature needs no lock and no write access; only a build takes the lock.
        Raises a 503 when the index must be built and cannot be (a directory that is not writable, a
        full disk), at once for ``BUILD_RETRY_SECONDS`` after a failed build.
        """
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            if self._stored_signature() != self.signature:
                self._build_locked("is missing or out of date and cannot be built",
                                   lambda: self._stored_signature() != self.signature)
            self._ready = True

    def _build_locked(self, problem: str, still_needed: Callable[[], bool]) -> None:
        """Build under the file lock if ``still_needed()`` (another process may have built it meanwhile).

        Call with ``self._lock`` held.  ``problem`` completes "The search index …" in the log line
        and the 503.
        """
        if time.monotonic() < self._retry_at:  # the last build failed a moment ago: not every search again
            raise self._unavailable(problem)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                if still_needed():
                    self._build()
        except (OSError, sqlite3.Error) as exc:
            why = self._cannot_build(exc)
            if why is None:
                raise
            if not self._build_failure_logged:
                self._build_failure_logged = True
                self.logger.error("the search index %s %s: %s", self.path, problem, exc)
            self._why = why
            if why == FULL:  # found out after building it all: not again on every search for a while
                self._retry_at = time.monotonic() + BUILD_RETRY_SECONDS
            raise self._unavailable(problem) from None
        self._build_failure_logged = False

    def _unavailable(self, problem: str) -> HTTPException:
        wait = BUILD_RETRY_SECONDS if self._why == FULL else 5
        return refuse(503, f"The search index {problem}: {self._why}.", headers=[("Retry-After", str(wait))])

    def _cannot_build(self, exc: BaseException) -> str | None:
        """Why the index cannot be built here (a 503 until that changes), or None for another failure."""
        if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
                (isinstance(exc, sqlite3.Error) and "full" in str(exc)):  # "database or disk is full"
            return FULL
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "its directory is not writable"
        directory = self.path.parent
        return "its directory is not writable" if directory.is_dir() and not os.access(directory, os.W_OK) else None

    def _stored_signature(self) -> str | None:
        if not self.path.is_file():
            return None
        try:
            with contextlib.closing(sqlite3.connect(self._uri(), uri=True)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'signature'").fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]) if row else None

    def _build(self) -> None:
        self._sweep()
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            with contextlib.closing(sqlite3.connect(tmp)) as db, warnings.catch_warnings():
                # Old files in site-packages may warn about escapes while parsing.
                warnings.simplefilter("ignore")
                db.execute("PRAGMA journal_mode = OFF")
                db.execute("PRAGMA synchronous = OFF")
                db.executescript(_SCHEMA)
                db.executemany(
                    "INSERT INTO docs(name, title, body, url, kind) VALUES (?, ?, ?, ?, ?)",
                    ((e.title.rpartition(".")[2], e.title, e.body, e.url, e.kind)
                     for e in iter_entries(self.sources)),
                )
                db.execute("INSERT INTO docs(docs) VALUES ('optimize')")
                db.execute("INSERT INTO meta(key, value) VALUES ('signature', ?)", (self.signature,))
                db.commit()
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Remove the temporary files of builds that ended without cleaning up (stopped or killed).

        Called under the index's file lock, which every build holds: none of them is running.
        (Not by process id: a container's server is pid 1 at every start.)
        """
        ours = re.compile(re.escape(self.path.name) + r"\.\d+\.\d+\.tmp")  # not another index's (name.full.…)
        for tmp in self.path.parent.iterdir():
            if ours.fullmatch(tmp.name):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _uri(self) -> str:
        return self.path.resolve().as_uri() + "?mode=ro"

    def _connection(self) -> sqlite3.Connection:
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None and held.generation != self._generation:
            self._drop_connection()  # it reads a damaged file that has been replaced since
            held = None
        if held is None:
            if self._ready and not self.path.is_file():
                self._ready = False  # deleted while we ran (a cleaned var/): build it again
            self.ensure_index()
            generation, identity = self._generation, file_identity(self.path)
            held = _Held(sqlite3.connect(self._uri(), uri=True, check_same_thread=False), generation, identity)
            with self._connections_lock:
                self._connections.add(held)
            self._local.held = held
        return held.conn

    def _drop_connection(self) -> None:
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            return
        self._local.held = None
        with self._connections_lock:
            self._connections.discard(held)
        held.close()

    def _fetch(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        """Run a query; when it finds the index damaged, rebuild the index and run it again."""
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.ProgrammingError:
            raise  # a misuse (such as a closed connection), not a damaged file
        except sqlite3.DatabaseError as exc:
            self._recover(exc)
        return self._connection().execute(sql, params).fetchall()

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """Replace the damaged file this thread's connection reads, unless someone already has."""
        generation, identity = self._local.held.generation, self._local.held.identity
        self._drop_connection()
        with self._lock:
            if generation != self._generation:
                return  # another thread rebuilt it after this connection was opened
            self.logger.warning("the search index %s is damaged (%s); rebuilding it", self.path, exc)
            # Another process that noticed first has replaced the file: then there is nothing to do.
            self._build_locked("is damaged and cannot be rebuilt", lambda: file_identity(self.path) == identity)
            self._generation += 1

    # ----------------------------------------------------------- search

    def check_query(self, query: str) -> None:
        """Refuse a query this engine will not run (more than ``MAX_TERMS`` words) with a 400."""
        fts_query(query)

    def stages(self, query: str, page: int, heartbeat: float | None = None) -> Generator[Progress, None, SearchPage]:
        match = fts_query(query)  # (a local index never keeps a stage waiting long: no heartbeat)
        self._connection()
        yield 33, "index_ready"
        total = int(self._fetch(_COUNT, (match,))[0][0]) if match else 0
        yield 67, "matched"
        offset = (page - 1) * self.per_page
        rows = self._fetch(_PAGE, (match, self.per_page, offset)) if match and offset < total else []
        results = tuple(SearchResult(title, url, " ".join(snippet.split()), self.name) for title, url, snippet in rows)
        yield 100, "ranked"
        return SearchPage(query, results, total, page, self.per_page)

    def close(self) -> None:
        """Close the index connections, without waiting for a build in progress (a stopping server
        would wait for the whole build: the process ends it, and the next build sweeps its file)."""
        with self._connections_lock:
            connections, self._connections = list(self._connections), weakref.WeakSet()
        for held in connections:
            held.close()
        self._local = threading.local()


class _Held:
    """One thread's connection to the index, with what it was opened on.

    It lives in the thread's ``threading.local``, and the connection is closed when the thread
    ends (the local goes with it) or the engine closes, whichever comes first: a server that
    runs each request in a thread or greenlet of its own would otherwise leave a file open per search.
    """

    __slots__ = ("__weakref__", "close", "conn", "generation", "identity")

    def __init__(self, conn: sqlite3.Connection, generation: int, identity: tuple[int, int] | None) -> None:
        self.conn, self.generation, self.identity = conn, generation, identity
        self.close = weakref.finalize(self, conn.close)  # once: at close(), else when the thread drops it
