"""serve.py between opening the port and serving: signals wait for the server's handlers."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

import serve
from config import ConfigError
from config.live import LiveStack

ECHO = 'app: {factory: "stack_support:echo_app"}\n'


def test_signals_wait_while_the_sockets_are_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGHUP right after the port opens must reach the reload handler, not end the process."""
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + "server: {listen: '127.0.0.1:18104'}\npipeline: [errors: {}]\n")
    masks: list[set[int]] = []

    def bind(listen: Sequence[str], backlog: int, workers: int) -> list[list[socket.socket]]:
        masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(serve, "_slots", bind)
    level = logging.getLogger().level
    try:
        assert serve.cmd_serve(argparse.Namespace(config=str(path))) == 2
    finally:
        logging.getLogger().setLevel(level)
    assert set(serve.HANDLED) <= masks[0]
    assert not set(serve.HANDLED) & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_signals_wait_while_the_stack_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`systemctl reload` right after a start: a SIGHUP while the stack is built must not end the process."""
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + "pipeline: [errors: {}]\n")
    masks: list[set[int]] = []

    def building(config: str) -> LiveStack:
        masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        raise ConfigError([])

    monkeypatch.setattr(serve, "LiveStack", building)
    assert serve.cmd_serve(argparse.Namespace(config=str(path))) == 2
    assert set(serve.HANDLED) <= masks[0]
    assert not set(serve.HANDLED) & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_a_failed_start_does_not_hide_why(tmp_path: Path, sent: int) -> None:
    """The app factory fails while a SIGTERM (systemd giving up), a Ctrl-C or a SIGHUP waits: the process
    still prints the error and exits 2, not 143, 130 (with a traceback) or 129 in silence."""
    import os
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    flag = tmp_path / "building"
    path = tmp_path / "stack.yaml"
    path.write_text(f'app: {{factory: "stack_support:slow_failing_app", options: {{flag: "{flag}"}}}}\n'
                    "pipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.Popen([sys.executable, str(root / "serve.py"), "-c", str(path), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(sent)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    assert "the app factory" in err and "refusing to start with an invalid configuration" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("sent", "expected"), [
    (signal.SIGHUP, None),  # a reload while it imports: it keeps starting and serves
    (signal.SIGTERM, 0),  # a stop while it imports: a clean stop, as documented
])
def test_a_signal_while_serve_imports_waits_for_the_handlers(tmp_path: Path, sent: int,
                                                             expected: int | None) -> None:
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import free_port

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + f"server: {{listen: '127.0.0.1:{port}'}}\npipeline: [errors: {{}}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.Popen([sys.executable, str(root / "serve.py"), "-c", str(path), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Once serve.py's first lines have blocked the signal (the interpreter's own start, before them,
        # cannot be covered), and long before the imports are done and the handlers exist.
        status = Path(f"/proc/{proc.pid}/status")
        while not int(next(line for line in status.read_text().splitlines()
                           if line.startswith("SigBlk:")).split()[1], 16) & (1 << (sent - 1)):
            assert proc.poll() is None
            time.sleep(0.001)
        assert "pydantic_core" not in Path(f"/proc/{proc.pid}/maps").read_text()  # still importing
        proc.send_signal(sent)
        if expected is not None:
            assert proc.wait(timeout=30) == expected
            return
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                    body = response.read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert b'"path": "/"' in body
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
