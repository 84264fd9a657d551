"""serve.py: exit codes, check output, layers, explain, and a real Waitress with proxy trust."""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port

import serve
from config.registry import LAYERS

ROOT = Path(__file__).resolve().parent.parent
ECHO = 'app: {factory: "stack_support:echo_app"}\n'


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run serve.py in a subprocess, as an operator would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config_file(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a stack.yaml into a temp folder and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "stack.yaml"
        path.write_text(text)
        return path

    return write


@pytest.mark.parametrize(
    ("text", "code", "first_line"),
    [
        pytest.param(ECHO + "pipeline: [errors: {}]\n", 0, "stack.yaml: ok", id="clean"),
        pytest.param(ECHO + "pipeline:\n  - stack_support:Tag: {}\n  - errors: {}\n", 2,
                     "stack.yaml:4:5 pipeline[1]: errors must be the outermost layer", id="lint error"),
        pytest.param(ECHO + "server:\n  threads: x\n", 2,
                     "stack.yaml:3:12 server.threads: Input should be a valid integer", id="schema error"),
        pytest.param(ECHO + "server:\n  trusted_proxy: '*'\n  trusted_proxy_headers: [x-forwarded-for]\n"
                     "pipeline: [errors: {}]\n", 1,
                     "stack.yaml:3:18 warning: server.trusted_proxy: trusted_proxy '*' trusts every peer",
                     id="warning only"),
    ],
)
def test_check_exit_codes(config_file, text: str, code: int, first_line: str) -> None:  # type: ignore[no-untyped-def]
    path = config_file(text)
    result = run_cli("-c", str(path), "check", cwd=path.parent)
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].replace(str(path), "stack.yaml").startswith(first_line), result.stdout


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_wsgistack_config_means_the_default_file(config_file, value: str) -> None:  # type: ignore[no-untyped-def]
    # `Environment=WSGISTACK_CONFIG=` in a unit, or WSGISTACK_CONFIG="$UNSET" in a script: unset, as the other
    # WSGISTACK_ variables read it, not the empty path ("cannot read the file: Is a directory: '.'").
    path = config_file(ECHO + "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "WSGISTACK_CONFIG": value}
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "check"], cwd=path.parent, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "stack.yaml: ok\n", "")
    hosted = python("import serve; print(serve.app.current.config.pipeline[0].name)", path, WSGISTACK_CONFIG=value)
    assert (hosted.returncode, hosted.stdout) == (0, "errors\n"), hosted.stderr


def test_an_empty_config_option_is_a_usage_error(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline: [errors: {}]\n")
    result = run_cli("-c", "", "check", cwd=path.parent)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == "serve.py: error: argument -c/--config: an empty path names no file"


def test_the_entry_point_imports_layers_beside_serve_py_as_serve_py_does(config_file) -> None:  # type: ignore[no-untyped-def]
    # A layer module in the project folder (tests/stack_support.py here, as tests.stack_support).
    entry_point = Path(sys.executable).parent / "wsgistack"
    assert entry_point.exists(), "pip install -e . makes the wsgistack command"
    path = config_file(ECHO.replace("stack_support", "tests.stack_support")
                       + "pipeline:\n  - errors: {}\n  - tests.stack_support:Tag: {name: x}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    results = [subprocess.run([*command, "-c", str(path), "check"], cwd=path.parent, env=env,
                              capture_output=True, text=True, timeout=60)
               for command in ([str(entry_point)], [sys.executable, str(ROOT / "serve.py")])]
    assert [(r.returncode, r.stdout.strip()) for r in results] == [(0, f"{path}: ok")] * 2, results


def test_serve_refuses_a_broken_config(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline:\n  - corz: {}\n")
    result = run_cli("-c", str(path), "serve")
    assert result.returncode == 2
    assert "unknown layer 'corz'; did you mean 'cors'?" in result.stderr
    assert "refusing to start" in result.stderr


def test_layers_lists_options_with_types_and_defaults() -> None:
    result = run_cli("layers")
    assert result.returncode == 0, result.stderr
    assert "errors  (middleware.errors:ErrorsMiddleware)" in result.stdout
    assert "    format: Literal['envelope', 'problem'] = 'envelope'" in result.stdout
    # With the first sentence of the option's row in the layer's page.
    assert "    docs: docs/layers/access_log.md\n" in result.stdout
    assert "    file: str | None = None\n        Append the lines to this file instead (created with mode `0640`; a " \
        "relative path is relative to the stack file).\n" in result.stdout


def test_layers_shows_a_required_secret_as_required_as_its_page_does() -> None:
    # session.secret_key's default is an empty SecretStr, which the layer refuses: no default at all.
    result = run_cli("layers")
    assert result.returncode == 0, result.stderr
    assert "    secret_key: secret = (required)\n        Signs the cookie.\n" in result.stdout
    assert "SecretStr(" not in result.stdout and "'(required)'" not in result.stdout
    assert "| `secret_key` | required |" in (ROOT / "docs" / "layers" / "session.md").read_text()


def test_layers_describes_a_layer_whose_module_has_no_docstring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The README's own example layer starts with its class: its docstring describes it."""
    (tmp_path / "served_by_layer.py").write_text(
        "class ServedBy:\n    \"\"\"Adds X-Served-By to every response.\n\n    More.\"\"\"\n\n"
        "    def __init__(self, app, options, context):\n        self.app = app\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(LAYERS, "served_by", "served_by_layer:ServedBy")
    assert serve.cmd_layers(argparse.Namespace()) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("served_by  (served_by_layer:ServedBy)")
    assert out[at + 1] == "    Adds X-Served-By to every response."



@pytest.mark.parametrize(("module", "entry", "message"), [
    pytest.param("class ServedBy:\n    pass\n", "broken_layer:ServedBi",
                 "'broken_layer' has no attribute 'ServedBi'; did you mean 'ServedBy'?", id="a misspelt class"),
    pytest.param("x = 1\ndef (:\n", "broken_layer:ServedBy",
                 "SyntaxError in {path}, line 2: invalid syntax", id="a module with a syntax error"),
    pytest.param("import sys\nsys.exit('no config')\n", "broken_layer:ServedBy",
                 "it called sys.exit('no config')", id="a module that exits"),
])
def test_layers_exits_2_naming_an_entry_that_cannot_be_imported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        module: str, entry: str, message: str) -> None:
    """A broken registry entry fails `layers` (exit 2) with check's words for it; the others are listed."""
    (tmp_path / "broken_layer.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_layer", raising=False)
    monkeypatch.setitem(LAYERS, "broken", entry)
    assert serve.cmd_layers(argparse.Namespace()) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"broken ({entry}): cannot import layer 'broken': "
                                + message.format(path=tmp_path / "broken_layer.py")]
    assert "errors  (middleware.errors:ErrorsMiddleware)" in out and "broken" not in out

@pytest.mark.parametrize(("target", "headers", "status", "message"), [
    ("/x?q=%ZZ", [], 400, "The query string has an invalid percent-escape '%ZZ' at offset 2."),
    ("/x", ["Authorization: Bearer bad"], 401, "Unauthorized: the token is malformed."),
])
def test_explain_shows_a_refusal(config_file, target: str, headers: list[str], status: int,  # type: ignore[no-untyped-def]
                                 message: str) -> None:
    """A layer's refusal is what explain is most often run for: the error response, not a traceback."""
    path = config_file(ECHO + """
pipeline:
  - errors: {}
  - validation: {}
  - auth: {secret: "%s", default: optional}
""" % ("j" * 40))
    lines, got = serve.explain(str(path), "GET", target, headers)
    text = "\n".join(lines)
    assert got == status
    assert f"status: {status} " in text
    assert "  Content-Type: application/json" in text
    assert message in text


@pytest.mark.parametrize(("server", "method", "target", "headers", "body", "expected"), [
    pytest.param("", "GET", "//api/x", [], b"", ['"path": "/api/x"'], id="leading slashes collapse"),
    pytest.param("", "GET", "/api/%ff", [], b"", ["status: 400 ", "not valid UTF-8"], id="a byte that is not UTF-8"),
    pytest.param("", "GET", "/api/" + "p" * 7000 + "?q=" + "b" * 2000, [], b"",
                 ["status: 414 ", "more than max_url_length (8192)"], id="the query counts in the URL"),
    pytest.param("server: {url_prefix: /svc}\n", "GET", "/svc/api/x", [], b"", ['"path": "/api/x"'],
                 id="url_prefix"),
    pytest.param("server: {url_scheme: https}\n", "GET", "/api/x", [], b"", ['"scheme": "https"'],
                 id="url_scheme"),
    pytest.param("", "GET", "/api/x", ["X_Forwarded_For: 10.0.0.7"], b"", ['"client_ip": "127.0.0.1"'],
                 id="a header with _ is dropped"),
    pytest.param("", "POST", "/api/x", ["Transfer-Encoding: chunked", "Content-Type: application/json"], b"{}",
                 ["status: 200 "], id="a chunked body is decoded"),
    pytest.param("", "GET", "/api/x", ["X-Name: Zo\u00eb \u2603"], b"", ["status: 200 "],
                 id="a header of UTF-8 text, as curl sends it"),
    pytest.param("server: {max_request_body_size: 10}\n", "POST", "/api/x", ["Content-Type: text/plain"],
                 b"x" * 11, ["Waitress answers it itself: 413 Request Entity Too Large"], id="Waitress refuses it"),
])
def test_explain_reads_the_request_as_waitress_does(config_file, server: str, method: str,  # type: ignore[no-untyped-def]
                                                    target: str, headers: list[str], body: bytes,
                                                    expected: list[str]) -> None:
    """The environ explain runs is the one Waitress would build, with the server settings in force."""
    path = config_file(ECHO + server + "pipeline:\n  - errors: {}\n  - validation: {}\n"
                       "  - proxy: {x_for: 1}\n")
    text = "\n".join(serve.explain(str(path), method, target, headers, body=body)[0])
    assert all(part in text for part in expected), text


@pytest.mark.parametrize("access_log", [pytest.param("{}", id="to the logger"),
                                        pytest.param("{stream: stdout}", id="to stdout itself")])
def test_explain_prints_the_trace_alone_on_stdout(config_file, access_log: str) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + f"pipeline:\n  - errors: {{}}\n  - access_log: {access_log}\n")
    result = run_cli("-c", str(path), "explain", "GET", "/api/x")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "GET /api/x from 127.0.0.1"
    assert '"path":"/api/x"' not in result.stdout
    assert '"path":"/api/x"' in result.stderr  # the access line still goes out, beside the trace


def test_explain_shows_each_layer_and_the_client_address(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + """
server:
  trusted_proxy: 10.0.0.1
  trusted_proxy_headers: [x-forwarded-for]
pipeline:
  - errors: {}
  - stack_support:Tag: {name: api-only, paths: ["/api/*"]}
""")
    lines, status = serve.explain(str(path), "GET", "/other?q=1", ["X-Forwarded-For: 198.51.100.7"], "10.0.0.1")
    text = "\n".join(lines)
    assert status == 200
    assert "stack_support:Tag skipped: request outside the layer's scope" in text
    assert "errors       applied" in text
    assert "client address: 198.51.100.7" in text
    lines, _ = serve.explain(str(path), "GET", "/other", ["X-Forwarded-For: 198.51.100.7"], "192.0.2.5")
    assert "client address: 192.0.2.5" in "\n".join(lines)


# ---------------------------------------------------------------- a real Waitress


@pytest.fixture
def waitress_server(config_file) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """serve.py serving the echo app behind trusted_proxy 127.0.0.1 on a free port."""
    port = free_port()
    path = config_file(ECHO + f"""
server:
  listen: 127.0.0.1:{port}
  threads: 2
  trusted_proxy: 127.0.0.1
  trusted_proxy_count: 1
  trusted_proxy_headers: [x-forwarded-for, x-forwarded-proto]
pipeline:
  - errors: {{}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def get_json(port: int, path: str, headers: dict[str, str], source: str) -> dict[str, str]:
    """GET from a chosen loopback source address, so the server sees that peer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.sock = sock
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("source", "headers", "remote_addr", "scheme"),
    [
        pytest.param("127.0.0.1", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
                     "203.0.113.7", "https", id="trusted proxy forwards the client"),
        pytest.param("127.0.0.2", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
                     "127.0.0.2", "http", id="spoofed headers from an untrusted peer are ignored"),
        pytest.param("127.0.0.1", {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"},
                     "203.0.113.7", "http", id="only one hop trusted"),
        pytest.param("127.0.0.1", {}, "127.0.0.1", "http", id="no header"),
    ],
)
def test_waitress_proxy_trust(waitress_server: int, source: str, headers: dict[str, str], remote_addr: str,
                              scheme: str) -> None:
    body = get_json(waitress_server, "/x", headers, source)
    assert body["remote_addr"] == remote_addr
    assert body["scheme"] == scheme


def test_sighup_reloads_and_keeps_serving_on_a_bad_config(config_file) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    head = f"server:\n  listen: 127.0.0.1:{port}\n  generation_header: true\n"
    path = config_file(ECHO + head + "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_generation(expected: str) -> None:
        deadline = time.monotonic() + 10
        while generation(port) != expected:
            assert time.monotonic() < deadline, f"generation never became {expected}"
            time.sleep(0.05)

    try:
        wait_for_port(port)
        assert generation(port) == "1"
        path.write_text(ECHO + head + "pipeline:\n  - stack_support:Tag: {}\n  - errors: {}\n")  # lint error
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert generation(port) == "1"
        path.write_text(ECHO + head + "pipeline:\n  - errors: {format: problem}\n")
        proc.send_signal(signal.SIGHUP)
        wait_generation("2")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=10)[0]
    assert "reload failed, generation 1 keeps serving" in output
    assert "errors must be the outermost layer" in output
    assert "generation 2 serving" in output


def test_users_list_into_a_closed_pipe_ends_quietly(config_file) -> None:  # type: ignore[no-untyped-def]
    """`serve.py users list | head -1` with the reader gone: ended by SIGPIPE, as the other printing
    commands, not "cannot use …users.sqlite3: Broken pipe" and exit 1."""
    path = config_file(ECHO.replace("}", ", options: {var_dir: data}}") + "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    added = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "users", "add", "alice",
                            "--password-stdin"], input="correct horse battery\n", env=env,
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "users", "list"],
                                cwd=path.parent, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True,
                                timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr
    assert result.returncode == -signal.SIGPIPE, result.stderr


def test_users_commands_manage_the_stack_users_db(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO.replace("}", ", options: {var_dir: data}}") + "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    added = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "users", "add", "alice",
                            "--role", "admin", "--password-stdin"], input="correct horse battery\n", env=env,
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    listed = run_cli("-c", str(path), "users", "list")
    assert "alice" in listed.stdout and "admin" in listed.stdout
    assert (path.parent / "data" / "users.sqlite3").exists()
    missing = run_cli("-c", str(path), "users", "remove", "bob")
    assert missing.returncode == 1
    assert "bob" in missing.stderr


@pytest.mark.parametrize("program", ["wsgistack", "serve.py"])
def test_users_commands_name_the_program_as_it_was_run(config_file, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        program: str) -> None:
    """The installed command's usage and errors say `wsgistack users …`, serve.py's `serve.py users …`."""
    path = config_file(ECHO.replace("}", ", options: {var_dir: data}}") + "pipeline: [errors: {}]\n")
    script = tmp_path / program
    if program == "wsgistack":  # what pip writes for [project.scripts]
        script.write_text("import sys\nfrom serve import main\nif __name__ == '__main__':\n    sys.exit(main())\n")
    else:
        script = ROOT / "serve.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def users(*argv: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, str(script), "-c", str(path), "users", *argv], env=env,
                              capture_output=True, text=True, timeout=60)
        return done.returncode, done.stderr

    db = path.parent / "data" / "users.sqlite3"
    assert users("remove", "bob") == (1, f"{program} users remove: there is no users database at {db} (`{program} "
                                         "users add` creates it; is app.options.var_dir, or WSGISTACK_VAR_DIR, the one "
                                         "the server uses?)\n")
    code, err = users("set-role", "bob")
    assert (code, err.splitlines()[0]) == (2, f"usage: {program} users set-role [-h] [--none] name [ROLE ...]")


def test_cache_purge_deletes_matching_entries(config_file) -> None:  # type: ignore[no-untyped-def]
    from webtest import TestApp

    from config import build_from_file
    from middleware.cache import CacheMiddleware

    path = config_file(ECHO + "stores: {shared: 'memory://'}\npipeline:\n  - errors: {}\n  - cache: {ttl: 60}\n")
    built = build_from_file(path)
    client = TestApp(built.app)
    client.get("/api/v1/search?q=a")
    client.get("/api/v1/other")
    assert client.get("/api/v1/search?q=a").headers["X-Cache"] == "HIT"
    # memory:// is per process: `serve.py cache purge` refuses it (below); the purge itself, in-process.
    from middleware import cache as cache_module

    store = built.context.stores["shared"]
    spec = next(s for s in built.layers if s.target is CacheMiddleware)
    assert cache_module.purge(store, "/api/v1/search*", prefix=spec.options.key_prefix) == 1
    assert client.get("/api/v1/search?q=a").headers["X-Cache"] == "MISS"
    assert client.get("/api/v1/other").headers["X-Cache"] == "HIT"
    built.close()


@pytest.mark.parametrize(
    ("cache", "how"),
    [
        pytest.param("cache: {ttl: 60}", "set the cache layer's purge_path (e.g. /_stack/cache/purge) and send POST "
                     "<purge_path>?pattern=/api/* to the running server with an admin's token", id="no purge_path"),
        pytest.param("cache: {ttl: 60, purge_path: /_stack/cache/purge}", "send POST "
                     "/_stack/cache/purge?pattern=/api/* to the running server with the token of a user with a role "
                     "in purge_roles", id="with purge_path"),
    ],
)
def test_cache_purge_refuses_a_memory_store(config_file, cache: str, how: str) -> None:  # type: ignore[no-untyped-def]
    """memory:// lives in the server's process: the command cannot reach it, and says how to purge instead."""
    path = config_file(ECHO + "stores: {shared: 'memory://'}\npipeline:\n  - errors: {}\n"
                       f"  - auth: {{secret: '{'j' * 32}'}}\n  - {cache}\n")
    result = run_cli("-c", str(path), "cache", "purge", "/api/*")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}:2:18 stores.shared: the cache at pipeline[2] keeps its responses in store 'shared' (memory://), "
        f"inside the running server's process: this command would purge an empty copy of its own; {how}\n")


@pytest.mark.parametrize(("args", "said"), [
    pytest.param([], ["WSGISTACK_CONFIG", "WSGISTACK_LOG_LEVEL", ".env", "stderr", "130 Ctrl-C",
                      "check: 1 warnings only"], id="the program"),
    pytest.param(["serve"], ["WSGISTACK_DRAIN_SECONDS", "SIGHUP", "2 not started", "3 every worker"], id="serve"),
    pytest.param(["check"], ["file:line:col", "stdout", "Redis", "1 warnings only"], id="check"),
    pytest.param(["layers"], ["2 when a registered layer"], id="layers"),
    pytest.param(["explain"], ["redis://", "0 explained, whatever its status", "2 an invalid"], id="explain"),
    pytest.param(["cache", "purge"], ["'/'", "1 a store failed", "2 an invalid"], id="cache purge"),
])
def test_help_says_what_a_script_relies_on(args: list[str], said: list[str]) -> None:
    # The environment a command reads, its exit codes, where its output goes: from --help, without the docs.
    result = run_cli(*args, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    text = " ".join(result.stdout.split())  # (as argparse wraps it)
    assert "Exit codes:" in text
    for words in said:
        assert words in text, (words, result.stdout)


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(["bogus"], "serve.py: error: argument command: invalid choice: 'bogus' (choose from 'serve', "
                 "'check', 'layers', 'explain', 'users', 'cache')", id="unknown command"),
    pytest.param(["cache"], "serve.py cache: error: the following arguments are required: {purge}",
                 id="cache without its command"),
    pytest.param(["cache", "drop"], "serve.py cache: error: argument {purge}: invalid choice: 'drop' (choose from "
                 "'purge')", id="unknown cache command"),
    pytest.param(["explain", "GET"], "serve.py explain: error: the following arguments are required: path",
                 id="explain without a target"),
    pytest.param(["-c", "missing.yaml", "explain", "GET", "/"], "missing.yaml (top level): file not found",
                 id="explain of a missing file"),
    pytest.param(["-c", "missing.yaml", "cache", "purge", "/x"], "missing.yaml (top level): file not found",
                 id="purge of a missing file"),
])
def test_a_usage_or_configuration_error_is_exit_2_said_on_stderr(tmp_path: Path, args: list[str],
                                                                 message: str) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == message


@pytest.mark.parametrize(
    ("text", "command", "expected"),
    [
        pytest.param("- a\n- b\n", ["users", "list"],
                     "stack.yaml:1:1 (top level): the top level must be a mapping (got list)", id="a list"),
        pytest.param("app: [x]\npipeline: [errors: {}]\n", ["users", "list"],
                     "stack.yaml:1:6 app: app must be a mapping (got list)", id="app a list"),
        pytest.param("app: {options: {var_dir: 5}}\npipeline: [errors: {}]\n", ["users", "list"],
                     "stack.yaml:1:26 app.options.var_dir: var_dir must be a path (got int 5)", id="var_dir a number"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - cache: {store: nosuch}\n", ["cache", "purge", "/x*"],
                     "stack.yaml:4:20 pipeline[1].cache.store: cache names store 'nosuch', which the stores section "
                     "does not define (known: shared)", id="cache on a store not defined"),
    ],
)
def test_users_and_cache_commands_report_a_broken_file(config_file, text: str, command: list[str],  # type: ignore[no-untyped-def]
                                                        expected: str) -> None:
    """Located problems and exit 2, as check gives them, never a traceback."""
    path = config_file(text)
    result = run_cli("-c", str(path), *command, cwd=path.parent)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.replace(str(path), "stack.yaml").splitlines() == [expected]


@pytest.mark.redis
def test_cache_purge_command_on_redis(config_file, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    from webtest import TestApp

    from config import build_from_file

    path = config_file(ECHO + f"stores: {{shared: '{redis_url}'}}\npipeline:\n  - errors: {{}}\n  - cache: {{}}\n")
    built = build_from_file(path)
    client = TestApp(built.app)
    client.get("/api/v1/search?q=a")
    client.get("/api/v2/search?q=a")
    result = run_cli("-c", str(path), "cache", "purge", "/api/v1/*")
    assert result.returncode == 0, result.stderr
    assert "purged 1 cached response(s) matching '/api/v1/*'" in result.stdout
    assert client.get("/api/v1/search?q=a").headers["X-Cache"] == "MISS"
    assert client.get("/api/v2/search?q=a").headers["X-Cache"] == "HIT"
    built.close()


@pytest.mark.redis
@pytest.mark.parametrize(("pattern", "expected"), [
    pytest.param("/api/v1/*", (0, "purged 1 cached response(s) matching '/api/v1/*'\n", ""),
                 id="a target the server passed on without '/' was cached under its rooted path"),
    pytest.param("/api/v2/*", (0, "purged 1 cached response(s) matching '/api/v2/*'\n", ""), id="the usual form"),
    pytest.param("/api/v3/*", (0, "purged 0 cached response(s) matching '/api/v3/*'\n", ""), id="none"),
    pytest.param("*v2*", (0, "purged 1 cached response(s) matching '*v2*'\n", ""), id="a glob first"),
    pytest.param("api/v1/*", (2, "", "cache purge: 'api/v1/*' can match no cached response: their paths start "
                                     "with '/'; did you mean '/api/v1/*'?\n"), id="without '/': refused"),
])
def test_cache_purge_of_a_pattern_without_a_leading_slash(config_file, redis_url: str, pattern: str,  # type: ignore[no-untyped-def]
                                                          expected: tuple[int, str, str]) -> None:
    """Waitress passes a target like 'GET api/v1/x' on without its '/', and a stack with no validation layer
    caches its answer under the rooted path the router reads (/api/v1/x): a pattern without the '/' could
    match nothing, and is refused with the pattern likely meant."""
    from conftest import Served

    port = free_port()
    path = config_file(f"server: {{listen: ['127.0.0.1:{port}']}}\n" + ECHO
                       + f"stores: {{shared: '{redis_url}'}}\npipeline:\n  - errors: {{}}\n  - cache: {{}}\n")
    server = Served(path, {}, port)
    try:
        answers = []
        for target in ("api/v1/search", "/api/v1/search", "/api/v2/search?q=a", "/api/v2/search?q=a"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                answers.append(b"".join(iter(lambda: sock.recv(65536), b"")))
            assert answers[-1].startswith(b"HTTP/1.1 200 "), answers[-1]
        assert b"X-Cache: HIT" in answers[1] and b"X-Cache: HIT" in answers[3]  # one entry each: one path
    finally:
        server.stop()
    result = run_cli("-c", str(path), "cache", "purge", pattern)
    assert (result.returncode, result.stdout, result.stderr) == expected


def test_cache_purge_with_redis_down_says_so(config_file) -> None:  # type: ignore[no-untyped-def]
    from conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    path = config_file(ECHO + f"stores: {{shared: '{url}'}}\npipeline:\n  - errors: {{}}\n  - cache: {{}}\n")
    result = run_cli("-c", str(path), "cache", "purge", "/api/*")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}: cannot purge '/api/*' (purged 0 before): redis store {url} could not ")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        pytest.param("10.0.0.2", "203.0.113.9", "203.0.113.9", id="trusted proxy peer"),
        pytest.param("198.51.100.3", "203.0.113.9", "198.51.100.3", id="spoofed from an untrusted peer"),
        pytest.param("10.0.0.2", "198.51.100.1, 203.0.113.9", "203.0.113.9", id="one hop from the right"),
    ],
)
def test_explain_with_the_proxy_layer(config_file, peer: str, forwarded: str,  # type: ignore[no-untyped-def]
                                      client: str) -> None:
    path = config_file(ECHO + "pipeline:\n  - errors: {}\n  - proxy: {x_for: 1, trusted_proxies: [10.0.0.0/8]}\n")
    result = run_cli("-c", str(path), "explain", "GET", "/x", "-H", f"X-Forwarded-For: {forwarded}", "--peer", peer)
    assert result.returncode == 0, result.stderr
    assert f"client address: {client}" in result.stdout
    assert "proxy        applied" in result.stdout


def test_explain_refuses_a_peer_that_is_no_address(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline:\n  - errors: {}\n")
    result = run_cli("-c", str(path), "explain", "GET", "/x", "--peer", "notanip")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == \
        "serve.py explain: error: argument --peer: 'notanip' is not an IP address (10.0.0.7, ::1)"


@pytest.mark.parametrize(("args", "expected"), [
    pytest.param([b"POST", b"/api/x", b"-d", b"\xff\xfe"], [b"status: 200 ", b"POST /api/x from 127.0.0.1"],
                 id="a binary body"),
    pytest.param([b"GET", b"/api/x", b"-H", b"X-Name: caf\xe9"], [b"status: 200 "],
                 id="a Latin-1 header value"),
    pytest.param([b"GET", b"/api/caf\xe9"], [b"GET /api/caf\xe9 from", b"Waitress answers it itself: 400 Bad Request"],
                 id="a target that is not UTF-8"),
])
def test_explain_sends_the_bytes_of_its_arguments_as_curl_does(config_file, args: list[bytes],  # type: ignore[no-untyped-def]
                                                               expected: list[bytes]) -> None:
    """An argument that is not UTF-8 text goes out as the bytes given, not as a codec error; the trace
    prints them back as they came (in a UTF-8 locale too, whose stdout would refuse them)."""
    path = config_file(ECHO + "pipeline:\n  - errors: {}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "explain", *args],
                            cwd=path.parent, env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(part in result.stdout for part in expected), result.stdout


def test_check_names_a_file_whose_name_is_not_utf_8_as_it_is(tmp_path: Path) -> None:
    """`check` prints the file's name back in the bytes it was given (as ls does), in a UTF-8 locale too."""
    path = tmp_path / os.fsdecode(b"caf\xe9.yaml")
    path.write_text(ECHO + "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", os.fsencode(path), "check"],
                            cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, os.fsencode(path) + b": ok\n"), result.stderr


@pytest.mark.parametrize("command", [
    pytest.param(["check"], id="check"),
    pytest.param(["layers"], id="layers"),
    pytest.param(["explain", "GET", "/api/x"], id="explain"),
    pytest.param(["cache", "purge", "/api/*"], id="cache purge"),
])
def test_a_reader_that_closed_its_end_ends_a_printing_command_quietly(config_file, redis_url: str,  # type: ignore[no-untyped-def]
                                                                      command: list[str]) -> None:
    """`serve.py check | head -1`: the command's output into a pipe nobody reads ends it without a traceback."""
    path = config_file(ECHO + f"stores: {{shared: '{redis_url}'}}\npipeline:\n  - errors: {{}}\n  - cache: {{}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command prints
    try:
        result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), *command], cwd=path.parent,
                                env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == -signal.SIGPIPE, result.stderr


@pytest.mark.parametrize("command", [
    pytest.param(["check"], id="check"),
    pytest.param(["check", "--hosted"], id="check --hosted"),
    pytest.param(["explain", "GET", "/api/x"], id="explain"),
    pytest.param(["cache", "purge", "/api/*"], id="cache purge"),
])
def test_ctrl_c_ends_a_command_with_130_and_no_traceback(config_file, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         command: list[str]) -> None:
    """SIGINT while the app factory runs (a slow database, say): exit 130, as shells report it, no traceback."""
    flag = tmp_path / "building"
    path = config_file(f'app: {{factory: "stack_support:slow_failing_app", options: {{flag: "{flag}"}}}}\n'
                       "stores: {shared: 'redis://127.0.0.1:1/0'}\npipeline:\n  - errors: {}\n  - cache: {}\n")
    if command[0] == "cache":  # this command builds no app: it waits for a Redis that does not answer
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection and never answers
        listener.settimeout(30)
        path.write_text(path.read_text().replace("127.0.0.1:1/", f"127.0.0.1:{listener.getsockname()[1]}/"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-c", str(path), *command], cwd=path.parent,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        if command[0] == "cache":
            connection, _ = listener.accept()
        else:
            while not flag.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if command[0] == "cache":
            connection.close()
            listener.close()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert (process.returncode, out) == (130, ""), err


# ---------------------------------------------------------------- serve:app for other WSGI servers


def python(code: str, config: Path, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` with ``$WSGISTACK_CONFIG`` (and ``extra``) set, as a WSGI server importing serve would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WSGISTACK_CONFIG": str(config), **extra}
    return subprocess.run([sys.executable, "-c", code], cwd=config.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_importing_serve_builds_nothing(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline:\n  - corz: {}\n")
    result = python("import serve; print(serve.DEFAULT_CONFIG, 'app' in vars(serve))", path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "stack.yaml False\n", "")


def test_serve_app_refuses_an_invalid_config_when_taken(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline:\n  - corz: {}\n")
    result = python("import serve\ntry:\n    serve.app\nexcept Exception as exc:\n    print(type(exc).__name__)\n",
                    path)
    assert result.stdout == "ConfigError\n"
    assert result.stderr.splitlines() == [
        f"{path}:3:5 pipeline[0]: unknown layer 'corz'; did you mean 'cors'? (known: {', '.join(sorted(LAYERS))}; "
        "or write module:attr for your own)",
        f"{path}: refusing to start with an invalid configuration",
    ]


def test_waitress_serve_stops_at_startup_on_an_invalid_config(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline:\n  - corz: {}\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WSGISTACK_CONFIG": str(path)}
    waitress = Path(sys.executable).with_name("waitress-serve")
    result = subprocess.run([str(waitress), f"--listen=127.0.0.1:{port}", "serve:app"], cwd=path.parent, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.startswith(f"{path}:3:5 pipeline[0]: unknown layer 'corz'; did you mean 'cors'?")
    assert f"{path}: refusing to start with an invalid configuration" in result.stderr


def test_serve_app_is_built_once_when_taken(config_file, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from webtest import TestApp

    from config.live import LiveStack

    path = config_file(ECHO + "logging: {level: WARNING}\npipeline: [errors: {}]\n")
    monkeypatch.setenv("WSGISTACK_CONFIG", str(path))
    monkeypatch.delitem(vars(serve), "app", raising=False)
    level = logging.getLogger("wsgistack").level
    try:
        app = serve.app
        assert isinstance(app, LiveStack) and serve.app is app
        assert TestApp(app).get("/x").json["path"] == "/x"
        assert logging.getLogger("wsgistack").level == logging.WARNING  # the host server owns the handlers
        app.current.close()
    finally:
        monkeypatch.delitem(vars(serve), "app", raising=False)
        logging.getLogger("wsgistack").setLevel(level)


HOSTED_CALL = """
import serve
from config.registry import LAYERS
from wsgiref.util import setup_testing_defaults
try:
    app = serve.app
except Exception as exc:
    print(type(exc).__name__)
    raise SystemExit(0)
for multiprocess in {multiprocess}:
    environ = {{"PATH_INFO": "/x", "REMOTE_ADDR": "192.0.2.7"}}
    setup_testing_defaults(environ)
    environ["wsgi.multiprocess"] = multiprocess
    seen = []
    result = app(environ, lambda status, headers, exc_info=None: seen.append(status))
    body = b"".join(result)
    getattr(result, "close", lambda: None)()
    print(seen[0], body.decode()[:60], flush=True)
"""


@pytest.mark.parametrize(("pipeline", "multiprocess", "stdout", "stderr"), [
    pytest.param("  - errors: {debug: true}\n", [False], ["ConfigError"],
                 "pipeline[0].errors.debug: debug may be true only when the server listens on loopback only",
                 id="debug: the host's listener is unknown"),
    pytest.param("  - errors: {}\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n", [False],
                 ["ConfigError"], "believes X-Forwarded-* from every peer, and the WSGI server hosting it may listen "
                 "beyond loopback and keep every client's forwarding headers (WSGISTACK_HOST_LISTEN is unset): any "
                 "client could set its own address (its rate-limit key, allow_from); use the proxy layer with "
                 "trusted_proxies, or name in WSGISTACK_HOST_LISTEN the loopback address that server binds",
                 id="ProxyFix: the host may keep every client's headers"),
    pytest.param("  - errors: {}\n  - session: {secret_key: '" + "s" * 40 + "'}\n", [True, False],
                 ["500 Internal Server Error wsgistack keeps per-process state (memory://) under a WSGI s"] * 2,
                 "session keeps state in store 'shared' (memory://) but the WSGI server runs several processes "
                 "(wsgi.multiprocess): each process would have its own copy; use redis://",
                 id="memory:// state under a host with several processes: refused at the first request"),
    pytest.param("  - errors: {}\n  - session: {secret_key: '" + "s" * 40 + "'}\n", [False],
                 ['200 OK {"path": "/x", "method": "GET", "remote_addr": "192.0.2.7", '], "",
                 id="memory:// state under a host with one process"),
    pytest.param("  - errors: {}\n  - proxy: {x_for: 1, trusted_proxies: ['fd00::/8']}\n", [False],
                 ['200 OK {"path": "/x", "method": "GET", "remote_addr": "192.0.2.7", '], "",
                 id="a proxy over IPv6 to a host that may bind IPv6 (serve.py's IPv4 listen says nothing)"),
])
def test_serve_app_judges_the_host_by_what_it_cannot_see(config_file, pipeline: str,  # type: ignore[no-untyped-def]
                                                         multiprocess: list[bool], stdout: list[str],
                                                         stderr: str) -> None:
    """gunicorn's listener, workers and proxy handling are its own: the file's server section says nothing."""
    path = config_file(ECHO + "server: {listen: 127.0.0.1:18120}\npipeline:\n" + pipeline)
    result = python(HOSTED_CALL.format(multiprocess=multiprocess), path)
    assert result.stdout.splitlines() == stdout, result.stderr
    assert stderr in result.stderr


def test_serve_app_judges_loopback_allowances_on_the_listen_its_operator_names(config_file) -> None:  # type: ignore[no-untyped-def]
    """The shipped stack.yaml (cookie_secure: false, for local development) under gunicorn -b 127.0.0.1:8000."""
    path = config_file(ECHO + "pipeline:\n  - errors: {}\n  - session: {secret_key: '" + "s" * 40 + "', "
                       "cookie_secure: false, cookie_name: dev_session}\n")
    refused = python(HOSTED_CALL.format(multiprocess=[False]), path)
    assert refused.stdout == "ConfigError\n"
    assert "(under another WSGI server, whose listener and proxy handling wsgistack cannot see; set " \
           "WSGISTACK_HOST_LISTEN to the address it binds)" in refused.stderr
    named = python(HOSTED_CALL.format(multiprocess=[False]), path, WSGISTACK_HOST_LISTEN="127.0.0.1:8000")
    assert named.stdout.startswith("200 OK"), named.stderr
    public = python(HOSTED_CALL.format(multiprocess=[False]), path, WSGISTACK_HOST_LISTEN="0.0.0.0:8000")
    assert public.stdout == "ConfigError\n"


def test_serve_app_warns_of_server_settings_the_host_owns(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "server: {trusted_proxy: 127.0.0.1, trusted_proxy_headers: [x-forwarded-for]}\n"
                       "pipeline: [errors: {}]\n")
    result = python(HOSTED_CALL.format(multiprocess=[False]), path)
    assert result.stdout.startswith("200 OK")
    assert f"{path}:2:25 warning: server.trusted_proxy: server.trusted_proxy is serve.py's (Waitress's) setting " \
           "and has no effect under another WSGI server: establish the client address with the proxy layer's " \
           "trusted_proxies, or the server's own settings" in result.stderr.splitlines()
    assert f"{path}:2:1 warning: server: trusted_proxy_headers: serve.py's (Waitress's) settings, which another " \
           "WSGI server does not read: its own settings apply" in result.stderr.splitlines()


def test_serve_app_does_not_refuse_what_only_serve_py_would_apply(config_file) -> None:  # type: ignore[no-untyped-def]
    """Waitress's header clearing, serve.py's workers: errors for serve.py, no effect (a warning) hosted."""
    path = config_file(ECHO + "server: {clear_untrusted_proxy_headers: true, workers: 2}\npipeline:\n"
                       "  - errors: {}\n  - proxy: {x_for: 1}\n  - session: {secret_key: '" + "s" * 40 + "'}\n"
                       "  - validation: {max_query_length: 9000, max_url_length: 8192}\n")
    checked = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "check"], cwd=path.parent,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2, checked.stdout  # as serve.py would serve it
    result = python(HOSTED_CALL.format(multiprocess=[False]), path)
    assert result.stdout.startswith("200 OK"), result.stderr
    assert "server.clear_untrusted_proxy_headers is serve.py's (Waitress's) setting and has no effect" in result.stderr
    assert "server.workers is serve.py's (Waitress's) setting and has no effect" in result.stderr
    # ...while what concerns the layers alone is said to every server:
    assert "validation.max_query_length (9000) is not below max_url_length (8192)" in result.stderr


@pytest.mark.parametrize(("server", "host_listen", "warned"), [
    pytest.param("", "", True, id="no server section (serve.py's loopback default): the host's address counts"),
    pytest.param("server: {url_scheme: https}\n", "", True,
                 id="Waitress's scheme settings do not apply"),
    pytest.param("", "127.0.0.1:8000", False, id="the host binds loopback"),
])
def test_serve_app_warns_of_headers_outside_a_scheme_setting_proxy_layer(  # type: ignore[no-untyped-def]
        config_file, server: str, host_listen: str, warned: bool) -> None:
    path = config_file(ECHO + server + "pipeline:\n  - errors: {}\n  - headers: {}\n  - proxy: {x_proto: 1}\n")
    result = python(HOSTED_CALL.format(multiprocess=[False]), path, WSGISTACK_HOST_LISTEN=host_listen)
    assert result.stdout.startswith("200 OK"), result.stderr
    assert ("is outside proxy at pipeline[2], which sets the scheme" in result.stderr) is warned, result.stderr


def test_serve_app_prints_the_access_log_when_the_host_configured_no_logging(config_file) -> None:  # type: ignore[no-untyped-def]
    path = config_file(ECHO + "pipeline:\n  - errors: {}\n  - access_log: {}\n")
    result = python(HOSTED_CALL.format(multiprocess=[False]), path)
    lines = result.stdout.splitlines()
    assert lines[0].startswith('{"time":') and '"path":"/x"' in lines[0] and '"status":200' in lines[0], lines
    assert lines[1].startswith("200 OK")


# ---------------------------------------------------------------- logging: in stack.yaml


def test_waitress_queue_warnings_are_one_line_per_ten_seconds(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Waitress warns once per queued request; a slow store queues thousands a second."""
    now = [1000.0]
    monkeypatch.setattr("serve.time.monotonic", lambda: now[0])
    monkeypatch.setattr("logging.time.time", lambda: 1_800_000_000.0 + now[0])  # the records' created
    queue = logging.getLogger("waitress.queue")
    once = serve.QueueDepthLines(10.0)
    queue.addFilter(once)
    try:
        with caplog.at_level(logging.WARNING, logger="waitress.queue"):
            now[0] += 0.5
            for depth in [*range(1, 401), *range(100, 0, -1)]:  # a burst up to 400 deep, and its ebb
                queue.warning("Task queue depth is %d", depth)
            now[0] += 10.0
            queue.warning("Task queue depth is %d", 3)
            now[0] += 3600.0  # a burst an hour later: its count is not the last ten seconds'
            for _ in range(3):
                queue.warning("Task queue depth is %d", 2)
            now[0] += 3600.0
            queue.warning("Task queue depth is %d", 1)
    finally:
        queue.removeFilter(once)
    assert [r.getMessage() for r in caplog.records] == [
        "Task queue depth is 1",
        "Task queue depth is 3 (499 more such lines held back since 2027-01-15T08:16:40Z, the deepest 400)",
        "Task queue depth is 2",
        "Task queue depth is 1 (2 more such lines held back since 2027-01-15T09:16:50Z, the deepest 2)"]
    served = subprocess.run([sys.executable, "-c", "import logging, serve; serve._setup_logging(); "
                             "print([type(f).__name__ for f in logging.getLogger('waitress.queue').filters])"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert served.stdout.strip() == "['QueueDepthLines']", served.stderr  # as serve.py sets up its logs


def test_json_log_lines() -> None:
    record = logging.LogRecord("wsgistack.reload", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), None)
    record.created, record.msecs, record.request_id = 1_700_000_000.25, 250, "abc"
    line = serve.JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) == {"time": "2023-11-14T22:13:20.250Z", "level": "ERROR", "logger": "wsgistack.reload",
                                "request_id": "abc", "message": "two\nlines here"}


@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_text_log_lines_are_one_line_in_utc(monkeypatch: pytest.MonkeyPatch, tz: str) -> None:
    """A value a client sent (a header Waitress warns of, a token's subject) cannot forge a line or a colour,
    and the time is UTC, as in the JSON lines and the access log, whatever the zone."""
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        record = logging.LogRecord("waitress", logging.WARNING, __file__, 1, "bad header %r: %s", (
            "x", "a\n2026-01-01 ERROR forged\x85\x1b[31mred\u2028"), None)
        record.created, record.msecs, record.request_id = 1_700_000_000.25, 250, "-"
        line = serve.TextFormatter().format(record)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert line == ("2023-11-14T22:13:20.250Z WARNING waitress [-]: bad header 'x': "
                    "a\\x0a2026-01-01 ERROR forged\\x85\\x1b[31mred\\u2028")


def generation(port: int) -> str:
    """The X-Stack-Generation of a fresh response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/x")
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.getheader("X-Stack-Generation") or ""


def test_the_logging_section_is_applied_and_reloaded(config_file) -> None:  # type: ignore[no-untyped-def]
    from loadgen import ServeProcess

    port = free_port()
    head = ECHO + f"server:\n  listen: 127.0.0.1:{port}\n  generation_header: true\npipeline: [errors: {{}}]\n"
    path = config_file(head + "logging: {level: INFO, format: json}\n")
    server = ServeProcess(path)
    server.env.pop("WSGISTACK_LOG_LEVEL", None)  # it would override logging.level
    server.start()

    def lines() -> list[dict[str, object]]:
        return [json.loads(x) for x in server.output().splitlines() if x.startswith('{"time"')]

    try:
        wait_for_port(port)
        server.wait_output(f'"message": "serving on http://127.0.0.1:{port} (generation 1, 1 worker(s))"')
        first = lines()[0]
        assert set(first) == {"time", "level", "logger", "request_id", "message"}
        assert (first["level"], first["logger"], first["request_id"]) == ("INFO", "wsgistack", "-")
        assert generation(port) == "1"
        path.write_text(head + "logging: {level: WARNING, format: json}\n")
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while generation(port) != "2":
            assert time.monotonic() < deadline, "the reload did not happen"
            time.sleep(0.05)
        path.write_text(head.replace("errors: {}", "corz: {}") + "logging: {level: WARNING, format: json}\n")
        server.signal(signal.SIGHUP)
        server.wait_output('"logger": "wsgistack.reload"')
        path.write_text(head + "logging: {level: INFO}\n")  # back to text lines
        server.signal(signal.SIGHUP)
        server.wait_output("INFO wsgistack.reload [-]: generation 3 serving")
    finally:
        server.stop()
    logged = lines()
    assert not any("generation 2 serving" in str(x["message"]) for x in logged)  # INFO, below WARNING
    failed = [x for x in logged if x["logger"] == "wsgistack.reload"]
    assert failed and failed[0]["level"] == "ERROR"
    assert str(failed[0]["message"]).startswith("reload failed, generation 2 keeps serving: ")


def test_startup_warnings_are_json_lines_when_the_log_is(config_file) -> None:  # type: ignore[no-untyped-def]
    """A log read as JSON lines must not meet the plain text of the warnings printed at the start."""
    from loadgen import ServeProcess

    port = free_port()
    path = config_file(ECHO + f"server:\n  listen: 127.0.0.1:{port}\npipeline: []\n"
                       "logging: {level: INFO, format: json}\n")
    server = ServeProcess(path)
    server.env.pop("WSGISTACK_LOG_LEVEL", None)
    server.start()
    try:
        wait_for_port(port)
        server.wait_output('"message": "serving on')
    finally:
        server.stop()
    said = [line for line in server.output().splitlines() if "lists no layer" in line]
    assert said, server.output()
    for line in said:
        record = json.loads(line)
        assert (record["level"], record["logger"]) == ("WARNING", "wsgistack.config")


@pytest.mark.parametrize(("level", "dotenv", "code", "stderr"), [
    pytest.param("debug", None, 0, "", id="a level in lower case"),
    pytest.param("loud", None, 2, "WSGISTACK_LOG_LEVEL='loud' is not a log level: use DEBUG, INFO, WARNING or ERROR",
                 id="no level"),
    pytest.param("", b"JWT_SECRET=caf\xe9\n", 2, "{env}: not UTF-8 text (byte 14); write it as NAME=value lines "
                 "in UTF-8", id="a .env that is not UTF-8"),
    pytest.param("", "dir", 2, "{env}: cannot read it: Is a directory", id="a .env that is a folder"),
])
def test_the_environment_is_refused_with_a_message_not_a_traceback(tmp_path: Path, level: str,
                                                                   dotenv: bytes | str | None, code: int,
                                                                   stderr: str) -> None:
    (tmp_path / "stack.yaml").write_text(ECHO + "pipeline: [errors: {}]\n")
    if dotenv == "dir":
        (tmp_path / ".env").mkdir()
    elif isinstance(dotenv, bytes):
        (tmp_path / ".env").write_bytes(dotenv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WSGISTACK_LOG_LEVEL": level}
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(tmp_path / "stack.yaml"), "check"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip() == stderr.format(env=tmp_path / ".env")


@pytest.mark.parametrize("seconds", ["abc", "inf", "nan", "-1", "3601"])
def test_a_drain_time_from_the_environment_is_checked_at_the_start(tmp_path: Path, seconds: str) -> None:
    """Found wrong only at SIGTERM, it was too late to say (and inf meant a stop that never ended)."""
    (tmp_path / "stack.yaml").write_text(ECHO + "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WSGISTACK_DRAIN_SECONDS": seconds}
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(tmp_path / "stack.yaml"), "check"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"WSGISTACK_DRAIN_SECONDS={seconds!r} is not a number of seconds from 0 to 3600 (server.drain_timeout's "
           "range)")


@pytest.mark.parametrize(("text", "seconds"), [
    pytest.param("0", 0.0, id="no drain at all"),
    pytest.param("3600", 3600.0, id="an hour, the most"),
    pytest.param(" 2.5 ", 2.5, id="a fraction, spaces around"),
    pytest.param("", None, id="empty: the config's"),
])
def test_a_drain_time_from_the_environment_within_its_range_is_taken(monkeypatch: pytest.MonkeyPatch, text: str,
                                                                      seconds: float | None) -> None:
    monkeypatch.setenv("WSGISTACK_DRAIN_SECONDS", text)
    assert serve._env_drain_seconds() == seconds


def test_explain_names_the_layer_that_refused(config_file) -> None:  # type: ignore[no-untyped-def]
    """Whether or not the layer notes its refusals itself (auth does, versioning does not), once each."""
    path = config_file(ECHO + """
pipeline:
  - errors: {}
  - auth: {secret: "%s", default: optional}
  - versioning: {supported: [v1]}
""" % ("j" * 40))
    lines, status = serve.explain(str(path), "GET", "/api/v3/x")
    assert status == 404
    assert [line.split()[1:] for line in lines if "versioning" in line] == [
        ["versioning", "applied:", "refused:", "404", "Not", "Found"]]
    lines, status = serve.explain(str(path), "GET", "/api/v1/x", ["Authorization: Bearer bad"])
    assert status == 401
    assert [line.split(None, 2)[2] for line in lines if " auth " in line] == ["applied: refused: malformed"]


def test_users_commands_find_the_database_the_server_reads(tmp_path: Path) -> None:
    """~ in var_dir is the home folder for `users` as for the server (it was a folder named ~)."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "stack.yaml").write_text("app: {factory: 'app:create_app', options: {var_dir: ~/wsdata}}\n"
                                         "pipeline: [errors: {}]\n")
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(tmp_path / "stack.yaml"), "users",
                           "add", "alice", "--password-stdin"], input="pw-123456\n", env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (home / "wsdata" / "users.sqlite3").exists()
    assert not (tmp_path / "~").exists()


def test_explain_names_the_app_when_the_app_refuses(config_file) -> None:  # type: ignore[no-untyped-def]
    """A refusal the app raises is the app's, not the innermost layer's."""
    path = config_file('app: {factory: "stack_support:refusing_app"}\n'
                       "pipeline:\n  - errors: {}\n  - versioning: {supported: [v1]}\n")
    lines, status = serve.explain(str(path), "GET", "/api/v1/x")
    assert status == 404
    said = {line.split()[1]: line.split(None, 2)[2] for line in lines if line.split()[1:2] in (["versioning"], ["app"])}
    assert said == {"versioning": "applied: v1 from url", "app": "applied: refused: 404 Not Found"}


def test_layer_pages_are_found_where_the_installer_put_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --user or --prefix install puts share/wsgistack outside the interpreter's data path: the record says where."""
    from pathlib import PurePosixPath

    share = tmp_path / "user" / "share" / "wsgistack" / "docs" / "layers"
    share.mkdir(parents=True)
    (share / "cors.md").write_text("| `origins` | `[]` | Who may read. More on it below. |\n", encoding="utf-8")
    site = tmp_path / "user" / "lib" / "python3" / "site-packages"
    site.mkdir(parents=True)

    class Installed:
        files = [PurePosixPath("serve.py"), PurePosixPath("../../../share/wsgistack/docs/layers/cors.md")]

        def locate_file(self, entry: PurePosixPath) -> Path:
            return site / entry

    monkeypatch.setattr("serve.importlib.metadata.distribution", lambda name: Installed())
    monkeypatch.setattr(serve, "__file__", str(site / "serve.py"))  # not a checkout: no docs beside it
    serve._installed_data.cache_clear()
    try:
        page, docs = serve._option_docs("cors")
    finally:
        serve._installed_data.cache_clear()
    assert page is not None and Path(page).resolve() == (share / "cors.md").resolve()
    assert docs == {"origins": "Who may read."}


def test_a_missing_stack_file_names_the_one_that_ships(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "check"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert f"a stack file to start from ships with wsgistack: cp {ROOT / 'stack.yaml'} stack.yaml" in result.stderr


def test_layer_pages_are_found_beside_a_target_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip install --target puts share/wsgistack beside the modules (its record names a temporary place)."""
    (tmp_path / "share" / "wsgistack" / "docs" / "layers").mkdir(parents=True)
    (tmp_path / "share" / "wsgistack" / "docs" / "layers" / "cors.md").write_text(
        "| `origins` | `[]` | Who may read. |\n", encoding="utf-8")
    monkeypatch.setattr(serve, "__file__", str(tmp_path / "serve.py"))
    monkeypatch.setattr(serve, "_installed_data", lambda: {})
    page, docs = serve._option_docs("cors")
    assert page is not None and docs == {"origins": "Who may read."}


def _explained_answer(lines: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The status line and the headers, in order, that ``explain`` printed."""
    at = next(i for i, line in enumerate(lines) if line.startswith("status: "))
    headers = []
    for line in lines[at + 1:]:
        if not line.startswith("  "):
            break
        name, _, value = line[2:].partition(": ")
        headers.append((name, value))
    return lines[at][len("status: "):], headers


@pytest.mark.parametrize(("method", "target", "headers"), [
    pytest.param("GET", "/x", {}, id="an answer with a Content-Length"),
    pytest.param("HEAD", "/x", {}, id="HEAD"),
    pytest.param("OPTIONS", "/x", {"Origin": "http://a.example", "Access-Control-Request-Method": "GET"},
                 id="a 204 preflight"),
    pytest.param("GET", "/x?q=%ZZ", {}, id="a refusal"),
])
def test_explain_prints_the_headers_waitress_sends(config_file, method: str, target: str,  # type: ignore[no-untyped-def]
                                                   headers: dict[str, str]) -> None:
    """Status and headers as they go on the wire: Waitress adds Server, Connection and Content-Length."""
    port = free_port()
    path = config_file(ECHO + f"""
server: {{listen: 127.0.0.1:{port}, threads: 2}}
pipeline:
  - errors: {{}}
  - cors: {{origins: ["http://a.example"]}}
  - validation: {{}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, target, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    lines, _ = serve.explain(str(path), method, target, [f"{k}: {v}" for k, v in headers.items()])
    status, explained = _explained_answer(lines)
    assert status == f"{response.status} {response.reason}"
    assert [(k, v) for k, v in explained if k != "Date"] == [(k, v) for k, v in response.getheaders() if k != "Date"]
    assert [k for k, _ in explained].count("Date") == 1


def test_explain_sends_the_generation_header_as_the_server_does(config_file) -> None:  # type: ignore[no-untyped-def]
    """server.generation_header: the running server adds X-Stack-Generation (1 until a reload) to every answer."""
    path = config_file(ECHO + "server: {generation_header: true}\npipeline:\n  - errors: {}\n")
    lines, status = serve.explain(str(path), "GET", "/x")
    assert status == 200
    assert ("X-Stack-Generation", "1") in _explained_answer(lines)[1], lines


def test_explain_says_a_memory_store_is_not_the_servers(config_file) -> None:  # type: ignore[no-untyped-def]
    """A memory:// store lives in the server's process: explain's is new, without its sessions, counts or cache."""
    path = config_file(ECHO + f"""
stores: {{shared: "memory://", other: "memory://", unused: "memory://"}}
pipeline:
  - errors: {{}}
  - ratelimit: {{store: other, limits: [1/minute]}}
  - session: {{store: shared, secret_key: "{"s" * 40}", cookie_name: sid, cookie_secure: false}}
""")
    lines, status = serve.explain(str(path), "GET", "/x", ["Cookie: sid=anything"])
    assert status == 200
    assert ("  stores other, shared are memory:// and new here: the running server's sessions, rate-limit "
            "counts and cached answers are not in them") in lines
    path = config_file(ECHO + "pipeline:\n  - errors: {}\n")
    assert not any("memory://" in line for line in serve.explain(str(path), "GET", "/x")[0])


FORGED = "\n2026-01-01 00:00:00 INFO wsgistack: forged"
#: How a text record's first line starts (and no other line may).
RECORD_START = r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d"


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    ("message", "args", "exception"),
    [
        pytest.param("bad value %r", (FORGED,), ValueError(f"invalid literal: {FORGED}"),
                     id="forged message and exception"),
        pytest.param("bad value", (), ValueError(f"cr: \r{FORGED[1:]}"), id="carriage return in the exception"),
        pytest.param("bad value", (), ValueError(f"nel: \x85{FORGED[1:]}\u2028{FORGED[1:]}\x1b[31m"),
                     id="unicode line breaks and an escape in the exception"),
        pytest.param("bad value", (), KeyError(FORGED), id="key error (repr of the key)"),
        pytest.param("%s", (FORGED,), None, id="forged message, no exception"),
    ],
)
def test_text_log_records_cannot_be_forged_by_an_exception(message: str, args: tuple[object, ...],
                                                          exception: BaseException | None) -> None:
    """Only a record's first line starts with the time: a traceback's lines (an exception's message holding
    a value a client sent) are prefixed, and their control characters escaped, yet read as a traceback."""
    record = logging.LogRecord("wsgistack", logging.ERROR, __file__, 1, message, args, None)
    record.request_id = "-"
    if exception is not None:
        try:
            try:
                _raise(exception)
            except Exception as cause:
                raise RuntimeError("while serving") from cause
        except RuntimeError:
            record.exc_info = sys.exc_info()
    text = serve.TextFormatter().format(record)
    lines = text.split("\n")
    assert re.match(RECORD_START, lines[0]), text
    assert [line for line in lines[1:] if not line.startswith("  |")] == [], text
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), text  # only the structuring \n
    if exception is not None:  # still a traceback to read
        assert lines[1] == "  | Traceback (most recent call last):"
        assert "  | The above exception was the direct cause of the following exception:" in lines
        assert lines[-1] == "  | RuntimeError: while serving"
        assert any(line.startswith(f"  | {type(exception).__name__}: ") for line in lines)
    else:
        assert len(lines) == 1


def test_text_log_stack_info_lines_are_prefixed() -> None:
    record = logging.LogRecord("wsgistack", logging.WARNING, __file__, 1, "here", (), None,
                               sinfo=f"Stack (most recent call last):\n  File \"x{FORGED}\", line 1")
    record.request_id = "-"
    lines = serve.TextFormatter().format(record).split("\n")
    assert lines[0].endswith("wsgistack [-]: here")
    assert lines[1:] == ["  | Stack (most recent call last):", '  |   File "x',
                         "  | 2026-01-01 00:00:00 INFO wsgistack: forged\", line 1"]


def test_a_served_exception_with_a_forged_message_stays_one_record(tmp_path: Path) -> None:
    """As serve.py sets up its logs (logging: {format: text}, as the shipped stack.yaml): a logged exception
    whose message holds a line break and a record's start forges no record on stderr."""
    code = ("import logging, serve\n"
            "serve._setup_logging('INFO', 'text')\n"
            "try:\n"
            f"    raise ValueError('no number: ' + {FORGED!r})\n"
            "except ValueError:\n"
            "    logging.getLogger('wsgistack').exception('cannot read %r', " f"{FORGED!r})\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert [line for line in lines if re.match(RECORD_START, line)] == [lines[0]], done.stderr
    assert lines[0].endswith(" ERROR wsgistack [-]: cannot read '\\n2026-01-01 00:00:00 INFO wsgistack: forged'")
    assert lines[1:] == ["  | Traceback (most recent call last):", '  |   File "<string>", line 4, in <module>',
                         "  | ValueError: no number: ", "  | 2026-01-01 00:00:00 INFO wsgistack: forged"], done.stderr
