"""The browser flows the shipped stack.yaml promises, in a real headless Chromium against serve.py.

The API is ``serve.py serve`` in a subprocess on ``127.0.0.1:P``, built from a copy of
stack.yaml that differs only where it must: ``cors.origins`` and ``csrf.trusted_origins`` name
the test page's origins (``http://localhost:Q`` and ``http://127.0.0.1:Q`` instead of port
3000), and the search stream is paced so that its events are seen to arrive one by one.  A
second copy also turns on csrf's ``double_submit``.  The page is a small HTML page served by
Waitress on ``Q``; its script calls the API with ``fetch(..., {credentials: "include"})``.

Each step asserts what the page's script could read (status, body, the headers
``Access-Control-Expose-Headers`` lets it see) and, through the ``X-Request-ID`` it read, the
access line the server wrote for that request (its status and the user it saw): so the effect
of the session cookie the browser kept is checked where it happens, on the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from browser import Server, chromium, serve
from conftest import Served, free_port
from stack_support import secret

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "ada", "correct horse battery staple"
INTERVAL = 0.25  # seconds between the stream's events: started, three progress events, complete
SECRETS = {"SESSION_SECRET": secret("session"), "JWT_SECRET": secret("jwt"), "CSRF_SECRET": secret("csrf")}
READABLE = ("X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After",
            "WWW-Authenticate", "Content-Type", "Cache-Control", "Pragma", "X-Cache")
PAGE = b"<!doctype html><html><head><title>client</title></head><body>client page</body></html>"

FETCH = """
const [url, init, names, done] = arguments;
fetch(url, init).then(async (r) => {
    const headers = {};
    for (const name of names) headers[name] = r.headers.get(name);
    done({ok: true, status: r.status, body: await r.text(), headers});
}).catch((e) => done({ok: false, error: `${e.name}: ${e.message}`}));
"""

STREAM = """
const [url, init, done] = arguments;
(async () => {
    const start = performance.now();
    const r = await fetch(url, init);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    const chunks = [];
    for (;;) {
        const {value, done: end} = await reader.read();
        if (end) break;
        chunks.push({at: performance.now() - start, text: decoder.decode(value, {stream: true})});
    }
    done({ok: true, status: r.status, type: r.headers.get("Content-Type"),
          request_id: r.headers.get("X-Request-ID"), chunks});
})().catch((e) => done({ok: false, error: `${e.name}: ${e.message}`}));
"""


def page_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The client page."""
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(PAGE)))])
    return [PAGE]


class Api(Served):
    """serve.py on a copy of stack.yaml; ``base`` is how the page addresses it."""

    def __init__(self, config: Path, port: int) -> None:
        super().__init__(config, {**SECRETS, "WSGISTACK_LISTEN": f"127.0.0.1:{port}",
                                  "WSGISTACK_VAR_DIR": str(config.parent.parent / "var")}, port, config.stem)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        """The access lines written so far."""
        return [dict(json.loads(line)) for line in self.out.read_text().splitlines() if line.startswith("{")]

    def wait_for(self, found: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The last access line ``found`` accepts (written just after its answer went out)."""
        deadline = time.monotonic() + 5
        while True:
            entry: dict[str, Any]
            for entry in reversed(self.lines()):
                if found(entry):
                    return entry
            assert time.monotonic() < deadline, f"no access line for {what}: {self.out.read_text()}"
            time.sleep(0.05)

    def access_line(self, request_id: str | None) -> dict[str, Any]:
        """The access line of the request with this id."""
        assert request_id, "the page could not read X-Request-ID"
        return self.wait_for(lambda line: line["request_id"] == request_id, request_id)

    def statuses(self, method: str, path: str) -> list[int]:
        """The statuses of every request ``method path`` the server logged so far."""
        return [line["status"] for line in self.lines() if (line["method"], line["path"]) == (method, path)]


def stack_copy(folder: Path, page_port: int, double_submit: bool) -> Path:
    """stack.yaml with the page's origins for port 3000's, a paced stream, and maybe double_submit."""
    data = yaml.safe_load((ROOT / "stack.yaml").read_text())
    wanted = ["http://localhost:3000", "http://127.0.0.1:3000"]
    ours = [f"http://localhost:{page_port}", f"http://127.0.0.1:{page_port}"]
    layers = {name: options for entry in data["pipeline"] for name, options in entry.items()}
    assert layers["cors"]["origins"] == wanted and layers["csrf"]["trusted_origins"] == wanted
    layers["cors"]["origins"] = layers["csrf"]["trusted_origins"] = ours
    data["app"]["options"]["search"]["stream_interval"] = INTERVAL
    if double_submit:
        layers["csrf"].update(double_submit=True, secret_key="${CSRF_SECRET}")
    config = folder / ("double_submit.yaml" if double_submit else "shipped.yaml")
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium() as d:
        yield d


@pytest.fixture(scope="module")
def page() -> Iterator[Server]:
    """The page on 127.0.0.1:Q, also reachable as localhost:Q: both are allowed origins."""
    with serve(page_app) as server:
        yield server


@pytest.fixture(scope="module")
def stranger() -> Iterator[Server]:
    """The same page on another port of 127.0.0.1: same site as the API, but no allowed origin."""
    with serve(page_app) as server:
        yield server


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A var/ with the user and the search index, shared by both servers."""
    from app.options import SearchOptions
    from app.search.local import LocalEngine
    from app.users import UserStore

    root = tmp_path_factory.mktemp("flows")
    var = root / "var"
    var.mkdir()
    users = UserStore(var / "users.sqlite3")
    users.add(USER, PASSWORD, roles=["user"])
    users.close()
    engine = LocalEngine(SearchOptions(index_path=str(var / "search-index.sqlite3")))
    engine.ensure_index()
    engine.close()
    (root / "stacks").mkdir()
    return root / "stacks"


@pytest.fixture(scope="module")
def shipped(folder: Path, page: Server) -> Iterator[Api]:
    """The shipped stack (double_submit off)."""
    api = Api(stack_copy(folder, page.port, double_submit=False), free_port())
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def tokened(folder: Path, page: Server) -> Iterator[Api]:
    """The shipped stack with csrf ``double_submit: true``."""
    api = Api(stack_copy(folder, page.port, double_submit=True), free_port())
    try:
        yield api
    finally:
        api.stop()


def call(driver: Any, page_url: str, url: str, init: dict[str, Any] | None = None) -> dict[str, Any]:
    """From the page at ``page_url``: what ``fetch(url, init)`` let the script read."""
    if driver.current_url.rstrip("/") != page_url:
        driver.get(page_url + "/")
    result: dict[str, Any] = driver.execute_async_script(FETCH, url, init or {}, list(READABLE))
    return result


def login_init(password: str = PASSWORD) -> dict[str, Any]:
    return {"method": "POST", "credentials": "include", "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"username": USER, "password": password})}


def post_json(body: dict[str, Any], headers: dict[str, str] | None = None,
              credentials: str = "include") -> dict[str, Any]:
    return {"method": "POST", "credentials": credentials,
            "headers": {"Content-Type": "application/json", **(headers or {})}, "body": json.dumps(body)}


def test_login_session_bearer_refresh_logout(driver: Any, page: Server, stranger: Server, shipped: Api) -> None:
    api, origin = shipped.url(), page.url

    login = call(driver, origin, f"{api}/auth/login", login_init())
    assert login["ok"] and login["status"] == 200, login
    tokens = json.loads(login["body"])
    assert {"access_token", "refresh_token"} <= set(tokens) and "csrf_token" not in tokens
    headers = login["headers"]
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("5", "4"), headers
    assert headers["RateLimit-Reset"] is not None and headers["X-Request-ID"] is not None
    assert (headers["Cache-Control"], headers["Pragma"]) == ("no-store", "no-cache"), "tokens are never cached"
    assert shipped.access_line(headers["X-Request-ID"])["status"] == 200
    assert shipped.statuses("OPTIONS", "/auth/login") == [204], "a JSON POST is preflighted"

    # The browser kept the session cookie (same site: both 127.0.0.1) and sends it back.
    mine = call(driver, origin, f"{api}/api/v1/search?q=json+decoder", {"credentials": "include"})
    assert mine["status"] == 200, mine
    assert (mine["headers"]["RateLimit-Limit"], mine["headers"]["X-Cache"]) == ("120", None), \
        "RateLimit-* are exposed, X-Cache is not"
    assert shipped.access_line(mine["headers"]["X-Request-ID"])["user"] == USER
    anonymous = call(driver, origin, f"{api}/api/v1/search?q=json+decoder")
    assert anonymous["status"] == 200, anonymous
    assert shipped.access_line(anonymous["headers"]["X-Request-ID"])["user"] is None

    no_token = call(driver, origin, f"{api}/auth/csrf", {"credentials": "include"})
    assert no_token["status"] == 404 and "double_submit is off" in no_token["body"], no_token

    # The bearer token alone (Authorization: a preflighted header).
    bearer = call(driver, origin, f"{api}/api/v1/search?q=json+encoder",
                  {"headers": {"Authorization": f"Bearer {tokens['access_token']}"}})
    assert bearer["status"] == 200, bearer
    assert shipped.access_line(bearer["headers"]["X-Request-ID"])["user"] == USER
    forged = call(driver, origin, f"{api}/api/v1/search?q=json", {"headers": {"Authorization": "Bearer x.y.z"}})
    assert forged["status"] == 401, forged
    assert forged["headers"]["WWW-Authenticate"].startswith("Bearer"), forged["headers"]
    assert json.loads(forged["body"])["error"]["request_id"] == forged["headers"]["X-Request-ID"]

    # A cookie write from an allowed origin needs no token (double_submit is off): a refresh.
    refreshed = call(driver, origin, f"{api}/auth/refresh", post_json({"refresh_token": tokens["refresh_token"]}))
    assert refreshed["status"] == 200, refreshed
    fresh = json.loads(refreshed["body"])
    assert fresh["refresh_token"] != tokens["refresh_token"]

    # A page on the same site but no trusted origin: its simple (unpreflighted) POST carries the
    # Lax cookie, the csrf layer refuses it, and the browser does not show the page the answer.
    forged_logout = call(driver, stranger.url, f"{api}/auth/logout",
                         {"method": "POST", "credentials": "include", "headers": {"Content-Type": "text/plain"}})
    assert forged_logout == {"ok": False, "error": "TypeError: Failed to fetch"}
    assert shipped.statuses("POST", "/auth/logout") == [403]
    still = call(driver, origin, f"{api}/api/v1/search?q=json+tool", {"credentials": "include"})
    assert shipped.access_line(still["headers"]["X-Request-ID"])["user"] == USER, "the session survived"

    logout = call(driver, origin, f"{api}/auth/logout", post_json(
        {"refresh_token": fresh["refresh_token"]}, {"Authorization": f"Bearer {fresh['access_token']}"}))
    assert (logout["status"], logout["body"]) == (204, ""), logout

    after = call(driver, origin, f"{api}/api/v1/search?q=json+scanner", {"credentials": "include"})
    assert after["status"] == 200, after
    assert shipped.access_line(after["headers"]["X-Request-ID"])["user"] is None, "the cookie is gone"
    for token in (tokens["access_token"], fresh["access_token"]):
        revoked = call(driver, origin, f"{api}/api/v1/search?q=json",
                       {"headers": {"Authorization": f"Bearer {token}"}})
        assert revoked["status"] == 401, revoked
    again = call(driver, origin, f"{api}/auth/refresh", post_json({"refresh_token": fresh["refresh_token"]}))
    assert again["status"] == 401, again


@pytest.mark.parametrize(("page_host", "api_host", "kept"), [
    pytest.param("localhost", "localhost", True, id="localhost page, localhost API: one site"),
    pytest.param("localhost", "127.0.0.1", False, id="localhost page, 127.0.0.1 API: two sites"),
])
def test_the_cookie_needs_page_and_api_on_one_site(driver: Any, page: Server, shipped: Api, page_host: str,
                                                   api_host: str, kept: bool) -> None:
    origin, api = f"http://{page_host}:{page.port}", shipped.url(api_host)
    login = call(driver, origin, f"{api}/auth/login", login_init())
    assert login["status"] == 200, login
    search = call(driver, origin, f"{api}/api/v1/search?q=json+{page_host}+{api_host}", {"credentials": "include"})
    assert search["status"] == 200, search
    assert shipped.access_line(search["headers"]["X-Request-ID"])["user"] == (USER if kept else None)
    tokens = json.loads(login["body"])
    bearer = call(driver, origin, f"{api}/api/v1/search?q=json", {
        "headers": {"Authorization": f"Bearer {tokens['access_token']}"}})
    assert shipped.access_line(bearer["headers"]["X-Request-ID"])["user"] == USER, "the bearer token works anyway"
    # A write from the trusted origin, with the cookie where the browser kept one.
    refreshed = call(driver, origin, f"{api}/auth/refresh", post_json({"refresh_token": tokens["refresh_token"]}))
    assert refreshed["status"] == 200, refreshed


def test_the_search_stream_arrives_event_by_event(driver: Any, page: Server, shipped: Api) -> None:
    driver.get(page.url + "/")
    result: dict[str, Any] = driver.execute_async_script(
        STREAM, f"{shipped.url()}/api/v1/search/stream?q=json", {"credentials": "include"})
    assert result["ok"] and result["status"] == 200, result
    assert result["type"].startswith("text/event-stream")
    assert shipped.access_line(result["request_id"])["status"] == 200
    text = "".join(chunk["text"] for chunk in result["chunks"])
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "search_started" and events[-1] == "search_complete", events
    assert "search_progress" in events
    first = next(c["at"] for c in result["chunks"] if "search_started" in c["text"])
    last = next(c["at"] for c in result["chunks"] if "search_complete" in c["text"])
    assert last - first >= 2 * INTERVAL * 1000, f"the events came together: {result['chunks']}"
    complete = text.split("event: search_complete\ndata: ")[1].split("\n")[0]
    assert json.loads(complete)["query"] == "json"


def test_double_submit_token(driver: Any, page: Server, tokened: Api) -> None:
    api, origin = tokened.url(), page.url
    before = call(driver, origin, f"{api}/auth/csrf", {"credentials": "include"})
    assert before["status"] == 404, before

    login = call(driver, origin, f"{api}/auth/login", login_init())
    assert login["status"] == 200, login
    tokens = json.loads(login["body"])
    token = tokens["csrf_token"]
    fetched = call(driver, origin, f"{api}/auth/csrf", {"credentials": "include"})
    assert fetched["status"] == 200, fetched
    assert json.loads(fetched["body"]) == {"csrf_token": token}

    refresh = {"refresh_token": tokens["refresh_token"]}
    missing = call(driver, origin, f"{api}/auth/refresh", post_json(refresh))
    assert missing["status"] == 403, missing
    assert json.loads(missing["body"])["error"]["message"].startswith("CSRF token missing"), missing
    assert missing["headers"]["X-Request-ID"] is not None
    wrong = call(driver, origin, f"{api}/auth/refresh", post_json(refresh, {"X-CSRF-Token": token[::-1]}))
    assert wrong["status"] == 403, wrong
    assert "does not match" in json.loads(wrong["body"])["error"]["message"]
    right = call(driver, origin, f"{api}/auth/refresh", post_json(refresh, {"X-CSRF-Token": token}))
    assert right["status"] == 200, right
    bearer_only = call(driver, origin, f"{api}/auth/refresh", post_json(
        {"refresh_token": json.loads(right["body"])["refresh_token"]}, credentials="omit"))
    assert bearer_only["status"] == 200, "without the cookie no token is needed"

    # Logging out with the cookie alone ends the tokens that login handed out too.
    logout = call(driver, origin, f"{api}/auth/logout", post_json({}, {"X-CSRF-Token": token}))
    assert logout["status"] == 204, logout
    access = json.loads(bearer_only["body"])["access_token"]
    revoked = call(driver, origin, f"{api}/api/v1/search?q=json", {"headers": {"Authorization": f"Bearer {access}"}})
    assert revoked["status"] == 401, revoked
    gone = call(driver, origin, f"{api}/auth/csrf", {"credentials": "include"})
    assert gone["status"] == 404, gone


def test_refusals_are_readable(driver: Any, page: Server, tokened: Api) -> None:
    """A 400 and the login limit's 429 (this server's last logins): status, body and headers."""
    api, origin = tokened.url(), page.url
    bad = call(driver, origin, f"{api}/auth/login", {**login_init(), "body": "{not json"})
    assert bad["status"] == 400, bad
    assert json.loads(bad["body"])["error"]["request_id"] == bad["headers"]["X-Request-ID"]
    assert bad["headers"]["RateLimit-Limit"] == "5"
    seen = []
    for _ in range(6):
        answer = call(driver, origin, f"{api}/auth/login", login_init("wrong"))
        seen.append(answer["status"])
        if answer["status"] == 429:
            break
        assert answer["status"] == 401 and answer["headers"]["WWW-Authenticate"], answer
    assert seen[-1] == 429, seen
    headers = answer["headers"]
    assert int(headers["Retry-After"]) > 0 and headers["RateLimit-Remaining"] == "0", headers
    assert headers["RateLimit-Limit"] == "5"
    assert json.loads(answer["body"])["error"]["code"] == 429


EVENT_SOURCE = """
const [url, done] = arguments;
const source = new EventSource(url, {withCredentials: true});
const seen = [];
const finish = (result) => { source.close(); done(result); };
for (const name of ["search_started", "search_progress", "search_complete", "search_error"]) {
    source.addEventListener(name, (e) => {
        seen.push({event: name, data: JSON.parse(e.data)});
        if (name === "search_complete" || name === "search_error") finish({ok: true, seen});
    });
}
source.onerror = () => finish({ok: false, seen, state: source.readyState});
"""


def test_an_event_source_reads_the_stream(driver: Any, page: Server, shipped: Api) -> None:
    """docs/production.md: a page's EventSource, which cannot send headers, relies on the session cookie."""
    assert call(driver, page.url, f"{shipped.url()}/auth/login", login_init())["status"] == 200
    before = {line["request_id"] for line in shipped.lines()}
    result: dict[str, Any] = driver.execute_async_script(
        EVENT_SOURCE, f"{shipped.url()}/api/v1/search/stream?q=json+decoder")
    assert result["ok"], result
    events = [item["event"] for item in result["seen"]]
    assert events[0] == "search_started" and events[-1] == "search_complete", events
    assert result["seen"][-1]["data"]["query"] == "json decoder"
    stream = shipped.wait_for(lambda line: line["path"] == "/api/v1/search/stream" and line["request_id"] not in before,
                              "the stream")
    assert (stream["status"], stream["user"]) == (200, USER), "the stream saw the session's user"


EVENT_SOURCE_LEFT_OPEN = """
const [url, done] = arguments;
const source = new EventSource(url, {withCredentials: true});
const seen = [];
source.addEventListener("search_complete", (e) => seen.push(e.lastEventId));
source.onerror = () => {  // the stream's end (CONNECTING: it reconnects), then the 204 (CLOSED: for good)
    if (source.readyState === EventSource.CLOSED) done({seen, state: source.readyState});
};
setTimeout(() => { const state = source.readyState; source.close(); done({seen, state, waited: true}); }, 15000);
"""


def test_an_event_source_left_open_stops_after_search_complete(driver: Any, page: Server, shipped: Api) -> None:
    """A page that never closes its EventSource: the browser reconnects when the stream ends, with the last event
    id, and the 204 that gets makes it stop for good: one search, not one every three seconds."""
    driver.get(page.url + "/")
    before = {line["request_id"] for line in shipped.lines()}
    result: dict[str, Any] = driver.execute_async_script(
        EVENT_SOURCE_LEFT_OPEN, f"{shipped.url()}/api/v1/search/stream?q=json+reconnect")
    assert result == {"seen": ["complete"], "state": 2}, result  # EventSource.CLOSED, by the server's 204
    def new_stream(line: dict[str, Any]) -> bool:
        return bool(line["path"] == "/api/v1/search/stream" and line["request_id"] not in before)

    shipped.wait_for(lambda line: new_stream(line) and line["status"] == 204, "the reconnection")
    assert [line["status"] for line in shipped.lines() if new_stream(line)] == [200, 204]


@pytest.mark.parametrize(("init", "status", "message"), [
    pytest.param({"method": "POST", "headers": {"Content-Type": "application/json"},
                  "body": "[" + "0," * 1_000_000 + "0]"}, 413, "more than max_body_bytes (1048576)",
                 id="a 2 MB body: the validation layer's 413"),
    pytest.param({"headers": {"X-API-Version": "v9"}}, 400, "v9", id="an unknown X-API-Version"),
])
def test_refusals_of_the_request_are_readable(driver: Any, page: Server, shipped: Api, init: dict[str, Any],
                                              status: int, message: str) -> None:
    result = call(driver, page.url, f"{shipped.url()}/api/search?q=json", {**init, "credentials": "include"})
    assert result["status"] == status, result
    body = json.loads(result["body"])
    assert message in body["error"]["message"], body
    assert body["error"]["request_id"] == result["headers"]["X-Request-ID"]


def test_a_body_over_waitress_cap_is_not_readable(driver: Any, page: Server, shipped: Api) -> None:
    """As stack.yaml and validation.md say: over server.max_request_body_size Waitress answers alone."""
    result = call(driver, page.url, f"{shipped.url()}/api/search?q=json", {
        "method": "POST", "headers": {"Content-Type": "application/json"}, "body": "[" + "0," * 2_200_000 + "0]"})
    assert result == {"ok": False, "error": "TypeError: Failed to fetch"}


def test_the_page_request_id_and_api_version_header(driver: Any, page: Server, shipped: Api) -> None:
    result = call(driver, page.url, f"{shipped.url()}/api/search?q=json+encoder",
                  {"headers": {"X-Request-ID": "page-42", "X-API-Version": "v2"}})
    assert result["status"] == 200, result
    assert result["headers"]["X-Request-ID"] == "page-42"
    assert "pagination" in json.loads(result["body"]), "the v2 shape"
    assert shipped.access_line("page-42")["status"] == 200
