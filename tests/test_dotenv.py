"""The .env beside the config: the grammar of Compose's and python-dotenv's files, less interpolation."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from serve import load_dotenv, parse_dotenv

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("A=1\n", {"A": "1"}, id="a setting"),
    pytest.param("# a comment\n\n  # another\nA=1\n", {"A": "1"}, id="comments and blank lines"),
    pytest.param("export A=1\nexport\tB=2\n", {"A": "1", "B": "2"}, id="export"),
    pytest.param("A = spaced \n", {"A": "spaced"}, id="spaces around = and the value"),
    pytest.param("A=secret value  # rotated 2025-01\n", {"A": "secret value"}, id="a comment after a value"),
    pytest.param("A=pass#word\n", {"A": "pass#word"}, id="a # inside a value"),
    pytest.param("CSP=\"default-src 'self'\"\n", {"CSP": "default-src 'self'"}, id="a quote inside other quotes"),
    pytest.param("A='$HOME \\n \"x\"'\n", {"A": '$HOME \\n "x"'}, id="single quotes: as written"),
    pytest.param('A="a\\nb \\"q\\" \\\\ \\x"\n', {"A": 'a\nb "q" \\ \\x'}, id="double quotes: escapes"),
    pytest.param('A="x\\ry\\tz"\n', {"A": "x\ry\tz"}, id="double quotes: \\r and \\t"),
    pytest.param("A='x \t\n  y  '\nB=\"one   \n two\"\n", {"A": "x \t\n  y  ", "B": "one   \n two"},
                 id="a quoted value over lines keeps its spaces"),
    pytest.param("A='x' # comment\n", {"A": "x"}, id="a comment after a quoted value"),
    pytest.param("A=\nB=''\n", {"A": "", "B": ""}, id="empty values"),
    pytest.param("A=first\nA=second\n", {"A": "second"}, id="the last line of a name wins"),
    pytest.param("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}, id="CRLF"),
    pytest.param('KEY="-----BEGIN KEY-----\nabc\n  def\n-----END KEY-----"\nB=2\n',
                 {"KEY": "-----BEGIN KEY-----\nabc\n  def\n-----END KEY-----", "B": "2"},
                 id="a quoted value over several lines"),
    pytest.param("# rotated monthly\u2028 see the wiki\nA=1\nNOTE=a\u2028B=2\n", {"A": "1", "NOTE": "a\u2028B=2"},
                 id="lines end at newlines only, as in Compose"),
])
def test_settings(text: str, expected: dict[str, str]) -> None:
    assert parse_dotenv(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    pytest.param('A=1\nL="unterminated\nB=2\n', ".env:2: the value of L opens a \" quote that never closes",
                 id="an unclosed double quote"),
    pytest.param("M='x\"\n", ".env:1: the value of M opens a ' quote that never closes",
                 id="quotes that do not match"),
    pytest.param('S="quoted" extra\n', ".env:1: the value of S goes on after its closing \": quote the whole value",
                 id="text after the closing quote"),
    pytest.param("P Q=1\n", ".env:1: 'P' is followed by ' ', not '=': write NAME=value (a name of letters, digits "
                 "and _, not starting with a digit)", id="a space in a name"),
    pytest.param("1X=2\n", ".env:1: '1X' is not a name: write NAME=value", id="a name starting with a digit"),
    pytest.param("1X=\n", ".env:1: '1X' is not a name: write NAME=value", id="a name starting with a digit, no value"),
    pytest.param("JWT_SECRET:\n", ".env:1: 'JWT_SECRET' is followed by ':', not '='", id="a colon, no value"),
    pytest.param("export 1X=2\n", ".env:1: '1X' is not a name: write NAME=value", id="export, then a digit"),
    pytest.param("SESSION_SECRET\n", ".env:1: the line has no '=': write NAME=value", id="no ="),
    pytest.param("JWT_SECRET: x\n", ".env:1: 'JWT_SECRET' is followed by ':', not '=': write NAME=value", id="a colon"),
    pytest.param("-----BEGIN KEY-----\n", ".env:1: the line is not NAME=value", id="no name at all"),
])
def test_lines_that_are_not_settings(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_dotenv(text)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("line", [
    pytest.param("JWT_SECRET: c2VjcmV0LXNlY3JldC1zZWNyZXQ=", id="YAML's colon (a base64 secret, its = too)"),
    pytest.param("JWT_SECRET c2VjcmV0LXNlY3JldC1zZWNyZXQ=", id="a space for the ="),
    pytest.param("c2VjcmV0LXNlY3JldC1zZWNyZXQ", id="the secret alone (a value wrapped onto its own line)"),
    pytest.param("c2Vj+cmV0LXNlY3JldC1zZWNyZXQ", id="a secret alone, with a +"),
    pytest.param("export c2VjcmV0LXNlY3JldC1zZWNyZXQ", id="export, then the secret"),
])
def test_a_line_that_is_not_a_setting_is_not_quoted_beyond_its_name(line: str) -> None:
    """The message goes to stderr, and so to the service's journal: no part of a secret may be in it."""
    with pytest.raises(ValueError) as info:
        parse_dotenv(f"A=1\n{line}\n")
    assert str(info.value).startswith(".env:2: ")
    assert "c2Vj" not in str(info.value)


@pytest.mark.parametrize(("written", "env", "shown"), [
    pytest.param(b"\xef\xbb\xbfGREETING=from the file\n", {}, "from the file", id="a BOM before the first name"),
    pytest.param(b"GREETING=from the file\n", {"GREETING": "from the environment"}, "from the environment",
                 id="the environment wins over the file"),
])
def test_serve_reads_the_file_beside_the_config(tmp_path: Path, written: bytes, env: dict[str, str],
                                                shown: str) -> None:
    (tmp_path / "stack.yaml").write_text('app: {factory: "stack_support:echo_app"}\n'
                                         "pipeline:\n  - request_id: {header: '${GREETING}'}\n")
    (tmp_path / ".env").write_bytes(written)
    base = {k: v for k, v in os.environ.items() if k != "GREETING"}
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(tmp_path / "stack.yaml"), "check"],
                          env={**base, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env},
                          capture_output=True, text=True, timeout=60)
    assert f"header {shown!r} is not a valid HTTP header name" in done.stdout, done.stdout + done.stderr


def test_a_bad_line_stops_the_start_with_its_place(tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text('app: {factory: "stack_support:echo_app"}\npipeline: [errors: {}]\n')
    (tmp_path / ".env").write_text("A=1\nL=\"unterminated\n")
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(tmp_path / "stack.yaml"), "check"],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"{tmp_path / '.env'}:2: the value of L opens a \" quote that never closes")


def make_env(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``make`` the .env beside ``tmp_path/stack.yaml`` with the project's Makefile, under umask 000."""
    return subprocess.run(["sh", "-c", 'umask 000 && exec make -s -f "$@"', "sh", str(ROOT / "Makefile"),
                           f"CONFIG={tmp_path / 'stack.yaml'}", *args, str(tmp_path / ".env")],
                          capture_output=True, text=True, timeout=60)


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


@needs_make
def test_make_creates_the_env_file_with_random_secrets_for_its_owner_alone(tmp_path: Path) -> None:
    done = make_env(tmp_path)
    env = tmp_path / ".env"
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    settings = parse_dotenv(env.read_text())
    assert sorted(settings) == ["JWT_SECRET", "SESSION_SECRET"]
    for secret in settings.values():
        assert len(secret) >= 43 and secret not in done.stdout + done.stderr  # 32 random bytes, never shown
    assert settings["JWT_SECRET"] != settings["SESSION_SECRET"]
    env.write_text("SESSION_SECRET=mine\n")
    assert make_env(tmp_path).returncode == 0
    assert env.read_text() == "SESSION_SECRET=mine\n", "an existing .env is never replaced"


@needs_make
def test_a_failed_make_leaves_no_env_file_behind(tmp_path: Path) -> None:
    """An empty one would count as made: the next `make serve` would not try again, and serve without secrets."""
    assert make_env(tmp_path, "PYTHON=false").returncode != 0
    assert not (tmp_path / ".env").exists()


@pytest.mark.parametrize(("text", "mode", "warned"), [
    pytest.param("JWT_SECRET=abc\nTAG=x\n", 0o644, True, id="secrets other accounts can read"),
    pytest.param("JWT_SECRET=abc\n", 0o640, True, id="readable by the group"),
    pytest.param("JWT_SECRET=abc\n", 0o600, False, id="the owner's alone"),
    pytest.param("TAG=x\nLISTEN=127.0.0.1:9000\n", 0o644, False, id="nothing secret in it"),
])
def test_a_file_of_secrets_others_can_read_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], text: str, mode: int,
                                                    warned: bool) -> None:
    """As the users database warns of its hashes: the secrets are read all the same, and the fix is named."""
    for name in ("JWT_SECRET", "TAG", "LISTEN"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / ".env"
    path.write_text(text)
    path.chmod(mode)
    load_dotenv(str(path))
    err = capsys.readouterr().err
    expected = f"{path}: other accounts on this machine can read it (mode {mode:o}), and it holds JWT_SECRET: " \
               f"chmod 600 {path}\n"
    assert err == (expected if warned else "")
    assert "abc" not in err
    assert os.environ.get("JWT_SECRET") == ("abc" if "JWT_SECRET" in text else None)


def test_the_env_file_of_the_production_guide_is_not_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """docs/production.md's .env, with the mode it is given there, reads without a warning."""
    doc = (ROOT / "docs" / "production.md").read_text()
    modes = re.findall(r"(?:-m|chmod) (0[0-7]{3}) (?:/dev/null )?/etc/wsgistack/\.env", doc)
    assert len(modes) == 1, modes
    monkeypatch.delenv("JWT_SECRET", raising=False)
    path = tmp_path / ".env"
    path.write_text("JWT_SECRET=abc\n")
    path.chmod(int(modes[0], 8))
    load_dotenv(str(path))
    assert capsys.readouterr().err == ""
