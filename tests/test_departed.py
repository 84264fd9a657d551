"""Clients of an ordinary slow request, on a real serve.py: which of them the server takes as gone.

serve.py looks once a second at every connection with a request in flight, since Waitress reads
nothing of it meanwhile. A reset says the client is gone. An end of stream alone does not, for an
ordinary request: a client that sends its request and then half-closes (``shutdown(SHUT_WR)``,
``nc -N``, a load balancer passing the client's FIN on) still waits for the answer, and gets it.
The paced search stream, where an end of stream does count, is in test_streaming.py.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from conftest import Served, free_port

#: Seconds the app takes over each request: past two of the server's once-a-second looks.
SLOW = 2.5


def slow_app(options: dict[str, Any] | None = None) -> Any:
    """An app factory: every answer (``slow <path>``) comes after SLOW seconds, ``/fast`` at once."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path != "/fast":
            time.sleep(SLOW)
        body = f"slow {path}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve.py over slow_app, with an access log on stdout."""
    port = free_port()
    config = tmp_path_factory.mktemp("departed") / "stack.yaml"
    config.write_text(f"server:\n  listen: 127.0.0.1:{port}\n  threads: 4\n"
                      "app:\n  factory: test_departed:slow_app\n"
                      "pipeline:\n  - errors: {}\n  - request_id: {}\n  - access_log: {stream: stdout}\n")
    served = Served(config, {}, port, "departed")
    try:
        yield served
    finally:
        served.stop()


def access_line(served: Served, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        lines: list[dict[str, Any]] = [json.loads(line) for line in served.out.read_text().splitlines()
                                       if line.startswith("{")]
        found = [line for line in lines if line["request_id"] == request_id]
        if found:
            [line] = found
            return line
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.05)


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def get(path: str, request_id: str, close: bool = False) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {request_id}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()


@pytest.mark.parametrize("exchanges", [
    pytest.param([("half-one", get("/one", "half-one", close=True), b"slow /one")], id="one request"),
    pytest.param([("half-old", b"GET /old HTTP/1.0\r\nX-Request-ID: half-old\r\n\r\n", b"slow /old")], id="HTTP/1.0"),
    pytest.param([("half-first", get("/first", "half-first"), b"slow /first"),
                  ("half-fast", get("/fast", "half-fast"), b"slow /fast"),
                  ("half-last", get("/last", "half-last", close=True), b"slow /last")], id="pipelined"),
])
def test_a_client_that_half_closes_gets_its_whole_answer(server: Served,
                                                         exchanges: list[tuple[str, bytes, bytes]]) -> None:
    """It sent all it had to say, then its FIN: it is still there to read, as Waitress alone would have it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5 * SLOW) as sock:
        sock.sendall(b"".join(request for _, request, _ in exchanges))
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        received = read_all(sock)
    assert received.count(b" 200 OK\r\n") == len(exchanges), received
    assert [received.count(answer) for _, _, answer in exchanges] == [1] * len(exchanges), received
    assert time.monotonic() - started > SLOW - 0.5  # the FIN went out while the app was still at work
    for request_id, _, _ in exchanges:
        line = access_line(server, request_id)
        assert (line["status"], line.get("error")) == (200, None), line


def test_a_client_that_resets_is_taken_as_gone(server: Served) -> None:
    """A reset while its request runs closes the connection: the app's answer is not sent, the line says aborted."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(get("/reset", "reset"))
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends a reset
    sock.close()
    line = access_line(server, "reset")
    assert (line["status"], line.get("error"), line["bytes"]) == (200, "aborted", 0), line
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as other:  # the server serves on
        other.sendall(get("/fast", "after-reset", close=True))
        assert read_all(other).endswith(b"slow /fast")
