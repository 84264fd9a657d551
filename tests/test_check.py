"""`serve.py check` refuses what `serve` refuses (short of binding and connecting), located, with exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ECHO = 'app: {factory: "stack_support:echo_app"}\n'
ERRORS = "pipeline: [errors: {}]\n"


def run(command: str, text: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``serve.py -c stack.yaml COMMAND`` on ``text``, from the config's folder (``tmp_path`` on the path)."""
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    paths = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(tmp_path)])
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", "stack.yaml", command], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": paths, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("text", "first_line"),
    [
        pytest.param(ECHO + "stores: {shared: 'redis://localhost:notaport/0'}\n" + ERRORS,
                     "stack.yaml:2:18 stores.shared: bad Redis store URL redis://localhost:notaport/0: Port could "
                     "not be cast to integer value as 'notaport' (got 'redis://localhost:notaport/0')",
                     id="redis URL with a bad port"),
        pytest.param(ECHO + "stores: {shared: 'mongodb://localhost'}\n" + ERRORS,
                     "stack.yaml:2:18 stores.shared: unknown store scheme 'mongodb://' (known: memory://, redis://, "
                     "rediss://, unix://, redis+sentinel://) (got 'mongodb://localhost')",
                     id="unknown scheme"),
        pytest.param(ECHO + "stores: {shared: 'redis//localhost:6379'}\n" + ERRORS,
                     "stack.yaml:2:18 stores.shared: store URL 'redis//localhost:6379' has no scheme",
                     id="no scheme"),
        pytest.param(ECHO + "stores: {shared: 'memory://?max_entries=abc'}\n" + ERRORS,
                     "stack.yaml:2:18 stores.shared: memory:// max_entries must be a whole number, got 'abc' "
                     "(got 'memory://?max_entries=abc')",
                     id="memory store option"),
        pytest.param(ECHO + "stores: {shared: ''}\n" + ERRORS,
                     "stack.yaml:2:18 stores.shared: store URL '' has no scheme", id="empty URL"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_fr: 1}\n",
                     "stack.yaml:4:46 pipeline[1].werkzeug.middleware.proxy_fix:ProxyFix.x_fr: unknown option "
                     "'x_fr' for werkzeug.middleware.proxy_fix:ProxyFix; did you mean 'x_for'?",
                     id="factory keyword argument"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - access_log: {file: /nonexistent/dir/access.log}\n",
                     "stack.yaml:4:24 pipeline[1].access_log.file: access_log cannot open it: No such file or "
                     "directory (got '/nonexistent/dir/access.log')",
                     id="a file the access log cannot open"),
        pytest.param(ECHO + "server: {listen: '999.1.1.1:80'}\n" + ERRORS,
                     "stack.yaml:2:18 server.listen[0]: '999.1.1.1' is not an IPv4 address (got '999.1.1.1:80')",
                     id="listen address"),
        pytest.param(ECHO + "server: {listen: 'no-such-host.invalid:80'}\n" + ERRORS,
                     "stack.yaml:2:18 server.listen[0]: cannot resolve the host 'no-such-host.invalid': ",
                     id="listen host that does not resolve"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - broken_syntax:Layer: {}\n",
                     "stack.yaml:4:5 pipeline[1]: cannot import layer 'broken_syntax:Layer': SyntaxError in ",
                     id="a layer module with a syntax error"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - broken_import:Layer: {}\n",
                     "stack.yaml:4:5 pipeline[1]: cannot import layer 'broken_import:Layer': KeyError: "
                     "'WSGISTACK_NOT_SET'",
                     id="a layer module raising KeyError while imported"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - quitting:layer: {}\n",
                     "stack.yaml:4:5 pipeline[1]: quitting:layer: it called sys.exit(0)",
                     id="a layer factory calling sys.exit(0): never a silent exit 0"),
        pytest.param(ECHO + "pipeline:\n  - errors: {}\n  - quitting_import:Layer: {}\n",
                     "stack.yaml:4:5 pipeline[1]: cannot import layer 'quitting_import:Layer': it called "
                     "sys.exit('no config')", id="a layer module calling sys.exit while imported"),
        pytest.param("app: {factory: 'quitting_import:app'}\n" + ERRORS,
                     "stack.yaml:1:16 app.factory: cannot import the app factory: it called sys.exit('no config')",
                     id="an app factory's module calling sys.exit while imported"),
        pytest.param("app: {factory: 'quitting:app'}\n" + ERRORS,
                     "stack.yaml:1:6 app: the app factory failed: it called sys.exit('no config for you')",
                     id="an app factory calling sys.exit"),
        pytest.param(ECHO + "server: &s {listen: '127.0.0.1:8889', reload: *s}\n" + ERRORS,
                     "stack.yaml:2:39 server.reload: this alias refers to a value that contains it",
                     id="a self-referencing alias"),
        pytest.param("", "stack.yaml:1:1 (top level): the file has no settings (it is empty or only comments)",
                     id="an empty file"),
        pytest.param("# server:\n#   listen: 127.0.0.1:8889\n",
                     "stack.yaml:1:1 (top level): the file has no settings", id="a file of comments"),
        pytest.param(ECHO + "server: {ident: '${NAME-wsgistack}'}\n" + ERRORS,
                     "stack.yaml:2:17 server.ident: '${NAME-wsgistack}' is not an interpolation stack.yaml "
                     "understands; write ${NAME:-wsgistack}",
                     id="an interpolation form that is not supported"),
    ],
)
def test_check_refuses_what_serve_refuses(tmp_path: Path, text: str, first_line: str) -> None:
    (tmp_path / "broken_syntax.py").write_text("def layer(:\n")
    (tmp_path / "broken_import.py").write_text("import os\nNAME = os.environ['WSGISTACK_NOT_SET']\n")
    (tmp_path / "quitting.py").write_text("import sys\ndef layer(app):\n    sys.exit(0)\n"
                                          "def app(**options):\n    sys.exit('no config for you')\n")
    (tmp_path / "quitting_import.py").write_text("import sys\nsys.exit('no config')\n")
    checked = run("check", text, tmp_path)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[0].startswith(first_line), checked.stdout
    assert "Traceback" not in checked.stdout + checked.stderr
    served = run("serve", text, tmp_path)
    assert served.returncode == 2, served.stdout + served.stderr
    assert served.stderr.splitlines()[0].startswith(first_line), served.stderr
    assert served.stderr.splitlines()[-1] == "stack.yaml: refusing to start with an invalid configuration"


def test_check_builds_without_connecting(tmp_path: Path) -> None:
    """check parses the store URLs and builds every layer, but connects to nothing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        checked = run("check", ECHO + f"stores: {{shared: 'redis://127.0.0.1:{port}/0'}}\npipeline:\n"
                      "  - errors: {}\n  - access_log: {file: access.log}\n  - cache: {}\n", tmp_path)
        with pytest.raises(TimeoutError):  # nobody knocked (the store's port listens, and counts)
            listener.accept()[0].close()
    finally:
        listener.close()
    assert (checked.returncode, checked.stdout) == (0, "stack.yaml: ok\n"), checked.stderr
    assert "does not answer" not in checked.stderr
    assert (tmp_path / "access.log").read_text() == ""  # built, like serve, and closed; nothing logged


def run_from_elsewhere(tmp_path: Path, text: str, command: str = "check") -> subprocess.CompletedProcess[str]:
    """``serve.py -c conf/stack.yaml COMMAND`` from ``tmp_path``: the stack file is in another folder."""
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "stack.yaml").write_text(text)
    paths = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", "conf/stack.yaml", command], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": paths}, capture_output=True, text=True, timeout=60)


def test_relative_file_options_resolve_against_the_stack_files_folder(tmp_path: Path) -> None:
    """access_log's file as the app's var_dir and auth's keys: next to stack.yaml, wherever serve.py starts."""
    (tmp_path / "conf" / "logs").mkdir(parents=True)
    text = ECHO + "pipeline:\n  - errors: {}\n  - access_log: {file: logs/access.log}\n"
    done = run_from_elsewhere(tmp_path, text)
    assert (done.returncode, done.stdout.strip()) == (0, "conf/stack.yaml: ok"), done.stderr
    assert (tmp_path / "conf" / "logs" / "access.log").exists()  # check creates it, as serve would
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(("layer", "message"), [
    pytest.param("access_log: {file: nowhere/access.log}",
                 "conf/stack.yaml:3:24 pipeline[0].access_log.file: access_log cannot open {conf}/nowhere/access.log: "
                 "No such file or directory (got 'nowhere/access.log')", id="the access log's file"),
    pytest.param("auth: {public_keys: [keys/missing.pem]}",
                 "conf/stack.yaml:3:25 pipeline[0].auth.public_keys: a public_keys entry: cannot read "
                 "'{conf}/keys/missing.pem' (No such file or directory)",
                 id="a public key (no secret: shown)"),
])
def test_a_relative_file_that_is_missing_is_named_where_it_was_looked_for(tmp_path: Path, layer: str,
                                                                         message: str) -> None:
    done = run_from_elsewhere(tmp_path, ECHO + f"pipeline:\n  - {layer}\n")
    assert done.returncode == 2
    assert done.stdout.splitlines()[0] == message.format(conf=tmp_path / "conf")


def test_a_file_that_is_not_utf8_is_located_at_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_bytes(ECHO.encode() + b"pipeline:\n  - headers: {}  # caf\xe9\n")
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", "stack.yaml", "check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (
        2, "stack.yaml:3:23 (top level): the file is not UTF-8 text: byte 0xe9 here; save it as UTF-8")


@pytest.mark.parametrize(("key", "shown"), [
    pytest.param("x\\ny", r"'x\ny'", id="a line break"),
    pytest.param("x\\ny: fine\\nstack.yaml:1:1 server", r"'x\ny: fine\nstack.yaml:1:1 server'", id="a forged line"),
    pytest.param("x\\e[2Jy", r"'x\x1b[2Jy'", id="a terminal escape"),
    pytest.param("x\\ty", r"'x\ty'", id="a tab"),
])
def test_a_key_is_shown_on_its_problems_line(tmp_path: Path, key: str, shown: str) -> None:
    # One problem a line, file:line:col key.path: message, whatever the file's keys hold: a script reads the
    # lines, and a terminal is not sent the file's escape sequences.
    checked = run("check", ECHO + ERRORS + f'"{key}": 1\nserver: {{"{key}": 1}}\n', tmp_path)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert len(lines) == 2, checked.stdout
    assert lines[0] == f"stack.yaml:3:1 {shown}: unknown top-level key {shown} (known: server, stores, app, " \
                       "pipeline, logging)"
    assert lines[1].startswith(f"stack.yaml:4:10 server.{shown}: unknown key {shown}")
