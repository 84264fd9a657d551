"""Waitress's own request limits, as serve.py hands them over: the numbers in stack.yaml are the largest accepted.

Waitress refuses a body of ``max_request_body_size`` bytes *or more*; docs/operations.md
tells operators to set it, the proxy's ``client_max_body_size`` and
``validation.max_body_bytes`` to one number, so a body of exactly that size
must pass all three.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest
from conftest import Served, free_port

LIMIT = 1000
HEADER_LIMIT = 2000
ECHO = 'app: {factory: "stack_support:echo_app"}\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    config = tmp_path_factory.mktemp("limits") / "stack.yaml"
    config.write_text(ECHO + f"server:\n  listen: 127.0.0.1:{port}\n  threads: 2\n  max_request_body_size: {LIMIT}\n"
                      f"  max_request_header_size: {HEADER_LIMIT}\n"
                      f"pipeline:\n  - errors: {{}}\n  - validation: {{max_body_bytes: {LIMIT}}}\n")
    server = Served(config, {}, port)
    try:
        yield port
    finally:
        server.stop()


@pytest.mark.parametrize(("size", "status", "content_type"), [
    pytest.param(LIMIT - 1, 200, "application/json", id="below the limit"),
    pytest.param(LIMIT, 200, "application/json", id="exactly the limit"),
    pytest.param(LIMIT + 1, 413, "text/plain", id="one byte over: Waitress refuses it before any layer"),
])
def test_a_body_of_the_limit_is_accepted(served: int, size: int, status: int, content_type: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served, timeout=5)
    conn.request("POST", "/upload", body=b'"' + b"x" * (size - 2) + b'"', headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert (response.status, response.getheader("Content-Type", "").split(";")[0]) == (status, content_type), body


@pytest.mark.parametrize(("size", "status"), [
    pytest.param(HEADER_LIMIT - 1, 200, id="below the limit"),
    pytest.param(HEADER_LIMIT, 200, id="exactly the limit"),
    pytest.param(HEADER_LIMIT + 1, 431, id="one byte over: Waitress refuses it before any layer"),
])
def test_a_header_block_of_the_limit_is_accepted(served: int, size: int, status: int) -> None:
    """The request line, the headers and the blank line that ends them: ``size`` bytes in all."""
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
    request = head + b"p" * (size - len(head) - 4) + b"\r\n\r\n"
    assert len(request) == size
    with socket.create_connection(("127.0.0.1", served), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.split(b" ", 2)[1] == str(status).encode(), answer[:200]


def test_more_connections_than_select_can_watch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A connection_limit above a thousand is served: with select(), the loop died at the first connection
    whose descriptor was 1024 or more (ValueError: filedescriptor out of range), and the server with it."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if hard != resource.RLIM_INFINITY and hard < wanted + 100:
        pytest.skip(f"{hard} file descriptors at most")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted + 100), hard))  # (the server inherits it)
    port = free_port()
    config = tmp_path_factory.mktemp("many") / "stack.yaml"
    config.write_text(ECHO + f"server: {{listen: '127.0.0.1:{port}', connection_limit: 2000}}\n"
                      "pipeline: [errors: {}]\n")
    server = Served(config, {}, port)
    held: list[socket.socket] = []
    try:
        held.extend(socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(wanted))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/after")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        alive = server.proc.poll() is None
        server.stop()
    assert alive, server.err.read_text()[-2000:]
