"""``make bench``: every measurement in one run, written to bench/RESULTS.md and printed.

    python -m bench            # the full run (a few minutes)
    python -m bench --quick    # a smoke run (under a minute): fewer rounds, shorter loads

Sections: in-process µs per request, HTTP under Waitress (requests/s, p50/p99,
peak RSS), Redis commands per request by layer, and the goals, each judged on
ratios measured in this same run.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import http, inproc, layer_cost, redis_count, stacks
from bench.common import FULL_YAML, PYTHON, ROOT, Workspace, access_logging, machine
from bench.stacks import HEALTH, SEARCH

RESULTS = ROOT / "bench" / "RESULTS.md"


@dataclass(frozen=True)
class Settings:
    rounds: int
    sample_seconds: float
    load_seconds: float
    warmup_seconds: float
    http_rounds: int
    redis_requests: int


FULL = Settings(rounds=31, sample_seconds=0.012, load_seconds=2, warmup_seconds=1, http_rounds=5, redis_requests=20)
QUICK = Settings(rounds=5, sample_seconds=0.004, load_seconds=1, warmup_seconds=1, http_rounds=1, redis_requests=5)


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- sections


def run_inproc(ws: Workspace, settings: Settings, redis: bool) -> inproc.Result:
    say("in-process: building the stacks")
    built = stacks.inproc_stacks(ws, redis)
    try:
        cases = inproc.prepare(built)
        say(f"in-process: {len(cases)} cases, {settings.rounds} interleaved rounds")
        return inproc.measure(cases, settings.rounds, settings.sample_seconds, say)
    finally:
        for stack in built:
            stack.close()


def stateless_yaml(ws: Workspace) -> Path:
    """bench/full.yaml without its stateful layers (so several workers need no shared store) and csrf."""
    dropped = {*redis_count.STATEFUL, "csrf"}  # csrf guards the session cookie: nothing to guard without one
    return stacks.pipeline_subset(ws, "stateless.yaml", lambda layer: layer not in dropped,
                                  "bench/full.yaml without ratelimit, session, csrf, auth and cache")


def http_servers(ws: Workspace, settings: Settings) -> list[tuple[http.Server, list[http.Load]]]:
    s = settings.load_seconds
    var = str(ws.var_dir)
    serve = [PYTHON, "serve.py", "-c", str(FULL_YAML.relative_to(ROOT)), "serve"]
    stateless = [PYTHON, "serve.py", "-c", str(stateless_yaml(ws)), "serve"]
    plain = [PYTHON, "-m", "bench.peer", "--listen", "127.0.0.1:{port}", "--var-dir", var]
    names: list[str] = []

    def server(name: str, command: list[str], redis: bool = False, **env: str) -> http.Server:
        log = ws.path / f"server-{len(names)}.log"
        names.append(name)
        return http.Server(name, command, ws.env(redis=redis, **env), log,
                           workers=int(env.get("WSGISTACK_WORKERS", "1")))

    def load(label: str, srv: str, path: str, connections: int = 8) -> http.Load:
        return http.Load(label, srv, path, connections, s)

    servers = [
        # Bare Flask at every connection count another server is loaded with: each ratio compares equal loads.
        (server("bare Flask", [*plain, "--bare"]),
         [load("bare Flask", "bare Flask", HEALTH), load("bare Flask", "bare Flask", SEARCH),
          load("bare Flask", "bare Flask", HEALTH, 16), load("bare Flask", "bare Flask", HEALTH, 64)]),
        (server("full stack", serve, WSGISTACK_WORKERS="1"),
         [load("full stack", "full stack", HEALTH),
          load("full stack", "full stack", HEALTH, 64),
          load("full stack (cache hit)", "full stack", SEARCH)]),
        # Several workers need shared state (serve.py check refuses memory stores), so both use Redis.
        (server("full stack Redis, workers 1", serve, WSGISTACK_WORKERS="1", redis=True),
         [load("full stack (Redis), workers: 1", "full stack (Redis), workers: 1", HEALTH, 16)]),
        (server("full stack Redis, workers 2", serve, WSGISTACK_WORKERS="2", redis=True),
         [load("full stack (Redis), workers: 2", "full stack (Redis), workers: 2", HEALTH, 16)]),
        # The same without a store process competing for the two cores.
        (server("stateless layers, workers 1", stateless, WSGISTACK_WORKERS="1"),
         [load("stateless layers, workers: 1", "stateless layers, workers: 1", HEALTH, 16)]),
        (server("stateless layers, workers 2", stateless, WSGISTACK_WORKERS="2"),
         [load("stateless layers, workers: 2", "stateless layers, workers: 2", HEALTH, 16)]),
        (server("peer stack", plain),
         [load("peer stack", "peer stack", HEALTH), load("peer stack (cache hit)", "peer stack", SEARCH)]),
    ]
    return [(srv, loads) for srv, loads in servers if ws.redis is not None or "REDIS_URL" not in srv.env]


def run_http(ws: Workspace, settings: Settings) -> tuple[list[http.Load], list[http.Server]]:
    plan = http_servers(ws, settings)
    loads = [load for _, server_loads in plan for load in server_loads]
    # Within a round, loads that are compared run back to back.
    order = sorted(loads, key=lambda x: (x.connections, x.path, x.label))
    http.measure(plan, settings.http_rounds, settings.warmup_seconds, order, say)
    for server, loads in plan:
        for load in loads:
            say(f"  {server.name}, {load.path} c{load.connections}: {load.rps:.0f} req/s, "
                f"p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms, errors {load.errors}, "
                f"peak RSS {load.rss_mib:.1f} MiB")
    return [load for _, loads in plan for load in loads], [server for server, _ in plan]


# ---------------------------------------------------------------- goals and report


@dataclass
class Goal:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x or math.isinf(x) else f"{x:.{digits}f}"


def goals(result: inproc.Result, loads: list[http.Load], deltas: list[dict[str, Any]] | None) -> list[Goal]:
    out = []
    profiles = [p.label for p in inproc.PROFILES]

    def ratio_goal(stack: str, limit: float, text: str) -> Goal:
        ratio = result.ratio(stack, "health")
        others = ", ".join(f"{p}: {_fmt(result.ratio(stack, p))}x" for p in profiles[1:])
        return Goal(text, f"{_fmt(ratio, 3)}x on health ({others})", ratio <= limit)  # 3 places: 2.004 is no 2.00

    out.append(ratio_goal("default stack (memory)", 2.0, "default stack ≤ 2.0x bare Flask in-process (health)"))
    out.append(ratio_goal("full stack (memory)", 2.0, "full stack, memory stores, ≤ 2x bare Flask in-process (health)"))
    for store, limit in (("memory", 3.0), ("Redis", 5.0)):
        full, peer = f"full stack ({store})", f"peer stack ({store})"
        factors = [(p, result.ratio(peer, p, baseline=full)) for p in profiles]
        if all(f != f for _, f in factors):
            out.append(Goal(f"full stack ≥ {limit:g}x faster than the peer stack, {store} stores", "not run", None))
            continue
        shown = ", ".join(f"{p}: {_fmt(f)}x" for p, f in factors)
        out.append(Goal(f"full stack ≥ {limit:g}x faster than the peer stack, {store} stores (every request)",
                        shown, all(f >= limit for _, f in factors)))
        if store == "Redis" and result.get(stacks.ROUND_TRIP_FLOOR, "health") is not None:
            out.append(_floor_goal(result, limit))
        same = [(p, result.ratio(peer, p, baseline=f"peer's work ({store})")) for p in profiles]
        shown = ", ".join(f"{p}: {_fmt(f)}x" for p, f in same)
        out.append(Goal(f"for reference, not the goal: the layers that do the peer's work only, ≥ {limit:g}x "
                        f"faster than the peer stack, {store} stores", shown, all(f >= limit for _, f in same)))
    hits = [(s, 1 / result.ratio(s, "search")) for s in ("default stack (memory)", "full stack (memory)")]
    out.append(Goal("a cache hit beats bare Flask (same search, uncached) by ≥ 2x in-process",
                    ", ".join(f"{s}: {_fmt(f)}x" for s, f in hits), all(f >= 2 for _, f in hits)))
    by = {(x.label, x.path, x.connections): x for x in loads}
    hit, bare = by.get(("full stack (cache hit)", SEARCH, 8)), by.get(("bare Flask", SEARCH, 8))
    if hit and bare:
        factor = http.ratio(hit, bare)
        out.append(Goal("a cache hit beats bare Flask by ≥ 1.3x over HTTP (req/s, same search)",
                        f"{factor:.2f}x ({hit.rps:.0f} vs {bare.rps:.0f} req/s)", factor >= 1.3))
    if deltas is not None:
        worst: dict[str, float] = {}
        for row in deltas:
            key = row["layer"]
            worst[key] = max(worst.get(key, 0.0), row["round_trips"])
        shown = ", ".join(f"{k} {v:g}" for k, v in worst.items())
        out.append(Goal("at most one Redis round trip per stateful layer per request (worst request)",
                        shown, all(v <= 1 for v in worst.values())))
    else:
        out.append(Goal("at most one Redis round trip per stateful layer per request", "not run", None))
    for stack in ("full stack (Redis)", "stateless layers"):
        one, two = by.get((f"{stack}, workers: 1", HEALTH, 16)), by.get((f"{stack}, workers: 2", HEALTH, 16))
        if one and two:
            factor = http.ratio(two, one)
            out.append(Goal(f"server.workers: 2 ≥ 1.6x the req/s of workers: 1 ({stack})",
                            f"{factor:.3f}x ({two.rps:.0f} vs {one.rps:.0f} req/s)", factor >= 1.6))
    return out


def _floor_goal(result: inproc.Result, limit: float) -> Goal:
    """Whether a stack that makes one Redis round trip per request could be ``limit`` times faster than the peer."""
    floor, peer = stacks.ROUND_TRIP_FLOOR, "peer stack (Redis)"
    rows = [p.label for p in inproc.PROFILES if p.target == HEALTH]
    factors = [(p, result.ratio(peer, p, baseline=floor)) for p in rows]
    shown = ", ".join(f"{p}: {_fmt(f)}x" for p, f in factors)
    cost = _fmt(result.ratio(floor, "health"))
    return Goal(f"for reference, not the goal: the peer stack (Redis) against bare Flask behind one Redis round "
                f"trip and nothing else ({cost}x bare Flask on health), the least any stack that counts "
                f"requests in Redis costs; ≥ {limit:g}x would leave room for the goal",
                shown, all(f >= limit for _, f in factors))


def http_table(loads: list[http.Load]) -> str:
    base = {(x.path, x.connections): x for x in loads if x.label == "bare Flask"}
    lines = ["| stack | request | connections | req/s | x bare Flask | p50 ms | p99 ms | errors | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in loads:
        b = base.get((x.path, x.connections))
        ratio = http.ratio(x, b) if b else float("nan")
        lines.append(f"| {x.label} | `{x.path}` | {x.connections} | {x.rps:.0f} | {_fmt(ratio)} | "
                     f"{_fmt(x.p50_ms)} | {_fmt(x.p99_ms)} | {x.errors} | {_fmt(x.rss_mib, 1)} |")
    return "\n".join(lines)


def rss_table(servers: list[http.Server]) -> str:
    lines = ["| server | processes | peak RSS per process MiB (VmHWM) | total MiB |", "|---|---:|---|---:|"]
    for server in servers:
        values = list(server.peak_rss.values())
        shown = ", ".join(f"{v:.1f}" for v in values) or "n/a"
        lines.append(f"| {server.name} | {len(values)} | {shown} | {sum(values):.1f} |")
    return "\n".join(lines)


def report(info: dict[str, str], settings: Settings, quick: bool, result: inproc.Result, layers: inproc.Result,
           in_place: inproc.Result, loads: list[http.Load], servers: list[http.Server], counts: Any, deltas: Any,
           compared: Any, goal_list: list[Goal], seconds: float) -> str:
    mark = {True: "met", False: "**missed**", None: "not measured"}
    parts = [
        "# wsgistack benchmark results",
        "",
        f"Generated by `{'python -m bench --quick' if quick else 'make bench'}` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} in {seconds:.0f} s. Every ratio compares figures from this one run.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Goals",
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
        *[f"| {g.text} | {g.measured} | {mark[g.met]} |" for g in goal_list],
        "",
        "## 1. In-process cost per request",
        "",
        f"Median of {settings.rounds} interleaved rounds (each round times every case once, in a shuffled "
        f"order, about {settings.sample_seconds * 1000:g} ms of requests per case), garbage collector on; "
        "the ratio is the median of the per-round ratios to bare Flask. "
        "Requests come from a browser on the app's origin through a proxy on loopback "
        "(`Origin`, `X-Forwarded-For`, `X-Forwarded-Proto`, `User-Agent`, `Accept`); "
        "\"session cookie\" adds the cookie of a logged-in session (`POST /auth/login` for wsgistack, "
        "`GET /peer/login` for the peer). The ratio is to bare Flask on the same request; on the search row "
        "bare Flask has no cache and runs the search every time.",
        "",
        inproc.table(result),
        "",
        "### Where the time goes",
        "",
        (layer_cost.__doc__ or "").split("\n\n", 1)[1].replace("\n", " ").strip(),
        "",
        layer_cost.table(layers),
        "",
        "The same layers cost more in the full stack on the Flask core: each row below is the full stack with "
        "that one layer replaced by a middleware that does nothing (its scope kept), and the time it saves "
        "(with `session` gone the `auth` layer also stops reading it): the median over the rounds of the "
        "difference within each round. The rows are small differences of noisy times (a few µs either way; a "
        "negative row is a layer whose saving the noise hides): read them as rough shares. "
        "Around the raw callable each layer's code and data stay "
        "in the CPU's caches from one call to the next; with Flask's request in between they do not (in a "
        "separate test, a bare Flask request run inside the core doubled the time of `ratelimit` and "
        "`access_log`).",
        "",
        layer_cost.in_place_table(in_place, layers),
        "",
        "## 2. Over HTTP under Waitress",
        "",
        f"`wrk` on loopback, one thread, keep-alive; every server started and warmed up "
        f"({settings.warmup_seconds:g} s of load per request) first, then {settings.http_rounds} interleaved "
        f"rounds of {settings.load_seconds:g} s per case (compared cases back to back, in reverse order every "
        "other round); the median round is shown, and ratios are medians of the per-round ratios, each to bare "
        "Flask under the same number of connections. Same browser headers; "
        "every server with the Waitress settings serve.py gives bench/full.yaml (8 threads, `poll()`), with "
        "untrusted proxy headers kept for the proxy layer and ProxyFix. Peak RSS is the server's `VmHWM` at the "
        "end (summed over the worker processes).",
        "",
        http_table(loads),
        "",
        "## 3. Redis commands per request, by layer",
        "",
        "bench/full.yaml with Redis stores, stateful layers added one at a time; each layer's row is what it adds. "
        "Requests of a logged-in client: the bearer token from `POST /auth/login` and its session cookie "
        "(the auth layer takes the token; the session is read ahead all the same, see below), or the "
        "session cookie alone. Commands from `INFO commandstats` after `CONFIG RESETSTAT` (commands a Lua "
        "script runs are counted too: the rate limiter's `INCRBY` runs inside its `EVALSHA`); round trips "
        "are redis-py sends (a pipeline is one). The session's `GETEX`, the blocklist's `GET` and the cache's "
        "read-or-lock ride in the rate limiter's pipeline (reads ahead, docs/architecture.md): their rows "
        "show the commands and no round trip. The cache keys per user (`per_user: true`): the auth layer "
        "foresees the user of a token it verified before, or of a session the session layer read before.",
        "",
        redis_count.table(counts, deltas) if counts is not None else "Not run (no redis-server).",
        "",
        "The Redis stacks of the in-process table on its requests (health, the cached search, health with the "
        "session cookie; counted as above): the peer stack's round trips beside the layers'. Flask-Limiter's "
        "hit is one round trip and its rate-limit headers two more (`TTL`, `GET`); Flask-Session reads "
        "(`GET`) and, to slide the lifetime, writes (`SET`) a logged-in session on every request; "
        "Flask-Caching's hit is a `GET` of its own.",
        "",
        redis_count.compare_table(compared) if compared is not None else "Not run (no redis-server).",
        "",
        "## 4. Peak RSS of the servers under load",
        "",
        rss_table(servers),
        "",
        "## What is compared",
        "",
        "- **raw WSGI**: a plain callable answering the health body (the floor).",
        "- **bare Flask**: `app.create_app({\"var_dir\": ..., \"search\": {\"engine\": \"local\"}})`, nothing else.",
        "- **default stack**: the shipped `stack.yaml`, memory stores.",
        "- **full stack**: `bench/full.yaml`: every built-in layer but `operator_page` (errors, proxy, "
        "request_id, health, metrics "
        "with layer timing off, access_log, headers, validation, cors, ratelimit, session, csrf, auth, versioning, "
        "cache with `per_user: true`), memory stores or Redis (`REDIS_URL`).",
        f"- **{stacks.ROUND_TRIP_FLOOR}** (with Redis only): bare Flask behind one pipeline of `INCR` and "
        "`PTTL` per request (redis-py with hiredis, as the stores use), nothing else: what one round trip "
        "adds to a request on this machine, a floor for any stack that counts every request in Redis. It is "
        "more than the same round trip timed alone in a loop.",
        "- **peer stack** (`bench/peer.py`): the same `create_app` core with Flask-CORS (the same origins, "
        "methods, headers, credentials), Flask-Session (server-side, read on every request by a `before_request` "
        "hook, a browser-session cookie and a sliding 30-minute lifetime in the store; no signer, which "
        "Flask-Session deprecates, so the peer skips the signature check the session layer makes on every "
        "cookie), Flask-Limiter (client IP, the same limit over all routes together "
        "(`application_limits`), headers on), "
        "Flask-Caching around both search views (query string in the key, the same 60 s TTL) and werkzeug's "
        "ProxyFix (one hop); cachelib `SimpleCache` / `memory://`, or one Redis for all three. The full stack "
        "does more than the peer on every request (request id, metrics, access log, security headers, "
        "validation, CSRF, JWT auth, API versioning).",
        f"- **peer's work** (`$WORKSPACE/peer-work.yaml`, written by the bench): bench/full.yaml with only "
        f"{', '.join(stacks.PEER_WORK)}, the layers that do what the peer's extensions do (auth reads the "
        "session's user, as the peer's hook does; errors renders refusals, as the core's handlers do the peer's). "
        "It answers the same question with the same work on both sides (but for the session layer's signature "
        "check, which the peer skips); the goals compare the full stack.",
        "- **stateless layers** (`$WORKSPACE/stateless.yaml`, written by the bench): bench/full.yaml without "
        "ratelimit, session, csrf, auth and cache, so it may run several workers on memory stores; it shows "
        "how serve.py's workers scale when no store process competes for the cores.",
        "- Logging of the in-process stacks is set up by serve.py's own `_setup_logging` (the access lines go "
        "through the `wsgistack.access` logger and the handler serve.py gives it), with files in place of "
        "stdout and stderr; served stacks write to stdout and stderr, redirected to files.",
        "- Rate limits are set to `1000000/minute`: every request is counted, none refused.",
        "",
        "## Commands",
        "",
        "```",
        "make bench                         # .venv/bin/python -m bench (writes bench/RESULTS.md)",
        ".venv/bin/python -m bench --quick  # smoke run",
        "```",
        "",
        "Servers (the bench picks free ports; `WSGISTACK_LISTEN` sets the stack's):",
        "",
        "```",
        *[s.shown for s in servers],
        "```",
        "",
        "Load:",
        "",
        "```",
        *dict.fromkeys(x.command for x in loads),
        "```",
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds, shorter loads")
    parser.add_argument("--output", type=Path, default=None,
                        help="where the Markdown goes (default bench/RESULTS.md; --quick prints only)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace (logs) for a look")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    info = machine()
    ws = Workspace.create()
    say(f"workspace: {ws.path}")
    counts = deltas = compared = None
    hidden: dict[str, str] = {str(ws.path): "$WORKSPACE"}
    try:
        try:
            ws.start_redis()
            hidden[f"127.0.0.1:{ws.redis.port}"] = "127.0.0.1:$REDIS_PORT"  # type: ignore[union-attr]
        except RuntimeError as exc:
            say(f"no Redis cases: {exc}")
        access_logging(ws.path)
        say(f"building the local search index once ({stacks.build_index(ws):.1f} s)")
        stacks.ensure_user(ws)
        result = run_inproc(ws, settings, redis=ws.redis is not None)
        say()
        say(inproc.table(result))
        say("in-process: the full stack built up layer by layer")
        layers = layer_cost.measure(ws, settings.rounds, settings.sample_seconds / 2)
        say(layer_cost.table(layers))
        say("in-process: each layer's own cost in the full stack on Flask")
        in_place = layer_cost.measure_in_place(ws, settings.rounds, settings.sample_seconds / 2)
        say(layer_cost.in_place_table(in_place, layers))
        if ws.redis is not None:
            say("redis: counting commands per request")
            counts, deltas = redis_count.count(ws, settings.redis_requests)
            say(redis_count.table(counts, deltas))
            compared = redis_count.compare(ws, settings.redis_requests)
            say(redis_count.compare_table(compared))
        loads, servers = run_http(ws, settings)
        info["load average after the HTTP runs"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    finally:
        ws.close(keep=args.keep)
    goal_list = goals(result, loads, deltas)
    text = report(info, settings, args.quick, result, layers, in_place, loads, servers, counts, deltas, compared,
                  goal_list, time.monotonic() - started)
    for real, shown in hidden.items():  # temporary paths and ports mean nothing in the report
        text = text.replace(real, shown)
    say()
    say(text)
    output = args.output or (None if args.quick else RESULTS)
    if output is not None:
        output.write_text(text, encoding="utf-8")
        say(f"written to {output}")
    return 0
