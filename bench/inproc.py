"""In-process cost per request: µs for each stack, and its ratio to bare Flask in the same run.

Each app is a WSGI callable driven directly, no sockets: a prebuilt environ is
copied per request, the body drained and closed.  The cases are timed in
interleaved rounds (every case once per round, in a shuffled order, round
after round), so a burst of load on a shared machine lands on a few samples
of every case instead of on one case; a case's figure is the median of its
rounds, and its ratio to bare Flask is the median of the per-round ratios (a
case against bare Flask timed in the same round, moments apart).  The garbage
collector stays on, as in a server, after ``gc.freeze()`` has moved
everything built before the timing out of its way.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import BROWSER_HEADERS
from bench.stacks import HEALTH, ROUND_TRIP_FLOOR, SEARCH, Stack, call, make_environ

BASELINE = "bare Flask"


@dataclass(frozen=True)
class Profile:
    """One kind of request: the target and whether it carries the logged-in session cookie."""

    label: str
    target: str
    session: bool = False


PROFILES = (
    Profile("health", HEALTH),
    Profile("search", SEARCH),
    Profile("health, session cookie", HEALTH, session=True),
)


@dataclass
class Case:
    stack: Stack
    profile: Profile
    environ: dict[str, Any]
    status: str = ""
    cache: str = ""
    number: int = 0
    samples: list[float] = field(default_factory=list)

    @property
    def micros(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the interquartile range of the rounds, in µs."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / 2


@dataclass
class Result:
    cases: list[Case]

    def get(self, stack: str, profile: str) -> Case | None:
        for case in self.cases:
            if case.stack.name == stack and case.profile.label == profile:
                return case
        return None

    def ratio(self, stack: str, profile: str, baseline: str = BASELINE) -> float:
        """Median over the rounds of this case's time over the baseline's in the same round."""
        case, base = self.get(stack, profile), self.get(baseline, profile)
        if case is None or base is None:
            return float("nan")
        return statistics.median(c / b for c, b in zip(case.samples, base.samples, strict=True))


def headers_for(stack: Stack, profile: Profile) -> dict[str, str]:
    headers = dict(BROWSER_HEADERS)
    if profile.session and stack.cookie:
        headers["Cookie"] = stack.cookie
    return headers


def prepare(stacks: Sequence[Stack], profiles: Sequence[Profile] = PROFILES) -> list[Case]:
    """Build the cases and send each request twice (fills caches, checks the answer)."""
    cases = []
    for profile in profiles:
        for stack in stacks:
            environ = make_environ(profile.target, headers_for(stack, profile))
            call(stack.app, environ)
            status, headers, body = call(stack.app, environ)
            if not status.startswith("200"):
                raise RuntimeError(f"{stack.name}, {profile.label}: expected 200, got {status}: {body[:300]!r}")
            cache = next((v for k, v in headers if k.lower() == "x-cache"), "")
            peer = stack.name.startswith("peer stack")
            if profile.target == SEARCH and peer:
                cache = "Flask-Caching"  # it says nothing; the first request filled it
            elif profile.target == SEARCH and not cache:
                cache = "no cache"
            uncached = ("raw WSGI", "bare Flask", ROUND_TRIP_FLOOR)
            if profile.target == SEARCH and stack.name not in uncached and not peer and cache != "HIT":
                raise RuntimeError(f"{stack.name}, {profile.label}: the second request was not a cache hit")
            cases.append(Case(stack, profile, environ, status, cache))
    return cases


def _loop(app: Any, environ: dict[str, Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call(app, environ)
    return time.perf_counter() - start


def measure(cases: list[Case], rounds: int, sample_seconds: float,
            progress: Callable[[str], None] = lambda text: None) -> Result:
    """Time every case in ``rounds`` interleaved rounds of about ``sample_seconds`` each."""
    for case in cases:  # warm up and size each sample
        elapsed = _loop(case.stack.app, case.environ, 20) / 20
        case.number = max(5, int(sample_seconds / max(elapsed, 1e-7)))
    order = list(cases)
    shuffle = random.Random(3333).shuffle
    gc.collect()
    gc.freeze()
    try:
        for i in range(rounds):
            shuffle(order)
            for case in order:
                case.samples.append(_loop(case.stack.app, case.environ, case.number) / case.number * 1e6)
            progress(f"  round {i + 1}/{rounds}")
    finally:
        gc.unfreeze()
    return Result(cases)


def table(result: Result) -> str:
    """The Markdown table: one row per stack and request."""
    lines = ["| stack | request | cache | µs/request (median) | ± (IQR/2) | x bare Flask |",
             "|---|---|---|---:|---:|---:|"]
    for case in result.cases:
        ratio = result.ratio(case.stack.name, case.profile.label)
        lines.append(f"| {case.stack.name} | {case.profile.label} | {case.cache} | {case.micros:.1f} | "
                     f"{case.spread:.1f} | {ratio:.2f} |")
    return "\n".join(lines)
