"""Where the time goes: bench/full.yaml built up one layer at a time around the raw callable.

Each row is the stack from ``errors`` down to that layer (the raw WSGI callable
at the core instead of Flask, so only the layers are timed); the last column is
what adding the layer cost, in place, with every layer outside it already
there (a layer that adds response headers also makes the outer layers' header
passes longer, and that lands on its row).  Same browser request and
interleaved timing as the in-process table.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from bench import inproc
from bench.common import FULL_YAML, Workspace
from bench.stacks import HEALTH, Stack


def stacks(ws: Workspace) -> list[Stack]:
    from config import build_from_text
    from config.loader import read_file

    data: dict[str, Any] = copy.deepcopy(read_file(FULL_YAML, env=ws.env()).data)
    data["app"] = {"factory": "bench.stacks:raw_factory"}
    pipeline = data["pipeline"]
    out = []
    for k in range(1, len(pipeline) + 1):
        data["pipeline"] = pipeline[:k]
        built = build_from_text(yaml.safe_dump(data), base_dir=FULL_YAML.parent, strict=False)
        out.append(Stack(f"+ {next(iter(pipeline[k - 1]))}", built.app, close=built.close))
    return out


def measure(ws: Workspace, rounds: int, sample_seconds: float) -> inproc.Result:
    built = stacks(ws)
    try:
        cases = inproc.prepare(built, [inproc.Profile("health", HEALTH)])
        return inproc.measure(cases, rounds, sample_seconds)
    finally:
        for stack in built:
            stack.close()


def table(result: inproc.Result) -> str:
    lines = ["| pipeline down to | µs/request (median) | added by this layer |", "|---|---:|---:|"]
    before = 0.0
    for case in result.cases:
        lines.append(f"| {case.stack.name} | {case.micros:.1f} | {case.micros - before:+.1f} |")
        before = case.micros
    return "\n".join(lines)
