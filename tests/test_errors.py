"""The errors layer: one renderer for every refusal and every unhandled exception."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pytest
from stack_support import discard, ignore_start, recording_start
from webtest import TestApp
from werkzeug.exceptions import HTTPException
from werkzeug.test import Client

from middleware.base import ORIG_PATH, TRACE, Context, refuse
from middleware.errors import ErrorsMiddleware
from middleware.request_id import RequestIdMiddleware

if TYPE_CHECKING:
    from _typeshed import OptExcInfo

CODES = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 429, 431, 500, 502, 503, 504]


def raising(exc: BaseException) -> Callable[..., Iterable[bytes]]:
    """An app that raises ``exc`` before starting the response."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise exc

    return app


def stack(app: Any, **options: Any) -> TestApp:
    """The errors layer (and request_id inside it) around ``app``."""
    inner = RequestIdMiddleware(app, RequestIdMiddleware.Options(), Context())
    return TestApp(ErrorsMiddleware(inner, ErrorsMiddleware.Options(**options), Context()))


@pytest.mark.parametrize("code", CODES)
def test_every_code_renders_the_envelope(code: int) -> None:
    response = stack(raising(refuse(code, f"Refused with {code}.", details={"why": "test"}))).get(
        "/api/x?q=1", status=code)
    error = response.json["error"]
    assert response.content_type == "application/json"
    assert error["code"] == code
    assert error["message"] == f"Refused with {code}."
    assert error["details"] == {"why": "test"}
    assert error["path"] == "/api/x" and error["method"] == "GET"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert error["timestamp"].endswith("Z")
    assert int(response.headers["Content-Length"]) == len(response.body)


@pytest.mark.parametrize("code", CODES)
def test_every_code_renders_problem_details(code: int) -> None:
    response = stack(raising(refuse(code, "Nope.")), format="problem").get("/p", status=code)
    assert response.content_type == "application/problem+json"
    doc = response.json
    assert doc["type"] == "about:blank" and doc["status"] == code
    assert doc["detail"] == "Nope." and doc["instance"] == "/p"
    assert doc["title"] and doc["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(("code", "status"), [
    pytest.param(300, "300 Multiple Choices", id="300: the lowest status an exception answers with"),
    pytest.param(404, "404 Not Found", id="404"),
    pytest.param(413, "413 Content Too Large", id="413"),
    pytest.param(414, "414 URI Too Long", id="414"),
    pytest.param(416, "416 Range Not Satisfiable", id="416"),
    pytest.param(422, "422 Unprocessable Content", id="422"),
    pytest.param(599, "599 Error", id="a code with no name"),
])
def test_status_lines_and_titles_are_rfc_9110_s(code: int, status: str) -> None:
    response = stack(raising(refuse(code, "Nope.")), format="problem").get("/p", status=code)
    assert response.status == status
    assert response.json["title"] == status[4:]


@pytest.mark.parametrize(("script_name", "path_info", "instance"), [
    pytest.param("", "/p", "/p", id="plain"),
    pytest.param("", "/no pe", "/no%20pe", id="a space"),
    pytest.param("", "/caf\u00c3\u00a9", "/caf%C3%A9", id="UTF-8"),
    pytest.param("", "/caf\u00e9", "/caf%E9", id="a byte that is not UTF-8"),
    pytest.param("", "/a?b", "/a%3Fb", id="a question mark in the path"),
    pytest.param("", "/a#b", "/a%23b", id="a hash in the path"),
    pytest.param("", "/v1/items;x=1/~me:@", "/v1/items;x=1/~me:@", id="what a path may hold as it is"),
    pytest.param("", "//evil.example/x", "/evil.example/x", id="leading slashes: never another host"),
    pytest.param("/mount", "/p", "/mount/p", id="an app mounted under a prefix: the path the client sent"),
])
def test_problem_instance_is_a_uri_reference(script_name: str, path_info: str, instance: str) -> None:
    response = stack(raising(refuse(404, "Nope.")), format="problem").get(
        "/", extra_environ={"SCRIPT_NAME": script_name, "PATH_INFO": path_info}, status=404)
    assert response.json["instance"] == instance


@pytest.mark.parametrize(
    ("exc", "header", "value"),
    [
        pytest.param(refuse(429, "Slow down.", headers=[("Retry-After", "7")]), "Retry-After", "7", id="429"),
        pytest.param(refuse(401, "Who?", headers=[("WWW-Authenticate", 'Bearer realm="x"')]),
                     "WWW-Authenticate", 'Bearer realm="x"', id="401"),
        pytest.param(refuse(405, "No.", headers=[("Allow", "GET, HEAD")]), "Allow", "GET, HEAD", id="405 from refuse"),
        pytest.param(refuse(503, "Later.", headers=[("Retry-After", "5")]), "Retry-After", "5", id="503"),
    ],
)
def test_headers_attached_by_inner_layers_are_kept(exc: BaseException, header: str, value: str) -> None:
    code = int(getattr(exc, "code", 500))
    response = stack(raising(exc)).get("/", status=code)
    assert response.headers[header] == value


def test_werkzeug_method_not_allowed_carries_allow() -> None:
    from werkzeug.exceptions import MethodNotAllowed

    response = stack(raising(MethodNotAllowed(["GET", "POST"]))).delete("/", status=405)
    assert response.headers["Allow"] == "GET, POST"


def test_allow_lists_the_methods_in_one_order_whatever_order_they_were_found_in() -> None:
    """werkzeug's router finds them in a set, whose order varies by process: RFC 9110's order, then by name."""
    from werkzeug.exceptions import MethodNotAllowed

    found = ["PURGE", "OPTIONS", "DELETE", "PATCH", "PUT", "POST", "HEAD", "GET", "COPY", "GET"]
    response = stack(raising(MethodNotAllowed(found))).put("/", status=405)
    assert response.headers["Allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, COPY, PURGE"


@pytest.mark.parametrize("fmt", ["envelope", "problem"])
def test_head_has_no_body_but_the_length_of_get(fmt: str) -> None:
    """RFC 9110 §8.6: a HEAD answer's Content-Length is that of the GET's body (the envelope says GET)."""
    app = stack(raising(refuse(404, "Missing.")), format=fmt)
    get = app.get("/x", status=404)
    head = app.head("/x", status=404)
    assert head.body == b""
    assert head.content_type == get.content_type
    assert int(head.headers["Content-Length"]) == len(get.body)  # the timestamp has a fixed width


def test_unhandled_exception_is_a_500_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        response = stack(raising(RuntimeError("password=hunter2"))).get("/boom", status=500)
    assert "hunter2" not in response.text
    message = "An unexpected error occurred; the request id identifies it in the logs."
    assert response.json["error"]["message"] == message
    assert "hunter2" in caplog.text  # the operator still sees it in the log
    assert response.headers["X-Request-ID"] in caplog.text
    # The record carries the id too (request_id has left the request by now): the JSON lines' field.
    assert [r.request_id for r in caplog.records] == [response.headers["X-Request-ID"]]  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records] == [
        f"unhandled exception in GET /boom (request id {response.headers['X-Request-ID']})"]


def test_debug_shows_the_traceback_on_loopback_only() -> None:
    response = stack(raising(RuntimeError("details please")), debug=True).get("/", status=500)
    assert response.json["error"]["details"]["exception"] == "RuntimeError: details please"
    with pytest.raises(ValueError, match="debug may be true only when the server listens on loopback only"):
        ErrorsMiddleware(raising(RuntimeError()), ErrorsMiddleware.Options(debug=True), Context(loopback_only=False))


def test_control_characters_in_the_path_are_escaped_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        stack(raising(RuntimeError("x"))).get("/a%0Aforged%20line", status=500)
    assert "/a\\x0aforged line" in caplog.text
    assert "\nforged" not in caplog.text


def test_renderer_is_published_for_the_core() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        status, headers, body = environ["wsgistack.render_error"](environ, refuse(409, "Conflict here."))
        seen["status"] = status
        start_response(f"{status} Conflict", headers)
        return [body]

    response = stack(app).get("/", status=409)
    assert seen["status"] == 409
    assert response.json["error"]["message"] == "Conflict here."


def test_a_traced_request_notes_the_status_rendered() -> None:
    trace: list[tuple[str, str]] = []
    stack(raising(refuse(404, "Missing."))).get("/x", status=404, extra_environ={TRACE: trace})
    assert [decision for layer, decision in trace if layer == "errors"] == ["rendered 404"]


@pytest.mark.parametrize(("fmt", "member", "named"), [("envelope", "path", "/api/my config"),
                                                     ("problem", "instance", "/api/my%20config")])
def test_a_rewritten_request_is_named_by_the_path_it_asked_for(fmt: str, member: str, named: str) -> None:
    """versioning routes /api/config to /api/v2/config: the client learns of the path it sent, as the log shows it."""
    response = stack(raising(refuse(404, "Missing.")), format=fmt).get(
        "/api/v2/config", status=404, extra_environ={ORIG_PATH: "/api/my config"})
    assert response.json.get("error", response.json)[member] == named


@pytest.mark.parametrize(("environ", "path", "instance"), [
    pytest.param({"PATH_INFO": "/a b"}, "/a b", "/a%20b", id="no SCRIPT_NAME"),
    pytest.param({"SCRIPT_NAME": "/mount"}, "/", "/mount", id="no PATH_INFO: the root of an app under a prefix"),
    pytest.param({}, "/", "/", id="neither"),
])
def test_an_environ_without_an_empty_path_variable_is_named_by_the_rest(
        environ: dict[str, str], path: str, instance: str) -> None:
    """PEP 3333: SCRIPT_NAME and PATH_INFO may be left out of the environ when they would be empty."""
    import json

    for fmt, named in (("envelope", path), ("problem", instance)):
        app = ErrorsMiddleware(raising(refuse(404, "Missing.")), ErrorsMiddleware.Options(format=fmt), Context())
        doc = json.loads(b"".join(app({"REQUEST_METHOD": "GET", **environ}, ignore_start)))
        assert (doc["error"]["path"] if fmt == "envelope" else doc["instance"]) == named


def test_an_exception_whose_response_is_not_a_werkzeug_response_is_rendered_by_its_code() -> None:
    from werkzeug.exceptions import NotFound

    def other_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:  # pragma: no cover - never run
        start_response("200 OK", [])
        return [b"not this"]

    response = stack(raising(NotFound("Missing.", response=other_app))).get("/r", status=404)  # type: ignore[arg-type]
    assert (response.json["error"]["code"], response.json["error"]["message"]) == (404, "Missing.")


@pytest.mark.parametrize(("base", "refused"), [
    pytest.param("errors/", "type_base must be an absolute URI", id="relative"),
    pytest.param("https://errors.example.org", "type_base 'https://errors.example.org' must end with '/' (or ':', "
                 "'#', '='): the status is appended to it, so it would read https://errors.example.org404",
                 id="no slash before the status"),
    pytest.param("https://errors.example.org/", None, id="a URL"),
    pytest.param("tag:example.org,2025:errors:", None, id="a tag URI, never fetched (RFC 4151)"),
])
def test_type_base_must_be_absolute(base: str, refused: str | None) -> None:
    if refused is not None:
        with pytest.raises(ValueError, match=re.escape(refused)):
            ErrorsMiddleware.Options(type_base=base)
        return
    response = stack(raising(refuse(404)), format="problem", type_base=base).get("/", status=404)
    assert response.json["type"] == base + "404"


def test_error_after_start_response_passes_exc_info() -> None:
    """PEP 3333: a second start_response call needs exc_info, or servers (Waitress) refuse it."""

    def starts_then_refuses(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        raise refuse(400, "late")

    calls: list[tuple[str, Any]] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: OptExcInfo | None = None) -> Callable[[bytes], object]:
        if calls and exc_info is None:
            raise AssertionError("start_response called a second time without providing exc_info")
        calls.append((status, exc_info))
        return discard

    app = ErrorsMiddleware(starts_then_refuses, ErrorsMiddleware.Options(), Context())
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, start_response))
    assert [status for status, _ in calls] == ["200 OK", "400 Bad Request"]
    assert calls[1][1][0] is not None and calls[1][1][1].code == 400
    assert b"late" in body


@pytest.mark.parametrize("exc", [
    pytest.param(refuse(404, "API version 'v3' is not supported."), id="a refusal"),
    pytest.param(RuntimeError("boom"), id="an exception"),
])
def test_a_refusal_before_start_response_is_rendered_without_exc_info(exc: Exception) -> None:
    """A server given exc_info re-raises it (werkzeug's test Client does): nothing was sent, so none is given."""
    response = Client(ErrorsMiddleware(raising(exc), ErrorsMiddleware.Options(), Context())).get("/")
    assert response.status_code == (404 if isinstance(exc, HTTPException) else 500)
    assert response.json is not None
    assert response.json["error"]["code"] == response.status_code


@pytest.mark.parametrize(("exc", "expected"), [
    pytest.param(refuse(404, "No such thing."), "no-store", id="a 404, cacheable by default"),
    pytest.param(refuse(405, "No.", headers=[("Allow", "GET")]), "no-store", id="a 405"),
    pytest.param(RuntimeError("boom"), "no-store", id="a 500"),
    pytest.param(refuse(404, "Gone.", headers=[("Cache-Control", "max-age=60")]), "max-age=60",
                 id="a refusal that says how long it may be kept"),
    pytest.param(refuse(404, "Gone.", headers=[("Cache-Control", "private")]), "private, no-store",
                 id="private (a logged-in request's, from the session layer) says who, not how long"),
    pytest.param(refuse(404, "Gone.", headers=[("Cache-Control", "private, no-cache")]),
                 "private, no-cache, no-store", id="nor does no-cache keep it out of a store"),
])
def test_an_error_is_not_stored_by_caches_unless_it_says_so(exc: BaseException, expected: str) -> None:
    """It carries this request's id and time: a shared cache must not answer another request with it."""
    for fmt in ("envelope", "problem"):
        response = stack(raising(exc), format=fmt).get("/x", expect_errors=True)
        assert response.headers.getall("Cache-Control") == [expected]


def test_an_exception_that_carries_its_own_response_keeps_it() -> None:
    """werkzeug's abort(Response(...)) answers with that response; a RequestRedirect says where to go."""
    from werkzeug.exceptions import abort
    from werkzeug.routing import RequestRedirect
    from werkzeug.wrappers import Response

    def payment(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        abort(Response("pay first", status=402, headers={"X-Reason": "quota"}))
        return []  # pragma: no cover - abort raises

    response = stack(payment).get("/", status=402)
    assert (response.text, response.headers["X-Reason"]) == ("pay first", "quota")
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])  # the layers it passed add theirs
    head = stack(payment).head("/", status=402)
    assert (head.body, head.headers["X-Reason"], head.headers["Content-Length"]) == (b"", "quota", "9")
    assert re.fullmatch(r"[0-9a-f]{32}", head.headers["X-Request-ID"])
    moved = stack(raising(RequestRedirect("http://localhost/api/x/"))).get("/api/x", status=308)
    assert moved.headers["Location"] == "http://localhost/api/x/"



@pytest.mark.parametrize(("status", "body", "headers", "expected"), [
    pytest.param(304, "stale", {"ETag": '"v7"'}, [("ETag", '"v7"')],
                 id="304: its validator, and no content nor the headers that describe it"),
    pytest.param(304, None, {"ETag": '"v7"', "Cache-Control": "max-age=60"},
                 [("ETag", '"v7"'), ("Cache-Control", "max-age=60")],
                 id="304 without a body: no Content-Type either"),
    pytest.param(204, "x", {"X-Reason": "done"}, [("X-Reason", "done")], id="204: no content, nor its type or length"),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_exception_s_own_response_without_content_is_sent_without(
        method: str, status: int, body: str | None, headers: dict[str, str], expected: list[tuple[str, str]]) -> None:
    """abort(Response(...)) with a 204 or 304 is sent as werkzeug sends that response (RFC 9110 §15.3.5, §15.4.5):
    a body after it would be read as the next response on the connection."""
    from werkzeug.exceptions import abort
    from werkzeug.wrappers import Response

    def answered(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        abort(Response(body, status=status, headers=headers))
        return []  # pragma: no cover - abort raises

    response = stack(answered).request("/r", method=method, status=status)
    assert response.body == b""
    assert [(k, v) for k, v in response.headerlist if k != "X-Request-ID"] == expected
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])  # the layers it passed add theirs


def test_no_store_is_added_on_the_way_out_so_the_cache_may_keep_listed_errors(tmp_path: Any) -> None:
    """The core's 404 reaches a cache told to keep 404s without no-store; the client gets no-store."""
    from config import build_from_text

    built = build_from_text(
        f"app: {{factory: 'app:create_app', options: {{var_dir: '{tmp_path}'}}}}\n"
        "pipeline:\n  - errors: {}\n  - cache: {statuses: [200, 404], paths: ['/api/*']}\n")
    try:
        client = TestApp(built.app)
        first, second = (client.get("/api/v1/nope", status=404) for _ in range(2))
        assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
        assert first.headers["Cache-Control"] == second.headers["Cache-Control"] == "no-store"
    finally:
        built.close()


class Closing:
    """A body that records whether the server closed it (PEP 3333: always, even when it fails)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks, self.closed = chunks, False

    def __iter__(self) -> Any:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


def generating(exc: BaseException | None) -> Callable[..., Iterable[bytes]]:
    """A generator app (PEP 3333 allows it): start_response is called on the body's first iteration,
    after ``exc`` was raised there if there is one."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if exc is not None:
            raise exc
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one, "
        yield b"two"

    return app


@pytest.mark.parametrize(("exc", "code", "header", "value"), [
    pytest.param(refuse(503, "Later.", headers=[("Retry-After", "5")]), 503, "Retry-After", "5", id="503"),
    pytest.param(refuse(401, "Who?", headers=[("WWW-Authenticate", 'Bearer realm="x"')]), 401,
                 "WWW-Authenticate", 'Bearer realm="x"', id="401"),
    pytest.param(RuntimeError("boom"), 500, "Cache-Control", "no-store", id="an exception"),
])
def test_an_error_raised_by_a_generator_body_before_start_response_is_rendered(
        exc: BaseException, code: int, header: str, value: str) -> None:
    """Nothing was sent: the errors layer renders it as it renders one raised by the call itself."""
    response = Client(ErrorsMiddleware(generating(exc), ErrorsMiddleware.Options(), Context())).get("/g")
    assert (response.status_code, response.headers[header]) == (code, value)
    assert response.headers["Content-Type"] == "application/json"
    assert response.json is not None
    assert response.json["error"]["code"] == code and response.json["error"]["path"] == "/g"


def test_a_body_that_starts_the_response_on_its_first_iteration_is_sent_whole_and_closed() -> None:
    bodies: list[Closing] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        bodies.append(Closing(generating(None)(environ, start_response)))
        return bodies[-1]

    seen: list[str] = []
    errors = ErrorsMiddleware(app, ErrorsMiddleware.Options(), Context())
    result = errors({"REQUEST_METHOD": "GET", "PATH_INFO": "/"},
                    recording_start(lambda status, headers: seen.append(status)))
    assert seen == ["200 OK"]  # its first chunk was taken, to see whether it fails before the response starts
    assert (b"".join(result), bodies[0].closed) == (b"one, two", False)
    result.close()  # type: ignore[attr-defined]
    assert bodies[0].closed


def test_a_body_given_after_start_response_is_returned_as_it_is() -> None:
    body = [b"listed"]

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    errors = ErrorsMiddleware(app, ErrorsMiddleware.Options(), Context())
    assert errors({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, ignore_start) is body


def _strict_json(body: bytes) -> Any:
    """``body`` parsed as RFC 8259 JSON: NaN and Infinity are not JSON."""
    import json

    def refuse_constant(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse_constant)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("str() of this fails")


def _circular() -> list[Any]:
    looped: list[Any] = []
    looped.append(looped)
    return looped


@pytest.mark.parametrize("details", [
    pytest.param({(1, 2): "x"}, id="a key JSON cannot hold"),
    pytest.param(float("nan"), id="NaN, which is not JSON"),
    pytest.param({"limit": float("inf")}, id="Infinity, which is not JSON"),
    pytest.param(_circular(), id="a circular list"),
    pytest.param({"x": Unprintable()}, id="a value whose str() fails"),
])
@pytest.mark.parametrize("fmt", ["envelope", "problem"])
def test_details_that_cannot_be_rendered_leave_them_out_and_keep_the_refusal(
        fmt: str, details: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A refusal whose details are not JSON is still answered in the format, with its status and message."""
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        response = stack(raising(refuse(422, "Bad field.", headers=[("X-Why", "test")], details=details)),
                         format=fmt).get("/d", status=422)
    doc = _strict_json(response.body)
    assert response.content_type == ("application/json" if fmt == "envelope" else "application/problem+json")
    assert (response.headers["X-Why"], response.headers["Cache-Control"]) == ("test", "no-store")
    assert int(response.headers["Content-Length"]) == len(response.body)
    if fmt == "envelope":
        assert (doc["error"]["code"], doc["error"]["message"], doc["error"]["details"]) == (422, "Bad field.", None)
    else:
        assert (doc["status"], doc["detail"], "details" in doc) == (422, "Bad field.", False)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]  # the operator learns why, once
    request_id = response.headers["X-Request-ID"]
    assert [r.getMessage() for r in caplog.records] == [
        f"could not render the details of a 422 for GET /d (request id {request_id}); sent without them"]
    assert [r.request_id for r in caplog.records] == [request_id]  # type: ignore[attr-defined]


def test_debug_renders_an_exception_whose_str_fails() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("str() of this fails")

    response = stack(raising(Weird()), debug=True).get("/", status=500)
    assert response.json["error"]["details"]["exception"] == "Weird: <exception str() failed>"
    assert response.json["error"]["message"].startswith("An unexpected error occurred;")


def _with_code(code: Any) -> HTTPException:
    exc = HTTPException("Said with a status no error has.")
    exc.code = code
    return exc


@pytest.mark.parametrize("code", [
    pytest.param(100, id="1xx: an interim answer, the client would wait on for the final one"),
    pytest.param(200, id="2xx: an error sent as a success"),
    pytest.param(204, id="204: no content may follow it"),
    pytest.param(99, id="99: not a status"),
    pytest.param(600, id="600: not a status"),
    pytest.param(1000, id="1000: not three digits (Waitress sends it, with no body)"),
    pytest.param("404", id="a string"),
])
@pytest.mark.parametrize("fmt", ["envelope", "problem"])
def test_an_http_exception_with_a_status_no_error_has_is_an_unexpected_500(
        fmt: str, code: Any, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 9110 §15: a status is 100-599; an exception's answer is an error (or a redirect), never 1xx or 2xx."""
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        response = stack(raising(_with_code(code)), format=fmt).get("/s", status=500)
    assert response.status == "500 Internal Server Error"
    assert response.headers["Cache-Control"] == "no-store"
    doc = response.json
    assert (doc["error"]["code"] if fmt == "envelope" else doc["status"]) == 500
    assert "Said with a status" not in response.text
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None  # logged once, with its traceback



class NotModified(HTTPException):
    """A 304 an app raises (werkzeug has no exception of its own for it)."""

    code = 304
    description = "Not modified since then."


@pytest.mark.parametrize(("exc", "etag"), [
    pytest.param(NotModified(), None, id="an HTTPException subclass"),
    pytest.param(refuse(304, "Unchanged.", headers=[("ETag", '"v7"')]), '"v7"', id="refuse(304), with the validator"),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("fmt", ["envelope", "problem"])
def test_a_304_is_sent_without_content(fmt: str, method: str, exc: HTTPException, etag: str | None) -> None:
    """RFC 9110 §15.4.5: a 304 ends with its header section; a body after it would be read as the next response."""
    response = stack(raising(exc), format=fmt).request("/r", method=method, status=304)
    assert response.body == b""
    assert "Content-Type" not in response.headers
    assert "Content-Length" not in response.headers
    assert "Cache-Control" not in response.headers  # no error: it says what the client has is still good
    assert response.headers.get("ETag") == etag
    assert response.headers["X-Request-ID"]  # the layers' headers stay


@pytest.mark.parametrize(("header", "code"), [
    pytest.param(("Retry-After", "5\r\nSet-Cookie: admin=1"), 429, id="CR LF: a header injected"),
    pytest.param(("Retry-After", "5\nX-Forged: 1"), 503, id="a bare LF"),
    pytest.param(("WWW-Authenticate", 'Bearer error_description="caf\u00e9 \u2603"'), 401,
                 id="not ASCII: Waitress cannot encode U+2603 and answers its own plain 500"),
    pytest.param(("X-Note", "a\x00b"), 400, id="a NUL"),
    pytest.param(("Bad Name", "v"), 400, id="a name that is not a token"),
    pytest.param(("X-Split:Name", "v"), 400, id="a colon in the name"),
])
def test_a_header_a_refusal_carries_that_cannot_be_sent_is_left_out(
        header: tuple[str, str], code: int, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 9110 §5: a field is a token name and a value of visible characters; anything else is left out
    (and logged), never sent as it is (a header of its own, a response split) nor a crash into the server's 500."""
    exc = refuse(code, "Refused.", headers=[("X-Kept", "yes"), header])
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        response = stack(raising(exc)).get("/h", status=code)
    assert response.json["error"]["code"] == code
    assert response.headers["X-Kept"] == "yes"
    names = [name.lower() for name, _ in response.headerlist]
    assert header[0].lower() not in names and "set-cookie" not in names and "x-forged" not in names
    assert len(caplog.records) == 1 and repr(header[0]) in caplog.text


def test_a_header_of_an_exception_with_its_own_response_that_cannot_be_sent_is_left_out() -> None:
    from werkzeug.exceptions import abort
    from werkzeug.wrappers import Response

    def payment(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        abort(Response("pay first", status=402, headers={"X-Reason": "quota \u2603", "X-Kept": "yes"}))
        return []  # pragma: no cover - abort raises

    response = stack(payment).get("/", status=402)
    assert (response.text, response.headers["X-Kept"], "X-Reason" in response.headers) == ("pay first", "yes", False)


@pytest.mark.parametrize(("new_url", "location"), [
    pytest.param("http://localhost/caf\u00e9/", "http://localhost/caf%C3%A9/",
                 id="an IRI: as a URI, as werkzeug sends it"),
    pytest.param("http://localhost/\u2603/", "http://localhost/%E2%98%83/", id="beyond latin-1"),
    pytest.param("http://localhost/x/?a=1\r\nSet-Cookie: admin=1", "http://localhost/x/?a=1Set-Cookie:%20admin=1",
                 id="CR LF: never a header of its own"),
])
def test_a_redirect_location_is_a_uri(new_url: str, location: str) -> None:
    from werkzeug.routing import RequestRedirect

    moved = stack(raising(RequestRedirect(new_url))).get("/x", status=308)
    assert moved.headers["Location"] == location
    assert "Set-Cookie" not in moved.headers


NOT_A_PATH = [
    pytest.param("443", "example.com:443", "example.com%3A443", id="CONNECT's authority: not the scheme example.com"),
    pytest.param("80/x", "evil.example:80/x", "evil.example%3A80/x", id="a target with a colon before its first slash"),
    pytest.param("80/", "evil.example:80/", "evil.example%3A80/", id="a target that ends with a slash"),
    pytest.param("*", "*", "*", id="OPTIONS *"),
]


@pytest.mark.parametrize(("path_info", "target", "instance"), NOT_A_PATH)
def test_problem_instance_of_a_target_that_is_not_a_path_is_a_relative_reference(
        path_info: str, target: str, instance: str) -> None:
    """RFC 3986 §4.2: a colon in the first segment of a relative reference would read as a scheme."""
    import json

    seen: list[str] = []
    app = ErrorsMiddleware(raising(refuse(400, "Nope.")), ErrorsMiddleware.Options(format="problem"), Context())
    body = b"".join(app({"REQUEST_METHOD": "OPTIONS", "PATH_INFO": path_info, "REQUEST_URI": target},
                        recording_start(lambda status, headers: seen.append(status))))
    assert seen == ["400 Bad Request"]
    assert json.loads(body)["instance"] == instance


@pytest.mark.parametrize(("path_info", "target", "instance"), NOT_A_PATH)
def test_the_envelope_names_a_target_that_is_not_a_path_as_it_was_sent(
        path_info: str, target: str, instance: str) -> None:
    """Waitress splits ``CONNECT example.com:443`` as a URL, giving the path ``443``: the error names the target."""
    import json

    app = ErrorsMiddleware(raising(refuse(400, "Nope.")), ErrorsMiddleware.Options(), Context())
    body = b"".join(app({"REQUEST_METHOD": "OPTIONS", "PATH_INFO": path_info, "REQUEST_URI": target},
                        ignore_start))
    assert json.loads(body)["error"]["path"] == target
