"""What the blueprints share: the validated options, the stack's context, the engine, the users."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from app.options import AppOptions
from app.search import SearchEngine
from app.users import UserStore
from middleware.base import Context

__all__ = ["SUPPORTED_VERSIONS", "AppState"]

SUPPORTED_VERSIONS = ("v1", "v2")


@dataclass
class AppState:
    """Built once by ``create_app``; kept in ``app.extensions["wsgistack"]``."""

    options: AppOptions
    context: Context
    engine: SearchEngine
    users: UserStore
    #: Slots for paced streams (``stream_interval`` > 0), each holding a server thread for its whole length.
    streams: threading.BoundedSemaphore | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        search = self.options.search
        if search.stream_interval > 0:
            self.streams = threading.BoundedSemaphore(search.max_streams)

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
