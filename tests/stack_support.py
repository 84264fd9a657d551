"""Small WSGI apps and layers that tests name in stack.yaml (``stack_support:echo_app``)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from middleware.base import LayerOptions
from stores.memory import MemoryStore

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication


def secret(name: str, size: int = 43) -> str:
    """A fixed secret for ``name`` that reads as random, as ``secrets.token_urlsafe`` makes one.

    (``check`` warns of a secret made of a run repeated, such as ``"s" * 43``.)
    """
    return base64.urlsafe_b64encode(hashlib.sha512(name.encode()).digest()).decode()[:size]


def discard(data: bytes) -> None:
    """The ``write`` callable the start_response helpers below give: there is no client to write to."""


def ignore_start(status: str, headers: list[tuple[str, str]],
                 exc_info: OptExcInfo | None = None) -> Callable[[bytes], object]:
    """A server's ``start_response``, for calling a layer directly when the test does not look at the response."""
    return discard


def recording_start(record: Callable[[str, list[tuple[str, str]]], object]) -> StartResponse:
    """A server's ``start_response`` that hands each status and headers it is given to ``record``."""

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: OptExcInfo | None = None) -> Callable[[bytes], object]:
        record(status, headers)
        return discard

    return start_response


def echo_app(options: dict[str, Any] | None = None) -> Any:
    """An app that answers JSON describing what the stack gave it."""
    options = options or {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/boom":
            raise RuntimeError("secret database password in exception text")
        identity = environ.get("wsgistack.identity")
        body = json.dumps({
            "path": environ.get("PATH_INFO"),
            "method": environ.get("REQUEST_METHOD"),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "client_ip": environ.get("wsgistack.client_ip"),
            "scheme": environ.get("wsgi.url_scheme"),
            "request_id": environ.get("wsgistack.request_id"),
            "api_version": environ.get("wsgistack.api_version"),
            "identity": getattr(identity, "subject", None),
            "layers": environ.get("stack_support.layers", []),
            "option": options.get("greeting"),
        }).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def flaky_echo_app(options: dict[str, Any]) -> Any:
    """:func:`echo_app`, but a worker cannot build it while the file ``fail_while`` exists.

    The file holds the supervisor's pid: the supervisor builds it (and publishes its generation),
    a worker's reload to that generation fails until the file is gone.
    """
    marker = options.get("fail_while")
    if marker and os.path.exists(marker) and open(marker).read().strip() != str(os.getpid()):  # noqa: SIM115
        raise RuntimeError("this worker cannot build the app yet")
    return echo_app(options)


class Tag:
    """A plain ``factory(app, **kwargs)`` middleware that records its name in environ."""

    def __init__(self, app: WSGIApplication, name: str = "tag") -> None:
        self.app = app
        self.name = name

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ.setdefault("stack_support.layers", []).append(self.name)
        return self.app(environ, start_response)


class Recorder:
    """An inner app that records the paths that reached it and answers 200."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]


class RaisingStore(MemoryStore):
    """A store whose health check itself raises (a backend bug, not an outage)."""

    def health(self) -> dict[str, object]:
        raise RuntimeError("health check exploded")


#: Not a layer: a pipeline entry naming it is refused (a constant, unlike CLOSING_LOG, which tests fill).
NOT_A_LAYER: tuple[str, ...] = ()

#: What :class:`Closing` layers did, in order: ("open", name) and ("close", name).
CLOSING_LOG: list[tuple[str, str]] = []


class Closing:
    """A plain middleware that holds a resource: it logs when it is built and when it is closed."""

    def __init__(self, app: WSGIApplication, name: str = "closing") -> None:
        self.app, self.name = app, name
        CLOSING_LOG.append(("open", name))

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)

    def close(self) -> None:
        CLOSING_LOG.append(("close", self.name))


def returns_none(app: Any) -> None:
    """A factory that forgot its return statement."""


def filter_factory(global_conf: Any, **local_conf: Any) -> Callable[[Any], Any]:
    """A Paste Deploy filter factory: its filter wants the app, not a request."""
    def filt(app: Any) -> Any:
        return app

    return filt


class KeyedLayer:
    """A layer with an options model whose ``api_key`` must be long."""

    def __init__(self, app: WSGIApplication, api_key: str | int = "") -> None:
        if len(str(api_key)) < 40:
            raise ValueError(f"api_key {api_key!r} was rejected: too short")
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)


class MethodsLayer:
    """A third-party middleware with an option named like the builder's scope key ``methods``."""

    def __init__(self, app: WSGIApplication, methods: tuple[str, ...] = ("GET",)) -> None:
        self.app, self.methods = app, methods

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)


class PlainOptionsLayer:
    """The layer contract's (app, options, context), with a pydantic model that is not a LayerOptions."""

    class Options(BaseModel):
        level: int = 1

    def __init__(self, app: WSGIApplication, options: Any, context: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)


class NoOptionsLayer(PlainOptionsLayer):
    """The layer contract's (app, options, context), without an Options class."""

    Options = None  # type: ignore[assignment]


class Visits:
    """A layer of your own that counts visits in a store (an Options field named store)."""

    class Options(LayerOptions):
        store: str = "shared"

    def __init__(self, app: WSGIApplication, options: Any, context: Any) -> None:
        self.app, self.store = app, context.store(options.store)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.store.incr("visits")
        return self.app(environ, start_response)


class SharedVisits(Visits):
    """Visits whose class says every process must share its counts."""

    shared_state = True


class LocalVisits(Visits):
    """Visits whose class says a count per process is right."""

    shared_state = False


class AnnounceLayer:
    """A layer of the layer contract whose Options has a field named like the scope key ``methods``."""

    class Options(LayerOptions):
        methods: list[str] = ["GET"]

    def __init__(self, app: WSGIApplication, options: Any, context: Any) -> None:
        self.app, self.methods = app, options.methods

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)


class AllowList:
    """A third-party middleware whose option is hinted loosely (any iterable of paths)."""

    def __init__(self, app: WSGIApplication, allowed: Iterable[str] = ()) -> None:
        self.app, self.allowed = app, allowed

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] not in self.allowed:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"no"]
        return self.app(environ, start_response)


class StripPrefix:
    """A layer of one's own that mounts the app under a prefix, written as the README says:
    ``preview_environ`` and ``rewrites_path``, and nothing else about the stack's environ keys."""

    rewrites_path = True

    def __init__(self, app: WSGIApplication, prefix: str = "/public") -> None:
        self.app, self.prefix = app, prefix.rstrip("/")

    def preview_environ(self, environ: dict[str, Any]) -> dict[str, Any]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(self.prefix + "/"):
            return {"PATH_INFO": path[len(self.prefix):], "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + self.prefix}
        return {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ.update(self.preview_environ(environ))
        return self.app(environ, start_response)


def refusing_app(options: dict[str, Any] | None = None) -> Any:
    """An app that refuses every request with a 404 of its own."""
    from werkzeug.exceptions import NotFound

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise NotFound()

    return app


def slow_failing_app(options: dict[str, Any]) -> Any:
    """An app factory that creates ``options["flag"]``, waits a moment (signals come then) and fails."""
    import time
    from pathlib import Path

    Path(options["flag"]).touch()
    time.sleep(1.0)
    raise RuntimeError("the database is not there")


def slow_reloading_app(options: dict[str, Any]) -> Any:
    """``echo_app`` whose every build after the first takes ``options["delay"]`` seconds; each build
    appends a line to ``options["log"]``, the slow ones before they wait."""
    import time
    from pathlib import Path

    log = Path(options["log"])
    first = not log.exists()
    with log.open("a") as out:
        out.write("build\n")
    if not first:
        time.sleep(float(options["delay"]))
    return echo_app()


def app_failing_in_workers(options: dict[str, Any] | None = None) -> Any:
    """``echo_app``, but a process forked from the one that built it exits at once (code 3): a worker
    that cannot start (say a library that refuses to run after a fork).  ``parent_pause`` (seconds)
    holds the forking process after each fork, as a loaded machine may."""
    import os
    import time

    os.register_at_fork(after_in_child=lambda: os._exit(3))
    pause = float((options or {}).get("parent_pause", 0))
    if pause:  # a busy machine: the forking process runs again only after its child has exited
        os.register_at_fork(after_in_parent=lambda: time.sleep(pause))
    return echo_app()


def app_running_commands(options: dict[str, Any]) -> Any:
    """:func:`echo_app`, whose factory runs ``options["count"]`` commands that exit with code 7 and appends
    a line to ``options["log"]``: this process's pid and the exit codes it was told (a factory that runs a
    migration or reads a version from git checks the command's exit code)."""
    import subprocess
    from pathlib import Path

    codes = {subprocess.run(["sh", "-c", "exit 7"], check=False).returncode for _ in range(int(options["count"]))}
    with Path(options["log"]).open("a") as out:
        out.write(f"{os.getpid()} {sorted(codes)}\n")
    return echo_app()


def held_echo_app(options: dict[str, Any]) -> Any:
    """:func:`echo_app`, whose build waits while the file ``options["hold"]`` holds this process's pid
    (up to 10 s), after writing ``<hold>.building``: a test edits the file while one process builds."""
    import time
    from pathlib import Path

    hold = Path(options["hold"])
    if hold.exists() and hold.read_text().strip() == str(os.getpid()):
        Path(f"{hold}.building").touch()
        deadline = time.monotonic() + 10
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return echo_app(options)


def app_exiting_when_flagged(options: dict[str, Any]) -> Any:
    """``echo_app``; while ``options["flag"]`` exists the factory calls ``sys.exit`` (a missing setting)."""
    import sys
    from pathlib import Path

    if Path(options["flag"]).exists():
        sys.exit("DATABASE_URL is not set")
    return echo_app()


def closing_app(options: dict[str, Any] | None = None) -> Any:
    """``echo_app`` with a ``close()`` that logs ("close", "app") in CLOSING_LOG."""
    app = echo_app(options)
    app.close = lambda: CLOSING_LOG.append(("close", "app"))
    return app


def app_returning_text(options: dict[str, Any] | None = None) -> str:
    """An app factory that returns something other than a WSGI app (a path, here)."""
    return "/srv/app"


def app_refusing_its_token(options: dict[str, Any]) -> Any:
    """An app factory whose error quotes the secret it was given."""
    raise ValueError(f"upstream refused token {options['api_token']}")


from middleware.auth import AuthMiddleware as AuthMiddleware  # noqa: E402 - a built-in re-exported
from middleware.cache import CacheMiddleware  # noqa: E402
from middleware.session import SessionMiddleware  # noqa: E402


class MyCache(CacheMiddleware):
    """A built-in layer subclassed: the order rules of ``cache`` hold for it."""


class MySession(SessionMiddleware):
    """A built-in layer subclassed: ``session``'s per-process state rule holds for it."""


def gc_app(options: dict[str, Any] | None = None) -> Any:
    """An app that answers how many objects the serving process keeps out of the collector's walks."""
    import gc

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = json.dumps({"frozen": gc.get_freeze_count()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def large_app(options: dict[str, Any] | None = None) -> Any:
    """An app that answers ``options["mib"]`` MiB of spaces (default 12), all at once."""
    body = b" " * (int((options or {}).get("mib", 12)) << 20)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]

    return app
