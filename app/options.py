"""The options of the Flask core (``app.options`` in stack.yaml), validated by pydantic.

``config/`` validates ``app.options`` with :class:`AppOptions` so that a
mistake is reported with its YAML line; :func:`app.create_app` validates the
same mapping again when it is called from plain Python.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

from middleware.base import no_boolean_numbers

__all__ = ["AppOptions", "SearchOptions"]


class SearchOptions(BaseModel):
    """How ``/api/*/search`` finds results.

    ``engine``: ``local`` (an embedded SQLite FTS5 index of Python docstrings,
    no network) or ``searxng`` (the JSON API of a SearXNG instance).
    ``upstream``: the SearXNG base URL; required for ``searxng``.
    ``timeout``: seconds for the whole upstream exchange (name lookup, connect, request,
    status line, headers and body; pauses of the stream endpoint do not count).
    ``connect_timeout``: seconds for each TCP connect attempt, within ``timeout`` (a TLS handshake gets the rest of it).
    ``per_page``: results per page.  ``index_path``: the
    local index file (default ``<var_dir>/search-index.sqlite3``).
    ``index_sources``: module names or directories to index (a directory has a ``/`` in it, or starts
    with ``.`` or ``~``; a relative one is the stack file's folder's) (``None``: the
    standard library and the project's dependencies).  ``stream_interval``:
    seconds to pause between Server-Sent Events of the stream endpoint (a pause
    over 15 s sends a ``: keep-alive`` comment every 15 s of it, so that a proxy's
    idle timeout does not end the stream).
    ``max_streams``: with ``stream_interval`` above 0, how many streams a process
    runs at once (each holds a server thread for about five intervals); one more
    gets 503 with a Retry-After.  Keep it below ``server.threads`` (``check`` warns):
    at as many, paced streams can hold every thread and the health probes wait.
    """

    model_config = ConfigDict(extra="forbid")
    _numbers = field_validator("*", mode="before")(classmethod(no_boolean_numbers))

    engine: Literal["local", "searxng"] = "local"
    upstream: AnyHttpUrl | None = Field(default=None, repr=False)  # it may hold a password
    timeout: float = Field(default=5.0, gt=0, le=300)
    connect_timeout: float = Field(default=2.0, gt=0, le=300)
    per_page: int = Field(default=10, ge=1, le=100)
    index_path: str | None = None
    index_sources: list[str] | None = None
    stream_interval: float = Field(default=0.0, ge=0, le=60)
    max_streams: int = Field(default=4, ge=1, le=1000)

    @field_validator("upstream")
    @classmethod
    def _host_resolvable(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        """A host name the resolver can be asked for (no empty label, none over 63 characters)."""
        host = value.host if value is not None else None
        if host:
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                try:
                    host.encode("idna")
                except UnicodeError:
                    raise ValueError(
                        f"upstream's host {host!r} is not a host name: a label between its dots is "
                        "empty or longer than 63 characters"
                    ) from None
        return value

    @model_validator(mode="after")
    def _upstream_for_searxng(self) -> SearchOptions:
        if self.engine == "searxng" and self.upstream is None:
            raise ValueError(
                "upstream is required when engine is 'searxng' (the SearXNG base URL, "
                "e.g. http://127.0.0.1:8888)"
            )
        if self.index_sources is not None and not all(s.strip() for s in self.index_sources):
            raise ValueError("index_sources may not contain empty names")
        return self


def _folder_can_hold(name: str, file: Path) -> None:
    """Refuse a file that is a folder, or whose folder (or a folder above it) is a file (``var_dir`` set
    to a database, say): the app would start, and answer 500 wherever it opens the file."""
    try:
        if file.is_dir():
            raise ValueError(f"{name} {str(file)!r} is a folder, not a file")
    except OSError:  # a folder above that this user may not enter: the app's own open will say so
        return
    for folder in file.parents:
        try:
            exists = folder.exists()
        except OSError:  # a folder above that this user may not enter: the app's own open will say so
            return
        if exists:
            if not folder.is_dir():
                raise ValueError(f"{name} {str(file)!r} cannot be created: {str(folder)!r} is a file, not a folder")
            return


class AppOptions(BaseModel):
    """Everything ``create_app`` accepts; unknown keys are refused.

    ``var_dir``: where the SQLite files live (default ``var``; a stack file's
    relative paths are resolved against its folder before they get here, so
    only ``create_app`` called directly reads them from the working directory).
    ``users_db``: the users database (default ``<var_dir>/users.sqlite3``; never the same file as
    ``search.index_path``, which a build replaces).  ``search``: see :class:`SearchOptions`.
    ``debug``: put the exception text in 500 bodies when the app is used
    without the stack's ``errors`` layer.  ``max_failed_logins`` /
    ``failed_login_window``: per-account throttling of wrong passwords.

        opts = AppOptions.model_validate({"search": {"engine": "local", "per_page": 5}})
        assert opts.search.index_path == "var/search-index.sqlite3"
    """

    model_config = ConfigDict(extra="forbid")
    _numbers = field_validator("*", mode="before")(classmethod(no_boolean_numbers))

    var_dir: str = "var"
    users_db: str | None = None
    search: SearchOptions = Field(default_factory=SearchOptions)
    debug: bool = False
    max_failed_logins: int = Field(10, ge=0)
    """Wrong passwords one user name may get within ``failed_login_window`` before its logins are
    refused with 429 until the window ends (0: no limit). Counted per name in the auth layer's store,
    for known and unknown names alike, so it neither tells them apart nor stops counting from
    other addresses."""
    failed_login_window: int = Field(900, ge=1)
    """Seconds the failed logins of a user name are counted for (fixed window)."""

    @model_validator(mode="after")
    def _fill_paths(self) -> AppOptions:
        if not self.var_dir.strip():
            raise ValueError("var_dir may not be empty")
        var = Path(self.var_dir)
        if self.users_db is None:
            self.users_db = str(var / "users.sqlite3")
        if self.search.index_path is None:
            self.search.index_path = str(var / "search-index.sqlite3")
        for name, file in (("users_db", self.users_db), ("search.index_path", self.search.index_path)):
            _folder_can_hold(name, Path(file))
        if os.path.realpath(self.search.index_path) == os.path.realpath(self.users_db):
            raise ValueError(f"search.index_path {self.search.index_path!r} is the users database; the index "
                             "build would replace it: give the index a file of its own")
        return self

    @property
    def users_path(self) -> str:
        """The users database path (always set after validation)."""
        return self.users_db or str(Path(self.var_dir) / "users.sqlite3")

    @property
    def index_file(self) -> str:
        """The local search index path (always set after validation)."""
        return self.search.index_path or str(Path(self.var_dir) / "search-index.sqlite3")
