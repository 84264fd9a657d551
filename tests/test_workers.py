"""serve.py with server.workers > 1: shared sockets, restarts, reload in every worker, clean stop.

Which worker answered a connection is read from the kernel, not from the app:
the server side of our connection is a socket inode in /proc/net/tcp, and
exactly one worker holds that inode among its file descriptors.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from loadgen import Load, Req, ServeProcess, request

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc/*/stat)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _server_inode(server_port: int, client_port: int) -> str | None:
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as handle:
        for line in handle.readlines()[1:]:
            parts = line.split()
            if parts[1] == local and parts[2] == remote:
                return parts[9]
    return None


def owner(conn: http.client.HTTPConnection, server_port: int, candidates: set[int]) -> int | None:
    """The pid among ``candidates`` that holds the server side of the open connection ``conn``."""
    assert conn.sock is not None
    inode = _server_inode(server_port, conn.sock.getsockname()[1])
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def _sockets(port: int, state: str) -> set[str]:
    """The sockets on 127.0.0.1:``port`` in TCP ``state`` (``01`` established, ``0A`` listening), as fd links."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as handle:
        return {f"socket:[{parts[9]}]" for line in handle.readlines()[1:]
                if (parts := line.split())[1] == local and parts[3] == state}


def _held(pid: int, sockets: set[str]) -> set[str]:
    """Which of ``sockets`` process ``pid`` holds among its file descriptors."""
    held = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if (target := os.readlink(f"/proc/{pid}/fd/{fd}")) in sockets:
                    held.add(target)
    return held


def accepted(port: int, workers: set[int]) -> int:
    """How many connections to ``port`` the workers have accepted (server-side sockets they hold)."""
    established = _sockets(port, "01")
    return sum(len(_held(pid, established)) for pid in workers)


def sample(port: int, workers: set[int], count: int = 40) -> dict[int, set[str]]:
    """Open ``count`` connections from 4 threads; map each serving worker to the generations it sent."""
    seen: dict[int, set[str]] = {}
    lock = threading.Lock()

    def one() -> None:
        for _ in range(count // 4):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/x")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            pid = owner(conn, port, workers)
            conn.close()
            if pid is not None:
                with lock:
                    seen.setdefault(pid, set()).add(response.getheader("X-Stack-Generation") or "")

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return seen


def replaced(server_pid: int, victim: int) -> Callable[[], bool]:
    """A condition: the supervisor has two workers again and ``victim`` is not one of them."""

    def check() -> bool:
        now = children(server_pid)
        return len(now) == 2 and victim not in now

    return check


def a_new_worker_serves(server: ServeProcess, port: int, generation: str) -> set[int]:
    """Kill a worker: its replacement serves ``generation``, as its sibling does; return the workers now."""
    victim = min(children(server.pid))
    os.kill(victim, signal.SIGKILL)
    wait_until(replaced(server.pid, victim), what="a new worker")
    now = children(server.pid)
    seen = sample(port, now)
    assert set(seen) == now and all(gens == {generation} for gens in seen.values()), seen
    return now


def refuses(port: int) -> bool:
    """Whether a new connection to ``port`` is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.02)


def config_text(port: int, greeting: str = "one", factory: str = "stack_support:echo_app", server: str = "") -> str:
    return f"""
server:
  listen: 127.0.0.1:{port}
  workers: 2
  threads: 4
  generation_header: true
  {server}
app:
  factory: "{factory}"
  options: {{greeting: {greeting}}}
pipeline:
  - errors: {{}}
"""


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[ServeProcess, int, Path]]:
    """serve.py with two workers of the echo app; yields (process, port, config path)."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port))
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "3"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        yield server, port, path
    finally:
        server.stop()
        assert "Traceback" not in server.output(), server.output()


def test_both_workers_serve(supervised: tuple[ServeProcess, int, Path]) -> None:
    server, port, _ = supervised
    workers = children(server.pid)
    assert len(workers) == 2
    seen = sample(port, workers)
    assert set(seen) == workers, f"only {sorted(seen)} of {sorted(workers)} answered"
    assert all(gens == {"1"} for gens in seen.values())


def listening(port: int, pid: int) -> set[str]:
    """The listening sockets on 127.0.0.1:``port`` that process ``pid`` holds (socket inodes)."""
    return _held(pid, _sockets(port, "0A"))


def test_each_worker_listens_on_a_socket_of_its_own(supervised: tuple[ServeProcess, int, Path]) -> None:
    """SO_REUSEPORT sockets, one per worker, so the kernel spreads connections over the workers.

    On one shared socket whichever worker woke first took the connections: under load
    one worker often held all 16 keep-alive connections of a client while the other idled.
    """
    server, port, _ = supervised
    workers = children(server.pid)
    own = [listening(port, pid) for pid in workers]
    assert [len(held) for held in own] == [1, 1]
    assert own[0] != own[1]
    assert listening(port, server.pid) == own[0] | own[1]  # the supervisor keeps them for restarts
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=5) for _ in range(16)]
    try:
        holders: dict[int | None, int] = {}
        for conn in connections:
            conn.request("GET", "/x")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            pid = owner(conn, port, workers)
            holders[pid] = holders.get(pid, 0) + 1
    finally:
        for conn in connections:
            conn.close()
    assert set(holders) == workers, holders  # by hash: all 16 on one worker is 1 in 30,000


def test_a_second_server_on_the_same_port_is_refused(supervised: tuple[ServeProcess, int, Path],
                                                      tmp_path: Path) -> None:
    """SO_REUSEPORT must not let a second serve.py join the first one's port and split its traffic."""
    _, port, _ = supervised
    second = tmp_path / "second.yaml"
    second.write_text(config_text(port, greeting="two"))
    other = ServeProcess(second).start()
    try:
        assert other.proc is not None
        assert other.proc.wait(timeout=30) == 2
    finally:
        other.stop()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (server.listen in " in other.output()


def test_slots_fall_back_to_one_shared_socket(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Where SO_REUSEPORT cannot be set, the workers share one socket (and say so) instead of not starting."""
    import serve

    real = serve._bind

    def bind(listen: list[str], backlog: int, reuse_port: bool = False, warn: bool = True) -> list[socket.socket]:
        if reuse_port:
            raise OSError(92, "Protocol not available")
        return real(listen, backlog, warn=warn)

    monkeypatch.setattr(serve, "_bind", bind)
    with caplog.at_level("WARNING", logger="wsgistack"):
        slots = serve._slots([f"127.0.0.1:{free_port()}"], 16, 2)
    try:
        assert len(slots) == 2 and slots[0] is slots[1]
        assert "cannot bind a socket per worker ([Errno 92] Protocol not available); the workers share one" \
            in caplog.text
    finally:
        for sock in slots[0]:
            sock.close()


def test_slots_are_sockets_of_their_own() -> None:
    import serve

    slots = serve._slots([f"127.0.0.1:{free_port()}"], 16, 3)
    try:
        assert len({id(sock) for slot in slots for sock in slot}) == 3
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1 for slot in slots for sock in slot)
    finally:
        for slot in slots:
            for sock in slot:
                sock.close()


def _scrape(port: int, workers: set[int]) -> tuple[int | None, float]:
    """GET /metrics on a new connection: (the worker that answered, its count of GET /x 200)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    pid = owner(conn, port, workers)
    conn.close()
    assert response.status == 200
    total = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "wsgistack_http_requests_total" and s.labels == {"method": "GET", "route": "/x",
                                                                              "status": "200"})
    return pid, total



def test_every_worker_reports_the_requests_of_all(tmp_path: Path) -> None:
    """Whichever worker answers the scrape, the counts cover both; the shared files go at the end."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port) + "  - metrics: {process_metrics: false}\n")
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "3"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        workers = children(server.pid)
        found = re.search(r"workers share their metrics in (\S+)", server.output())
        assert found is not None, server.output()
        directory = Path(found.group(1))
        seen = sample(port, workers, count=40)
        assert set(seen) == workers  # both served some of the 40
        time.sleep(1.5)  # each has shared its counts since
        answered = {}
        for _ in range(12):
            pid, total = _scrape(port, workers)
            answered[pid] = total
        assert set(answered) == workers, f"only {sorted(map(str, answered))} answered the scrapes"
        assert set(answered.values()) == {40.0}
        assert directory.is_dir() and len(list(directory.glob("*.json"))) == 2
    finally:
        server.stop()
        assert "Traceback" not in server.output(), server.output()
    assert not directory.exists()


def test_one_process_keeps_its_counts_across_reloads(tmp_path: Path) -> None:
    """With one worker too, a reload's new pipeline adds the counts of the one it replaced."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    text = config_text(port).replace("workers: 2", "workers: 1") + "  - metrics: {process_metrics: false}\n"
    path.write_text(text)
    server = ServeProcess(path).start()
    try:
        wait_for_port(port)
        for generation, expected in ((1, 10.0), (2, 20.0), (3, 30.0)):
            if generation > 1:
                path.write_text(text.replace("greeting: one", f"greeting: g{generation}"))
                server.signal(signal.SIGHUP)
                server.wait_output(f"generation {generation} serving")
            for _ in range(10):
                assert request(port, "GET", "/x")[0] == 200
            assert _scrape(port, {server.pid})[1] == expected
    finally:
        server.stop()
        assert "Traceback" not in server.output(), server.output()


def test_a_killed_worker_is_replaced_while_requests_keep_succeeding(
        supervised: tuple[ServeProcess, int, Path]) -> None:
    server, port, _ = supervised
    before = children(server.pid)
    victim = min(before)
    with Load(port, [Req("GET", "/x")], threads=4, max_seconds=20, fresh_connections=True) as load:
        load.wait_for(50)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(replaced(server.pid, victim), what="a new worker")
        restarted_at = time.monotonic()
        load.wait_for(200)
    replacement = children(server.pid) - before
    assert len(replacement) == 1
    assert restarted_at - killed_at < 3
    # Only requests the dead worker held at the moment of the kill may fail (at most one per load thread).
    lost = load.failures()
    assert len(lost) <= 4, lost
    assert all(r.error and r.started <= killed_at + 0.5 and r.started + r.elapsed >= killed_at for r in lost), \
        (killed_at, lost)
    assert len(load.between(restarted_at)) >= 100
    assert "was killed by signal 9" in server.output()
    seen = sample(port, children(server.pid))
    assert set(seen) == children(server.pid)


@pytest.mark.parametrize("timeout", [1, 0], ids=["watched", "watch off"])
def test_a_stopped_worker_is_killed_and_replaced_after_worker_timeout(tmp_path: Path, timeout: int) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port, server=f"worker_timeout: {timeout}"))
    server = ServeProcess(path).start()
    victim = 0
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        time.sleep(1.5)  # idle workers beat on: none is taken for hung meanwhile
        before = children(server.pid)
        assert len(before) == 2 and "serving loop" not in server.output()
        victim = min(before)
        os.kill(victim, signal.SIGSTOP)  # hung: its loop makes no pass, the kernel still queues it connections
        stopped_at = time.monotonic()
        if timeout:
            wait_until(replaced(server.pid, victim), timeout=5, what="a new worker")
            assert time.monotonic() - stopped_at >= timeout
            assert not alive(victim)
            assert re.search(rf"worker {victim} has not run its serving loop for [\d.]+ s \(stopped, or stuck "
                             r"holding the interpreter\): killing it \(server.worker_timeout 1 s\)", server.output())
            assert f"worker {victim} was killed by signal 9" in server.output()
            seen = sample(port, children(server.pid))
            assert set(seen) == children(server.pid)  # the replacement serves, as its sibling does
        else:
            time.sleep(2.5)
            assert children(server.pid) == before and alive(victim)
            assert "serving loop" not in server.output()
            os.kill(victim, signal.SIGCONT)
    finally:
        if victim:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        server.stop()


def test_workers_stopped_with_their_supervisor_are_not_taken_for_hung(tmp_path: Path) -> None:
    """Ctrl-Z, docker pause, a frozen cgroup: the whole group stops, and the supervisor may resume first."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port, server="worker_timeout: 1"))
    server = ServeProcess(path).start()
    stopped: list[int] = []
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        workers = children(server.pid)
        for pid in [server.pid, *workers]:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        time.sleep(2.5)  # longer than worker_timeout
        os.kill(server.pid, signal.SIGCONT)
        time.sleep(0.4)  # the supervisor runs its loop before the workers run theirs
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        time.sleep(1.5)
        assert children(server.pid) == workers
        assert "serving loop" not in server.output()
        seen = sample(port, workers)
        assert set(seen) == workers
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        server.stop()


def test_sighup_reloads_every_worker_and_the_ones_started_later(
        supervised: tuple[ServeProcess, int, Path]) -> None:
    server, port, path = supervised
    workers = children(server.pid)
    path.write_text(config_text(port, greeting="two"))
    server.signal(signal.SIGHUP)
    for pid in workers:
        server.wait_output(f"worker {pid}: generation 2 serving")
    server.wait_output("supervisor: generation 2 serving")
    seen = sample(port, workers)
    assert seen == {pid: {"2"} for pid in workers}
    status, _, body = request(port, "GET", "/x")
    assert status == 200 and b'"option": "two"' in body

    # A worker started after the reload serves the reloaded configuration too.
    now = a_new_worker_serves(server, port, "2")

    # An invalid file reloads nowhere: the supervisor refuses it, and every worker keeps generation 2.
    path.write_text(config_text(port) + "  - corz: {}\n")
    server.signal(signal.SIGHUP)
    server.wait_output("supervisor: reload failed, generation 2 keeps serving")
    time.sleep(0.5)
    assert server.output().count("reload failed") == 1, server.output()
    assert all(gens == {"2"} for gens in sample(port, now).values())


def test_a_worker_whose_reload_failed_tries_again_until_it_serves_the_supervisors_generation(
        supervised: tuple[ServeProcess, int, Path], tmp_path: Path) -> None:
    """The supervisor built the new file; a worker that could not (a store that did not answer for a
    moment, say) does not stay on the old pipeline until the next reload: it tries again, less often."""
    server, port, path = supervised
    workers = children(server.pid)
    marker = tmp_path / "workers-cannot-build"
    marker.write_text(str(server.pid))  # the supervisor builds it, the workers fail to
    text = config_text(port, greeting="two", factory="stack_support:flaky_echo_app")
    path.write_text(text.replace("options: {greeting: two}", f"options: {{greeting: two, fail_while: '{marker}'}}"))
    server.signal(signal.SIGHUP)
    server.wait_output("supervisor: generation 2 serving")
    for pid in workers:
        server.wait_output(f"worker {pid}: reload failed")
    assert all(gens == {"1"} for gens in sample(port, workers).values())
    server.wait_output("behind the supervisor's 2: reloading again")  # first retry after WORKER_RETRY[0]
    marker.unlink()
    for pid in workers:
        server.wait_output(f"worker {pid}: generation 2 serving", timeout=15)
    assert sample(port, workers) == {pid: {"2"} for pid in workers}


def test_a_sighup_to_the_whole_group_reloads_each_worker_once(
        supervised: tuple[ServeProcess, int, Path]) -> None:
    """A terminal's hangup or `kill -HUP -PGID` reaches every worker as well as the supervisor: the
    supervisor's reload is the one, and each worker follows it once."""
    server, port, path = supervised
    workers = children(server.pid)
    path.write_text(config_text(port, greeting="two"))
    for pid in workers:  # the workers' copies first, as when the supervisor's comes a moment later
        os.kill(pid, signal.SIGHUP)
    time.sleep(0.5)
    assert "generation 2" not in server.output()  # a worker leaves it to the supervisor
    os.kill(server.pid, signal.SIGHUP)
    server.wait_output("supervisor: generation 2 serving")
    for pid in workers:
        server.wait_output(f"worker {pid}: generation 2 serving")
    time.sleep(0.5)
    assert "generation 3" not in server.output()
    assert sample(port, workers) == {pid: {"2"} for pid in workers}


def test_every_sighup_reloads_every_worker_also_right_after_another(
        supervised: tuple[ServeProcess, int, Path]) -> None:
    """Two `systemctl reload`s in a row, the second with stack.yaml unchanged (a key file it names was
    replaced in between, say): two reloads in the supervisor as in each worker, and a worker started
    later serves the very generation its siblings do."""
    server, port, path = supervised
    workers = children(server.pid)
    path.write_text(config_text(port, greeting="two"))
    server.signal(signal.SIGHUP)
    server.wait_output("supervisor: generation 2 serving")
    server.signal(signal.SIGHUP)  # the file as it was, a moment later
    server.wait_output("supervisor: generation 3 serving")
    for pid in workers:
        server.wait_output(f"worker {pid}: generation 3 serving")
    time.sleep(0.5)
    assert "generation 4" not in server.output()
    assert sample(port, workers) == {pid: {"3"} for pid in workers}
    a_new_worker_serves(server, port, "3")


def test_polling_reads_a_file_written_in_parts_once_it_settles(tmp_path: Path) -> None:
    """The supervisor polls (the workers follow it): a file still being written is not read half-way, and
    a worker started later serves the generation its sibling does."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    text = config_text(port).replace("  generation_header: true\n",
                                     "  generation_header: true\n  reload: {watch: true, interval: 0.5}\n")
    path.write_text(text)
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "3"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        edited = text.replace("greeting: one", "greeting: two")
        head, tail = edited.split("pipeline:")
        with path.open("w") as out:  # a slow copy: a shorter, valid file first, then the rest
            out.write(head)
            out.flush()
            for _ in range(3):
                time.sleep(0.3)
                out.write("#" * 10 + "\n")
                out.flush()
            out.write("pipeline:" + tail)
        for pid in children(server.pid):
            server.wait_output(f"worker {pid}: generation 2 serving")
        server.wait_output("supervisor: generation 2 serving")
        time.sleep(1.2)
        assert "generation 3" not in server.output(), server.output()
        a_new_worker_serves(server, port, "2")
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()


def _supervisor_generation(server: ServeProcess) -> str:
    """The generation the supervisor serves now (the one it starts workers with), from its log lines."""
    found = re.findall(r"supervisor: generation (\d+) serving", server.output())
    return found[-1] if found else "1"


def every_worker_at_the_supervisors_generation(server: ServeProcess, port: int) -> str:
    """Wait for every worker to answer with the supervisor's generation; return it."""
    generation = _supervisor_generation(server)
    workers = children(server.pid)
    seen: dict[int, set[str]] = {}

    def settled() -> bool:
        seen.clear()
        seen.update(sample(port, workers, count=16))
        return set(seen) == workers and all(gens == {generation} for gens in seen.values())

    with contextlib.suppress(AssertionError):
        wait_until(settled, timeout=3)
    assert settled(), (f"the supervisor serves generation {generation}, the workers {seen}",
                       server.output()[-3000:])
    return generation


def test_sighups_seconds_apart_reload_every_worker_as_the_supervisor(
        supervised: tuple[ServeProcess, int, Path]) -> None:
    """Each SIGHUP the supervisor takes for a reload is one in every worker too, however late a worker's
    serving loop gets to it: two SIGHUPs a couple of seconds apart, the file unchanged, the first
    reaching idle workers (their loop acts on it up to a tick later) and the second busy ones (at once),
    twice, leave every worker (and one started later) at the supervisor's generation."""
    server, port, _ = supervised
    workers = children(server.pid)
    for _ in range(2):
        server.signal(signal.SIGHUP)
        time.sleep(2.02)
        server.signal(signal.SIGHUP)
        sample(port, workers, count=16)
        time.sleep(2.3)  # idle again
    generation = every_worker_at_the_supervisors_generation(server, port)
    assert generation == "5", server.output()[-3000:]
    a_new_worker_serves(server, port, generation)


def test_polling_with_workers_leaves_every_worker_at_the_supervisors_generation(tmp_path: Path) -> None:
    """Only the supervisor polls the file: edits that come about an interval apart are as many reloads
    in every worker as in the supervisor (a worker polling on its own schedule saw some as one)."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    text = config_text(port, server="reload: {watch: true, interval: 0.2}")
    path.write_text(text)
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "3"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        a_new_worker_serves(server, port, "1")  # a worker started later than the supervisor's first poll
        for n, pause in enumerate((0.23, 0.29, 0.35, 0.27, 0.31, 0.25, 0.37, 0.33) * 2):  # across the poll's phase
            path.write_text(text.replace("greeting: one", f"greeting: edit{'x' * n}"))
            time.sleep(pause)
        time.sleep(1.0)
        assert int(every_worker_at_the_supervisors_generation(server, port)) > 2
        status, _, body = request(port, "GET", "/x")
        assert status == 200 and b'"option": "edit' + b"x" * 15 + b'"' in body
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()


def test_a_shorter_interval_applies_at_once_in_the_supervisor(tmp_path: Path) -> None:
    """A SIGHUP that shortens reload.interval from an hour has the supervisor poll at the new interval from
    then on, not once the hour it was waiting out has passed."""
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port, server="reload: {watch: true, interval: 3600}"))
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "3"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        path.write_text(config_text(port, server="reload: {watch: true, interval: 0.1}"))
        server.signal(signal.SIGHUP)
        server.wait_output("supervisor: generation 2 serving")
        time.sleep(0.3)
        path.write_text(config_text(port, greeting="two", server="reload: {watch: true, interval: 0.1}"))
        server.wait_output("supervisor: generation 3 serving", timeout=3)
        assert every_worker_at_the_supervisors_generation(server, port) == "3"
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()


@pytest.mark.parametrize("everyone", [
    pytest.param(False, id="SIGTERM to the supervisor"),
    pytest.param(True, id="SIGTERM to every process, as systemd and a terminal's Ctrl-C do"),
])
def test_sigterm_drains_requests_in_flight_and_leaves_no_process(tmp_path: Path, everyone: bool) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port, factory="loadgen:slow_app"))
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "5"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        workers = children(server.pid)
        results: list[tuple[int, bytes]] = []

        def slow() -> None:
            results.append(request(port, "GET", "/?sleep=2.0", timeout=15)[::2])

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: accepted(port, workers) == 4, what="four requests in flight")
        server.signal(signal.SIGTERM)
        if everyone:
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
        # Nothing accepts new connections any more, well before the requests in flight (2 s) end.
        wait_until(lambda: refuses(port), timeout=1.8, what="the listening socket to close")
        for t in threads:
            t.join(15)
        assert server.proc is not None
        code = server.proc.wait(timeout=10)
    finally:
        server.stop()
    assert code == 0, server.output()
    assert results == [(200, b'{"slept": 2.0}')] * 4
    assert not any(alive(pid) for pid in workers)
    assert "Traceback" not in server.output()


def test_sigterm_in_one_process_mode_drains_too(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port, factory="loadgen:slow_app").replace("workers: 2", "workers: 1"))
    server = ServeProcess(path).start()
    try:
        wait_for_port(port)
        results: list[int] = []
        thread = threading.Thread(target=lambda: results.append(request(port, "GET", "/?sleep=0.8")[0]))
        thread.start()
        wait_until(lambda: accepted(port, {server.pid}) == 1, what="the request in flight")
        server.signal(signal.SIGTERM)
        thread.join(10)
        assert server.proc is not None
        code = server.proc.wait(timeout=10)
    finally:
        server.stop()
    assert (code, results) == (0, [200])


@pytest.mark.parametrize(("env", "outcome"), [
    pytest.param({}, (1, "connection closed"), id="server.drain_timeout: 0.5 cuts a 3 s request short"),
    pytest.param({"WSGISTACK_DRAIN_SECONDS": "6"}, (0, 200), id="the environment overrides it"),
])
def test_drain_timeout_from_the_configuration(tmp_path: Path, env: dict[str, str],
                                              outcome: tuple[int, int | str]) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    text = config_text(port, factory="loadgen:slow_app").replace("workers: 2", "workers: 1\n  drain_timeout: 0.5")
    path.write_text(text)
    server = ServeProcess(path, env=env).start()
    results: list[int | str] = []

    def slow() -> None:
        try:
            results.append(request(port, "GET", "/?sleep=3.0", timeout=15)[0])
        except (OSError, http.client.HTTPException):
            results.append("connection closed")

    try:
        wait_for_port(port)
        thread = threading.Thread(target=slow)
        thread.start()
        wait_until(lambda: accepted(port, {server.pid}) == 1, what="the request in flight")
        stopping = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        code = server.proc.wait(timeout=15)
        stopped = time.monotonic() - stopping
        thread.join(15)
    finally:
        server.stop()
    assert (code, *results) == outcome, server.output()
    if code == 1:
        assert stopped < 2.5
        assert "1 connection(s) still busy after 0.5 s; closing them" in server.output()


def test_a_supervisor_killed_outright_leaves_no_orphans(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(port))
    server = ServeProcess(path).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        workers = children(server.pid)
        server.signal(signal.SIGKILL)
        # The kernel tells the workers at once (PR_SET_PDEATHSIG): they stop well within their
        # once-a-second orphan check, and free the port for a restart right away.
        wait_until(lambda: not any(alive(pid) for pid in workers), timeout=0.9, what="the orphans stopping")
    finally:
        server.stop()
    assert "the supervisor (pid" in server.output()
    found = re.search(r"workers share their metrics in (\S+)", server.output())
    assert found is not None and os.path.isdir(found.group(1))  # killed outright, it could not remove it
    again = ServeProcess(path).start()
    try:
        again.wait_output("workers share their metrics in", count=2)  # the log file is the first server's too
        assert not os.path.exists(found.group(1))  # the next supervisor removes what a dead one left
    finally:
        again.stop()
        shutil.rmtree(found.group(1), ignore_errors=True)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        pytest.param("session: {secret_key: '" + "s" * 32 + "'}",
                     "session keeps state in store 'shared' (memory://) but server.workers is 2: each process "
                     "would have its own copy; use redis://", id="session"),
        pytest.param("ratelimit: {limits: ['10/minute']}",
                     "ratelimit keeps state in store 'shared' (memory://) but server.workers is 2", id="ratelimit"),
        pytest.param("auth: {secret: '" + "j" * 32 + "'}",
                     "auth keeps state in store 'shared' (memory://) but server.workers is 2", id="auth"),
    ],
)
def test_check_refuses_per_process_state_with_workers(tmp_path: Path, layer: str, message: str) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(config_text(free_port()) + f"  - {layer}\nstores: {{shared: 'memory://'}}\n")
    check = ServeProcess(path, command="check").start()
    assert check.proc is not None
    code = check.proc.wait(timeout=60)
    check.stop()
    assert code == 2, check.output()
    assert message in check.output()
    assert "error" in check.output().splitlines()[0] or "stack.yaml:" in check.output().splitlines()[0]


def test_a_heartbeat_read_half_written_is_no_silence() -> None:
    """struct's pack_into zeroes a stamp before it writes it: a supervisor reading in between saw 0 and
    killed a healthy worker for one 'silent since the clock began'. A stamp is one store, and 0 is no silence."""
    import serve

    beats = serve._Beats(2)
    try:
        beats.stamp(0, 100.0)
        assert beats.silent(0, 130.5) == 30.5
        assert beats.silent(1, 6224.8) == 0.0  # never stamped, or caught half written
    finally:
        beats.close()


def test_each_generation_is_published_with_the_text_it_was_built_from() -> None:
    """The start's generation has no text (the workers were forked with its pipeline); each later one
    has its own, in the file the one before did not use, and the same generation is not written twice
    (a worker may be reading it)."""
    import serve

    beats = serve._Beats(2)
    try:
        assert beats.published() == (1, None)
        steps = [(2, "two: 2\n", (2, "two: 2\n")), (3, "three: 3\n", (3, "three: 3\n")),
                 (3, "other\n", (3, "three: 3\n")), (4, "four\n", (4, "four\n")), (5, "", (5, ""))]
        for generation, text, expected in steps:
            beats.publish(generation, text)
            assert beats.published() == expected
            assert beats.generation() == expected[0]
    finally:
        beats.close()

def greetings(port: int, workers: set[int]) -> dict[int, set[tuple[str, str]]]:
    """Map each worker that answered to the (generation, greeting) pairs it sent."""
    seen: dict[int, set[tuple[str, str]]] = {}
    for _ in range(24):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/x")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200
        pid = owner(conn, port, workers)
        conn.close()
        if pid is not None:
            seen.setdefault(pid, set()).add((response.getheader("X-Stack-Generation") or "", body["option"]))
    return seen


def test_every_worker_builds_the_text_the_supervisor_built(tmp_path: Path) -> None:
    """A generation is one configuration in every process: a file edited again while the supervisor
    builds (no SIGHUP yet) is not what the workers serve under the supervisor's generation number;
    they build the text the supervisor read, as a worker started later has it."""
    port, hold = free_port(), tmp_path / "hold"
    path = tmp_path / "stack.yaml"

    def text(greeting: str) -> str:
        return config_text(port, greeting=greeting, factory="stack_support:held_echo_app").replace(
            f"greeting: {greeting}", f"greeting: {greeting}, hold: '{hold}'")

    path.write_text(text("one"))
    server = ServeProcess(path, env={"WSGISTACK_DRAIN_SECONDS": "3"}).start()
    try:
        wait_for_port(port)
        wait_until(lambda: len(children(server.pid)) == 2, what="two workers")
        workers = children(server.pid)
        hold.write_text(str(server.pid))  # the supervisor's build waits until the file is gone
        path.write_text(text("two"))
        server.signal(signal.SIGHUP)
        wait_until(Path(f"{hold}.building").exists, what="the supervisor's build")
        path.write_text(text("three"))  # edited again while it builds, reloaded later
        hold.unlink()
        server.wait_output("supervisor: generation 2 serving")
        for pid in workers:
            server.wait_output(f"worker {pid}: generation 2 serving")
        assert greetings(port, workers) == {pid: {("2", "two")} for pid in workers}, server.output()[-3000:]
        now = a_new_worker_serves(server, port, "2")
        assert greetings(port, now) == {pid: {("2", "two")} for pid in now}

        server.signal(signal.SIGHUP)  # and the next reload brings the edit everywhere
        for pid in now:
            server.wait_output(f"worker {pid}: generation 3 serving")
        assert greetings(port, now) == {pid: {("3", "three")} for pid in now}
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()
