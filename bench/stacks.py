"""The WSGI apps the bench compares, built in-process, and the requests it sends them.

- ``raw WSGI``: a callable answering the health body, the floor of any Python server;
- ``bare Flask``: ``app.create_app`` alone;
- ``default stack``: the shipped stack.yaml (memory stores);
- ``full stack``: bench/full.yaml, every built-in layer on but ``operator_page``, memory or Redis stores;
- ``peer's work``: bench/full.yaml with only the layers that do what the peer's extensions do;
- ``peer stack``: bench.peer, Flask extensions on the same core, memory or Redis.

Each wsgistack stack is built with ``config.build_from_file(path, env=...)``,
as ``serve.py`` builds it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from bench.common import BROWSER_HEADERS, DEFAULT_YAML, FULL_YAML, USER, Workspace
from bench.peer import create_bare_app, create_peer_app

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

HEALTH = "/api/v1/health"
SEARCH = "/api/v1/search?q=json"
_RAW_BODY = json.dumps({"status": "ok", "version": "v1", "engine": "local"}).encode()


def raw_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """The floor: a plain WSGI callable that answers the health body."""
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(_RAW_BODY)))])
    return [_RAW_BODY]


@dataclass
class Stack:
    """One app under test, with what it needs for logged-in requests."""

    name: str
    app: WSGIApp
    cookie: str = ""            # a session cookie of a logged-in user ("" when the stack has no session)
    token: str = ""             # a bearer access token ("" when the stack issues none)
    close: Callable[[], None] = field(default=lambda: None)


def make_environ(target: str, headers: dict[str, str] | None = None, method: str = "GET",
                 body: bytes = b"", remote_addr: str = "127.0.0.1") -> dict[str, Any]:
    """A PEP 3333 environ for ``target`` (path and query), as Waitress would give it."""
    from werkzeug.test import EnvironBuilder

    path, _, query = target.partition("?")
    builder = EnvironBuilder(path=path, query_string=query, method=method, headers=list((headers or {}).items()),
                             data=body or None, environ_base={"REMOTE_ADDR": remote_addr, "REMOTE_PORT": "50000"})
    environ = builder.get_environ()
    builder.close()
    environ["REQUEST_URI"] = environ["RAW_URI"] = target
    environ["wsgi.input"] = io.BytesIO(body)
    return environ


def call(app: WSGIApp, environ: dict[str, Any], body: bytes = b"") -> tuple[str, list[tuple[str, str]], bytes]:
    """One request: copy the environ, call the app, drain and close the body."""
    env = environ.copy()
    env["wsgi.input"] = io.BytesIO(body)
    seen: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        seen[:] = [status, headers]
        return _discard

    result = app(env, start_response)
    try:
        data = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen[0], seen[1], data


def _discard(data: bytes) -> None:
    pass


def _cookie_from(headers: list[tuple[str, str]], name: str) -> str:
    for key, value in headers:
        if key.lower() == "set-cookie" and value.startswith(name + "="):
            jar: SimpleCookie = SimpleCookie()
            jar.load(value)
            return f"{name}={jar[name].value}"
    return ""


def ensure_user(ws: Workspace) -> None:
    """Create the bench's login user once (scrypt hashing takes a moment)."""
    from app.users import UserStore

    users = UserStore(ws.var_dir / "users.sqlite3")
    try:
        if users.verify_password(*USER) is None:
            users.add(USER[0], USER[1], roles=["user"])
    finally:
        users.close()


def login(app: WSGIApp, cookie_name: str = "wsgistack_session") -> tuple[str, str]:
    """POST /auth/login as the bench user; return (session cookie, bearer token)."""
    body = json.dumps({"username": USER[0], "password": USER[1]}).encode()
    environ = make_environ("/auth/login", {**BROWSER_HEADERS, "Content-Type": "application/json",
                                           "Content-Length": str(len(body))}, method="POST", body=body)
    status, headers, data = call(app, environ, body)
    if not status.startswith("200"):
        raise RuntimeError(f"login failed: {status} {data[:300]!r}")
    return _cookie_from(headers, cookie_name), json.loads(data)["access_token"]


def wsgistack(ws: Workspace, name: str, config: Path, redis: bool = False, logged_in: bool = True,
              **env: str) -> Stack:
    """Build a stack.yaml as serve.py does; log the bench user in when the stack can."""
    from config import build_from_file

    built = build_from_file(config, env=ws.env(redis=redis, **env))
    stack = Stack(name, built.app, close=built.close)
    if logged_in and "tokens" in built.context.services:
        stack.cookie, stack.token = login(built.app)
    return stack


def peer(ws: Workspace, name: str, redis: bool = False) -> Stack:
    """The peer stack; its session cookie comes from GET /peer/login."""
    app = create_peer_app(str(ws.var_dir), ws.redis_url if redis else None)
    status, headers, _ = call(app, make_environ("/peer/login", BROWSER_HEADERS))
    if not status.startswith("200"):
        raise RuntimeError(f"peer login failed: {status}")
    return Stack(name, app, cookie=_cookie_from(headers, "peer_session"))


#: The stack that shows what one Redis round trip costs on this machine, whatever makes it.
ROUND_TRIP_FLOOR = "bare Flask + 1 Redis round trip"


def round_trip_floor(ws: Workspace) -> Stack:
    """Bare Flask behind one Redis round trip per request: a floor for any stack that counts in Redis.

    The round trip is the rate limiter's (a pipeline of ``INCR`` and ``PTTL`` on one key, through
    redis-py with hiredis, as the stores use), and nothing else runs around Flask: no stack that
    counts every request in Redis can cost less than this.
    """
    import redis

    if ws.redis_url is None:
        raise RuntimeError("no Redis server in this run")
    client = redis.Redis.from_url(ws.redis_url)
    core = create_bare_app(str(ws.var_dir))

    def floor(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        pipe = client.pipeline(transaction=False)
        pipe.incr("bench:floor")
        pipe.pttl("bench:floor")
        pipe.execute()
        return core(environ, start_response)

    return Stack(ROUND_TRIP_FLOOR, floor, close=client.close)


def build_index(ws: Workspace) -> float:
    """Build the local search index once (every stack and server shares the file); return seconds."""
    import time

    start = time.perf_counter()
    app = create_bare_app(str(ws.var_dir))
    status, _, data = call(app, make_environ(SEARCH, BROWSER_HEADERS))
    if not status.startswith("200"):
        raise RuntimeError(f"building the search index failed: {status} {data[:300]!r}")
    return time.perf_counter() - start


#: The layers of bench/full.yaml that do the peer stack's work: ProxyFix, Flask-CORS, Flask-Limiter,
#: Flask-Session read on every request (auth reads the session's user, as the peer's hook does) and
#: Flask-Caching; errors renders their refusals, as the core's error handlers do the peer's.
PEER_WORK = ("errors", "proxy", "cors", "ratelimit", "session", "auth", "cache")


def pipeline_subset(ws: Workspace, name: str, keep: Callable[[str], bool], comment: str) -> Path:
    """bench/full.yaml with only the layers ``keep`` accepts, written to the workspace as ``name``."""
    import yaml

    data = yaml.safe_load(FULL_YAML.read_text(encoding="utf-8"))
    data["pipeline"] = [entry for entry in data["pipeline"] if keep(next(iter(entry)))]
    path = ws.path / name
    path.write_text(f"# {comment}\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def peer_work_yaml(ws: Workspace) -> Path:
    return pipeline_subset(ws, "peer-work.yaml", lambda layer: layer in PEER_WORK,
                           f"bench/full.yaml with only {', '.join(PEER_WORK)}: the peer stack's work")


def inproc_stacks(ws: Workspace, redis: bool) -> list[Stack]:
    """Every stack of the in-process table, in table order."""
    stacks = [
        Stack("raw WSGI", raw_wsgi),
        Stack("bare Flask", create_bare_app(str(ws.var_dir))),
        wsgistack(ws, "default stack (memory)", DEFAULT_YAML),
        wsgistack(ws, "full stack (memory)", FULL_YAML),
        wsgistack(ws, "peer's work (memory)", peer_work_yaml(ws)),
    ]
    if redis:
        stacks.append(round_trip_floor(ws))
        stacks.append(wsgistack(ws, "full stack (Redis)", FULL_YAML, redis=True))
        stacks.append(wsgistack(ws, "peer's work (Redis)", peer_work_yaml(ws), redis=True))
    stacks.append(peer(ws, "peer stack (memory)"))
    if redis:
        stacks.append(peer(ws, "peer stack (Redis)", redis=True))
    return stacks


def raw_factory(options: dict[str, Any] | None = None) -> WSGIApp:
    """``app.factory`` for stacks around the raw callable (the per-layer table)."""
    return raw_wsgi
