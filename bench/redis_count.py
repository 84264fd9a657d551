"""Redis commands and round trips per request, attributed to the layer that makes them.

The stacks are bench/full.yaml with Redis stores, first without any stateful
layer, then adding ratelimit, session, auth and cache one at a time; a layer's
share is what its stack adds to the one before.  Commands come from the
server's ``INFO commandstats`` (reset with ``CONFIG RESETSTAT``); round trips
are counted in the client, as the packed sends of redis-py connections (a
pipeline is one send, so one round trip).

The requests are those of a logged-in client: the bearer token from
``POST /auth/login`` and the session cookie it set (the auth layer then takes
the token, so nothing reads the session), or the session cookie alone (the
auth layer reads the user from the session).  The cached search repeats one
query (filled before counting); the uncached one asks for a new page on every
request, so every request misses.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.common import BROWSER_HEADERS, FULL_YAML, RATE_LIMIT, Workspace
from bench.stacks import Stack, call, login, make_environ

STATEFUL = ("ratelimit", "auth", "session", "cache")


@dataclass
class Count:
    """What one stack's requests cost in Redis, per request."""

    stack: str
    request: str
    commands: dict[str, float] = field(default_factory=dict)
    round_trips: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.commands.values())


class _Sends:
    """Counts packed sends of every redis-py connection while on (thread-safe enough: one thread)."""

    def __init__(self) -> None:
        self.count = 0
        self.on = False
        self.lock = threading.Lock()

    @contextmanager
    def installed(self) -> Iterator[None]:
        from redis.connection import AbstractConnection

        original = AbstractConnection.send_packed_command
        sends = self

        def counting(conn: Any, command: Any, check_health: bool = True) -> Any:
            if sends.on:
                with sends.lock:
                    sends.count += 1
            return original(conn, command, check_health)  # type: ignore[no-untyped-call]

        AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        try:
            yield
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def _stats(client: Any) -> Counter[str]:
    stats: Counter[str] = Counter()
    for name, value in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] in ("info", "config"):
            continue
        stats[command.upper()] = int(value["calls"])
    return stats


def _build(ws: Workspace, layers: tuple[str, ...]) -> Any:
    """bench/full.yaml with Redis stores, keeping only the stateful layers named in ``layers``."""
    from config import build_from_text
    from config.loader import read_file

    document = read_file(FULL_YAML, env=ws.env(redis=True))
    data = copy.deepcopy(document.data)
    data["pipeline"] = [entry for entry in data["pipeline"]
                        if next(iter(entry)) not in STATEFUL or next(iter(entry)) in layers]
    import yaml

    return build_from_text(yaml.safe_dump(data), base_dir=FULL_YAML.parent, strict=False)


def count(ws: Workspace, requests: int = 20) -> tuple[list[Count], list[dict[str, Any]]]:
    """Per-request Redis commands for each cumulative stack; and the per-layer deltas."""
    client = ws.redis.client() if ws.redis is not None else None
    if client is None:
        raise RuntimeError("no Redis server in this run")
    full = _build(ws, STATEFUL)
    cookie, token = login(full.app)
    with_token = {**BROWSER_HEADERS, "Cookie": cookie, "Authorization": f"Bearer {token}"}
    cookie_only = {**BROWSER_HEADERS, "Cookie": cookie}
    sends = _Sends()
    counts: list[Count] = []
    built = [full]
    with sends.installed():
        for i in range(len(STATEFUL) + 1):
            layers = STATEFUL[:i]
            stack = full if i == len(STATEFUL) else _build(ws, layers)
            built.append(stack)
            name = "stateless layers only" if not layers else "+ " + layers[-1]
            for label, headers, targets in (
                ("token and cookie, search, cache hit", with_token, ["/api/v1/search?q=json"] * requests),
                ("token and cookie, search, uncached", with_token,
                 [f"/api/v1/search?q=json&page={100 + i * requests + n}" for n in range(requests)]),
                ("session cookie only, search, cache hit", cookie_only, ["/api/v1/search?q=json"] * requests),
                ("session cookie only, search, uncached", cookie_only,
                 [f"/api/v1/search?q=http&page={100 + i * requests + n}" for n in range(requests)]),
            ):
                if label.endswith("cache hit"):
                    call(stack.app, make_environ(targets[0], headers))  # fills the cache
                client.config_resetstat()
                sends.count, sends.on = 0, True
                statuses = [call(stack.app, make_environ(target, headers))[0] for target in targets]
                sends.on = False
                if any(not s.startswith("200") for s in statuses):
                    raise RuntimeError(f"{name}, {label}: {sorted(set(statuses))}")
                stats = _stats(client)
                counts.append(Count(name, label, {k: v / requests for k, v in stats.items()},
                                    sends.count / requests))
    for stack in built:
        stack.close()
    client.close()
    return counts, _deltas(counts)


def compare(ws: Workspace, requests: int = 20) -> list[Count]:
    """Commands and round trips per request of the in-process table's Redis stacks, on its requests.

    The full stack, the layers that do the peer's work and the peer stack, each
    sent the requests of the in-process table (health, the cached search,
    health with the session cookie), so the peer's round trips stand beside the
    layers'.  Their logins do not count against the login limit of the other
    sections' stacks (a limit of their own).
    """
    from bench import inproc, stacks

    client = ws.redis.client() if ws.redis is not None else None
    if client is None:
        raise RuntimeError("no Redis server in this run")
    built = [stacks.wsgistack(ws, "full stack (Redis)", FULL_YAML, redis=True, WSGISTACK_LOGIN_LIMIT=RATE_LIMIT),
             stacks.wsgistack(ws, "peer's work (Redis)", stacks.peer_work_yaml(ws), redis=True,
                              WSGISTACK_LOGIN_LIMIT=RATE_LIMIT),
             stacks.peer(ws, "peer stack (Redis)", redis=True)]
    sends = _Sends()
    out: list[Count] = []
    try:
        with sends.installed():
            for profile in inproc.PROFILES:
                for stack in built:
                    environ = make_environ(profile.target, inproc.headers_for(stack, profile))
                    call(stack.app, environ)  # fills the cache, as inproc.prepare does
                    client.config_resetstat()
                    sends.count, sends.on = 0, True
                    statuses = [call(stack.app, environ)[0] for _ in range(requests)]
                    sends.on = False
                    if any(not s.startswith("200") for s in statuses):
                        raise RuntimeError(f"{stack.name}, {profile.label}: {sorted(set(statuses))}")
                    out.append(Count(stack.name, profile.label,
                                     {k: v / requests for k, v in _stats(client).items()}, sends.count / requests))
    finally:
        for stack in built:
            stack.close()
        client.close()
    return out


def compare_table(counts: list[Count]) -> str:
    lines = ["| stack | request | Redis commands per request | commands | round trips |", "|---|---|---|---:|---:|"]
    for c in counts:
        shown = ", ".join(f"{n} {v:g}" for n, v in sorted(c.commands.items())) or "none"
        lines.append(f"| {c.stack} | {c.request} | {shown} | {c.total:g} | {c.round_trips:g} |")
    return "\n".join(lines)


def _deltas(counts: list[Count]) -> list[dict[str, Any]]:
    rows = []
    for request in dict.fromkeys(c.request for c in counts):
        series = [c for c in counts if c.request == request]
        for before, after in itertools.pairwise(series):
            names = sorted(set(before.commands) | set(after.commands))
            diff = {n: after.commands.get(n, 0.0) - before.commands.get(n, 0.0) for n in names}
            diff = {n: v for n, v in diff.items() if abs(v) > 1e-9}
            rows.append({"layer": after.stack.removeprefix("+ "), "request": request, "commands": diff,
                         "total": sum(diff.values()), "round_trips": after.round_trips - before.round_trips})
    return rows


def table(counts: list[Count], deltas: list[dict[str, Any]]) -> str:
    lines = ["| stateful layer | request | Redis commands per request | commands | round trips |",
             "|---|---|---|---:|---:|"]
    for row in deltas:
        shown = ", ".join(f"{n} {v:g}" for n, v in row["commands"].items()) or "none"
        lines.append(f"| {row['layer']} | {row['request']} | {shown} | {row['total']:g} | {row['round_trips']:g} |")
    lines += ["", "| stack | request | commands per request | round trips per request |", "|---|---|---:|---:|"]
    for c in counts:
        lines.append(f"| {c.stack} | {c.request} | {c.total:g} | {c.round_trips:g} |")
    return "\n".join(lines)


__all__ = ["Count", "Stack", "compare", "compare_table", "count", "table"]
