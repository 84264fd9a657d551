"""The stack under another WSGI server (``serve:app``, ``LiveStack(path, hosted=True)``), in-process.

Such a server builds the stack in every process it starts, and one that fails
to build stops it altogether (gunicorn's workers): what may stop a hosted start
is a configuration that never works, not a moment's trouble.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import REFUSALS_THAT_PASS, RedisServer, redis_command
from stack_support import secret
from webtest import TestApp

from config import ConfigError
from config.live import HOST_LISTEN_ENV, LiveStack

ECHO = 'app: {factory: "stack_support:echo_app"}\n'
REDIS_STACK = ECHO.replace("{", "{{").replace("}", "}}") + """stores:
  shared: "{url}"
pipeline:
  - errors: {{}}
  - health: {{}}
  - ratelimit: {{store: shared, limits: ["100/minute"]}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- a Redis refusing for a while


@pytest.mark.redis
@pytest.mark.parametrize(("refuse", "allow", "why"), REFUSALS_THAT_PASS)
def test_a_hosted_start_goes_on_while_redis_refuses_for_a_reason_that_passes(
        tmp_path: Path, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        refuse: tuple[str, ...], allow: tuple[str, ...], why: str) -> None:
    """serve.py keeps its pipeline through a failover; a gunicorn worker that refused to boot would stop gunicorn."""
    monkeypatch.setattr("stores.redis.REFUSED_FRESH", 1.0)
    admin = redis.Redis.from_url(own_redis.url)
    redis_command(admin, *refuse)
    path = _write(tmp_path, REDIS_STACK.format(url=own_redis.url))
    try:
        with caplog.at_level(logging.WARNING, logger="wsgistack.stores"):
            live = LiveStack(path, hosted=True)
        said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "wsgistack.stores"]
        assert said == [("ERROR", f"store 'shared' ({own_redis.url}): {why}; started anyway, since under another "
                                  "WSGI server a process that fails to start can stop it altogether (a failover, "
                                  "or Redis freeing memory or connections, ends this): its layers follow their "
                                  "on_store_error, and /readyz fails while Redis refuses them")]
        client = TestApp(live)
        assert client.get("/x").status_int == 200  # the limiter cannot count: on_store_error open
        shared = client.get("/readyz", status=503).json["stores"]["shared"]
        assert (shared["ok"], shared["error"]) == (False, why)
        redis_command(admin, *allow)
        time.sleep(1.1)
        assert client.get("/x").status_int == 200
        assert client.get("/readyz").json["status"] == "ok"
        live.current.close()
    finally:
        admin.close()


@pytest.mark.redis
def test_a_replica_still_stops_serve_py_which_keeps_the_pipeline_it_runs(tmp_path: Path,
                                                                         own_redis: RedisServer) -> None:
    redis.Redis.from_url(own_redis.url).replicaof("127.0.0.1", "1")
    path = _write(tmp_path, REDIS_STACK.format(url=own_redis.url))
    with pytest.raises(ConfigError) as info:
        LiveStack(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:11 stores.shared: store 'shared' ({own_redis.url}): a read-only replica: every write is refused "
        "(give the primary's URL, or redis+sentinel://)"]


@pytest.mark.redis
@pytest.mark.parametrize(("user", "why"), [
    pytest.param("app:wrong@", "authentication failed (a wrong or missing user name or password)",
                 id="a wrong password"),
    pytest.param("app:right@", "the Redis user may not do what the layers need (NOPERM: ",
                 id="a user without the commands the layers send"),
])
def test_a_hosted_start_still_stops_on_a_refusal_that_never_passes(tmp_path: Path, own_redis: RedisServer,
                                                                   user: str, why: str) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    redis_command(admin, "ACL", "SETUSER", "app", "on", ">right", "~*", "+ping", "+get")
    admin.close()
    url = own_redis.url.replace("redis://", f"redis://{user}")
    path = _write(tmp_path, REDIS_STACK.format(url=url))
    with pytest.raises(ConfigError) as info:
        LiveStack(path, hosted=True)
    shown = url.replace(user.split(":")[1].rstrip("@"), "***")
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith(f"{path}:3:11 stores.shared: store 'shared' ({shown}): {why}"), problem


@pytest.mark.redis
def test_a_hosted_start_still_stops_on_a_database_the_server_does_not_have(tmp_path: Path,
                                                                           own_redis: RedisServer) -> None:
    url = own_redis.url.removesuffix("/0") + "/99"
    path = _write(tmp_path, REDIS_STACK.format(url=url))
    with pytest.raises(ConfigError) as info:
        LiveStack(path, hosted=True)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:11 stores.shared: store 'shared' ({url}): no database of that number on the server"]


# ---------------------------------------------------------------- serve.py check --hosted


ROOT = Path(__file__).resolve().parent.parent
SECRET = secret("session", 40)
DEV_SESSION = f"  - session: {{secret_key: '{SECRET}', cookie_secure: false, cookie_name: dev_session}}\n"
PROXYFIX = "  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n"
UNSEEN = "(under another WSGI server, whose listener and proxy handling wsgistack cannot see"


def check(path: Path, *flags: str, **env: str) -> tuple[int, list[str]]:
    """``serve.py -c path check *flags``, as an operator runs it before a ``kill -HUP``: exit code and lines."""
    environ = {key: value for key, value in os.environ.items() if key != HOST_LISTEN_ENV}
    environ.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env)
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "check", *flags],
                            cwd=path.parent, env=environ, capture_output=True, text=True, timeout=60)
    assert result.stderr == ""
    return result.returncode, result.stdout.splitlines()


@pytest.mark.parametrize(("pipeline", "refused"), [
    pytest.param("  - errors: {debug: true}\n",
                 "{path}:3:21 pipeline[0].errors.debug: debug may be true only when the server listens on loopback "
                 "only, with no proxy forwarding remote clients to it (server.trusted_proxy, a proxy layer) "
                 f"{UNSEEN}; set WSGISTACK_HOST_LISTEN to the address it binds) (got True)", id="debug"),
    pytest.param("  - errors: {}\n" + DEV_SESSION,
                 "{path}:4:86 pipeline[1].session.cookie_secure: cookie_secure: false is only allowed when the "
                 "server listens only on loopback and trusts no proxy; on any other address, or behind a proxy "
                 "that forwards other clients' requests, the session cookie would travel over plain HTTP "
                 f"{UNSEEN}; set WSGISTACK_HOST_LISTEN to the address it binds) (got False)",
                 id="cookie_secure: false (the shipped stack.yaml's)"),
])
def test_check_hosted_refuses_what_serve_app_refuses(tmp_path: Path, pipeline: str, refused: str) -> None:
    """``check`` judges the file as serve.py serves it (on loopback by default); gunicorn's worker would not boot."""
    path = _write(tmp_path, ECHO + "pipeline:\n" + pipeline)
    assert check(path) == (0, [f"{path}: ok"])
    assert check(path, "--hosted") == (2, [refused.format(path=path)])
    code, lines = check(path, "--hosted", WSGISTACK_HOST_LISTEN="127.0.0.1:8000")
    # (the session's memory:// store: refused at the first request only if the host runs several processes)
    assert (code, lines) == (0, [f"{path}: ok"]) or (code == 1 and len(lines) == 1 and "store 'shared' (memory://) "
                                                    "keeps the state of session at pipeline[1]" in lines[0]), lines
    code, lines = check(path, "--hosted", WSGISTACK_HOST_LISTEN="0.0.0.0:8000")
    assert code == 2 and len(lines) == 1, lines


def test_check_hosted_refuses_a_proxyfix_the_host_may_hand_every_clients_headers(tmp_path: Path) -> None:
    path = _write(tmp_path, ECHO + "pipeline:\n  - errors: {}\n" + PROXYFIX)
    assert check(path) == (0, [f"{path}: ok"])
    code, lines = check(path, "--hosted")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{path}:4:5 pipeline[1]: "), lines
    assert "believes X-Forwarded-* from every peer" in lines[0]
    assert check(path, "--hosted", WSGISTACK_HOST_LISTEN="127.0.0.1:8000") == (0, [f"{path}: ok"])


@pytest.mark.parametrize("named", ["127.0.0.1", "garbage", "127.0.0.1:99999"])
def test_a_host_listen_that_is_no_address_is_said_and_judged_public(tmp_path: Path, named: str) -> None:
    """A typo in WSGISTACK_HOST_LISTEN never passes a loopback-only allowance, and is named, not taken in silence."""
    path = _write(tmp_path, ECHO + "pipeline:\n  - errors: {debug: true}\n")
    code, lines = check(path, "--hosted", WSGISTACK_HOST_LISTEN=named)
    assert code == 2, lines
    said = f"{path} warning: WSGISTACK_HOST_LISTEN: entry {named!r} is not an address to listen on"
    assert lines[0].startswith(said), lines
    assert "judged as a public address" in lines[0], lines


def test_check_hosted_prints_the_warnings_serve_app_prints(tmp_path: Path) -> None:
    path = _write(tmp_path, ECHO + "server: {workers: 2}\npipeline: [errors: {}]\n")
    assert check(path, "--hosted") == (1, [
        f"{path}:2:19 warning: server.workers: server.workers is serve.py's (Waitress's) setting and has no effect "
        "under another WSGI server: the server runs its own processes (per-process memory:// state is refused at "
        "the first request when it runs several)"])
    assert check(path) == (0, [f"{path}: ok"])


# ---------------------------------------------------------------- a wsgi.py of your own


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """hosted_app sets the wsgistack loggers' level and may give the access logger a handler: put them back."""
    stack, access = logging.getLogger("wsgistack"), logging.getLogger("wsgistack.access")
    kept = stack.level, access.handlers[:], access.propagate
    yield
    stack.setLevel(kept[0])
    access.handlers[:], access.propagate = kept[1], kept[2]


def test_hosted_app_sets_up_a_wsgi_py_of_your_own_as_serve_app_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        restored_logging: None) -> None:
    """``application = serve.hosted_app("stack.yaml")``: the .env beside it, its warnings, logging.level, and an
    access log that goes somewhere when the host configured no logging."""
    import serve

    monkeypatch.setenv("HOSTED_TAG", "unset")
    monkeypatch.delenv("HOSTED_TAG")  # (put back as it was: unset)
    monkeypatch.delenv("WSGISTACK_LOG_LEVEL", raising=False)
    (tmp_path / ".env").write_text("HOSTED_TAG=from-dotenv\n")
    path = _write(tmp_path, 'app: {factory: "stack_support:echo_app", options: {greeting: "${HOSTED_TAG}"}}\n'
                  "server: {workers: 2}\nlogging: {level: INFO}\npipeline:\n  - errors: {}\n  - access_log: {}\n")
    access = logging.getLogger("wsgistack.access")
    access.handlers[:], access.propagate = [], False  # as a host with no logging configured (pytest has some)
    logging.getLogger("wsgistack").setLevel(logging.ERROR)
    live = serve.hosted_app(path)
    try:
        out, err = capsys.readouterr()
        assert err.splitlines() == [
            f"{path}:2:19 warning: server.workers: server.workers is serve.py's (Waitress's) setting and has no "
            "effect under another WSGI server: the server runs its own processes (per-process memory:// state is "
            "refused at the first request when it runs several)"]
        assert logging.getLogger("wsgistack").level == logging.INFO
        assert TestApp(live).get("/x").json["option"] == "from-dotenv"
        out, err = capsys.readouterr()
        assert '"path":"/x"' in out and '"status":200' in out, out
    finally:
        live.current.close()


def test_hosted_app_refuses_an_invalid_file_with_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            restored_logging: None) -> None:
    import serve

    path = _write(tmp_path, ECHO + "pipeline:\n  - errors: {debug: true}\n")
    with pytest.raises(ConfigError):
        serve.hosted_app(path)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"{path}:3:21 pipeline[0].errors.debug: debug may be true only"), lines
    assert lines[-1] == f"{path}: refusing to start with an invalid configuration"


# ---------------------------------------------------------------- judged on the host's settings alone


DEBUG_ONLY = ("debug may be true only when the server listens on loopback only, with no proxy forwarding remote "
              "clients to it (server.trusted_proxy, a proxy layer)")
COOKIE_ONLY = ("cookie_secure: false is only allowed when the server listens only on loopback and trusts no proxy; on "
               "any other address, or behind a proxy that forwards other clients' requests, the session cookie "
               "would travel over plain HTTP")
TRUSTED_PROXY = "server: {trusted_proxy: 127.0.0.1, trusted_proxy_headers: [x-forwarded-for]}\n"
TRUSTS_EVERY_PEER = ("werkzeug.middleware.proxy_fix:ProxyFix at pipeline[1] believes X-Forwarded-* from every peer, "
                     "and {listens}: any client could set its own address (its rate-limit key, allow_from); use the "
                     "proxy layer with trusted_proxies{instead}")


@pytest.mark.parametrize(("server", "pipeline"), [
    pytest.param("server: {listen: '0.0.0.0:8889'}\n", "  - errors: {debug: true}\n", id="debug, listen public"),
    pytest.param("server: {listen: '0.0.0.0:8889'}\n", "  - errors: {}\n" + DEV_SESSION,
                 id="cookie_secure: false, listen public"),
    pytest.param(TRUSTED_PROXY, "  - errors: {debug: true}\n", id="debug, trusted_proxy"),
    pytest.param(TRUSTED_PROXY, "  - errors: {}\n" + DEV_SESSION,
                 id="cookie_secure: false, trusted_proxy"),
    pytest.param("server: {listen: '0.0.0.0:8889'}\n", "  - errors: {}\n" + PROXYFIX, id="ProxyFix, listen public"),
])
def test_a_host_on_loopback_is_judged_by_its_address_not_the_files_server_section(tmp_path: Path, server: str,
                                                                                   pipeline: str) -> None:
    """gunicorn -b 127.0.0.1:8000: the file's listen and trusted_proxy are serve.py's, and have no effect there."""
    path = _write(tmp_path, ECHO + server + "pipeline:\n" + pipeline)
    live = LiveStack(path, hosted=True, env={HOST_LISTEN_ENV: "127.0.0.1:8000"})
    assert TestApp(live).get("/x").status_int == 200
    live.current.close()


@pytest.mark.parametrize(("pipeline", "host_listen", "refused"), [
    pytest.param("  - errors: {debug: true}\n", "0.0.0.0:8000",
                 f"{{path}}:4:21 pipeline[0].errors.debug: {DEBUG_ONLY} (under another WSGI server, which binds "
                 "0.0.0.0:8000 as WSGISTACK_HOST_LISTEN says) (got True)", id="debug: the host binds a public address"),
    pytest.param("  - errors: {debug: true}\n", "",
                 f"{{path}}:4:21 pipeline[0].errors.debug: {DEBUG_ONLY} {UNSEEN}; set WSGISTACK_HOST_LISTEN to the "
                 "address it binds) (got True)", id="debug: the host's address unknown"),
    pytest.param("  - errors: {}\n" + DEV_SESSION, "127.0.0.1:8000 [::1]:8000 0.0.0.0:8001",
                 f"{{path}}:5:86 pipeline[1].session.cookie_secure: {COOKIE_ONLY} (under another WSGI server, which "
                 "binds 127.0.0.1:8000, [::1]:8000, 0.0.0.0:8001 as WSGISTACK_HOST_LISTEN says) (got False)",
                 id="cookie_secure: false, the host binds loopback and a public address"),
    pytest.param("  - errors: {}\n  - proxy: {x_for: 1}\n" + DEV_SESSION, "127.0.0.1:8000",
                 f"{{path}}:6:86 pipeline[2].session.cookie_secure: {COOKIE_ONLY} (under another WSGI server, which "
                 "binds 127.0.0.1:8000 as WSGISTACK_HOST_LISTEN says; behind a proxy: proxy at pipeline[1] reads "
                 "forwarding headers) (got False)", id="cookie_secure: false behind a proxy layer on loopback"),
    pytest.param("  - errors: {}\n" + PROXYFIX, "",
                 "{path}:5:5 pipeline[1]: " + TRUSTS_EVERY_PEER.format(
                     listens="the WSGI server hosting it may listen beyond loopback and keep every client's "
                             "forwarding headers (WSGISTACK_HOST_LISTEN is unset)",
                     instead=", or name in WSGISTACK_HOST_LISTEN the loopback address that server binds"),
                 id="ProxyFix: the host's address unknown"),
    pytest.param("  - errors: {}\n" + PROXYFIX, "0.0.0.0:8000",
                 "{path}:5:5 pipeline[1]: " + TRUSTS_EVERY_PEER.format(
                     listens="the WSGI server hosting it listens on 0.0.0.0:8000 (WSGISTACK_HOST_LISTEN)", instead=""),
                 id="ProxyFix: the host binds a public address"),
])
def test_a_hosted_refusal_names_the_hosts_address(tmp_path: Path, pipeline: str, host_listen: str,
                                                  refused: str) -> None:
    """Never serve.py's server.trusted_proxy or a made-up address; never "set WSGISTACK_HOST_LISTEN" once it is."""
    path = _write(tmp_path, ECHO + "server: {listen: '127.0.0.1:8889'}\npipeline:\n" + pipeline)
    with pytest.raises(ConfigError) as info:
        LiveStack(path, hosted=True, env={HOST_LISTEN_ENV: host_listen})
    assert [str(p) for p in info.value.problems] == [refused.format(path=path)]


# ---------------------------------------------------------------- a module beside the file, as the host imports it


PLAIN_LAYER = "class Plain:\n    def __init__(self, app):\n        self.app = app\n\n" \
              "    def __call__(self, environ, start_response):\n        return self.app(environ, start_response)\n"


@pytest.fixture
def beside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A layer module in the folder a host starts in (its working directory), forgotten again afterwards."""
    name = f"beside_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLAIN_LAYER)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_check_hosted_imports_a_layer_from_the_working_directory_as_the_host_does(tmp_path: Path,
                                                                                   beside: str) -> None:
    from config.live import check_hosted

    path = _write(tmp_path, ECHO + f"pipeline:\n  - errors: {{}}\n  - {beside}:Plain: {{}}\n")
    before = sys.path[:]
    assert check_hosted(path) == []
    assert sys.path == before
    code, lines = check(path, "--hosted")  # serve.py from elsewhere, started in the folder (check's cwd)
    assert (code, lines) == (0, [f"{path}: ok"])


def test_check_hosted_names_the_working_directory_of_a_module_it_cannot_import(tmp_path: Path,
                                                                               beside: str) -> None:
    from config.live import check_hosted

    path = _write(tmp_path, ECHO + "pipeline:\n  - errors: {}\n  - not_in_any_folder_zz:Plain: {}\n")
    assert [str(p) for p in check_hosted(path)] == [
        f"{path}:4:5 pipeline[1]: cannot import layer 'not_in_any_folder_zz:Plain': No module named "
        f"'not_in_any_folder_zz': it is not installed in this Python ({sys.executable}) and not in a folder on its "
        "path; install it, or add the folder that holds it to PYTHONPATH (under another WSGI server, which "
        f"imports from its working directory, here {tmp_path}, and PYTHONPATH: start it in the folder that holds "
        "the module)"]


# ---------------------------------------------------------------- memory:// state, before the first request


def test_check_hosted_warns_that_memory_state_is_refused_under_several_processes(tmp_path: Path) -> None:
    """gunicorn -w 2 answers 500 to every request of a stack keeping sessions in memory://: check says so first."""
    path = _write(tmp_path, ECHO + "pipeline:\n  - errors: {}\n  - session: {secret_key: '" + SECRET + "'}\n"
                  "  - ratelimit: {limits: ['5/minute']}\n  - cache: {}\n")
    assert check(path) == (0, [f"{path}: ok"])
    assert check(path, "--hosted") == (1, [
        f"{path}:1:1 warning: stores.shared: store 'shared' (memory://) keeps the state of session at pipeline[1], "
        "ratelimit at pipeline[2] in each process apart: a WSGI server that runs several processes "
        "(wsgi.multiprocess, gunicorn -w 2) answers every request with 500; use redis:// there"])
