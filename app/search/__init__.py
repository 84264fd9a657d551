"""Search engines behind ``/api/*/search``: the result types and the engine interface.

An engine runs a search as a generator of real stages: it yields
``(percent, stage)`` after each step it has finished and returns the
:class:`SearchPage`.  The stream endpoint turns each yielded stage into a
``search_progress`` event as soon as it happens; :meth:`SearchEngine.search`
simply runs the stages to the end.  An engine that waits on I/O (an upstream)
is given a ``heartbeat`` by the stream: it waits in slices of at most that
many seconds and yields :data:`WAITING` between them, which the stream sends
as a comment line, so that a proxy does not take a slow search for an idle
connection; without one (the plain search) it just waits.

Engines raise werkzeug ``HTTPException`` for failures the client should see
(502 and 504 for upstream trouble); anything else is a bug and becomes a 500.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.options import SearchOptions

__all__ = ["MAX_PAGE", "WAITING", "Progress", "SearchEngine", "SearchPage", "SearchResult", "make_engine"]

#: The last page a client may ask for (``page``); ``pages`` in an answer never names a later one.
MAX_PAGE = 1000

#: One finished stage of a search: (percent done, stage name).
Progress = tuple[int, str]
#: Not a stage: the engine has been waiting ``heartbeat`` seconds and is still waiting.
WAITING: Progress = (-1, "waiting")


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One hit: what the API returns for it."""

    title: str
    url: str
    content: str
    engine: str

    def as_dict(self) -> dict[str, str]:
        return {"title": self.title, "url": self.url, "content": self.content, "engine": self.engine}


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of results for a query, with what is needed to paginate."""

    query: str
    results: tuple[SearchResult, ...]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        """How many pages ``total`` results fill (0 when there are none), at most the MAX_PAGE a client may ask for."""
        return min(-(-self.total // self.per_page), MAX_PAGE) if self.per_page else 0  # whole numbers: no overflow

    def v1(self) -> dict[str, Any]:
        """The ``/api/v1`` body: ``results`` plus ``meta``."""
        return {
            "query": self.query,
            "results": [r.as_dict() for r in self.results],
            "meta": {"total": self.total, "page": self.page, "per_page": self.per_page, "query": self.query},
        }

    def v2(self) -> dict[str, Any]:
        """The ``/api/v2`` body: ``data`` plus ``pagination``."""
        return {
            "query": self.query,
            "data": [r.as_dict() for r in self.results],
            "pagination": {
                "page": self.page,
                "per_page": self.per_page,
                "total": self.total,
                "pages": self.pages,
            },
        }


class SearchEngine(abc.ABC):
    """What the API needs from an engine; subclasses implement :meth:`stages`."""

    #: The value of ``engine`` in ``/api/v1/config``.
    name: str = ""

    @abc.abstractmethod
    def stages(self, query: str, page: int, heartbeat: float | None = None) -> Generator[Progress, None, SearchPage]:
        """Search, yielding ``(percent, stage)`` after each finished step; return the page.

        ``heartbeat``: while it waits, yield :data:`WAITING` at least this often (seconds); an
        engine that never waits long may ignore it.
        """

    def search(self, query: str, page: int = 1) -> SearchPage:
        """Run every stage and return the page of results."""
        steps = self.stages(query, page)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: SearchPage = done.value
                return result

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files or connections."""


def make_engine(options: SearchOptions, logger: logging.Logger | None = None) -> SearchEngine:
    """Build the engine that ``options.engine`` names; ``logger`` gets what the engine reports."""
    if options.engine == "searxng":
        from app.search.searxng import SearxngEngine

        return SearxngEngine(options)
    from app.search.local import LocalEngine

    return LocalEngine(options, logger)
