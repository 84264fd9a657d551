"""Which connections a stopping server closes at once: only those holding no part of a request."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest

import serve


def channel(sock: socket.socket, **state: Any) -> SimpleNamespace:
    return SimpleNamespace(socket=sock, requests=state.get("requests", []), request=state.get("request"),
                           total_outbufs_len=state.get("outbufs", 0))


@pytest.mark.parametrize(("sent", "state", "idle"), [
    pytest.param(b"", {}, True, id="idle keep-alive"),
    pytest.param(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", {}, False,
                 id="a request sent before the stop, not read yet: answered, not reset"),
    pytest.param(b"", {"request": object()}, False, id="a request being parsed"),
    pytest.param(b"", {"requests": [object()]}, False, id="a request being answered"),
    pytest.param(b"", {"outbufs": 10}, False, id="an answer still being sent"),
])
def test_idle(sent: bytes, state: dict[str, Any], idle: bool) -> None:
    server_side, client_side = socket.socketpair()
    try:
        if sent:
            client_side.sendall(sent)
        assert serve._idle(channel(server_side, **state)) is idle
        if sent:
            assert server_side.recv(len(sent)) == sent  # only peeked: the loop still reads it
    finally:
        server_side.close()
        client_side.close()


def test_a_client_that_closed_is_idle() -> None:
    server_side, client_side = socket.socketpair()
    client_side.close()
    try:
        assert serve._idle(channel(server_side)) is True
    finally:
        server_side.close()
