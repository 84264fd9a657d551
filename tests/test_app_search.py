"""The local engine: docstrings read with ast, the FTS5 index, ranking, injection safety."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from app import create_app
from app.options import SearchOptions
from app.search import SearchPage
from app.search import local as local_module
from app.search.docstrings import default_sources, iter_entries
from app.search.local import LocalEngine, fts_query


def engine_for(tmp_path: Path, sources: list[str] | None, **extra: Any) -> LocalEngine:
    return LocalEngine(SearchOptions(index_path=str(tmp_path / "index.sqlite3"), index_sources=sources, **extra))


@pytest.fixture
def json_engine(tmp_path: Path) -> Iterator[LocalEngine]:
    """A local engine over the json package only."""
    engine = engine_for(tmp_path, ["json"])
    yield engine
    engine.close()


@pytest.fixture
def client(tmp_path: Path) -> TestApp:
    """WebTest over the Flask core indexing the json package."""
    return TestApp(create_app({"var_dir": str(tmp_path), "search": {"index_sources": ["json"]}}))


# ------------------------------------------------------------------ results


def test_known_term_finds_the_json_decoder(json_engine: LocalEngine) -> None:
    page = json_engine.search("decode")
    by_title = {r.title: r for r in page.results}
    hit = by_title["json.decoder.JSONDecoder.decode"]
    assert hit.url == "https://docs.python.org/3/library/json.html#json.decoder.JSONDecoder.decode"
    assert hit.engine == "local"
    assert "Python representation" in hit.content
    assert "\n" not in hit.content
    assert page.total == len(page.results) or len(page.results) == 10


def test_qualified_name_outranks_a_passing_mention(json_engine: LocalEngine) -> None:
    assert json_engine.search("JSONDecoder").results[0].title.endswith("JSONDecoder")
    assert json_engine.search("dumps").results[0].title == "json.dumps"


def test_stemming_matches_word_forms(json_engine: LocalEngine) -> None:
    titles = {r.title for r in json_engine.search("decoding").results}
    assert "json.decoder.JSONDecoder.decode" in titles


def test_all_terms_must_match(json_engine: LocalEngine) -> None:
    both = json_engine.search("decode document")
    only = json_engine.search("decode")
    assert 0 < both.total < only.total


def test_snippet_is_plain_text_around_the_match(json_engine: LocalEngine) -> None:
    content = next(r.content for r in json_engine.search("indent").results if r.title == "json.dumps")
    assert "indent" in content
    assert "<b>" not in content


def test_pagination_is_stable(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, ["json"], per_page=2)
    first, second = engine.search("json", 1), engine.search("json", 2)
    assert first.total == second.total > 4
    assert len(first.results) == len(second.results) == 2
    assert not {r.title for r in first.results} & {r.title for r in second.results}
    assert engine.search("json", 1000).results == ()
    engine.close()


FTS_SYNTAX = [
    '"', '""', "AND(", "OR", "NOT", "NEAR(a b", "*", "json*", "title:json", "body:decode", "^json", "-json",
    "(", ")", '"decode', "decode AND", "a OR b", "{title body}: json", "'; DROP TABLE docs; --",
    "\\", "%", "_", "json\x00decode", "ünïcödé", "数据", "😀", "NEAR(json decode, 2)", "decode + -",
]


@pytest.mark.parametrize("query", FTS_SYNTAX)
def test_fts_syntax_in_the_query_is_searched_for_not_parsed(client: TestApp, query: str) -> None:
    body = client.get("/api/v1/search", {"q": query}).json
    assert body["query"] == query.strip()
    assert isinstance(body["meta"]["total"], int)
    # Still intact and searchable afterwards.
    assert client.get("/api/v1/search", {"q": "decode"}).json["meta"]["total"] > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("decode", '"decode"', id="one term"),
        pytest.param("json  decode", '"json" "decode"', id="two terms"),
        pytest.param('say "hi"', '"say" """hi"""', id="quotes doubled"),
        pytest.param("AND( OR", '"AND(" "OR"', id="operators quoted"),
        pytest.param('" * ( )', None, id="no searchable term"),
        pytest.param("", None, id="empty"),
        pytest.param("json\x00decode\x1b", '"json" "decode"', id="control characters separate"),
        pytest.param("json.loads", '"json.loads"', id="a dotted name stays one phrase"),
        pytest.param(" ".join(f"w{i}" for i in range(32)), " ".join(f'"w{i}"' for i in range(32)),
                     id="MAX_TERMS words"),
        pytest.param("the THE th\u00e9 the", '"the"', id="a term again, in any case or accent: once"),
        pytest.param("json json.loads JSON", '"json" "json.loads"', id="a phrase is another term"),
        pytest.param(" ".join(["the"] * 32) + " json", '"the" "json"', id="copies take no room under the cap"),
        pytest.param("a." * 31 + "a", '"' + "a." * 31 + 'a"', id="one term of 32 words"),
        pytest.param("a\u19b0" * 32, '"' + "a\u19b0" * 32 + '"',
                     id="a letter to Python that separates words in SQLite (Unicode 6.1) separates them here"),
        pytest.param("json \u2d5c\u2d30\u2d4e \u07d2\u07de\u07cf", '"json" "\u2d5c\u2d30\u2d4e" "\u07d2\u07de\u07cf"',
                     id="scripts newer than Unicode 3.2 are words too (Tifinagh, N'Ko)"),
        pytest.param("".join(f"caf{i}e\u0301 " for i in range(17)) + "europe\u0301enne",
                     "".join(f'"caf{i}e\u0301" ' for i in range(17)) + '"europe\u0301enne"',
                     id="decomposed accents (NFD) count one word each, not two (34, past the cap)"),
        pytest.param("".join(f"w{i} " for i in range(31)) + "re\u0301sume\u0301",
                     "".join(f'"w{i}" ' for i in range(31)) + '"re\u0301sume\u0301"',
                     id="a decomposed accent inside a word is no break: the 32nd word is kept whole"),
        pytest.param("a\u03b1\u0313" * 32, '"' + "a\u03b1\u0313" * 32 + '"',
                     id="marks NFC folds but the tokenizer splits at (Greek psili) still count as breaks"),
        pytest.param("\u1112\u1161\u11ab \uf91d", '"\u1112\u1161\u11ab" "\uf91d"',
                     id="searched for as written (the index keeps NFD Hangul and compatibility ideographs)"),
        pytest.param("caf\u00e9 \u0436\u0443\u0440\u043d\u0430\u043b",
                     '"caf\u00e9" "\u0436\u0443\u0440\u043d\u0430\u043b"', id="letters of every script are words"),
        pytest.param("json \uff4a\uff53\uff4f\uff4e", '"json" "\uff4a\uff53\uff4f\uff4e"',
                     id="fullwidth letters are another word to the tokenizer"),
        pytest.param("\uff4a\uff53\uff4f\uff4e json", '"\uff4a\uff53\uff4f\uff4e" "json"', id="in either order"),
        pytest.param("\ufb01le file", '"\ufb01le" "file"', id="a ligature is not its letters"),
        pytest.param("2 \u00b2", '"2" "\u00b2"', id="a superscript is not its digit"),
        pytest.param("stra\u00dfe STRASSE strasse", '"stra\u00dfe" "STRASSE"', id="sharp s is not ss"),
        pytest.param("\u03ac \u03b1 \u0439 \u0438", '"\u03ac" "\u03b1" "\u0439" "\u0438"',
                     id="Greek tonos and Cyrillic breve are letters of their own"),
        pytest.param("\u0130 i", '"\u0130"', id="dotted capital I folds to i"),
        pytest.param("\u017f s \u03c3 \u03c2 \u03a3", '"\u017f" "\u03c3"', id="long s and final sigma fold"),
        pytest.param("JSON.loads json.load\u015b", '"JSON.loads"', id="a dotted name again, accented"),
        pytest.param("the\u3002 the\u3001 the", '"the\u3002"', id="a word again between other punctuation"),
    ],
)
def test_fts_query_quotes_every_term(text: str, expected: str | None) -> None:
    assert fts_query(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    pytest.param(" ".join(f"w{i}" for i in range(33)), 33, id="33 words"),
    pytest.param(" ".join(f"w{i}" for i in range(32)) + " " + " ".join(f"W{i}" for i in range(32)) + " zzz", 33,
                 id="a word again counts once"),
    pytest.param("".join(f"x{i} " for i in range(30)) + "a.b.c", 33, id="a dotted name counts each word"),
    pytest.param("a." * 499 + "a", 500, id="one term of 500 words"),
    pytest.param("a\u19b0" * 33, 33, id="letters SQLite (Unicode 6.1) splits at count"),
    pytest.param("a\u03b1\u0313" * 33, 33, id="marks the tokenizer splits at count"),
])
def test_more_than_max_terms_words_are_refused(text: str, words: int) -> None:
    from werkzeug.exceptions import BadRequest

    with pytest.raises(BadRequest) as refused:
        fts_query(text)
    assert refused.value.description == f"The query parameter 'q' may have at most 32 words (it has {words})."


@pytest.mark.parametrize("path", ["/api/v1/search", "/api/v2/search", "/api/v2/search/stream"])
def test_a_query_of_more_than_max_terms_words_is_a_400(client: TestApp, path: str) -> None:
    """Refused, not searched for its first 32 words (a 33rd word no document has would find them)."""
    query = " ".join(["decode"] + [f"w{i}" for i in range(32)])
    answer = client.get(path, {"q": query}, status=400)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json["error"]["code"] == 400
    assert answer.json["error"]["message"] == "The query parameter 'q' may have at most 32 words (it has 33)."
    assert answer.json["error"]["details"] == {"parameter": "q", "max_words": 32}
    assert client.get(path, {"q": " ".join(query.split()[:32])}, status=200)


def test_words_are_split_where_sqlite_splits_them() -> None:
    """Every character where Python's tables and SQLite's (Unicode 6.1) may disagree, tokenized by the
    running SQLite between two letters: a letter Python knows and Unicode 3.2 did not, and every
    combining mark. fts_query never counts fewer words than SQLite reads (the cap holds), and counts
    the same for letters and for the accents of decomposed text."""
    import sqlite3
    import sys
    import unicodedata
    from unicodedata import ucd_3_2_0

    from app.search.local import _words

    letters = [chr(c) for c in range(0x80, sys.maxunicode + 1)
               if chr(c).isalnum() and ucd_3_2_0.category(chr(c))[0] not in "LN"]
    marks = [chr(c) for c in range(0x80, sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == "M"]
    chars = letters + marks
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'porter unicode61 remove_diacritics 2')")
    db.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((i, f"a{c}a") for i, c in enumerate(chars)))
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    read = dict.fromkeys(chars, 0)
    for i, count in db.execute("SELECT doc, count(*) FROM v GROUP BY doc"):
        read[chars[i]] = count
    db.close()
    counted = {c: len(_words(f"a{c}a")) for c in chars}
    assert [c for c in chars if counted[c] < read[c]] == []  # never fewer: no query gets past the cap
    assert [c for c in letters if counted[c] != read[c]] == []
    latin = [c for c in marks if c < "\u0370" and read[c] == 1]  # the accents of decomposed Latin text
    assert [c for c in latin if counted[c] != 1] == []


def test_terms_are_one_only_when_the_tokenizer_reads_them_alike() -> None:
    """Every character, between two letters, as the index's tokenizer reads it: two terms fts_query
    takes for one (keeping the first) must be the same words to SQLite, else the answer would depend on
    their order and match more than was asked."""
    import sqlite3
    from collections import defaultdict

    from app.search.local import _key, _key_table, _words

    # Past U+2FFFF the key keeps every character as it is: no two characters share a key there.
    assert max(_key_table()) < 0x30000
    chars = [chr(c) for c in range(0x80, 0x30000) if not 0xD800 <= c < 0xE000]
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'porter unicode61 remove_diacritics 2')")
    db.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((ord(c), f"q{c}q") for c in chars))
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    read: dict[int, list[str]] = defaultdict(list)
    for doc, term in db.execute("SELECT doc, term FROM v ORDER BY doc, offset"):
        read[doc].append(term)
    db.close()
    tokens: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for c in chars:
        term = f"q{c}q"
        tokens[_key(term, _words(term))].add(tuple(read[ord(c)]))
    assert {key: seen for key, seen in tokens.items() if len(seen) > 1} == {}


@pytest.mark.parametrize(("first", "second"), [
    pytest.param("decode", "\uff44\uff45\uff43\uff4f\uff44\uff45", id="fullwidth"),
    pytest.param("file", "\ufb01le", id="ligature"),
    pytest.param("2", "\u00b2", id="superscript"),
    pytest.param("decode", "D\u00c9CODE", id="case and accent: one term"),
])
def test_the_total_does_not_depend_on_the_order_of_the_words(json_engine: LocalEngine, first: str,
                                                              second: str) -> None:
    both = json_engine.search(f"{first} {second}").total
    assert json_engine.search(f"{second} {first}").total == both
    alone = sorted([json_engine.search(first).total, json_engine.search(second).total])
    assert both == (alone[1] if fts_query(f"{first} {second}") == fts_query(first) else alone[0])


def test_quoted_query_finds_what_the_plain_one_finds(json_engine: LocalEngine) -> None:
    assert json_engine.search('"decode"').total == json_engine.search("decode").total > 0


def test_no_searchable_term_gives_no_results(json_engine: LocalEngine) -> None:
    page = json_engine.search('" * (')
    assert (page.total, page.results) == (0, ())


# ----------------------------------------------------------------- building


def test_index_is_built_on_first_use_and_reused(tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite3"
    engine = engine_for(tmp_path, ["json"])
    assert not index.exists()
    engine.search("json")
    stamp = index.stat().st_mtime_ns
    engine.close()
    again = engine_for(tmp_path, ["json"])
    assert again.search("json").total > 0
    assert index.stat().st_mtime_ns == stamp, "an up-to-date index must not be rebuilt"
    again.close()
    assert not list(tmp_path.glob("*.tmp")), "no temporary files are left behind"


def test_index_is_rebuilt_when_the_sources_change(tmp_path: Path) -> None:
    first = engine_for(tmp_path, ["json"])
    assert first.search("base64").total == 0
    first.close()
    second = engine_for(tmp_path, ["base64"])
    titles = {r.title for r in second.search("b64encode").results}
    assert "base64.b64encode" in titles
    assert second.search("JSONDecoder").total == 0
    second.close()


def test_a_deleted_index_is_built_again(json_engine: LocalEngine, tmp_path: Path) -> None:
    assert json_engine.search("decode").total > 0
    (tmp_path / "index.sqlite3").unlink()
    totals: list[int] = []
    thread = threading.Thread(target=lambda: totals.append(json_engine.search("decode").total))
    thread.start()
    thread.join()
    assert totals and totals[0] > 0
    assert (tmp_path / "index.sqlite3").is_file()


def test_many_threads_on_first_use_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tmp_path, ["json"])
    builds = count_builds(monkeypatch, delay=0.05)  # widen the window in which other threads arrive
    totals = search_together(engine, "decode", 8)
    assert len(builds) == 1
    assert len(set(totals)) == 1 and totals[0] > 0


def search_together(engine: LocalEngine, query: str, threads: int) -> list[int]:
    """Run ``threads`` searches at once (released together by a barrier); their totals, none failing."""
    barrier = threading.Barrier(threads)
    totals: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            totals.append(engine.search(query).total)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    started = [threading.Thread(target=worker) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    engine.close()
    assert errors == []
    assert len(totals) == threads
    return totals


# ------------------------------------------------- damaged index, read-only directory


def corrupt(path: Path) -> None:
    """Overwrite the middle third of ``path`` with random bytes (the same bytes every run)."""
    data = path.read_bytes()
    third = len(data) // 3
    path.write_bytes(data[:third] + random.Random(0).randbytes(third) + data[2 * third:])


def count_builds(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    """Record the thread of every index build from now on (``delay`` widens the window for races)."""
    builds: list[int] = []
    real_build = LocalEngine._build

    def counting_build(self: LocalEngine) -> None:
        builds.append(threading.get_ident())
        time.sleep(delay)
        real_build(self)

    monkeypatch.setattr(LocalEngine, "_build", counting_build)
    return builds


def index_options(tmp_path: Path) -> dict[str, Any]:
    """App options with the index in its own directory, ``tmp_path / "index"``."""
    index = tmp_path / "index" / "search-index.sqlite3"
    return {"var_dir": str(tmp_path), "search": {"index_sources": ["json"], "index_path": str(index)}}


def build_index(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Build the index of ``index_options`` and return its path and the v1 answer for 'decode'."""
    app = create_app(index_options(tmp_path))
    expected = TestApp(app).get("/api/v1/search", {"q": "decode"}).json
    app.extensions["wsgistack"].close()
    return tmp_path / "index" / "search-index.sqlite3", expected


class ReadOnly:
    """Directories that refuse writes, as on a read-only container filesystem.

    Permission bits do not stop root, so the engine's ``open()`` also refuses
    to write in them, with the error a read-only mount gives (EROFS).
    """

    def __init__(self) -> None:
        self.directories: set[Path] = set()

    def add(self, directory: Path) -> None:
        directory.chmod(0o555)
        self.directories.add(directory.resolve())

    def remove(self, directory: Path) -> None:
        directory.chmod(0o755)
        self.directories.discard(directory.resolve())

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if set(mode) & set("wax+") and Path(file).resolve().parent in self.directories:
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return open(file, mode, *args, **kwargs)


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadOnly]:
    """Make directories read-only with ``read_only.add(path)``; writable again afterwards."""
    dirs = ReadOnly()
    monkeypatch.setattr(local_module, "open", dirs.open, raising=False)
    yield dirs
    for directory in list(dirs.directories):
        dirs.remove(directory)


def test_a_damaged_index_is_rebuilt_and_the_query_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    index, expected = build_index(tmp_path)
    corrupt(index)
    builds = count_builds(monkeypatch)
    client = TestApp(create_app(index_options(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="wsgistack.app.search"):
        assert client.get("/api/v1/search", {"q": "decode"}).json == expected
        assert client.get("/api/v1/search", {"q": "decode"}).json == expected
    assert len(builds) == 1
    [message] = caplog.messages  # the SQLite error in the parentheses depends on the bytes it met
    assert message.startswith(f"the search index {index} is damaged (")
    assert message.endswith("); rebuilding it")


def test_a_damaged_index_found_by_the_stream_is_rebuilt(tmp_path: Path) -> None:
    index, expected = build_index(tmp_path)
    corrupt(index)
    text = TestApp(create_app(index_options(tmp_path))).get("/api/v1/search/stream", {"q": "decode"}).text
    assert text.endswith(f"event: search_complete\ndata: {json.dumps(expected, separators=(',', ':'))}\n"
                         "id: complete\n\n")


def test_many_threads_finding_the_index_damaged_rebuild_it_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    engine_for(tmp_path, ["json"]).ensure_index()
    corrupt(tmp_path / "index.sqlite3")
    engine = engine_for(tmp_path, ["json"])
    builds = count_builds(monkeypatch, delay=0.05)
    totals = search_together(engine, "decode", 8)
    assert len(builds) == 1
    assert len(set(totals)) == 1 and totals[0] > 0


def test_an_index_another_process_replaced_is_not_rebuilt_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Two engines stand in for two worker processes: each has its own thread lock and connections.
    engine_for(tmp_path, ["json"]).ensure_index()
    corrupt(tmp_path / "index.sqlite3")
    first, second = engine_for(tmp_path, ["json"]), engine_for(tmp_path, ["json"])
    steps = second.stages("decode", 1)
    assert next(steps) == (33, "index_ready")  # connected to the damaged file
    builds = count_builds(monkeypatch)
    total = first.search("decode").total  # notices the damage first and replaces the file
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
    assert done.value.value.total == total > 0
    assert len(builds) == 1
    first.close()
    second.close()


def test_an_up_to_date_index_in_a_read_only_directory_is_used(tmp_path: Path, read_only: ReadOnly,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    index, expected = build_index(tmp_path)
    index.with_name(index.name + ".lock").unlink()  # a shipped index comes without one
    read_only.add(index.parent)
    builds = count_builds(monkeypatch)
    assert TestApp(create_app(index_options(tmp_path))).get("/api/v1/search", {"q": "decode"}).json == expected
    assert builds == []
    assert [p.name for p in index.parent.iterdir()] == [index.name]


def test_an_index_that_cannot_be_built_is_a_503_logged_once(tmp_path: Path, read_only: ReadOnly,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    index = tmp_path / "index" / "search-index.sqlite3"
    index.parent.mkdir()
    read_only.add(index.parent)
    client = TestApp(create_app(index_options(tmp_path)))
    message = "The search index is missing or out of date and cannot be built: its directory is not writable."
    with caplog.at_level(logging.ERROR, logger="wsgistack.app.search"):
        for _ in range(2):
            error = client.get("/api/v2/search", {"q": "decode"}, status=503).json["error"]
            assert (error["code"], error["message"]) == (503, message)
        last = client.get("/api/v1/search/stream", {"q": "decode"}).text.strip().split("\n\n")[-1]
    event = {"code": 503, "message": message, "retry_after": 5, "request_id": None}
    assert last == "event: search_error\ndata: " + json.dumps(event, separators=(",", ":")) + "\nretry: 5000"
    assert caplog.messages == [f"the search index {index} is missing or out of date and cannot be built: "
                               f"[Errno 30] Read-only file system: '{index}.lock'"]


@pytest.mark.parametrize("failure", [
    pytest.param(sqlite3.OperationalError("database or disk is full"), id="SQLite: database or disk is full"),
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="ENOSPC"),
])
def test_a_build_that_runs_out_of_room_is_a_503_not_tried_on_every_search(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    """The build costs seconds of CPU before the disk says no: the next searches get the 503 at once."""
    builds: list[int] = []

    def full(self: LocalEngine) -> None:
        builds.append(1)
        raise failure

    monkeypatch.setattr(LocalEngine, "_build", full)
    client = TestApp(create_app(index_options(tmp_path)))
    for _ in range(3):
        answer = client.get("/api/v1/search", {"q": "decode"}, status=503)
        assert answer.json["error"]["message"] == ("The search index is missing or out of date and cannot be "
                                                   "built: the disk is full.")
        assert answer.headers["Retry-After"] == "30"
    assert builds == [1]


def test_a_damaged_index_in_a_read_only_directory_is_a_503_until_it_is_writable(
        tmp_path: Path, read_only: ReadOnly) -> None:
    index, expected = build_index(tmp_path)
    corrupt(index)
    read_only.add(index.parent)
    client = TestApp(create_app(index_options(tmp_path)))
    error = client.get("/api/v1/search", {"q": "decode"}, status=503).json["error"]
    assert error["message"] == "The search index is damaged and cannot be rebuilt: its directory is not writable."
    read_only.remove(index.parent)
    assert client.get("/api/v1/search", {"q": "decode"}).json == expected


@pytest.mark.parametrize(("total", "pages"), [
    pytest.param(0, 0, id="none"),
    pytest.param(21, 3, id="a last page part full"),
    pytest.param(10_000, 1000, id="exactly the pages a client may ask for"),
    pytest.param(10_001, 1000, id="more than a client may ask for: the last it may"),
    pytest.param(10**400, 1000, id="a huge total, without a float overflow"),
])
def test_pages_are_those_a_client_can_ask_for(total: int, pages: int) -> None:
    assert SearchPage("q", (), total, 1, 10).pages == pages


# ----------------------------------------------------------------- docstrings


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package on disk whose import would leave a marker file."""
    root = tmp_path / "src" / "sidepkg"
    (root / "tests").mkdir(parents=True)
    marker = tmp_path / "imported.txt"
    (root / "__init__.py").write_text(
        f'"""Sidepkg frobnicates widgets."""\nimport pathlib\npathlib.Path({str(marker)!r}).write_text("x")\n'
    )
    (root / "engine.py").write_text(
        '"""Engine module docstring."""\n'
        "class Gearbox:\n"
        '    """A gearbox that frobnicates."""\n'
        "    def shift(self):\n"
        '        """Shift the gearbox up."""\n'
        "    def _clutch(self):\n"
        '        """Private clutch frobnicates."""\n'
        "def _hidden():\n"
        '    """Hidden frobnicates."""\n'
        "if True:\n"
        "    def conditional():\n"
        '        """Conditional frobnicates."""\n'
    )
    (root / "_private.py").write_text('"""Private module frobnicates."""\n')
    (root / "legacy.py").write_text('"""Legacy frobnicates."""\nprint "python 2"\n')
    (root / "tests" / "test_engine.py").write_text('"""Tests frobnicate."""\n')
    return root


def test_directory_source_reads_public_docstrings_without_importing(package: Path, tmp_path: Path) -> None:
    entries = {e.title: e for e in iter_entries([str(package)])}
    assert set(entries) == {
        "sidepkg", "sidepkg.engine", "sidepkg.engine.Gearbox", "sidepkg.engine.Gearbox.shift",
        "sidepkg.engine.conditional",
    }
    assert entries["sidepkg.engine.Gearbox"].kind == "class"
    assert entries["sidepkg.engine.Gearbox.shift"].body == "Shift the gearbox up."
    assert entries["sidepkg"].url == "https://pypi.org/search/?q=sidepkg"
    assert not (tmp_path / "imported.txt").exists()


def test_module_name_source_is_found_without_importing(package: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(package.parent))
    titles = {e.title for e in iter_entries(["sidepkg.engine"])}
    assert titles == {"sidepkg.engine", "sidepkg.engine.Gearbox", "sidepkg.engine.Gearbox.shift",
                      "sidepkg.engine.conditional"}
    assert {e.title for e in iter_entries(["sidepkg"])} >= {"sidepkg", "sidepkg.engine.Gearbox"}
    assert not (tmp_path / "imported.txt").exists()
    assert "sidepkg" not in sys.modules
    assert list(iter_entries(["sidepkg.nothing", "no_such_module_anywhere"])) == []


def test_urls_for_stdlib_and_installed_distributions() -> None:
    stdlib = {e.title: e.url for e in iter_entries(["json"])}
    assert stdlib["json"] == "https://docs.python.org/3/library/json.html#json"
    assert stdlib["json.dumps"] == "https://docs.python.org/3/library/json.html#json.dumps"
    third_party = {e.url for e in iter_entries(["itsdangerous"])}
    assert third_party == {"https://pypi.org/project/itsdangerous/"}


def test_default_sources_are_stdlib_and_project_dependencies() -> None:
    names = default_sources()
    assert {"json", "sqlite3", "flask", "werkzeug", "pydantic", "yaml", "redis", "jwt"} <= set(names)
    assert not {n for n in names if n.startswith("_")}
    assert not {"test", "idlelib", "tkinter", "pytest", "webtest"} & set(names)


@pytest.mark.slow
def test_the_default_index_holds_the_standard_library_and_the_dependencies(tmp_path: Path) -> None:
    # (How long building it takes is measured by `make bench`, which prints it: a timed test fails on a busy machine.)
    engine = engine_for(tmp_path, None)
    engine.ensure_index()
    titles = {r.title for r in engine.search("flask blueprint", 1).results}
    assert any(t.startswith("flask.") for t in titles)
    assert engine.search("sqlite3 connect").total > 0
    assert os.path.getsize(tmp_path / "index.sqlite3") > 1_000_000
    engine.close()


def test_close_does_not_wait_for_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server stopping while the first search builds the index closes at once (the build dies with it)."""
    started, release = threading.Event(), threading.Event()

    def slow_entries(sources: Any) -> Iterator[Any]:
        started.set()
        release.wait(10)
        yield from iter_entries(["json"])

    monkeypatch.setattr(local_module, "iter_entries", slow_entries)
    engine = engine_for(tmp_path, ["json"])
    builder = threading.Thread(target=engine.ensure_index)
    builder.start()
    assert started.wait(10)
    begun = time.monotonic()
    engine.close()
    assert time.monotonic() - begun < 1.0
    release.set()
    builder.join(10)


def open_files(path: Path) -> int:
    """How many file descriptors of this process have ``path`` open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_a_threads_connection_is_closed_when_the_thread_ends(tmp_path: Path) -> None:
    """A server that runs each request in a thread (or greenlet) of its own must not leave a file open per search."""
    engine = engine_for(tmp_path, ["json"])
    engine.ensure_index()
    try:
        for _ in range(20):
            thread = threading.Thread(target=engine.search, args=("decode",))
            thread.start()
            thread.join(10)
        assert open_files(engine.path) == 0
        engine.search("decode")  # a thread still running keeps its connection, until close()
        assert open_files(engine.path) == 1
    finally:
        engine.close()
    assert open_files(engine.path) == 0


def test_a_build_sweeps_the_temporary_files_of_builds_that_died(tmp_path: Path) -> None:
    """A worker killed mid-build left its .tmp file (up to a whole index): the next build removes it."""
    import subprocess

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    engine = engine_for(tmp_path, ["json"])
    dead = engine.path.with_name(f"{engine.path.name}.{int(gone.stdout)}.140000.tmp")
    reused = engine.path.with_name(f"{engine.path.name}.{os.getpid()}.140000.tmp")  # pid 1 after a restart
    other = engine.path.with_name(f"{engine.path.name}.full.{os.getpid()}.140000.tmp")  # another index's build
    for leftover in (dead, reused, other):
        leftover.write_bytes(b"partial index")
    engine.ensure_index()  # under the index's file lock: no other build of it is running
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["index.sqlite3", "index.sqlite3.lock", other.name])
    engine.close()


def test_a_docstring_with_a_lone_surrogate_or_a_nul_is_indexed(tmp_path: Path) -> None:
    """A ``"\\ud800"`` escape in a docstring made the build raise (SQLite takes UTF-8): every search was a 500.
    A NUL ended the snippet there."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "oddmod.py").write_text(
        'def lone():\n    """Surrogate \\ud800 quirk inside."""\n'
        'def nul():\n    """Nul \\x00 quirk inside, and more."""\n'
    )
    client = TestApp(create_app({"var_dir": str(tmp_path / "var"), "search": {"index_sources": [str(source)]}}))
    found = {r["title"]: r["content"] for r in client.get("/api/v2/search", {"q": "quirk"}).json["data"]}
    assert found == {"oddmod.lone": "Surrogate \ufffd quirk inside.",
                     "oddmod.nul": "Nul \ufffd quirk inside, and more."}
