"""The Flask core: v1/v2 shapes, validation, health/config, error rendering, session adapter."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flask
import pytest
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.test import EnvironBuilder

from app import AppOptions, create_app
from middleware.base import Context
from middleware.errors import ErrorsMiddleware
from middleware.session import SessionMiddleware
from stores.memory import MemoryStore

SOURCES = ["json"]


def options(tmp_path: Path, **search: Any) -> dict[str, Any]:
    """App options with a tiny index under ``tmp_path``."""
    return {"var_dir": str(tmp_path / "var"), "search": {"index_sources": SOURCES, **search}}


@pytest.fixture
def flask_app(tmp_path: Path) -> Iterator[flask.Flask]:
    """The Flask core alone, indexing only the json package."""
    app = create_app(options(tmp_path))
    yield app
    app.extensions["wsgistack"].close()


@pytest.fixture
def client(flask_app: flask.Flask) -> TestApp:
    """WebTest over the bare Flask core (errors rendered by its fallback)."""
    return TestApp(flask_app)


# --------------------------------------------------------------- search shapes


def test_v1_search_shape(client: TestApp) -> None:
    body = client.get("/api/v1/search", {"q": "decode"}).json
    assert set(body) == {"query", "results", "meta"}
    assert body["query"] == "decode"
    assert body["meta"] == {"total": body["meta"]["total"], "page": 1, "per_page": 10, "query": "decode"}
    assert body["meta"]["total"] >= 3
    assert body["results"], body
    for result in body["results"]:
        assert set(result) == {"title", "url", "content", "engine"}
        assert result["engine"] == "local"
        assert result["url"].startswith("https://docs.python.org/3/library/json.html#json")
    titles = [r["title"] for r in body["results"]]
    assert "json.decoder.JSONDecoder.decode" in titles


def test_v2_search_shape_matches_v1_data(client: TestApp) -> None:
    v1 = client.get("/api/v1/search", {"q": "json", "page": "2"}).json
    v2 = client.get("/api/v2/search", {"q": "json", "page": "2"}).json
    assert set(v2) == {"query", "data", "pagination"}
    assert v2["data"] == v1["results"]
    total = v1["meta"]["total"]
    assert v2["pagination"] == {"page": 2, "per_page": 10, "total": total, "pages": math.ceil(total / 10)}


def test_per_page_option(tmp_path: Path) -> None:
    client = TestApp(create_app(options(tmp_path, per_page=3)))
    body = client.get("/api/v2/search", {"q": "json"}).json
    assert len(body["data"]) == 3
    assert body["pagination"]["per_page"] == 3
    assert body["pagination"]["pages"] == math.ceil(body["pagination"]["total"] / 3)


def test_page_past_the_end_is_empty_not_an_error(client: TestApp) -> None:
    body = client.get("/api/v1/search", {"q": "decode", "page": "1000"}).json
    assert body["results"] == []
    assert body["meta"]["page"] == 1000
    assert body["meta"]["total"] > 0


@pytest.mark.parametrize(("text", "page"), [("02", 2), ("0002", 2), ("00002", 2), ("000000001000", 1000)])
def test_page_with_leading_zeros_is_that_page(client: TestApp, text: str, page: int) -> None:
    v1 = client.get("/api/v1/search", {"q": "json", "page": text}).json
    v2 = client.get("/api/v2/search", {"q": "json", "page": text}).json
    assert v1 == client.get("/api/v1/search", {"q": "json", "page": str(page)}).json
    assert v1["meta"]["page"] == v2["pagination"]["page"] == page


def test_query_of_exactly_1000_characters_is_accepted(client: TestApp) -> None:
    assert client.get("/api/v1/search", {"q": "a" * 1000}).json["meta"]["total"] == 0


def test_query_is_trimmed(client: TestApp) -> None:
    assert client.get("/api/v1/search", {"q": "  decode  "}).json["query"] == "decode"


Q_REQUIRED = "The query parameter 'q' is required and may not be empty."
Q_TOO_LONG = "The query parameter 'q' may be at most 1000 characters long (it has 1001)."
BAD_PAGE = "The query parameter 'page' must be a whole number from 1 to 1000."
PAGE = {"parameter": "page", "max": 1000}


def repeated(name: str, times: int) -> str:
    return f"The query parameter {name!r} may be given only once (it is given {times} times)."


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({}, (400, Q_REQUIRED, {"parameter": "q"}), id="q missing"),
        pytest.param({"q": ""}, (400, Q_REQUIRED, {"parameter": "q"}), id="q empty"),
        pytest.param({"q": "   "}, (400, Q_REQUIRED, {"parameter": "q"}), id="q only spaces"),
        pytest.param({"q": "\x00"}, (400, Q_REQUIRED, {"parameter": "q"}), id="q only a NUL"),
        pytest.param({"q": " \x07\x1f\u200b "}, (400, Q_REQUIRED, {"parameter": "q"}),
                     id="q only control and format characters"),
        pytest.param({"q": "a" * 1001}, (400, Q_TOO_LONG, {"parameter": "q", "max": 1000}), id="q too long"),
        pytest.param({"q": "x", "page": "0"}, (400, BAD_PAGE, PAGE), id="page 0"),
        pytest.param({"q": "x", "page": "-1"}, (400, BAD_PAGE, PAGE), id="page negative"),
        pytest.param({"q": "x", "page": "abc"}, (400, BAD_PAGE, PAGE), id="page text"),
        pytest.param({"q": "x", "page": "1.5"}, (400, BAD_PAGE, PAGE), id="page fraction"),
        pytest.param({"q": "x", "page": ""}, (400, BAD_PAGE, PAGE), id="page empty"),
        pytest.param({"q": "x", "page": "1001"}, (400, BAD_PAGE, PAGE), id="page too big"),
        pytest.param({"q": "x", "page": "00000"}, (400, BAD_PAGE, PAGE), id="page zeros"),
        pytest.param({"q": "x", "page": "01001"}, (400, BAD_PAGE, PAGE), id="page too big after a zero"),
        pytest.param({"q": "x", "page": "٣"}, (400, BAD_PAGE, PAGE), id="page non-ascii digit"),
        # Which of two values counts is a guess a layer or a proxy reading the first (or the last) may
        # make otherwise: a URL with "&page=2" appended was page 1, with "&q=" prepended a 400 for no q.
        pytest.param([("q", "json"), ("page", "1"), ("page", "2")], (400, repeated("page", 2), {"parameter": "page"}),
                     id="page repeated"),
        pytest.param([("q", "x"), ("page", "2"), ("page", "abc")], (400, repeated("page", 2), {"parameter": "page"}),
                     id="page repeated, the second no number"),
        pytest.param([("q", ""), ("q", "json")], (400, repeated("q", 2), {"parameter": "q"}), id="q repeated"),
        pytest.param([("q", "json"), ("q", "json"), ("q", "")], (400, repeated("q", 3), {"parameter": "q"}),
                     id="q three times"),
    ],
)
def test_search_rejections(client: TestApp, version: str, params: dict[str, str] | list[tuple[str, str]],
                           expected: tuple[int, str, dict[str, Any]]) -> None:
    status, message, details = expected
    for path in (f"/api/{version}/search", f"/api/{version}/search/stream"):
        response = client.get(path, params, status=status)
        assert response.content_type == "application/json"
        error = response.json["error"]
        assert error["code"] == status
        assert error["message"] == message
        assert error["details"] == details
        assert error["path"] == path


def _raw_get(app: Any, path: str, query_string: str) -> tuple[str, dict[str, str], bytes]:
    """GET with QUERY_STRING as a server hands it on (PEP 3333: its bytes as latin-1), not re-encoded by a client."""
    environ = EnvironBuilder(path=path).get_environ()
    environ["QUERY_STRING"] = query_string
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = status, dict(headers)
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    return seen["status"], seen["headers"], data


def not_utf8(name: str) -> tuple[str, dict[str, str]]:
    return f"The query parameter {name!r} is not valid UTF-8 once percent-decoded.", {"parameter": name}


@pytest.mark.parametrize("path", ["/api/v1/search", "/api/v2/search", "/api/v1/search/stream", "/api/v2/search/stream"])
@pytest.mark.parametrize(
    ("query_string", "expected"),
    [
        pytest.param("q=caf\xe9", not_utf8("q"), id="q with a raw latin-1 byte"),
        pytest.param("q=caf%E9", not_utf8("q"), id="q with a percent-encoded latin-1 byte"),
        pytest.param("q=%ED%A0%80", not_utf8("q"), id="q with an encoded surrogate"),
        pytest.param("q=%C3", not_utf8("q"), id="q with a truncated sequence"),
        pytest.param("q=json&page=\xe9", not_utf8("page"), id="page with a raw byte"),
        pytest.param("q=json&ref=\xff", not_utf8("ref"), id="another parameter with a raw byte"),
        pytest.param("q=json&ref+id=%FF", not_utf8("ref id"), id="another parameter encoded"),
    ],
)
def test_a_query_string_that_is_not_utf8_is_a_400(flask_app: flask.Flask, path: str, query_string: str,
                                                   expected: tuple[str, dict[str, str]]) -> None:
    """A raw byte made reading the parameters raise (500); an encoded one was searched for as its escape
    (``caf%E9``, which a client's ``caf%25E9`` also gives)."""
    message, details = expected
    status, headers, body = _raw_get(flask_app, path, query_string)
    assert (status, headers["Content-Type"], headers["Cache-Control"]) == ("400 Bad Request", "application/json",
                                                                           "no-store")
    error = json.loads(body)["error"]
    assert (error["code"], error["message"], error["details"], error["path"]) == (400, message, details, path)


@pytest.mark.parametrize("query_string", ["q=caf%C3%A9", "q=caf\xc3\xa9", "q=caf%C3%A9&page=1"])
def test_a_utf8_query_is_searched_for_as_text(flask_app: flask.Flask, query_string: str) -> None:
    status, _, body = _raw_get(flask_app, "/api/v1/search", query_string)
    assert status == "200 OK"
    assert json.loads(body)["query"] == "caf\u00e9"


# ---------------------------------------------------------------- health, config


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_health_is_cheap(client: TestApp, flask_app: flask.Flask, version: str) -> None:
    assert client.get(f"/api/{version}/health").json == {"status": "ok", "version": version, "engine": "local"}
    index = Path(flask_app.extensions["wsgistack"].options.index_file)
    assert not index.exists(), "health must not build or open the search index"


def test_config_is_public_and_secret_free(tmp_path: Path) -> None:
    opts = {"var_dir": str(tmp_path), "search": {"engine": "searxng", "upstream": "http://user:pw@10.0.0.9:8888"}}
    body = TestApp(create_app(opts)).get("/api/v1/config").json
    assert body == {
        "version": "v1",
        "api_versions": ["v1", "v2"],
        "engine": "searxng",
        "per_page": 10,
        "max_query_length": 1000,
        "max_page": 1000,
        "stream": {"path": "/api/v1/search/stream", "interval": 0.0},
        "login": False,
    }
    assert "10.0.0.9" not in str(body) and "pw" not in str(body)


def test_config_reports_login_when_the_auth_layer_published_tokens(tmp_path: Path) -> None:
    context = Context()
    client = TestApp(create_app(options(tmp_path), context))
    assert client.get("/api/v2/config").json["login"] is False
    context.services["tokens"] = object()  # layers are built after the app: looked up per request
    assert client.get("/api/v2/config").json["login"] is True


def test_config_reports_no_login_when_the_auth_layer_only_verifies(tmp_path: Path) -> None:
    """An auth layer with public keys alone: login answers 503, so the config does not offer it."""
    context = Context()
    client = TestApp(create_app(options(tmp_path), context))
    context.services["tokens"] = SimpleNamespace(signer=None)
    assert client.get("/api/v2/config").json["login"] is False
    assert client.post_json("/auth/login", {"username": "a", "password": "b"}, status=503).json["error"]["message"] == (
        "Login needs an auth layer that signs tokens (secret or private_key); this one only verifies them.")


# ------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param({"search": {"engine": "searxng"}},
                     "upstream is required when engine is 'searxng'", id="searxng without upstream"),
        pytest.param({"serach": {}}, "Extra inputs are not permitted", id="unknown key"),
        pytest.param({"search": {"engine": "bing"}}, "Input should be 'local' or 'searxng'", id="unknown engine"),
        pytest.param({"search": {"per_page": 0}}, "greater than or equal to 1", id="per_page 0"),
        pytest.param({"search": {"timeout": 0}}, "greater than 0", id="timeout 0"),
        pytest.param({"search": {"engine": "searxng", "upstream": "ftp://x"}}, "URL scheme should be 'http' or 'https'",
                     id="upstream not http"),
        pytest.param({"var_dir": " "}, "var_dir may not be empty", id="empty var_dir"),
        pytest.param({"search": {"engine": "searxng", "upstream": "http://searx..internal:8888/"}},
                     "upstream's host 'searx..internal' is not a host name: a label between its dots is empty",
                     id="upstream host with an empty label"),
        pytest.param({"search": {"engine": "searxng", "upstream": f"http://{'a' * 64}.example.org/"}},
                     "is not a host name: a label between its dots is empty or longer than 63 characters",
                     id="upstream host with a label too long"),
    ],
)
def test_invalid_options_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match="(?s)" + message.replace("(", r"\(").replace(")", r"\)")):
        create_app(data)


@pytest.mark.parametrize("options", [
    pytest.param(lambda f: {"var_dir": str(f)}, id="var_dir is a file"),
    pytest.param(lambda f: {"users_db": str(f / "sub" / "users.db")}, id="a folder above users_db is a file"),
    pytest.param(lambda f: {"search": {"index_path": str(f / "index.db")}}, id="index_path's folder is a file"),
])
def test_a_file_where_a_folder_must_be_is_refused(tmp_path: Path, options: Any) -> None:
    """check refuses it: the app would start and answer 500 wherever it opens its databases."""
    taken = tmp_path / "users.sqlite3"
    taken.write_bytes(b"")
    with pytest.raises(ValidationError, match=f"{str(taken)!r} is a file, not a folder"):
        AppOptions.model_validate(options(taken))


@pytest.mark.parametrize(("options", "name"), [
    pytest.param(lambda f: {"users_db": str(f)}, "users_db", id="users_db is a folder"),
    pytest.param(lambda f: {"search": {"index_path": str(f)}}, "search.index_path", id="index_path is a folder"),
])
def test_a_folder_where_a_database_file_must_be_is_refused(tmp_path: Path, options: Any, name: str) -> None:
    """check refuses it: an index_path that is a folder made every search a 500 (the build cannot replace it)."""
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(ValidationError, match=f"{name} {str(folder)!r} is a folder, not a file"):
        AppOptions.model_validate(options(folder))


@pytest.mark.parametrize("index_path", [
    pytest.param(lambda var: var / "users.sqlite3", id="the same path"),
    pytest.param(lambda var: var / "sub" / ".." / "users.sqlite3", id="another spelling of it"),
])
def test_an_index_path_that_is_the_users_database_is_refused(tmp_path: Path, index_path: Any) -> None:
    """The first search found no index there and built one in its place: every user was gone."""
    var = tmp_path / "var"
    with pytest.raises(ValidationError, match=f"search.index_path {str(index_path(var))!r} is the users "
                                              "database; the index build would replace it"):
        AppOptions.model_validate({"var_dir": str(var), "search": {"index_path": str(index_path(var))}})


def test_a_folder_this_user_may_not_enter_is_left_to_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.exists() raises PermissionError there: check must not stop with a traceback."""
    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    assert AppOptions.model_validate({"var_dir": str(tmp_path / "locked" / "var")}).var_dir.endswith("var")


def test_paths_default_under_var_dir() -> None:
    opts = AppOptions.model_validate({"var_dir": "/srv/data"})
    assert opts.users_db == "/srv/data/users.sqlite3"
    assert opts.search.index_path == "/srv/data/search-index.sqlite3"
    explicit = AppOptions.model_validate({"users_db": "/x/u.db", "search": {"index_path": "/y/i.db"}})
    assert (explicit.users_db, explicit.search.index_path) == ("/x/u.db", "/y/i.db")


def test_factory_exposes_its_options_model_for_config() -> None:
    assert create_app.Options is AppOptions  # type: ignore[attr-defined]


# ------------------------------------------------------------- error rendering


def _boom_app(tmp_path: Path, **extra: Any) -> flask.Flask:
    app = create_app({**options(tmp_path), **extra})

    def boom() -> str:
        raise RuntimeError("secret database password in exception text")

    app.add_url_rule("/boom", "boom", boom)
    return app


def test_unhandled_exception_is_a_500_without_its_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = TestApp(_boom_app(tmp_path))
    with caplog.at_level(logging.ERROR, logger="app"):
        response = client.get("/boom", status=500)
    assert response.json["error"]["code"] == 500
    assert response.json["error"]["message"] == (
        "An unexpected error occurred; the request id identifies it in the logs."
    )
    assert "secret" not in response.text
    assert "secret database password" in caplog.text  # logged for the operator, not sent


def test_debug_option_shows_the_exception_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = TestApp(_boom_app(tmp_path, debug=True))
    with caplog.at_level(logging.CRITICAL, logger="wsgistack"):
        response = client.get("/boom", status=500)
    details = response.json["error"]["details"]
    assert details["exception"] == "RuntimeError: secret database password in exception text"
    assert details["traceback"][-1] == "RuntimeError: secret database password in exception text\n"


def test_unhandled_exception_goes_through_the_errors_layer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stack = TestApp(ErrorsMiddleware(_boom_app(tmp_path), ErrorsMiddleware.Options(format="problem"), Context()))
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        response = stack.get("/boom", status=500)
    assert response.content_type == "application/problem+json"
    assert response.json["status"] == 500
    assert "secret" not in response.text
    logged = [r for r in caplog.records if r.exc_info]
    assert [r.name for r in logged] == ["wsgistack.errors"]  # logged once, by the errors layer


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        pytest.param("GET", "/nope", (404, None, "The requested URL was not found on the server."), id="404"),
        pytest.param("POST", "/api/v1/search", (405, "GET, HEAD, OPTIONS",
                                                "The method is not allowed for the requested URL."), id="405"),
        pytest.param("DELETE", "/auth/login", (405, "POST, OPTIONS",
                                               "The method is not allowed for the requested URL."), id="405 login"),
        pytest.param("GET", "/api/v1/search", (400, None, Q_REQUIRED), id="400"),
    ],
)
@pytest.mark.parametrize("fmt", ["fallback", "envelope", "problem"])
def test_app_errors_use_the_stack_renderer(flask_app: flask.Flask, method: str, path: str,
                                           expected: tuple[int, str | None, str], fmt: str) -> None:
    status, allow, message = expected
    wsgi: Any = flask_app
    if fmt != "fallback":
        wsgi = ErrorsMiddleware(flask_app, ErrorsMiddleware.Options(format=fmt), Context())
    response = TestApp(wsgi).request(path, method=method, status=status)
    if fmt == "problem":
        assert response.content_type == "application/problem+json"
        assert (response.json["status"], response.json["instance"]) == (status, path)
        assert response.json["detail"].startswith(message)
    else:
        assert response.content_type == "application/json"
        error = response.json["error"]
        assert (error["code"], error["path"], error["method"]) == (status, path, method)
        assert error["message"].startswith(message)
        assert set(error) == {"code", "message", "details", "timestamp", "path", "method", "request_id"}
    assert response.headers.get("Allow") == allow  # in one order, whatever order werkzeug's set gave
    assert response.headers["Cache-Control"] == "no-store"  # the app alone too: it answers as the stack would


@pytest.mark.parametrize(("path", "allow"), [
    pytest.param("/api/v1/search", "GET, HEAD, OPTIONS", id="search"),
    pytest.param("/auth/login", "POST, OPTIONS", id="login"),
])
def test_options_of_a_route_answers_allow_and_no_content(client: TestApp, path: str, allow: str) -> None:
    response = client.options(path, status=204)
    assert (response.status, response.headers.get("Allow"), response.body) == ("204 No Content", allow, b"")
    assert "Content-Type" not in response.headers


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_there_is_no_static_route(flask_app: flask.Flask, method: str) -> None:
    """Flask's default /static/<path> served nothing (the package has no static folder), yet answered an
    OPTIONS of any /static/… path 204 with GET in Allow, and labelled every one of them a route for metrics."""
    response = TestApp(flask_app).request("/static/app.js", method=method, status=404)
    assert (response.content_type, response.headers.get("Allow")) == ("application/json", None)
    assert flask_app.extensions["wsgistack"].context.services["route_template"]("/static/app.js", method) is None


@pytest.mark.parametrize("layered", [False, True], ids=["fallback", "errors layer"])
def test_head_error_has_no_body(flask_app: flask.Flask, layered: bool) -> None:
    wsgi = ErrorsMiddleware(flask_app, ErrorsMiddleware.Options(), Context()) if layered else flask_app
    response = TestApp(wsgi).head("/nope", status=404)
    assert response.body == b""
    assert response.content_type == "application/json"


def test_request_id_from_the_stack_is_in_the_envelope(client: TestApp) -> None:
    error = client.get("/nope", status=404, extra_environ={"wsgistack.request_id": "req-42"}).json["error"]
    assert error["request_id"] == "req-42"


def test_matched_route_template_is_noted_for_metrics(flask_app: flask.Flask) -> None:
    seen: dict[str, Any] = {}

    def spy(environ: dict[str, Any], start_response: Any) -> Any:
        result = flask_app(environ, start_response)
        seen["route"] = environ.get("wsgistack.route")
        return result

    TestApp(spy).get("/api/v2/health")
    assert seen["route"] == "/api/v2/health"
    TestApp(spy).get("/missing", status=404)
    assert seen["route"] is None


# ------------------------------------------------------------ session adapter


def _session_app(tmp_path: Path, context: Context | None = None) -> flask.Flask:
    app = create_app(options(tmp_path), context)

    def count() -> dict[str, Any]:
        flask.session["n"] = flask.session.get("n", 0) + 1
        return {"n": flask.session["n"], "keys": sorted(flask.session)}

    def quiet() -> dict[str, Any]:
        return {"ok": True}

    def login() -> dict[str, Any]:  # as the docs ask a login to: a new, empty session
        flask.session.rotate(carry=False)  # type: ignore[attr-defined]
        flask.session["user"] = "bob"
        return {"keys": sorted(flask.session)}

    app.add_url_rule("/count", "count", count)
    app.add_url_rule("/quiet", "quiet", quiet)
    app.add_url_rule("/login", "login", login)
    return app


def test_without_a_session_layer_the_session_lives_one_request(tmp_path: Path) -> None:
    client = TestApp(_session_app(tmp_path))
    first = client.get("/count")
    assert first.json == {"n": 1, "keys": ["n"]}
    assert "Set-Cookie" not in first.headers
    assert client.get("/count").json["n"] == 1


def test_flask_session_is_the_stack_session(tmp_path: Path) -> None:
    store = MemoryStore()
    context = Context(stores={"shared": store})
    layer = SessionMiddleware(
        _session_app(tmp_path, context),
        SessionMiddleware.Options(secret_key="k" * 40, cookie_name="sid", cookie_secure=False),
        context,
    )
    client = TestApp(layer)
    first = client.get("/count")
    assert first.json["n"] == 1
    assert first.headers["Set-Cookie"].startswith("sid=")
    assert client.get("/count").json["n"] == 2
    assert client.get("/count").json["n"] == 3
    assert len(list(store.scan("session:"))) == 1
    quiet = client.get("/quiet")
    assert "Set-Cookie" not in quiet.headers
    assert "private" not in quiet.headers.get("Cache-Control", ""), "an unread session must not be loaded"
    assert quiet.headers["Vary"] == "Cookie"  # the request carried it: a streamed body could still read it
    assert client.get("/login").json == {"keys": ["user"]}  # nothing of the session before it goes on
    assert client.get("/count").json == {"n": 1, "keys": ["n", "user"]}
