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
