"""Where the time goes: bench/full.yaml built up one layer at a time around the raw callable.

The first row is the raw WSGI callable alone; each row after it is the stack
from ``errors`` down to that layer (the raw WSGI callable at the core instead of
Flask, so only the layers are timed, and the first layer's row adds only what
that layer costs, not the callable's own time); the last column is
what adding the layer cost, in place, with every layer outside it already
there (a layer that adds response headers also makes the outer layers' header
passes longer, and that lands on its row).  Same browser request and
interleaved timing as the in-process table.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import yaml

from bench import inproc
from bench.common import FULL_YAML, Workspace
from bench.stacks import HEALTH, Stack, raw_wsgi


def stacks(ws: Workspace) -> list[Stack]:
    from config import build_from_text
    from config.loader import read_file

    data: dict[str, Any] = copy.deepcopy(read_file(FULL_YAML, env=ws.env()).data)
    data["app"] = {"factory": "bench.stacks:raw_factory"}
    pipeline = data["pipeline"]
    out = [Stack("raw WSGI", raw_wsgi)]  # the core alone: the first layer's row adds only what that layer costs
    for k in range(1, len(pipeline) + 1):
        data["pipeline"] = pipeline[:k]
        built = build_from_text(yaml.safe_dump(data), base_dir=FULL_YAML.parent, strict=False)
        out.append(Stack(f"+ {next(iter(pipeline[k - 1]))}", built.app, close=built.close))
    return out


class Passthrough:
    """A middleware that does nothing: stands in for one layer in the in-place table."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.app(environ, start_response)


SCOPE_KEYS = ("paths", "exclude_paths", "methods")


def in_place_stacks(ws: Workspace) -> list[Stack]:
    """bench/full.yaml on the Flask core, then once more per layer with that layer a pass-through."""
    from config import build_from_text
    from config.loader import read_file

    data: dict[str, Any] = copy.deepcopy(read_file(FULL_YAML, env=ws.env()).data)
    pipeline = data["pipeline"]
    out = []
    for k in range(len(pipeline)):
        if k and next(iter(pipeline[k])) == "health":
            continue  # it answers only its own paths: nothing to take away on this request
        variant = copy.deepcopy(pipeline)
        name = "whole stack"
        if k:
            name, options = next(iter(pipeline[k].items()))
            scope = {key: options[key] for key in SCOPE_KEYS if key in (options or {})}
            variant[k] = {"bench.layer_cost:Passthrough": scope}  # the scope shim stays
        data["pipeline"] = variant
        built = build_from_text(yaml.safe_dump(data), base_dir=FULL_YAML.parent, strict=False)
        out.append(Stack(name, built.app, close=built.close))
    return out


def measure_in_place(ws: Workspace, rounds: int, sample_seconds: float) -> inproc.Result:
    return _time_health(in_place_stacks(ws), rounds, sample_seconds)


def in_place_table(result: inproc.Result, alone: inproc.Result) -> str:
    """Each layer's own cost in the full stack on Flask, next to its cost added around the raw callable."""
    whole = result.cases[0].micros
    added = {case.stack.name.removeprefix("+ "): cost for case, cost in _added(alone)}
    lines = [f"| layer | in the full stack on Flask ({whole:.1f} µs): saved by a pass-through | "
             "added around the raw callable (table above) |", "|---|---:|---:|"]
    for case in result.cases[1:]:
        name = case.stack.name
        # Paired: the median over the rounds of the difference within each round (both timed in it).
        saved = statistics.median(w - c for w, c in zip(result.cases[0].samples, case.samples, strict=True))
        lines.append(f"| {name} | {saved:.1f} | {added.get(name, float('nan')):.1f} |")
    return "\n".join(lines)


def measure(ws: Workspace, rounds: int, sample_seconds: float) -> inproc.Result:
    return _time_health(stacks(ws), rounds, sample_seconds)


def _time_health(built: list[Stack], rounds: int, sample_seconds: float) -> inproc.Result:
    """Time the health request on every stack in interleaved rounds; close the stacks."""
    try:
        cases = inproc.prepare(built, [inproc.Profile("health", HEALTH)])
        return inproc.measure(cases, rounds, sample_seconds)
    finally:
        for stack in built:
            stack.close()


def _added(result: inproc.Result) -> list[tuple[inproc.Case, float]]:
    """Each row of the build-up with what adding its layer cost."""
    out, before = [], 0.0
    for case in result.cases:
        out.append((case, case.micros - before))
        before = case.micros
    return out


def table(result: inproc.Result) -> str:
    lines = ["| pipeline down to | µs/request (median) | added by this layer |", "|---|---:|---:|"]
    for case, added in _added(result):
        lines.append(f"| {case.stack.name} | {case.micros:.1f} | {added:+.1f} |")
    return "\n".join(lines)
