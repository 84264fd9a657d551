"""Soak: minutes of mixed traffic against a real serve.py; report errors, p99 and memory growth.

    python tests/soak.py                       # 5 minutes, one process, memory:// stores
    python tests/soak.py --seconds 60 --workers 2 --redis redis://127.0.0.1:6379/15
    python tests/soak.py --reload-every 30     # SIGHUP every 30 s while the load runs

It writes a stack.yaml with every built-in layer into a temporary folder,
adds a user, starts ``serve.py`` there and sends a mix of anonymous, token
and session requests, searches (cache hits and misses), event streams, 4xx
refusals and probes from ``--threads`` keep-alive clients.  Memory is the
resident set (VmRSS) of the server and its workers, sampled every second;
growth is measured from the end of the warm-up (``--warmup``, default a fifth
of the run) to the end.  The goals: no 5xx and no connection error, p99 under
``--p99-ms`` and RSS growth under ``--max-growth`` percent.  The exit code is 0
when every goal is met and 1 otherwise.  Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from conftest import free_port, wait_for_port  # noqa: E402
from loadgen import Load, Req, Result, ServeProcess, full_stack, percentile, request  # noqa: E402

from app.users import UserStore  # noqa: E402

WORDS = ["json", "decode", "encoder", "load", "dumps", "parse", "float", "object", "error", "indent", "sort",
         "keys", "separators", "unicode", "ascii", "scanner", "string", "number", "array", "hook"]
PASSWORD = "correct horse battery"


class Credentials:
    """A token and a session cookie for the ``soak`` user, renewed in the background."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.token, self.cookie = "", ""
        self.renew()

    def renew(self) -> None:
        body = json.dumps({"username": "soak", "password": PASSWORD}).encode()
        status, headers, data = request(self.port, "POST", "/auth/login", [("Content-Type", "application/json")],
                                        body)
        if status != 200:
            raise RuntimeError(f"login failed with {status}: {data[:200]!r}")
        self.token = json.loads(data)["access_token"]
        self.cookie = headers["set-cookie"].split(";", 1)[0]


def make_plan(creds: Credentials, seed: int) -> Callable[[int, int], Req]:
    rng = random.Random(seed)
    lock = threading.Lock()

    def plan(thread: int, n: int) -> Req:
        with lock:
            roll = rng.random()
            word = rng.choice(WORDS)
            page = rng.randint(1, 3)
        if roll < 0.25:
            return Req("GET", "/api/v1/health", name="health")
        if roll < 0.45:
            return Req("GET", f"/api/v1/search?q={word}&page={page}", name="search v1")
        if roll < 0.55:
            return Req("GET", f"/api/v2/search?q={word}", (("Origin", "http://localhost:3000"),), name="search v2")
        if roll < 0.60:
            return Req("GET", f"/api/v1/search/stream?q={word}", name="stream")
        if roll < 0.70:
            return Req("GET", "/api/v1/config", (("Authorization", f"Bearer {creds.token}"),), name="bearer")
        if roll < 0.78:
            return Req("GET", "/api/v1/health", (("Cookie", creds.cookie),), name="session")
        if roll < 0.84:
            return Req("GET", "/api/v1/nope", name="404")
        if roll < 0.88:
            return Req("GET", "/api/v1/search?q=", name="400")
        if roll < 0.92:
            return Req("POST", "/auth/refresh", (("Content-Type", "application/json"),), b'{"refresh_token": "x"}',
                       name="401")
        if roll < 0.96:
            return Req("GET", "/readyz", name="readyz")
        return Req("GET", "/metrics", name="metrics")

    return plan


class Tally:
    """Aggregates results without keeping them: counts, statuses and latencies per kind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, array[float]] = {}
        self.statuses: dict[str, dict[str, int]] = {}
        self.failures: list[Result] = []

    def __call__(self, result: Result) -> None:
        with self.lock:
            self.latency.setdefault(result.name, array("d")).append(result.elapsed)
            key = str(result.status) if result.error is None else "error"
            counts = self.statuses.setdefault(result.name, {})
            counts[key] = counts.get(key, 0) + 1
            if not result.ok and len(self.failures) < 50:
                self.failures.append(result)

    def all_latencies(self) -> list[float]:
        return [x for values in self.latency.values() for x in values]

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def failed(self) -> int:
        return sum(n for c in self.statuses.values() for k, n in c.items() if k == "error" or k.startswith("5"))


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children, in KiB."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            pids += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to send traffic (default 300)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before memory is measured "
                                                                   "(default: a fifth of --seconds)")
    parser.add_argument("--threads", type=int, default=4, help="client connections (default 4)")
    parser.add_argument("--pause", type=float, default=0.002, help="seconds each client waits between requests")
    parser.add_argument("--workers", type=int, default=1, help="server.workers (more than 1 needs --redis)")
    parser.add_argument("--redis", help="a redis:// URL for the stores (default memory://)")
    parser.add_argument("--reload-every", type=float, default=0.0, help="send SIGHUP every N seconds (0: never)")
    parser.add_argument("--p99-ms", type=float, default=250.0, help="p99 goal in ms (default 250)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth goal in percent (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (config, logs)")
    args = parser.parse_args(argv)
    if args.workers > 1 and not args.redis:
        parser.error("--workers > 1 needs --redis: sessions, limits and tokens must be shared")
    warmup = args.seconds / 5 if args.warmup is None else args.warmup

    folder = Path(tempfile.mkdtemp(prefix="wsgistack-soak-"))
    port = free_port()
    config = folder / "stack.yaml"
    config.write_text(full_stack(port, folder / "var", store=args.redis or "memory://", workers=args.workers))
    UserStore(str(folder / "var" / "users.sqlite3")).add("soak", PASSWORD, ["user"])
    server = ServeProcess(config, folder / "serve.log").start()
    tally = Tally()
    samples: list[tuple[float, int]] = []
    code = 1
    try:
        wait_for_port(port, timeout=30)
        creds = Credentials(port)
        print(f"soak: {args.seconds:.0f} s against serve.py pid {server.pid} on 127.0.0.1:{port} "
              f"({args.workers} worker(s), {args.redis or 'memory://'}), folder {folder}", flush=True)
        started = time.monotonic()
        next_reload = started + args.reload_every if args.reload_every else float("inf")
        next_login = started + 60
        next_print = started + 30
        reloads = 0
        with Load(port, make_plan(creds, 1), threads=args.threads, max_seconds=args.seconds, pause=args.pause,
                  max_requests=10**9, timeout=10, sink=tally) as load:
            while load.running:
                time.sleep(1.0)
                now = time.monotonic()
                samples.append((now - started, rss_kib(server.pid)))
                if now >= next_reload:
                    server.signal(signal.SIGHUP)
                    reloads += 1
                    next_reload += args.reload_every
                if now >= next_login:
                    creds.renew()
                    next_login += 60
                if now >= next_print:
                    next_print += 30
                    print(f"  {now - started:5.0f} s  {tally.total():8d} requests  {tally.failed():4d} failed  "
                          f"rss {samples[-1][1] / 1024:.1f} MiB", flush=True)
        code = report(args, tally, samples, warmup, reloads)
    finally:
        exit_code = server.stop()
        if exit_code != 0:
            print(f"FAIL: serve.py exited with {exit_code}")
            code = 1
        if "Traceback" in server.output():
            print(f"FAIL: the server log has a traceback: {folder / 'serve.log'}")
            code = 1
        if args.keep or code:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return code


def report(args: argparse.Namespace, tally: Tally, samples: list[tuple[float, int]], warmup: float,
           reloads: int) -> int:
    print(f"\n{'kind':<12} {'count':>8} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for name in sorted(tally.latency):
        values = tally.latency[name]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses[name].items()))
        print(f"{name:<12} {len(values):8d} {percentile(values, 50) * 1000:8.1f} "
              f"{percentile(values, 99) * 1000:8.1f}  {statuses}")
    everything = tally.all_latencies()
    p99 = percentile(everything, 99) * 1000 if everything else float("inf")
    after = [rss for t, rss in samples if t >= warmup]
    base, end = (after[0], after[-1]) if len(after) >= 2 else (0, 0)
    growth = (end - base) / base * 100 if base else float("inf")
    print(f"\nrequests {tally.total()}, failed {tally.failed()}, p99 {p99:.1f} ms, reloads {reloads}")
    print(f"rss after warm-up {base / 1024:.1f} MiB, at the end {end / 1024:.1f} MiB "
          f"(max {max((r for _, r in samples), default=0) / 1024:.1f} MiB), growth {growth:+.2f} %")
    missed = []
    if tally.failed():
        missed.append(f"{tally.failed()} failed request(s), e.g. {tally.failures[:3]}")
    if p99 > args.p99_ms:
        missed.append(f"p99 {p99:.1f} ms is over {args.p99_ms:.0f} ms")
    if growth >= args.max_growth:
        missed.append(f"RSS grew {growth:.2f} % (goal < {args.max_growth:.0f} %)")
    for line in missed:
        print(f"FAIL: {line}")
    if not missed:
        print("ok: every goal met")
    return 1 if missed else 0


if __name__ == "__main__":
    os.environ.setdefault("WSGISTACK_LOG_LEVEL", "WARNING")
    sys.exit(main())
