"""serve.py's ``server.listen``: a host name is served on every address it resolves to.

The servers here are real ones, bound and connected to for real.  A name that resolves to
both loopback addresses is needed, and this machine's ``localhost`` may resolve to one of
them only: so serve.py runs under a resolver that answers for names of the reserved ``.test``
domain (``WSGISTACK_TEST_HOSTS``: ``name=address,address``) and asks the system for the rest.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO = 'app: {factory: "stack_support:echo_app"}\n'

#: serve.py's ``__main__`` under a resolver that answers for the names in $WSGISTACK_TEST_HOSTS.
RESOLVING = """
import os, runpy, socket, sys
hosts = dict(entry.split("=", 1) for entry in os.environ["WSGISTACK_TEST_HOSTS"].split(";"))
real = socket.getaddrinfo
def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    if host not in hosts:
        return real(host, port, family, type, proto, flags)
    return [info for address in hosts[host].split(",")
            for info in real(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)]
socket.getaddrinfo = getaddrinfo
sys.argv = ["serve.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["WSGISTACK_ROOT"], "serve.py"), run_name="__main__")
"""


def ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (an IPv6 stack with its loopback address)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class Served:
    """A serve.py process and its stderr, kept in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def read_until(self, text: str, count: int = 1, timeout: float = 30.0) -> str:
        """The output once ``text`` appeared ``count`` times (or the process ended, or ``timeout`` passed),
        and a second later: what the start says after it is there too."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)
        return self.output()


@contextlib.contextmanager
def serving(tmp_path: Path, listen: str, hosts: str, workers: int = 1) -> Iterator[Served]:
    """serve.py on ``listen`` (its names resolved by ``hosts``), stopped with SIGTERM at the end."""
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + f"server: {{listen: '{listen}', workers: {workers}}}\npipeline: [errors: {{}}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WSGISTACK_TEST_HOSTS": hosts, "WSGISTACK_ROOT": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", RESOLVING, "-c", str(path), "serve"], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=out)
    try:
        yield Served(proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get(address: str, port: int) -> int:
    """The status of ``GET /x`` sent to ``address``."""
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request("GET", "/x")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("resolved", [
    pytest.param("127.0.0.1,::1", id="IPv4 first"),
    pytest.param("::1,127.0.0.1", id="IPv6 first"),
    pytest.param("127.0.0.1,::1,127.0.0.1,::1", id="each address twice"),
])
def test_a_host_name_is_served_on_every_address_it_resolves_to(tmp_path: Path, resolved: str,
                                                               workers: int) -> None:
    """A client that resolves the name to either address reaches the server, one worker or several."""
    port = free_port()
    v6 = ipv6_loopback()
    with serving(tmp_path, f"dual.wsgistack.test:{port}", f"dual.wsgistack.test={resolved}", workers) as served:
        expected = ["127.0.0.1", "[::1]"] if v6 else ["127.0.0.1"]
        output = served.read_until("serving on", len(expected))
        hosts = sorted(line.split("http://")[1].split(f":{port} ")[0] for line in output.splitlines()
                       if "serving on" in line)
        assert hosts == expected, output
        assert get("127.0.0.1", port) == 200
        if v6:  # the machine has ::1: it must be served, not skipped
            assert get("::1", port) == 200
        else:  # no IPv6 loopback here: the IPv4 side serves, and the start says what it could not bind
            assert "cannot listen on dual.wsgistack.test" in output and "::1" in output, output
        for _ in range(4):  # every worker takes both (the kernel spreads connections across their sockets)
            assert get("127.0.0.1", port) == 200
            if v6:
                assert get("::1", port) == 200
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=20) == 0, served.output()


def test_localhost_is_served_on_every_address_the_system_gives(tmp_path: Path) -> None:
    """The name as the system resolves it (here, no resolver of the test's own)."""
    port = free_port()
    addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)})
    with serving(tmp_path, f"localhost:{port}", "unused.wsgistack.test=127.0.0.1") as served:
        output = served.read_until("serving on", len(addresses))
        for address in addresses:
            assert f"serving on http://{f'[{address}]' if ':' in address else address}:{port} " in output, output
            assert get(address, port) == 200


def test_an_address_that_cannot_be_bound_is_left_out_with_a_warning(tmp_path: Path) -> None:
    """2001:db8::1 (documentation space) is no address of this machine: the name is served on the other."""
    port = free_port()
    with serving(tmp_path, f"some.wsgistack.test:{port}", "some.wsgistack.test=2001:db8::1,127.0.0.1") as served:
        output = served.read_until("serving on")
        assert get("127.0.0.1", port) == 200
    warning = next(line for line in output.splitlines() if "2001:db8::1" in line)
    assert " WARNING wsgistack [-]: cannot listen on some.wsgistack.test:" in warning, output
    assert f"[2001:db8::1]:{port}" in warning and "serving on its other addresses" in warning, output
    assert output.count("serving on http://") == 1, output


@pytest.mark.parametrize(("resolved", "taken", "why"), [
    pytest.param("2001:db8::1", False, "Cannot assign requested address", id="no address of the name can be bound"),
    pytest.param("2001:db8::1,127.0.0.1", True, "Address already in use",
                 id="one address not this machine's, the other taken"),
    pytest.param("127.0.0.1,::1", True, "Address already in use",
                 id="one address taken: another server has it, not served beside it"),
])
def test_serve_refuses_to_start_when_an_address_is_taken_or_none_can_be_bound(
        tmp_path: Path, resolved: str, taken: bool, why: str) -> None:
    port = free_port()
    with contextlib.ExitStack() as stack:
        if taken:
            other = stack.enter_context(socket.socket())
            other.bind(("127.0.0.1", port))
            other.listen()
        served = stack.enter_context(serving(tmp_path, f"n.wsgistack.test:{port}", f"n.wsgistack.test={resolved}"))
        assert served.proc.wait(timeout=30) == 2, served.output()
        err = served.output()
    assert f"cannot listen on n.wsgistack.test:{port}: {why}" in err, err
    assert err.rstrip().endswith(f"(server.listen in {tmp_path / 'stack.yaml'})"), err


def test_check_refuses_a_name_sharing_any_of_its_addresses_with_another_entry(tmp_path: Path) -> None:
    """Every address of a name is served: one that another entry also names is that address twice."""
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + "server:\n  listen: ['dual.wsgistack.test:18006', '[::1]:18006']\npipeline: [errors: {}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WSGISTACK_TEST_HOSTS": "dual.wsgistack.test=127.0.0.1,::1", "WSGISTACK_ROOT": str(ROOT)}
    checked = subprocess.run([sys.executable, "-c", RESOLVING, "-c", path.name, "check"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[0] == (
        "stack.yaml:3:41 server.listen[1]: listen[1] ([::1]:18006) is the same address as listen[0] "
        "(dual.wsgistack.test:18006): ::1 port 18006; remove one (got '[::1]:18006')"), checked.stdout
