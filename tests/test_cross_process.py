"""examples/production.yaml as two real serve.py processes sharing one Redis.

Process A and process B run the same file (``workers: 1`` each, their own port), the way two
hosts behind one proxy would: a session made on one is valid on the other, the login limit is
counted once for both, a logout on one refuses the token on the other at once, and the
walkthrough in docs/production.md works as written, straight to A and, when nginx is installed,
through the docs' own nginx configuration in front of both. Direct requests carry
``X-Forwarded-For`` and ``X-Forwarded-Proto: https`` from 127.0.0.1, the proxy the example
trusts, as nginx would send them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RedisServer, free_port
from conftest import Served as ServedBase
from stack_support import secret

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "production.yaml"
DOC = ROOT / "docs" / "production.md"
SECRETS = {"SESSION_SECRET": secret("session"), "JWT_SECRET": secret("jwt", 64)}
PASSWORD = "correct horse battery staple"
HSTS = "max-age=31536000"
INTERVAL = 0.3  # seconds between the events of the search stream in the derived config


# ---------------------------------------------------------------- serve.py check on the example

CHECK_ENV = {"REDIS_URL": "redis://127.0.0.1:6379/0", **SECRETS}


def check_example(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``serve.py -c examples/production.yaml check`` with exactly ``env`` (plus PATH) as the environment.

    It runs on a copy, so that a developer's own ``examples/.env`` (which serve.py would read)
    cannot change the answer.
    """
    (tmp_path / "examples").mkdir(exist_ok=True)
    shutil.copy(EXAMPLE, tmp_path / "examples" / "production.yaml")
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", "examples/production.yaml", "check"],
                          cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("env", "code", "lines"),
    [
        pytest.param(CHECK_ENV, 0, ["examples/production.yaml: ok"], id="clean with the three variables"),
        pytest.param({}, 2, [
            "examples/production.yaml:34:11 stores.shared: environment variable REDIS_URL is not set and has no "
            "default: set it in the environment or in the .env file beside the configuration, or write "
            "${REDIS_URL:-default}",
            "examples/production.yaml:79:19 pipeline[9].session.secret_key: environment variable SESSION_SECRET is "
            "not set and has no default: set it in the environment or in the .env file beside the configuration "
            "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')",
            "examples/production.yaml:88:15 pipeline[11].auth.secret: environment variable JWT_SECRET is not set "
            "and has no default: set it in the environment or in the .env file beside the configuration (make one "
            "with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')",
        ], id="no variables"),
        pytest.param({**CHECK_ENV, "JWT_SECRET": "short"}, 2, [
            "examples/production.yaml:88:15 pipeline[11].auth.secret: secret must be at least 32 bytes for HS256 "
            "(it has 5); make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'",
        ], id="short JWT secret"),
        pytest.param({**CHECK_ENV, "REDIS_URL": "memory://"}, 2, [
            "examples/production.yaml:64:5 pipeline[7]: ratelimit keeps state in store 'shared' (memory://) but "
            "server.workers is 2: each process would have its own copy; use redis://",
            "examples/production.yaml:77:5 pipeline[9]: session keeps state in store 'shared' (memory://) but "
            "server.workers is 2: each process would have its own copy; use redis://",
            "examples/production.yaml:86:5 pipeline[11]: auth keeps state in store 'shared' (memory://) but "
            "server.workers is 2: each process would have its own copy; use redis://",
            "examples/production.yaml:105:5 warning: pipeline[13]: cache on a memory:// store with 2 workers keeps "
            "one cache per process (more misses, uneven purges)",
        ], id="memory store with two workers"),
        pytest.param({**CHECK_ENV, "REDIS_URL": "memory://", "WSGISTACK_WORKERS": "1"}, 0,
                     ["examples/production.yaml: ok"], id="memory store is fine for one worker"),
    ],
)
def test_check_the_production_example(env: dict[str, str], code: int, lines: list[str], tmp_path: Path) -> None:
    result = check_example(env, tmp_path)
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout.splitlines() == lines


def test_the_check_output_in_the_docs_is_real(tmp_path: Path) -> None:
    doc = DOC.read_text()
    block = doc.split("Errors\nname the file, line, column and key:\n\n```\n", 1)[1].split("```", 1)[0]
    assert len(block.splitlines()) == 2
    for line in block.replace("/etc/wsgistack/stack.yaml", "examples/production.yaml").splitlines():
        env = {**CHECK_ENV, "JWT_SECRET": "short"} if "HS256" in line else {}
        assert line in check_example(env, tmp_path).stdout.splitlines(), line
    # With memory:// for Redis, every layer whose state the workers would not share, and nothing else:
    shared = doc.split("they name every layer whose state the\nprocesses would not share:\n\n```\n", 1)[1]
    shared = shared.split("```", 1)[0].replace("/etc/wsgistack/stack.yaml", "examples/production.yaml")
    assert check_example({**CHECK_ENV, "REDIS_URL": "memory://"}, tmp_path).stdout.splitlines() \
        == shared.splitlines()


def docs_unit() -> dict[str, list[str]]:
    """The settings of the systemd unit in docs/production.md, each name with its values in order."""
    block = DOC.read_text().split("# /etc/systemd/system/wsgistack.service\n", 1)[1].split("```", 1)[0]
    settings: dict[str, list[str]] = {}
    for line in block.splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


def test_the_docs_unit_lets_the_example_write_drain_and_reload() -> None:
    """What examples/production.yaml writes lies where the unit's read-only file system lets it write."""
    unit = docs_unit()
    example = EXAMPLE.read_text()
    server = yaml.safe_load(example)["server"]
    # systemd has no comments after a value: a '#' there becomes part of it, and the setting is
    # ignored ("Failed to parse time value"). Neither page's unit text may have one.
    for page in (DOC, ROOT / "docs" / "operations.md"):
        for block in re.findall(r"```ini\n(.*?)```", page.read_text(), flags=re.S):
            assert not [line for line in block.splitlines() if "=" in line and "#" in line.partition("=")[2]], page
    assert unit["ProtectSystem"] == ["strict"] and unit["PrivateTmp"] == ["yes"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    writable = [Path("/var/lib", *unit["StateDirectory"]), Path("/run", *unit["RuntimeDirectory"]), Path("/tmp"),
                *(Path(p) for values in unit.get("ReadWritePaths", []) for p in values.split())]
    for variable in ("WSGISTACK_VAR_DIR", "WSGISTACK_DRAIN_FILE"):
        [default] = re.findall(r"\$\{" + variable + r":-([^}]+)\}", example)
        assert any(Path(default).is_relative_to(folder) for folder in writable), (variable, default, writable)
    # The drain (and the 5 s the supervisor then gives a worker) ends before systemd's SIGKILL.
    assert int(unit["TimeoutStopSec"][0]) > server["drain_timeout"] + 5
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # the supervisor, which reloads every worker
    assert unit["User"] == ["wsgistack"] and unit["StateDirectory"] == ["wsgistack"]
    # systemd makes the folders with its own mode (0755 unless told): the one step 1 gives them.
    [made] = re.findall(r"install -d -o wsgistack -g wsgistack -m (\d+) /var/lib/wsgistack /run/wsgistack",
                        DOC.read_text())
    assert unit["StateDirectoryMode"] == unit["RuntimeDirectoryMode"] == [made]


# ---------------------------------------------------------------- two processes, one Redis


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []


class Served(ServedBase):
    """One ``serve.py serve`` process of the pair, called as nginx would call it."""

    def __init__(self, name: str, config: Path, env: dict[str, str], port: int) -> None:
        super().__init__(config, env, port, name)

    def call(self, method: str, path: str, *, client: str, token: str | None = None, cookie: str | None = None,
             body: Any = None, https: bool = True) -> Reply:
        """One request as nginx forwards it: the client's address, and the scheme it came in on."""
        headers = {"X-Forwarded-For": client, "X-Forwarded-Proto": "https" if https else "http"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if cookie is not None:
            headers["Cookie"] = cookie
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        conn = HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, data, headers)
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def login(self, user: str, client: str, password: str = PASSWORD) -> Reply:
        reply = self.call("POST", "/auth/login", client=client, body={"username": user, "password": password})
        assert reply.status == 200, reply.body
        return reply


@dataclass
class Pair:
    a: Served
    b: Served
    config: Path
    env: dict[str, str]
    drain: Path


def derived_config(path: Path) -> None:
    """examples/production.yaml with a small, paced search: everything else comes from the environment."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["app"]["options"]["search"] = {"engine": "local", "index_sources": ["json"], "stream_interval": INTERVAL}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Processes A and B serving the production example on one real Redis, with users ann (admin) and bob."""
    from app.options import SearchOptions
    from app.search.local import LocalEngine
    from app.users import UserStore

    redis_server: RedisServer | None = request.getfixturevalue("redis_server")
    if redis_server is not None and not redis_server.running:
        redis_server.start()
    url = os.environ.get("REDIS_URL") or (redis_server.url if redis_server else "")
    home = tmp_path_factory.mktemp("production")
    var = home / "var"
    var.mkdir()
    users = UserStore(var / "users.sqlite3")
    users.add("ann", PASSWORD, roles=["admin"])
    users.add("bob", PASSWORD, roles=["user"])
    users.close()
    engine = LocalEngine(SearchOptions(index_path=str(var / "search-index.sqlite3"), index_sources=["json"]))
    engine.ensure_index()
    engine.close()
    config = home / "stack.yaml"
    derived_config(config)
    env = {"REDIS_URL": url, **SECRETS, "WSGISTACK_WORKERS": "1", "WSGISTACK_VAR_DIR": str(var),
           "WSGISTACK_DRAIN_FILE": str(home / "drain"), "WSGISTACK_LOG_LEVEL": "INFO"}
    servers: list[Served] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            servers.append(Served(name, config, {**env, "WSGISTACK_LISTEN": f"127.0.0.1:{port}"}, port))
        yield Pair(servers[0], servers[1], config, env, home / "drain")
    finally:
        for served in servers:
            served.stop()


@pytest.fixture
def servers(pair: Pair, redis_url: str) -> Pair:
    """The pair, with Redis emptied before each test (no sessions, counters or revocations left)."""
    assert redis_url == pair.env["REDIS_URL"]
    return pair


def session_cookie(reply: Reply) -> str:
    """``__Host-session=…`` from a response, after checking the production cookie attributes."""
    for header in reply.cookies():
        if header.startswith("__Host-session=") and "Max-Age=0" not in header:
            value, _, attributes = header.partition("; ")
            assert attributes == "Secure; HttpOnly; Path=/; SameSite=Lax", header
            return value
    raise AssertionError(f"no session cookie in {reply.cookies()}")


@pytest.mark.redis
def test_a_session_made_on_a_is_valid_on_b(servers: Pair) -> None:
    client = "198.51.100.10"
    cookie = session_cookie(servers.a.login("bob", client))

    assert servers.b.call("GET", "/api/v2/search?q=json", client=client).status == 401
    on_b = servers.b.call("GET", "/api/v2/search?q=json", client=client, cookie=cookie)
    assert on_b.status == 200, on_b.body
    assert on_b.json()["pagination"]["total"] > 0
    assert on_b.headers["Cache-Control"] == "private"
    assert "Cookie" in on_b.headers["Vary"]
    # What a browser's EventSource does: the progress stream with the cookie alone.
    events = servers.b.call("GET", "/api/v2/search/stream?q=json", client=client, cookie=cookie)
    assert events.status == 200
    assert events.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert events.body.startswith(b"event: search_started\n") and b"event: search_complete\n" in events.body

    # Logging out through B ends the session everywhere: A no longer knows the cookie.
    out = servers.b.call("POST", "/auth/logout", client=client, cookie=cookie)
    assert out.status == 204
    assert any(c.startswith("__Host-session=; Expires=Thu, 01 Jan 1970") for c in out.cookies())
    refused = servers.a.call("GET", "/api/v2/search?q=json", client=client, cookie=cookie)
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="wsgistack"'


@pytest.mark.redis
def test_the_login_limit_is_counted_once_for_both_processes(servers: Pair) -> None:
    client = "198.51.100.20"
    barrier = threading.Barrier(10)
    statuses: list[tuple[str, int]] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        server = servers.a if i % 2 else servers.b
        barrier.wait()
        reply = server.call("POST", "/auth/login", client=client, body={"username": "bob", "password": "wrong"})
        with lock:
            statuses.append((server.name, reply.status))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(s for _, s in statuses) == [401] * 5 + [429] * 5, statuses  # 5/minute between them
    for server in (servers.a, servers.b):
        refused = server.call("POST", "/auth/login", client=client, body={"username": "bob", "password": PASSWORD})
        assert refused.status == 429
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.json()["detail"].startswith("Too many requests: the limit is 5 per 1 minute; retry in ")
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Remaining"] == "0"
    # The limit is per client address: another client behind the same proxy logs in.
    assert servers.b.login("bob", "198.51.100.21").status == 200


@pytest.mark.redis
def test_a_logout_on_a_refuses_the_token_on_b_at_once(servers: Pair) -> None:
    client = "198.51.100.30"
    tokens = servers.a.login("bob", client).json()
    access = tokens["access_token"]
    assert servers.b.call("GET", "/api/v2/search?q=json", client=client, token=access).status == 200

    out = servers.a.call("POST", "/auth/logout", client=client, token=access,
                         body={"refresh_token": tokens["refresh_token"]})
    assert out.status == 204
    started = time.monotonic()
    refused = servers.b.call("GET", "/api/v2/search?q=json", client=client, token=access)
    assert time.monotonic() - started < 1.0
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"] == (
        'Bearer realm="wsgistack", error="invalid_token", error_description="the token has been revoked"')
    assert refused.json()["detail"] == "Unauthorized: the token has been revoked."
    again = servers.b.call("POST", "/auth/refresh", client=client, body={"refresh_token": tokens["refresh_token"]})
    assert again.status == 401


@pytest.mark.redis
def test_the_production_walkthrough_across_both_processes(servers: Pair) -> None:
    a, b = servers.a, servers.b
    client = "198.51.100.40"

    # Anonymous search is refused, as the API's users expect; health is public.
    anonymous = a.call("GET", "/api/v1/search?q=json", client=client)
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="wsgistack"'
    assert anonymous.headers["Strict-Transport-Security"] == HSTS
    assert anonymous.json()["type"] == "about:blank" and anonymous.json()["status"] == 401
    assert a.call("GET", "/api/v1/health", client=client).status == 200
    # (and unversioned: /api/health reaches the default version's, and both spellings are exempt)
    unversioned = b.call("GET", "/api/health", client=client)
    assert (unversioned.status, unversioned.json()["version"]) == (200, "v2")

    # Log in on A, search on B with the token.
    tokens = a.login("bob", client).json()
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 900
    found = b.call("GET", "/api/v1/search?q=json", client=client, token=tokens["access_token"])
    assert found.status == 200
    assert found.json()["meta"]["query"] == "json" and found.json()["results"]
    assert found.headers["X-Cache"] == "MISS"
    again = b.call("GET", "/api/v1/search?q=json", client=client, token=tokens["access_token"])
    assert again.headers["X-Cache"] == "HIT"  # the same user (A and B differ in Host, which the cache keys on)
    assert again.json() == found.json()
    assert found.headers["Deprecation"] == "@1780272000"
    assert found.headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert found.headers.get_all("Link") == ['<https://docs.example.org/api/v1-deprecation>; rel="deprecation"',
                                             '</api/v2/>; rel="successor-version"']
    assert found.headers["Strict-Transport-Security"] == HSTS
    assert "Deprecation" not in b.call("GET", "/api/search?q=json", client=client,
                                       token=tokens["access_token"]).headers
    assert "Strict-Transport-Security" not in b.call("GET", "/api/v2/health", client=client, https=False).headers

    # Purging needs the admin role; ann has it, bob does not.
    purge = "/_stack/cache/purge?pattern=/api/*"
    denied = a.call("POST", purge, client=client, token=tokens["access_token"])
    assert denied.status == 403
    assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]
    admin = b.login("ann", client).json()["access_token"]
    purged = a.call("POST", purge, client=client, token=admin)
    assert purged.status == 200
    assert purged.json() == {"purged": 2, "pattern": "/api/*"}  # bob's v1 and v2 searches
    assert b.call("GET", "/api/v1/search?q=json", client=client,
                  token=tokens["access_token"]).headers["X-Cache"] == "MISS"

    # Log out on B; A refuses the token with the reason.
    assert b.call("POST", "/auth/logout", client=client, token=tokens["access_token"],
                  body={"refresh_token": tokens["refresh_token"]}).status == 204
    refused = a.call("GET", "/api/v2/search?q=json", client=client, token=tokens["access_token"])
    assert refused.status == 401
    assert 'error_description="the token has been revoked"' in refused.headers["WWW-Authenticate"]

    # Probes and metrics: readiness pings Redis; the drain file takes both out of rotation.
    assert a.call("GET", "/readyz", client=client).json()["stores"]["shared"]["ok"] is True
    servers.drain.touch()
    try:
        for server in (a, b):
            draining = server.call("GET", "/readyz", client=client)
            assert (draining.status, draining.json()) == (503, {"status": "draining"})
            assert server.call("GET", "/healthz", client=client).status == 200
    finally:
        servers.drain.unlink()
    assert a.call("GET", "/metrics", client="10.1.2.3").status == 200
    outsider = a.call("GET", "/metrics", client=client)
    assert outsider.status == 403
    assert outsider.json()["detail"] == "Metrics are not available to this client."


@pytest.mark.redis
def test_sighup_reloads_one_process(servers: Pair) -> None:
    a, b = servers.a, servers.b
    original = servers.config.read_text()
    assert "hsts_max_age: 31536000" in original
    try:
        servers.config.write_text(original.replace("hsts_max_age: 31536000", "hsts_max_age: 600"))
        a.proc.send_signal(signal.SIGHUP)
        wait_for_line(a, "generation 2 serving")
        assert a.call("GET", "/api/v2/health", client="198.51.100.50").headers["Strict-Transport-Security"] == \
            "max-age=600"
        assert b.call("GET", "/api/v2/health", client="198.51.100.50").headers["Strict-Transport-Security"] == HSTS

        servers.config.write_text(original.replace("hsts_max_age: 31536000", "hsts_max_age: -1"))
        a.proc.send_signal(signal.SIGHUP)
        wait_for_line(a, "reload failed, generation 2 keeps serving")
        assert a.call("GET", "/api/v2/health", client="198.51.100.50").headers["Strict-Transport-Security"] == \
            "max-age=600"
    finally:
        servers.config.write_text(original)
        a.proc.send_signal(signal.SIGHUP)
        wait_for_line(a, "generation 3 serving")
    assert a.call("GET", "/api/v2/health", client="198.51.100.50").headers["Strict-Transport-Security"] == HSTS


def wait_for_line(server: Served, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.err.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{server.name} did not log {text!r}: {server.err.read_text()[-2000:]}")
        time.sleep(0.05)


# ---------------------------------------------------------------- the docs, run as written


def walkthrough() -> list[str]:
    """The shell blocks of docs/production.md marked ``<!-- walkthrough -->``, in order."""
    blocks: list[str] = re.findall(r"<!-- walkthrough -->\n```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 6, "docs/production.md lost a walkthrough block"
    assert "users add alice" in blocks[0]
    return blocks


ALICE_PASSWORD = 'it\'s "quoted" $and spaced'
NEEDS_CURL = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")


def run_walkthrough(servers: Pair, script: str, base: str, **env: str) -> str:
    """Run doc shell code with bash -euo pipefail against ``base``; return its output.

    The docs' ``wsgistack`` shell function (serve.py as the service user on /etc/wsgistack) is
    defined here as serve.py on the pair's stack file.
    """
    prelude = f'wsgistack() {{ "{sys.executable}" "{ROOT / "serve.py"}" -c "{servers.config}" "$@"; }}\n'
    script = prelude + script.replace("http://127.0.0.1:8889", base)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**servers.env, "PATH": os.environ.get("PATH", ""),
                                             "PYTHONPATH": str(ROOT), "ALICE_PASSWORD": ALICE_PASSWORD, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def check_walkthrough_output(out: str) -> None:
    assert '"token_type": "Bearer"' in out and '"expires_in": 900' in out
    assert '"query": "json"' in out
    # The index holds what is installed: the exact first result varies, a json module's name does not.
    assert re.search(r'^  "first": "json(\.\w+)*"$', out, flags=re.M), out
    assert re.search(r"^HTTP/\S+ 204", out, flags=re.M), out
    assert re.search(r"^vary: Cookie, Origin\r?$", out, flags=re.M | re.I), out
    assert not re.search(r"^set-cookie:", out, flags=re.M | re.I), out  # no session sent: no cookie expired
    assert re.search(r"^HTTP/\S+ 401", out, flags=re.M), out
    assert re.search(r'^www-authenticate: Bearer realm="wsgistack", error="invalid_token", '
                     r'error_description="the token has been revoked"\r?$', out, flags=re.M | re.I), out
    assert '{"purged": 1, "pattern": "/api/*"}' in out


@pytest.mark.redis
@NEEDS_CURL
def test_the_docs_walkthrough_runs_as_written(servers: Pair) -> None:
    from app.users import UserStore

    with contextlib.closing(UserStore(Path(servers.env["WSGISTACK_VAR_DIR"]) / "users.sqlite3")) as users:
        users.remove("alice")  # the walkthrough adds her
    out = run_walkthrough(servers, "\n".join(walkthrough()), f"http://127.0.0.1:{servers.a.port}")
    assert "added user 'alice' with roles: admin" in out
    assert "HTTP/1.1 204 No Content" in out and "HTTP/1.1 401 Unauthorized" in out
    check_walkthrough_output(out)


# ---------------------------------------------------------------- behind the docs' nginx

NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` (its own CA, so curl can trust it) and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def nginx(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    """nginx with the server blocks of docs/production.md in front of A and B: (https port, http port, CA)."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    home = tmp_path_factory.mktemp("nginx")
    home.chmod(0o777)  # the workers (user nobody) write their temp files here
    cert, key = self_signed(home)
    https_port, http_port = free_port(), free_port()
    blocks = [b for b in re.findall(r"```nginx\n(.*?)```", DOC.read_text(), flags=re.S) if "server_name" in b]
    assert len(blocks) == 1  # the server blocks (another block shows only an upstream)
    servers = f"server 127.0.0.1:{pair.a.port};\n    server 127.0.0.1:{pair.b.port};"
    text = blocks[0]
    for old, new in [("listen 80;", f"listen 127.0.0.1:{http_port};"),
                     ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
                     ("server 127.0.0.1:8889;", servers),
                     ("/etc/letsencrypt/live/search.example.org/fullchain.pem", str(cert)),
                     ("/etc/letsencrypt/live/search.example.org/privkey.pem", str(key))]:
        assert old in text, old
        text = text.replace(old, new)
    conf = home / "nginx.conf"
    conf.write_text(f"""pid {home}/nginx.pid;
error_log {home}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {home}/body;
    proxy_temp_path {home}/proxy;
{text}
}}
""")
    tested = subprocess.run([NGINX, "-t", "-q", "-c", str(conf), "-p", str(home)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stderr
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(home), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (home / "error.log").read_text()
                time.sleep(0.05)
        yield https_port, http_port, cert
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
        proc.wait(timeout=10)


def via_nginx(port: int, ca: Path, path: str, headers: dict[str, str], source: str = "127.0.0.1") -> Reply:
    import ssl
    from http.client import HTTPSConnection

    conn = HTTPSConnection("localhost", port, timeout=10, source_address=(source, 0),
                           context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def access_log(servers: Pair, request_id: str) -> list[tuple[str, str]]:
    """``(client_ip, path)`` of the access log lines with this request id (written once the response is done)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for server in (servers.a, servers.b) for line in server.out.read_text().splitlines()
                 if f'"{request_id}"' in line]
        if lines or time.monotonic() > deadline:
            return [(entry["client_ip"], entry["path"]) for entry in lines]
        time.sleep(0.05)


@pytest.mark.redis
@NEEDS_CURL
@pytest.mark.parametrize(("path", "streams"), [
    ("/api/v1/search/stream", True),
    ("/api/v2/search/stream", True),
    ("/api/search/stream", True),  # the version from X-API-Version or Accept: the same stream
    ("/api/v1/search", False),
    ("/api/v1/search/stream/x", False),
])
def test_the_docs_nginx_gives_every_spelling_of_the_stream_its_location(path: str, streams: bool) -> None:
    """Its unbuffered location with the long read timeout (events may be a minute apart)."""
    [pattern] = re.findall(r"location ~ (\S+) \{[^}]*proxy_buffering off", DOC.read_text(encoding="utf-8"))
    assert (re.search(pattern, path) is not None) is streams


def test_the_walkthrough_through_the_docs_nginx(servers: Pair, nginx: tuple[int, int, Path]) -> None:
    from app.users import UserStore

    https_port, http_port, ca = nginx
    with contextlib.closing(UserStore(Path(servers.env["WSGISTACK_VAR_DIR"]) / "users.sqlite3")) as users:
        if users.get("alice") is None:
            users.add("alice", ALICE_PASSWORD, roles=["admin"])
    steps = "\n".join(walkthrough()[1:])  # alice exists already
    out = run_walkthrough(servers, steps, f"https://localhost:{https_port}", CURL_CA_BUNDLE=str(ca))
    check_walkthrough_output(out)

    # The server believes nginx about the client and the scheme, and only the entry nginx added:
    # a client that sends its own X-Forwarded-For from 127.0.0.2 is still 127.0.0.2.
    spoofed = via_nginx(https_port, ca, "/api/v2/health",
                        {"X-Forwarded-For": "203.0.113.99", "X-Request-ID": "spoof-check-1"}, source="127.0.0.2")
    assert spoofed.status == 200
    assert spoofed.headers["Strict-Transport-Security"] == HSTS
    # nginx gives the id ($request_id), whatever the client sent: the line is found by the id it got back
    assert spoofed.headers["X-Request-ID"] != "spoof-check-1"
    assert access_log(servers, "spoof-check-1") == []
    assert access_log(servers, spoofed.headers["X-Request-ID"]) == [("127.0.0.2", "/api/v2/health")]
    # Nor can what the client wrote there get its request refused: Waitress parses every entry of
    # the header it is given, and answers one it cannot parse (bad quoting) with its own plain 400.
    for forged in ['"203.0.113.99', '"a\\', "203.0.113.99, \"x"]:
        garbled = via_nginx(https_port, ca, "/api/v2/health", {"X-Forwarded-For": forged}, source="127.0.0.2")
        assert garbled.status == 200, (forged, garbled.body)
        assert access_log(servers, garbled.headers["X-Request-ID"]) == [("127.0.0.2", "/api/v2/health")]
    assert via_nginx(https_port, ca, "/metrics", {}).status == 404

    conn = HTTPConnection("127.0.0.1", http_port, timeout=10)
    conn.request("GET", "/api/v2/health", headers={"Host": "search.example.org"})
    redirect = conn.getresponse()
    conn.close()
    assert (redirect.status, redirect.headers["Location"]) == (301, "https://search.example.org/api/v2/health")


@pytest.mark.redis
def test_the_search_stream_through_the_docs_nginx_is_not_buffered(servers: Pair,
                                                                  nginx: tuple[int, int, Path]) -> None:
    import ssl
    from http.client import HTTPSConnection

    https_port, _, ca = nginx
    token = servers.a.login("bob", "198.51.100.60").json()["access_token"]
    conn = HTTPSConnection("localhost", https_port, timeout=10, context=ssl.create_default_context(cafile=str(ca)))
    started = time.perf_counter()
    conn.request("GET", "/api/v1/search/stream?q=json", headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Content-Length"] is None
    arrivals = []
    while line := response.readline():
        if line.startswith(b"event: "):
            arrivals.append((time.perf_counter() - started, line[7:].strip().decode()))
    done = time.perf_counter() - started
    conn.close()
    assert [name for _, name in arrivals] == ["search_started", *["search_progress"] * 3, "search_complete"]
    assert arrivals[0][0] < done - 2 * INTERVAL, (arrivals, done)
    assert done >= 4 * INTERVAL
