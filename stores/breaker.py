"""A thread-safe circuit breaker, so that threads never queue on a dead backend.

After ``failure_threshold`` consecutive failures the circuit *opens*: every
call fails at once with :class:`~stores.base.StoreError` ("circuit open …")
instead of waiting for a socket timeout.  Once ``reset_timeout`` seconds have
passed, exactly one call is let through as a probe (*half-open*); its success
closes the circuit, its failure opens it again for another ``reset_timeout``.
There is no background thread: the next call after the pause is the probe,
so a store recovers by itself as soon as traffic (or a ``/readyz`` ping) flows.

State changes are logged once each on the ``wsgistack.stores`` logger, never
per request.

When not to use it: around calls that fail for reasons of their own (bad
input, a missing key).  Only backend-health errors (``failure_types``) should
count; anything else the callable raises counts as "the backend answered".
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Literal, TypeVar

from .base import StoreBusy, StoreError

__all__ = ["CircuitBreaker", "CircuitOpenError", "StoreUnavailable"]

log = logging.getLogger("wsgistack.stores")

T = TypeVar("T")
State = Literal["closed", "open", "half-open"]

CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half-open"


class StoreUnavailable(StoreError):
    """The backend did not answer (refused, reset, timed out): counts against the breaker.

    ``detail`` is the backend's own short reason, safe to log (no secrets).
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class CircuitOpenError(StoreUnavailable):
    """Raised without calling the backend while the circuit is open."""


#: Every breaker of this process, for :func:`_after_fork`.
_BREAKERS: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: a new lock for each breaker (one a parent's thread held at the fork is never given
    back in the child, where that thread is not)."""
    for breaker in _BREAKERS:
        breaker._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class CircuitBreaker:
    """Fail fast while a backend is down, probe it once per pause, recover by itself.

    Options:

    - ``failure_threshold`` (3): consecutive failures that open the circuit.
    - ``reset_timeout`` (2.0 s): how long it stays open before one probe is let through.
    - ``name`` ("store"): what the log lines and errors call the guarded backend.
    - ``failure_types`` (``(StoreUnavailable, OSError)``): exceptions that count as
      failures; any other exception the callable raises means the backend answered
      (it passes through and counts as a success), except:
    - ``neutral_types`` (``(StoreBusy,)``): exceptions that mean the backend was never
      asked (an exhausted connection pool): they count neither way, and a probe that
      meets one leaves the next call to probe.

    ``breaker = CircuitBreaker(failure_threshold=3, reset_timeout=2.0, name="redis store")``
    ``value = breaker.call(lambda: client.get("k"))``
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout: float = 2.0,
        *,
        name: str = "store",
        failure_types: tuple[type[BaseException], ...] = (StoreUnavailable, OSError),
        neutral_types: tuple[type[BaseException], ...] = (StoreBusy,),
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if reset_timeout <= 0:
            raise ValueError(f"reset_timeout must be a positive number of seconds, got {reset_timeout}")
        self.failure_threshold = failure_threshold
        self.reset_timeout = float(reset_timeout)
        self.name = name
        self.failure_types = failure_types
        self.neutral_types = neutral_types
        self._lock = threading.Lock()  # (a new one in a forked child: _after_fork)
        _BREAKERS.add(self)
        self._state: State = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._last_error = ""
        #: Why the last call through it failed, as its user words it (a store's readiness shows it; every
        #: store sharing this breaker shares the server, so the reason is theirs too); None again once a ping passes.
        self.failure: str | None = None

    @property
    def state(self) -> State:
        """``"closed"``, ``"open"`` or ``"half-open"`` (a probe is in flight)."""
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return self._failures

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` unless the circuit is open; record how it went."""
        probe = False
        if self._state is not CLOSED:
            probe = self._admit()
        try:
            result = fn()
        except self.failure_types as exc:
            self._failed(exc, probe)
            raise
        except self.neutral_types:
            if probe:
                self._release_probe()
            raise
        except Exception:
            # The backend answered (with an error of the caller's making).
            self._succeeded(probe)
            raise
        except BaseException:
            if probe:
                self._release_probe()
            raise
        if probe or self._failures:
            self._succeeded(probe)
        return result

    def reset(self) -> None:
        """Close the circuit and forget past failures."""
        with self._lock:
            self._state, self._failures = CLOSED, 0

    def _admit(self) -> bool:
        """Decide for a call made while not closed: return True for the probe, else raise."""
        with self._lock:
            if self._state is CLOSED:
                return False
            wait = self._opened_at + self.reset_timeout - time.monotonic()
            if self._state is OPEN and wait <= 0:
                self._state = HALF_OPEN
                log.info("circuit half-open for %s: probing with one call", self.name)
                return True
            failures = self._failures
        hint = f"next probe in {wait:.2f} s" if wait > 0 else "a probe is in flight"
        raise CircuitOpenError(
            f"circuit open for {self.name} after {failures} consecutive failures "
            f"(last: {self._last_error}); {hint}"
        )

    def _failed(self, exc: BaseException, probe: bool) -> None:
        with self._lock:
            self._last_error = _describe(exc)
            if probe:
                self._state, self._opened_at = OPEN, time.monotonic()
                self._failures += 1
                log.debug("probe failed for %s; circuit open again: %s", self.name, self._last_error)
                return
            if self._state is not CLOSED:
                return  # a call that started before the circuit opened
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._state, self._opened_at = OPEN, time.monotonic()
                log.warning(
                    "circuit opened for %s after %d consecutive failures: %s; "
                    "failing fast for %.1f s before probing",
                    self.name, self._failures, self._last_error, self.reset_timeout,
                )

    def _succeeded(self, probe: bool) -> None:
        with self._lock:
            if probe:
                self._state, self._failures = CLOSED, 0
                log.info("circuit closed for %s: the backend answers again", self.name)
            elif self._state is CLOSED:
                self._failures = 0

    def _release_probe(self) -> None:
        """The probe was interrupted without a verdict: let the next call probe."""
        with self._lock:
            if self._state is HALF_OPEN:
                self._state = OPEN
                self._opened_at = time.monotonic() - self.reset_timeout

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(name={self.name!r}, state={self._state!r}, failures={self._failures}, "
            f"failure_threshold={self.failure_threshold}, reset_timeout={self.reset_timeout})"
        )


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "detail", None) or str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
