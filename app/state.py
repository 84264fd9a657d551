"""What the blueprints share: the validated options, the stack's context, the engine, the users."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from app.options import AppOptions
from app.search import SearchEngine
from app.users import UserStore
from middleware.base import Context

__all__ = ["STREAMS", "SUPPORTED_VERSIONS", "AppState", "StreamSlots"]

SUPPORTED_VERSIONS = ("v1", "v2")


class StreamSlots:
    """The paced streams running in this process, whichever pipeline they came through.

    One count per process, not per app: a reload builds a new app while the old one's streams
    run on, and a count of its own would let ``max_streams`` more through each time (with
    every server thread held, probes included, until the old streams end).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0

    def take(self, limit: int) -> bool:
        """Take a slot when fewer than ``limit`` are taken (the limit of the app asking)."""
        with self._lock:
            if self.running >= limit:
                return False
            self.running += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.running -= 1


#: This process's paced streams (a worker forked from the supervisor starts with none running).
STREAMS = StreamSlots()


@dataclass
class AppState:
    """Built once by ``create_app``; kept in ``app.extensions["wsgistack"]``."""

    options: AppOptions
    context: Context
    engine: SearchEngine
    users: UserStore
    #: Slots for paced streams (``stream_interval`` > 0), each holding a server thread for its whole length.
    streams: StreamSlots | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.options.search.stream_interval > 0:
            self.streams = STREAMS

    def service(self, name: str) -> Any:
        """A service a layer published (looked up per request: layers are built after the app)."""
        return self.context.services.get(name)

    def can_issue_tokens(self) -> bool:
        """Whether an auth layer that signs tokens is in the pipeline (one that only verifies cannot log in)."""
        service = self.service("tokens")
        return service is not None and getattr(service, "signer", True) is not None

    def user_roles(self, name: str) -> tuple[str, ...] | None:
        """The roles ``name`` has now, or None when there is no such user (published as ``user_roles``)."""
        user = self.users.get(name)
        return None if user is None else user.roles

    def user_since(self, name: str) -> float | None:
        """When ``name``'s credentials last changed, or None when there is no such user (``user_since``)."""
        user = self.users.get(name)
        return None if user is None else user.credentials_at

    def close(self) -> None:
        """Close the index connections and the users database."""
        self.engine.close()
        self.users.close()
