"""Over HTTP under Waitress: requests/s, p50/p99 latency and peak RSS of the server process.

Every server is a separate process on a free loopback port, started the way an
operator starts it: wsgistack stacks with ``python serve.py -c FILE serve``,
bare Flask and the peer stack with ``python -m bench.peer`` (Waitress with the
settings serve.py gives bench/full.yaml).  Load comes from ``wrk`` (one thread,
keep-alive), or from a small Python load generator when wrk is missing.  Each
run is bounded in time.  All servers are started first and warmed up (caches
filled, Waitress's threads started); then the loads run in interleaved rounds,
every load once per round (loads compared with each other run back to back, the
order reversed every other round),
and each figure is the median of its rounds, a ratio the median of the
per-round ratios, so a burst of load on a shared machine does not land on one
case only.  Peak RSS
is the kernel's high-water mark (``VmHWM``) of the server process, and of each
worker process when there are several.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BROWSER_HEADERS, PYTHON, ROOT, free_port, wait_for_port


@dataclass
class Load:
    """One measured run."""

    label: str
    server: str
    path: str
    connections: int
    seconds: float
    command: str = ""
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    rss_mib: float = float("nan")
    rounds: list[Load] = field(default_factory=list)

    def settle(self) -> None:
        """Take the median of the rounds as the figures."""
        if self.rounds:
            self.rps = statistics.median(r.rps for r in self.rounds)
            self.p50_ms = statistics.median(r.p50_ms for r in self.rounds)
            self.p99_ms = statistics.median(r.p99_ms for r in self.rounds)
            self.requests = sum(r.requests for r in self.rounds)
            self.errors = sum(r.errors for r in self.rounds)
            self.command = self.rounds[0].command


@dataclass
class Server:
    """A server process under test."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    port: int = 0
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None
    peak_rss: dict[int, float] = field(default_factory=dict)

    @property
    def shown(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items() if k.startswith(("WSGISTACK_WORKERS", "REDIS")))
        return (env + " " if env else "") + " ".join(self.command).replace(PYTHON, "python")

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, **self.env, "WSGISTACK_LISTEN": f"127.0.0.1:{self.port}", "PYTHONUNBUFFERED": "1"}
        command = [part.replace("{port}", str(self.port)) for part in self.command]
        handle = open(self.log, "ab")  # noqa: SIM115 - the child keeps its own descriptor
        try:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=handle,
                                         start_new_session=True)
        finally:
            handle.close()
        wait_for_port(self.port, 60, self.proc)

    def pids(self) -> list[int]:
        """The server process and its worker processes."""
        if self.proc is None:
            return []
        pids = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children", encoding="ascii") as handle:
                pids += [int(p) for p in handle.read().split()]
        except OSError:
            pass
        return pids

    def record_rss(self) -> None:
        for pid in self.pids():
            peak = vm_hwm(pid)
            if peak == peak:  # not NaN
                self.peak_rss[pid] = max(peak, self.peak_rss.get(pid, 0.0))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session, workers included
            proc.wait(timeout=10)


def vm_hwm(pid: int) -> float:
    """Peak resident set size of ``pid`` in MiB (``VmHWM``), NaN when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request (warm-ups and checks)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={**BROWSER_HEADERS, **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- load generators

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_command(port: int, path: str, connections: int, seconds: float) -> list[str]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    for name, value in BROWSER_HEADERS.items():
        command += ["-H", f"{name}: {value}"]
    return [*command, f"http://127.0.0.1:{port}{path}"]


def run_wrk(load: Load, port: int) -> None:
    command = wrk_command(port, load.path, load.connections, load.seconds)
    load.command = " ".join(f"'{c}'" if " " in c else c for c in command).replace(str(port), "PORT")
    out = subprocess.run(command, capture_output=True, text=True, timeout=load.seconds + 30, check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            load.rps = float(parts[1])
        elif len(parts) == 2 and parts[0] == "50%":
            load.p50_ms = _ms(parts[1])
        elif len(parts) == 2 and parts[0] == "99%":
            load.p99_ms = _ms(parts[1])
        elif "requests in" in line:
            load.requests = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            load.errors += int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            load.errors += sum(int(n) for n in re.findall(r"\d+", line))
    if load.rps == 0.0:
        raise RuntimeError(f"wrk gave no result for {load.label}:\n{out}")


def run_python(load: Load, port: int) -> None:
    """A keep-alive load generator: one thread per connection, latencies of every request."""
    load.command = f"python load generator: {load.connections} connections, {load.seconds:g} s"
    deadline = time.perf_counter() + load.seconds
    latencies: list[list[float]] = [[] for _ in range(load.connections)]
    errors = [0] * load.connections

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                conn.request("GET", load.path, headers=BROWSER_HEADERS)
                response = conn.getresponse()
                response.read()
                if response.status >= 400:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            latencies[i].append((time.perf_counter() - start) * 1e3)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(load.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    every = sorted(x for per in latencies for x in per)
    load.requests = len(every)
    load.rps = len(every) / elapsed
    if every:
        load.p50_ms = statistics.median(every)
        load.p99_ms = every[min(len(every) - 1, int(len(every) * 0.99))]
    load.errors = sum(errors)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def ratio(a: Load, b: Load) -> float:
    """Median over the rounds of ``a``'s requests/s over ``b``'s in the same round."""
    if not a.rounds or len(a.rounds) != len(b.rounds):
        return a.rps / b.rps if b.rps else float("nan")
    return statistics.median(x.rps / y.rps for x, y in zip(a.rounds, b.rounds, strict=True))


def cpu_ticks(pids: list[int]) -> int:
    """User plus system clock ticks used so far by ``pids`` (from /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total


def settle(servers: list[Server], limit: float = 10.0) -> None:
    """Wait until every server has finished the backlog a load left behind (idle CPU), at most ``limit`` s.

    A server still answering the queue of a 64-connection run would otherwise
    take the CPU from whichever case is measured next.
    """
    pids = [pid for server in servers for pid in server.pids()]
    deadline = time.monotonic() + limit
    before = cpu_ticks(pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = cpu_ticks(pids)
        if now - before <= 2:  # at most 20 ms of CPU in 200 ms: idle
            return
        before = now


def measure(plan: list[tuple[Server, list[Load]]], rounds: int, warmup: float, order: list[Load] | None = None,
            progress: Callable[[str], None] = lambda text: None) -> None:
    """Start every server, warm each load up, run the loads in interleaved rounds, stop the servers.

    ``order`` is the order of the loads within a round (default: as in ``plan``).
    """
    runner = run_wrk if have_wrk() else run_python
    started: list[Server] = []
    try:
        for server, loads in plan:
            progress(f"http: starting {server.name}: {server.shown}")
            server.start()
            started.append(server)
            for load in loads:
                for _ in range(3):  # fills the cache; the first search opens the index
                    status, _, body = get(server.port, load.path)
                    if status != 200:
                        raise RuntimeError(f"{server.name} {load.path}: {status} {body[:200]!r}")
                runner(Load(load.label, load.server, load.path, load.connections, warmup), server.port)
                settle(started)
        server_of = {id(load): server for server, loads in plan for load in loads}
        sequence = order or [load for _, loads in plan for load in loads]
        for i in range(rounds):
            # Every other round in reverse: no load always runs first (or last) among those compared with it.
            for load in sequence if i % 2 == 0 else sequence[::-1]:
                server = server_of[id(load)]
                sample = Load(load.label, load.server, load.path, load.connections, load.seconds)
                settle(started)
                runner(sample, server.port)
                load.rounds.append(sample)
                server.record_rss()
            progress(f"  round {i + 1}/{rounds}")
        for server, loads in plan:
            for load in loads:
                load.settle()
                load.rss_mib = sum(server.peak_rss.values())
    finally:
        for server in started:
            server.stop()
