"""Scoping any layer by ``paths``, ``exclude_paths`` (globs) and ``methods``, applied once by the builder."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from middleware.base import PathRewrites, decoded_path, note, routed_path, with_head

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def compile_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for a list of path globs (``*`` spans segments; matched case-sensitively)."""
    parts = [fnmatch.translate(p) for p in patterns]
    if not parts:
        return None
    return re.compile("|".join(f"(?:{p})" for p in parts))


_WILD = re.compile(r"[*?[]")
_WILD_END = re.compile(r"[*?\]]")


def _may_meet(a: str, b: str) -> bool:
    """Whether one path may match both globs ``a`` and ``b`` (a ``[`` fnmatch reads as text is taken as a wildcard)."""
    start_a, start_b = _WILD.search(a), _WILD.search(b)
    if start_a is None and start_b is None:
        return a == b
    head_a, head_b = a[:start_a.start()] if start_a else a, b[:start_b.start()] if start_b else b
    if not (head_a.startswith(head_b) or head_b.startswith(head_a)):
        return False
    tail_a, tail_b = a[_after_last_wild(a):], b[_after_last_wild(b):]
    return tail_a.endswith(tail_b) or tail_b.endswith(tail_a)


def _after_last_wild(glob: str) -> int:
    """Where the literal text after the last wildcard of ``glob`` begins (0: none)."""
    found = [m.end() for m in _WILD_END.finditer(glob)]
    return found[-1] if found else 0


class Scope:
    """Which requests a layer applies to."""

    def __init__(
        self,
        paths: Iterable[str] | None = None,
        exclude_paths: Iterable[str] | None = None,
        methods: Iterable[str] | None = None,
    ) -> None:
        self.paths = tuple(paths or ())
        self.exclude_paths = tuple(exclude_paths or ())
        self.methods = tuple(m.upper() for m in methods or ())
        self._include = compile_globs(self.paths)
        self._exclude = compile_globs(self.exclude_paths)
        self._methods = with_head(self.methods) or None  # GET covers HEAD, as in the layers' own rules
        #: The path rewrites of the layers inside this one (set by the builder): a request is in scope
        #: when its path is, or the path it is routed to (``/api/search`` → ``/api/v1/search``) is.
        self.rewrites: PathRewrites = ()
        #: Set by the builder for a layer that grants something (``cors``): then a request is in scope only
        #: when both spellings are, or a client would pick the spelling a scope covers (or does not
        #: exclude) to be granted it for a resource the scope leaves out.
        self.every_spelling = False

    def matches(self, environ: WSGIEnvironment) -> bool:
        if self._methods is not None and environ.get("REQUEST_METHOD", "GET").upper() not in self._methods:
            return False
        if self._include is None and self._exclude is None:
            return True
        path = decoded_path(environ)
        if self.every_spelling:
            if not self._covers(path):
                return False
            return not self.rewrites or self._covers(routed_path(environ, self.rewrites))
        if self._covers(path):
            return True
        if not self.rewrites:
            return False
        routed = routed_path(environ, self.rewrites)
        return routed != path and self._covers(routed)

    def _covers(self, path: str) -> bool:
        if self._include is not None and self._include.match(path) is None:
            return False
        return self._exclude is None or self._exclude.match(path) is None

    def overlaps(self, other: Scope) -> bool:
        """Whether two scopes may both match one request: False only when that is sure.

        A path both globs match begins with the literal text of each before its first
        wildcard (``*``, ``?``, ``[``), and ends with the text of each after its last
        (``*``, ``?``, ``]``): when neither prefix begins the other, or neither ending
        ends the other, no path matches both.  ``exclude_paths`` are left out.
        """
        if self._methods and other._methods and not (self._methods & other._methods):
            return False
        if not self.paths or not other.paths:
            return True
        return any(_may_meet(a, b) for a in self.paths for b in other.paths)

    def __bool__(self) -> bool:
        return bool(self.paths or self.exclude_paths or self.methods)

    def __repr__(self) -> str:
        bits = []
        if self.paths:
            bits.append(f"paths={list(self.paths)}")
        if self.exclude_paths:
            bits.append(f"exclude_paths={list(self.exclude_paths)}")
        if self.methods:
            bits.append(f"methods={list(self.methods)}")
        return f"Scope({', '.join(bits)})"


class Scoped:
    """Send a request through ``layer`` when in scope, else straight to ``next_app``."""

    def __init__(self, layer: WSGIApplication, next_app: WSGIApplication, scope: Scope, label: str) -> None:
        self.layer = layer
        self.next_app = next_app
        self.scope = scope
        self.label = label
        self.matches = scope.matches

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.matches(environ):
            return self.layer(environ, start_response)
        note(environ, self.label, "request outside the layer's scope")
        return self.next_app(environ, start_response)
