"""A pipeline that can be rebuilt from stack.yaml and swapped atomically while serving.

``LiveStack`` is the WSGI callable the server hosts.  ``reload()`` reads,
validates, lints and builds the file again; only a complete new pipeline
replaces the old one (a single attribute assignment, atomic under the GIL).
In-flight requests keep the pipeline they started with; an invalid file is
logged with its errors and the old pipeline keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import build_from_file
from .build import BuiltStack
from .errors import ConfigError, Problem

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("wsgistack.reload")

#: server settings that only a restart can change
RESTART_ONLY = ("listen", "threads", "workers", "connection_limit", "backlog", "trusted_proxy",
                "trusted_proxy_count", "trusted_proxy_headers", "clear_untrusted_proxy_headers",
                "url_scheme", "url_prefix", "ident", "channel_timeout", "max_request_body_size",
                "max_request_header_size", "cleanup_interval")


@dataclass
class ReloadResult:
    """What the last reload did."""

    ok: bool
    generation: int
    at: float = field(default_factory=time.time)
    problems: list[Problem] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return f"reload failed, generation {self.generation} keeps serving: " + "; ".join(map(str, self.problems))
        text = f"generation {self.generation} serving"
        if self.needs_restart:
            text += f"; needs restart to apply: {', '.join(self.needs_restart)}"
        return text


class LiveStack:
    """Host the pipeline built from ``path``; ``reload()`` swaps in a new one."""

    def __init__(self, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                 built: BuiltStack | None = None) -> None:
        self.path = os.fspath(path)
        self.env = env
        self._lock = threading.Lock()
        self.current = built or build_from_file(self.path, env=env)
        self.generation = 1
        self.last = ReloadResult(True, 1)
        self._mtime = self._stat()
        self._publish()

    def _stat(self) -> float:
        try:
            return os.stat(self.path).st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def _publish(self) -> None:
        ctx = self.current.context
        ctx.settings["generation"] = self.generation
        ctx.settings["last_reload"] = self.last
        server = self.current.config.server
        self._generation_header = [("X-Stack-Generation", str(self.generation))] if server.generation_header else None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        header = self._generation_header
        if header is None:
            return self.current.app(environ, start_response)

        def with_generation(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, *header], exc_info)

        return self.current.app(environ, with_generation)

    def reload(self) -> ReloadResult:
        """Rebuild from the file; swap on success, keep the old pipeline on failure."""
        with self._lock:
            self._mtime = self._stat()
            try:
                new = build_from_file(self.path, env=self.env)
            except ConfigError as exc:
                self.last = ReloadResult(False, self.generation, problems=exc.problems)
                self.current.context.settings["last_reload"] = self.last
                log.error("%s", self.last.summary())
                return self.last
            except Exception as exc:  # a layer or the app failed to build
                self.last = ReloadResult(False, self.generation, problems=[Problem(f"build failed: {exc}")])
                self.current.context.settings["last_reload"] = self.last
                log.exception("reload failed; the old pipeline keeps serving")
                return self.last
            old_server = self.current.config.server
            needs = [name for name in RESTART_ONLY if getattr(old_server, name) != getattr(new.config.server, name)]
            old = self.current
            self.current = new
            self.generation += 1
            self.last = ReloadResult(True, self.generation, needs_restart=needs, problems=new.warnings)
            self._publish()
            log.info("%s", self.last.summary())
            for warning in new.warnings:
                log.warning("%s", warning)
        # Stores of the old pipeline are closed later by the garbage collector once in-flight
        # requests drop their references; closing them now could cut those requests off.
        del old
        return self.last

    def watch(self, interval: float = 1.0, stop: threading.Event | None = None) -> threading.Thread:
        """Poll the file's mtime and reload on change, in a daemon thread."""
        stop = stop or threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                if self._stat() != self._mtime:
                    self.reload()

        thread = threading.Thread(target=run, name="wsgistack-watch", daemon=True)
        thread.start()
        return thread
