"""A pipeline that can be rebuilt from stack.yaml and swapped atomically while serving.

``LiveStack`` is the WSGI callable the server hosts.  ``reload()`` reads,
validates, lints and builds the file again; only a complete new pipeline
replaces the old one (a single attribute assignment, atomic under the GIL).
In-flight requests keep the pipeline they started with, and the old pipeline is
closed (its layers' ``close()``, its stores' connections) once the last of them
has finished; an invalid file is logged with its errors and the old pipeline
keeps serving.

``memory://`` stores whose URL and options did not change are carried over
into the new pipeline, so a reload keeps sessions, rate-limit counters and the
token blocklist of a single-process server (a revoked token stays revoked).
Polling (``server.reload.watch``) follows the configuration: a reload that
turns it on starts the poller, one that turns it off stops it.

Settings only a restart can change (``RESTART_ONLY``: the sockets and
Waitress's adjustments) stay those the process started with, in
:attr:`LiveStack.in_force`; every reload compares the file with them, so a
pending change is reported until the process restarts, and a worker started
after a reload is served with them like its siblings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from . import _relative_to, build_from_file, config_dir, load
from .build import BuiltStack, StackConfig, build, make_stores
from .errors import ConfigError, Problem
from .loader import read_file, read_source, read_text
from .schema import ServerOptions, split_listen

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from stores.base import Store

log = logging.getLogger("wsgistack.reload")

#: The server settings a stack hosted by another WSGI server (``serve:app`` under gunicorn) is judged
#: with: that server's listener and proxy handling are its own and unseen here, so the least safe ones
#: (a public listener that keeps every client's forwarding headers).
HOSTED: dict[str, Any] = {"listen": ["0.0.0.0:0"], "clear_untrusted_proxy_headers": False, "trusted_proxy": None}
HOSTED_NOTE = "under another WSGI server, whose listener and proxy handling wsgistack cannot see"
#: Where the hosting server binds, when its operator says so (``127.0.0.1:8000``, several separated by
#: spaces): loopback-only allowances (``debug``, ``cookie_secure: false``) are judged on it.
HOST_LISTEN_ENV = "WSGISTACK_HOST_LISTEN"


def hosted_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """HOSTED, with the listen addresses ``$WSGISTACK_HOST_LISTEN`` names instead of a public one."""
    listen = (env.get(HOST_LISTEN_ENV) or "").split()
    return {**HOSTED, "listen": listen} if listen else dict(HOSTED)


_HOST_OWNS = {
    "trusted_proxy": "establish the client address with the proxy layer's trusted_proxies, or the server's own "
                     "settings",
    "clear_untrusted_proxy_headers": "the server keeps or clears forwarding headers itself",
    "workers": "the server runs its own processes (per-process memory:// state is refused at the first "
               "request when it runs several)",
    "reload": "the server's own reload applies (gunicorn's starts new processes: memory:// stores start empty, "
              "so logged-out tokens work again; use redis:// stores)",
}

#: server settings that only a restart can change
RESTART_ONLY = ("listen", "threads", "workers", "connection_limit", "backlog", "trusted_proxy",
                "trusted_proxy_count", "trusted_proxy_headers", "clear_untrusted_proxy_headers",
                "log_untrusted_proxy_headers", "url_scheme", "url_prefix", "ident", "channel_timeout",
                "max_request_body_size", "max_request_header_size", "cleanup_interval")


def _judged(config: StackConfig, server: ServerOptions, *rules: Callable[..., Iterable[Problem]]) -> list[Problem]:
    """What lint ``rules`` find in ``config`` served with ``server`` instead of its own ``server:`` section."""
    from .build import with_default_errors

    served, specs = dataclasses.replace(config, server=server), with_default_errors(config.pipeline)
    return [config.document.masked(problem) for rule in rules for problem in rule(served, specs)]


def _noted(problem: Problem, note: str) -> Problem:
    """``problem`` with ``note`` (in parentheses) after its message."""
    return dataclasses.replace(problem, message=f"{problem.message} ({note})")


def _passing() -> tuple[str, ...]:
    """What a Redis says while a cause that can pass lasts: a replica (promoted in a failover), out of memory,
    out of connections (``maxclients``)."""
    from stores.redis import MAXCLIENTS, OUT_OF_MEMORY, READ_ONLY

    return READ_ONLY, OUT_OF_MEMORY, MAXCLIENTS


def refused_stores(built: BuiltStack, *, hosted: bool = False) -> list[Problem]:
    """Ask every store that can tell (Redis) once; the configurations it refuses, as problems.

    A wrong password, a database the server does not have or a failed TLS
    handshake never heal, so no pipeline may start with them.  A store that does
    not answer at all may be in an outage, or start after this process: that is
    logged, and its layers follow their ``on_store_error`` until it answers.

    ``hosted``: each process of another WSGI server builds the stack as it starts,
    and one that fails stops that server altogether (gunicorn's workers), where
    serve.py keeps the pipeline it runs.  There a refusal whose cause can pass (a
    replica during a failover, a Redis out of memory or connections) is logged
    as an error and left to /readyz, which reports the refused writes.
    """
    problems: list[Problem] = []
    answered: dict[str, Any] = {}
    stores_log = logging.getLogger("wsgistack.stores")
    for name, store in built.context.stores.items():
        probe = getattr(store, "probe", None)
        found = probe() if callable(probe) else None
        if found is None:
            if callable(probe):
                answered[name] = store
            continue
        what, refuses = found
        if hosted and what in _passing():
            stores_log.error(
                "store %r (%s): %s; started anyway, since under another WSGI server a process that fails to "
                "start can stop it altogether (a failover, or Redis freeing memory or connections, ends this): "
                "its layers follow their on_store_error, and /readyz fails while Redis refuses them", name,
                store.url, what)
        elif refuses:
            problems.append(built.config.document.problem(("stores", name), f"store {name!r} ({store.url}): {what}"))
        else:
            stores_log.warning(
                "store %r (%s) does not answer yet: %s; its layers follow their on_store_error and /readyz "
                "reports it until it answers", name, store.url, what)
    _warn_of_evictions(built, answered)
    return problems


#: Layers whose keys are state: a key evicted changes what a request may do (a revocation forgotten).
_STATEFUL = ("auth", "session", "ratelimit")


def _warn_of_evictions(built: BuiltStack, stores: Mapping[str, Any]) -> None:
    """Warn when Redis's ``maxmemory`` settings would make a store lose state, or let the cache refuse it room.

    With ``maxmemory`` set, an evicting policy may drop a revocation or a session
    (every key the layers write has a TTL, so the ``volatile-*`` policies evict them
    too); with ``noeviction`` a cache on the same server (any of its databases: they
    share ``maxmemory``) fills it, and then the logins and logouts that need a write fail.
    """
    users: dict[str, set[str]] = {}
    for spec in built.config.pipeline:
        store = getattr(spec.options, "store", None)
        if isinstance(store, str):
            users.setdefault(store, set()).add(spec.name)
    servers: dict[str, list[tuple[str, Any, str]]] = {}  # run id -> (store name, store, policy), maxmemory set
    for name, store in stores.items():
        ask = getattr(store, "memory_policy", None)
        found = ask() if callable(ask) else None
        if found is not None and found[1]:  # no maxmemory: Redis evicts nothing
            servers.setdefault(found[2] or name, []).append((name, store, found[0]))
    log = logging.getLogger("wsgistack.stores")
    for on_server in servers.values():
        caches = [name for name, _, _ in on_server if "cache" in users.get(name, ())]
        for name, store, policy in on_server:
            state = sorted(users.get(name, set()).intersection(_STATEFUL))
            if state and policy != "noeviction":
                log.warning("store %r (%s) evicts keys when Redis is full (maxmemory-policy %s): %s would lose "
                            "state (a revoked token accepted again, a session or a count gone); give them a Redis "
                            "with maxmemory-policy noeviction (docs/stores.md)", name, store.url, policy,
                            ", ".join(state))
            elif state and caches:
                where = "holds the cache beside" if name in caches else \
                    f"shares its server, and maxmemory, with store {caches[0]!r}, which holds the cache; it holds"
                log.warning("store %r (%s) %s %s, with maxmemory-policy noeviction: once cached answers fill "
                            "maxmemory, the writes logins and logouts need are refused; give the cache a Redis "
                            "server of its own, with allkeys-lru (docs/stores.md)", name, store.url, where,
                            ", ".join(state))


def _probed(built: BuiltStack, *, hosted: bool = False) -> BuiltStack:
    """``built``, unless a store refuses its configuration: then closed, and a ConfigError (``hosted``: see
    :func:`refused_stores`)."""
    problems = refused_stores(built, hosted=hosted)
    if problems:
        built.close()  # memory:// stores shared with a running pipeline keep their data (MemoryStore.close)
        raise ConfigError(problems)
    return built


def build_hosted(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> BuiltStack:
    """Build ``path`` for another WSGI server, judged with the least safe server settings (see HOSTED), or with
    ``$WSGISTACK_HOST_LISTEN``'s; no store is asked anything yet (:func:`refused_stores` does)."""
    from .lint import hsts_outside_proxy, proxyfix_trusts_every_peer

    base = config_dir(path)
    try:
        config, warnings = load(_relative_to(read_file(path, env=env), base), hosted=True)
    except ConfigError as exc:
        raise ConfigError(_imported_by_host(exc.problems)) from None
    given = (os.environ if env is None else env).get(HOST_LISTEN_ENV, "")
    named, unread = _host_listen(given, config.document.file)
    shown = ", ".join(given.split())  # (as the operator wrote them, in the messages)
    served = config.server.model_copy(update=hosted_settings({HOST_LISTEN_ENV: " ".join(named)}))
    # Judged on the host's settings alone: the file's server section (listen, trusted_proxy) is serve.py's.
    if named:
        listens = f"the WSGI server hosting it listens on {shown} ({HOST_LISTEN_ENV})"
        instead = ""
    else:
        listens = (f"the WSGI server hosting it may listen beyond loopback and keep every client's forwarding "
                   f"headers ({HOST_LISTEN_ENV} is unset)")
        instead = f", or name in {HOST_LISTEN_ENV} the loopback address that server binds"
    found = _judged(config, served, partial(proxyfix_trusts_every_peer, listens=listens, instead=instead))
    if found:
        raise ConfigError([*unread, *found])
    found = [*unread, *found]
    # Waitress's scheme settings do not apply there either: only a proxy layer makes requests https.
    plain = served.model_copy(update={"url_scheme": "http", "trusted_proxy_headers": []})
    found += [_noted(p, HOSTED_NOTE) for p in _judged(config, plain, hsts_outside_proxy)]
    doc = config.document
    for name in ("trusted_proxy", "clear_untrusted_proxy_headers", "workers", "reload"):
        if name in config.server.model_fields_set:
            found.append(doc.problem(("server", name), f"server.{name} is serve.py's (Waitress's) setting and "
                                     f"has no effect under another WSGI server: {_HOST_OWNS[name]}",
                                     severity="warning"))
    others = sorted(config.server.model_fields_set - set(_HOST_OWNS) - {"generation_header"})
    if others:
        found.append(doc.problem(("server",), f"{', '.join(others)}: serve.py's (Waitress's) settings, which "
                                 "another WSGI server does not read: its own settings apply", key=True,
                                 severity="warning"))
    found += _per_process_state(config)
    try:
        new = build(config, server=served, hosted=True)
    except ConfigError as exc:  # a loopback-only allowance (debug, cookie_secure: false), judged as hosted
        forwarding = config.forwarding_layer
        note = f"under another WSGI server, which binds {shown} as {HOST_LISTEN_ENV} says" if named \
            else HOSTED_NOTE
        if forwarding is not None:
            note += f"; behind a proxy: {forwarding.name} at pipeline[{forwarding.index}] reads forwarding headers"
        elif not named:
            note += f"; set {HOST_LISTEN_ENV} to the address it binds"
        raise ConfigError([*unread, *(_noted(p, note) if "loopback" in p.message else p
                                      for p in exc.problems)]) from None
    new.warnings = [*warnings, *found]
    return new


def _host_listen(value: str, file: str) -> tuple[list[str], list[Problem]]:
    """The addresses ``$WSGISTACK_HOST_LISTEN`` names, each that is none (a typo: no port, one out of range)
    replaced by a public one and named in a warning: it never passes a loopback-only allowance in silence."""
    named: list[str] = []
    unread: list[Problem] = []
    for entry in value.split():
        try:
            split_listen(entry)
        except ValueError as exc:
            unread.append(Problem(f"entry {entry!r} is not an address to listen on ({exc}): it is judged as a "
                                  "public address", (HOST_LISTEN_ENV,), file, severity="warning"))
            named.append("0.0.0.0:0")
        else:
            named.append(entry)
    return named, unread


def _per_process_state(config: StackConfig) -> list[Problem]:
    """A warning per memory:// store whose state the host refuses at the first request when it runs several
    processes (``LiveStack._check_host``): neither ``check --hosted`` nor the start can see how many it runs."""
    from .lint import per_process_state

    layers: dict[str, list[str]] = {}
    for spec, label, store, _ in per_process_state(config, config.pipeline):
        layers.setdefault(store, []).append(f"{label} at pipeline[{spec.index}]")
    return [config.document.problem(("stores", store), f"store {store!r} (memory://) keeps the state of "
                                    f"{', '.join(names)} in each process apart: a WSGI server that runs several "
                                    "processes (wsgi.multiprocess, gunicorn -w 2) answers every request with 500; "
                                    "use redis:// there", severity="warning") for store, names in layers.items()]


def _imported_by_host(problems: list[Problem]) -> list[Problem]:
    """``problems`` with a module that is on no folder of the path said to be looked for where the host starts."""
    try:
        cwd = os.getcwd()
    except OSError:  # (the folder was removed)
        return problems
    note = (f"under another WSGI server, which imports from its working directory, here {cwd}, and PYTHONPATH: "
            "start it in the folder that holds the module")
    return [_noted(p, note) if p.message.startswith("cannot import ") and "not in a folder on its path" in p.message
            else p for p in problems]


@contextlib.contextmanager
def _importable_as_hosted() -> Iterator[None]:
    """The working directory on ``sys.path`` (first) while inside, as a WSGI server puts the folder it starts
    in (gunicorn, waitress-serve), so that a layer module beside the file imports as it will there."""
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    added = bool(cwd) and cwd not in sys.path and "" not in sys.path  # ("" is the working directory too)
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def check_hosted(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> list[Problem]:
    """What ``serve:app`` would print for ``path`` (``serve.py check --hosted``), short of asking Redis: the
    problems that stop it, or the warnings of the stack it would serve (built, then closed again).

    Modules are imported as the host imports them: from the working directory (where it is started,
    which ``check`` takes to be this one) besides the folders on the path.
    """
    try:
        with _importable_as_hosted():
            built = build_hosted(path, env=env)
    except ConfigError as exc:
        return exc.problems
    built.close()
    return built.warnings


def restart_settings(config: StackConfig) -> dict[str, Any]:
    """The values of the ``RESTART_ONLY`` settings a server of ``config`` runs with."""
    values = {name: getattr(config.server, name) for name in RESTART_ONLY}
    values["clear_untrusted_proxy_headers"] = config.clears_proxy_headers  # "auto" follows the pipeline
    return values


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


class _Flight:
    """The requests in flight on one pipeline: once it is retired, the last of them closes it."""

    __slots__ = ("built", "closed", "count", "header", "lock", "retired")

    def __init__(self, built: BuiltStack, header: list[tuple[str, str]] | None = None) -> None:
        self.built = built
        self.header = header  # X-Stack-Generation of this pipeline (None: not sent)
        self.lock = threading.Lock()
        self.count = 0
        self.retired = self.closed = False

    def enter(self) -> bool:
        """Count a request in; False once the pipeline is retired (take the current one instead)."""
        with self.lock:
            if self.retired:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.count -= 1
            last = self.retired and self.count == 0
        if last:
            self._close()

    def retire(self) -> None:
        """No new requests; close the pipeline now, or when the last request in flight finishes."""
        with self.lock:
            self.retired = True
            idle = self.count == 0
        if idle:
            self._close()

    def _close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.built.close()  # memory:// stores carried over keep their data: their close() is a no-op
        except Exception:
            log.exception("closing the pipeline a reload replaced failed")

    def finished(self, result: Iterable[bytes], environ: WSGIEnvironment) -> Iterable[bytes]:
        """``result``, which counts the request out when the server closes it."""
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(result, wrapper):
            self.leave()  # the server sends the file itself (and closes it): the pipeline is done with it
            return result
        return _SizedFinish(result, self) if hasattr(result, "__len__") else _Finish(result, self)


class _Finish:
    """A response body that tells its pipeline's :class:`_Flight` when the server closes it."""

    __slots__ = ("flight", "result")

    def __init__(self, result: Iterable[bytes], flight: _Flight | None) -> None:
        self.result, self.flight = result, flight

    def __iter__(self) -> Any:
        return iter(self.result)

    def close(self) -> None:
        flight, self.flight = self.flight, None
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if flight is not None:
                flight.leave()


class _SizedFinish(_Finish):
    """The same for a body with a length (Waitress sets Content-Length for a one-chunk list)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self.result)  # type: ignore[arg-type]


class LiveStack:
    """Host the pipeline built from ``path``; ``reload()`` swaps in a new one."""

    def __init__(self, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                 built: BuiltStack | None = None, hosted: bool = False) -> None:
        self.path = os.fspath(path)
        self.env = env
        #: prefixed to reload log lines ("worker 1234: "), so a supervisor's workers can be told apart
        self.label = ""
        self._lock = threading.Lock()
        #: Served by another WSGI server (``serve:app``): its listener, workers and proxy handling are
        #: not the file's ``server:`` section, and wsgistack cannot see them (see HOSTED).  The process's
        #: setup (the .env, printing the warnings, the log level and handlers) is ``serve.hosted_app``'s.
        self.hosted = hosted
        self.current = built or (_probed(build_hosted(self.path, env=env), hosted=True) if hosted
                                else _probed(build_from_file(self.path, env=env)))
        #: The server settings this process started with; those in RESTART_ONLY stay in force until a restart.
        self.in_force: ServerOptions = self.current.config.server.model_copy(
            update=hosted_settings(self._env)) if hosted else self.current.config.server
        #: The Waitress adjustments in force (what a server, or a restarted worker, is created with).
        self.waitress_kwargs: dict[str, Any] = self.current.config.waitress_kwargs()
        if hosted:
            self.waitress_kwargs["clear_untrusted_proxy_headers"] = False
        #: Hosted: the first request tells whether the host runs several processes (``wsgi.multiprocess``).
        self._host_check = hosted
        self._host_problems: list[Problem] | None = None
        self._started = restart_settings(self.current.config)
        #: Called with the new pipeline after every successful reload (serve.py applies ``logging:``).
        self.on_reload: list[Callable[[BuiltStack], None]] = []
        self.generation = 1
        #: The text the last successful reload built (None: the start's): a supervisor hands it to its workers.
        self.source: str | None = None
        self.last = ReloadResult(True, 1)
        self._mtime = self._stat()
        self._follow = False
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._publish()
        self._flight = _Flight(self.current, self._generation_header)
        self._retired: list[_Flight] = []  # replaced pipelines not closed yet (requests still in flight)
        self._retired_lock = threading.Lock()  # two reloads at once (polling, SIGHUP) each keep theirs

    def _stat(self) -> tuple[int, int, int, int]:
        """The file's (mtime ns, size, inode, ctime ns): a write, a rename or a chmod changes it.

        (The ctime: a file that could not be read, then was made readable, is read again.)
        """
        try:
            st = os.stat(self.path)
        except OSError:
            return (0, 0, 0, 0)
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)

    def _publish(self) -> None:
        ctx = self.current.context
        ctx.settings["generation"] = self.generation
        ctx.settings["last_reload"] = self.last
        server = self.current.config.server
        self._generation_header = [("X-Stack-Generation", str(self.generation))] if server.generation_header else None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._host_check:
            refused = self._check_host(environ, start_response)
            if refused is not None:
                return refused
        flight = self._flight
        while not flight.enter():  # a reload retired it just now: the new one is in place
            flight = self._flight
        header = flight.header
        respond = start_response
        if header is not None:
            def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                return start_response(status, [*headers, *header], exc_info)
        try:
            result = flight.built.app(environ, respond)
        except BaseException:
            flight.leave()
            raise
        return flight.finished(result, environ)

    def reload(self, generation: int | None = None, source: str | None = None) -> ReloadResult:
        """Rebuild from the file (or from ``source``, its text as another process read it); swap on
        success, keep the old pipeline on failure.

        A successful reload adds one to the generation, or takes ``generation`` (a worker
        following its supervisor's, built from the text the supervisor built: serve.py).
        """
        with self._lock:
            self._mtime = self._stat()
            try:
                new, text = self._build(source)
            except ConfigError as exc:
                self.last = ReloadResult(False, self.generation, problems=exc.problems)
                self.current.context.settings["last_reload"] = self.last
                log.error("%s%s", self.label, self.last.summary())
                return self.last
            except (Exception, SystemExit) as exc:  # a layer or the app failed to build (sys.exit("…") too)
                self.last = ReloadResult(False, self.generation, problems=[Problem(f"build failed: {exc}")])
                self.current.context.settings["last_reload"] = self.last
                log.exception("%sreload failed; the old pipeline keeps serving", self.label)
                return self.last
            wanted = restart_settings(new.config)
            needs = [name for name in RESTART_ONLY if wanted[name] != self._started[name]]
            old, retired = self.current, self._flight
            interval = old.config.server.reload.interval
            self.current, self.source = new, text
            self.generation = self.generation + 1 if generation is None else generation
            self.last = ReloadResult(True, self.generation, needs_restart=needs, problems=new.warnings)
            self._publish()
            self._flight = _Flight(new, self._generation_header)  # the pipeline and its generation, as one
            for callback in self.on_reload:  # first, so that the lines below already follow a new logging:
                try:
                    callback(new)
                except Exception:
                    log.exception("%sa reload hook failed", self.label)
            log.info("%s%s", self.label, self.last.summary())
            gone = _removed_layers(old, new)
            if gone:  # a file read half-written can be a valid, shorter config: say what went
                log.warning("%sthe new pipeline has no %s any more (layers it removed)", self.label, ", ".join(gone))
            for warning in new.warnings:
                log.warning("%s%s", self.label, warning)
            if self._follow:
                if self._watcher is not None and new.config.server.reload.interval != interval:
                    self._watch_stop.set()  # it waits out the old interval (up to an hour): a new one polls
                    self._watcher = None
                self._sync_watch()
        # The old pipeline's layers and stores are closed once its last request in flight has
        # finished (closing them now could cut those requests off).
        retired.retire()
        with self._retired_lock:
            self._retired = [f for f in self._retired if not f.closed] + ([] if retired.closed else [retired])
        del old
        return self.last

    def close(self) -> None:
        """At exit: close the current pipeline and those reloads replaced that still had requests in
        flight (their layers write what they owe, the access log the lines of requests cut off)."""
        with self._retired_lock:
            retired, self._retired = self._retired, []
        for flight in retired:
            flight._close()
        self.current.close()

    def _build(self, source: str | None = None) -> tuple[BuiltStack, str]:
        """Read (unless ``source`` is the text), validate, lint and build the file, carrying unchanged
        memory:// stores over; the pipeline and the text it was built from."""
        text = read_source(self.path) if source is None else source
        document = read_text(text, file=self.path, env=self.env)
        config, warnings = load(_relative_to(document, config_dir(self.path)))
        warnings = self._lint_as_served(config, warnings)
        new = build(config, stores=self._stores(config), server=self.in_force)
        new.warnings = warnings
        return _probed(new), text

    @property
    def _env(self) -> Mapping[str, str]:
        return os.environ if self.env is None else self.env

    def _check_host(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes] | None:
        """Refuse every request when a host with several processes would split per-process state."""
        problems = self._host_problems
        if problems is None:
            problems = []
            if environ.get("wsgi.multiprocess"):
                from .lint import shared_state

                config = self.current.config
                several = partial(shared_state, several="the WSGI server runs several processes (wsgi.multiprocess)")
                problems = [p for p in _judged(config, config.server, several) if p.severity == "error"]
                for problem in problems:
                    log.error("%s", problem)
            self._host_problems = problems
            if not problems:
                self._host_check = False
                return None
        if not problems:
            return None
        body = (b"wsgistack keeps per-process state (memory://) under a WSGI server with several processes; "
                b"the log says which layers; use redis://\n")
        start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8"),
                                                     ("Content-Length", str(len(body)))])
        return [body]

    def _lint_as_served(self, config: StackConfig, known: list[Problem]) -> list[Problem]:
        """Lint the new pipeline against the server settings in force; raise on errors, return the warnings.

        The file's own settings are linted by ``load``, but the workers, the sockets, the
        threads and Waitress's adjustments are the start's until a restart: a pipeline can be
        safe with the file's and unsafe with the ones serving, or the other way round.  Every
        rule that reads server settings (``lint.SERVED_ONLY``: state per process under the
        workers running, a ProxyFix believing every client's X-Forwarded-For, which Waitress
        keeps when the start's pipeline read them itself, paced streams against the threads
        running, the validation limits against Waitress's) judges the new pipeline with the
        settings in force instead: ``known`` (``load``'s warnings) comes back without what those
        rules found only with the file's settings, and with what they find only with the ones
        in force (noted so).  (A proxy layer added while Waitress clears the headers sees the
        proxy as every client, as the old pipeline did: a restart applies it, and the reload
        says so.)  Hosted, only the multiprocess and ProxyFix rules are judged again.
        """
        from .lint import SERVED_ONLY, proxy_headers_kept, proxyfix_trusts_every_peer, shared_state

        restart_only = {name: getattr(self.in_force, name) for name in RESTART_ONLY}
        restart_only["clear_untrusted_proxy_headers"] = self.waitress_kwargs["clear_untrusted_proxy_headers"]
        served = config.server.model_copy(update=restart_only)
        if all(getattr(served, name) == getattr(config.server, name) for name in restart_only):
            return known
        # (proxy_headers_kept judges the file's own clear_untrusted_proxy_headers: true, not the value in force.)
        rules = (shared_state, proxyfix_trusts_every_peer) if self.hosted else \
            tuple(rule for rule in SERVED_ONLY if rule is not proxy_headers_kept)
        in_force = _judged(config, served, *rules)
        now = {(p.message, p.path) for p in in_force}
        only_the_files = {(p.message, p.path) for p in _judged(config, config.server, *rules)} - now
        seen = {(p.message, p.path) for p in known}
        found = [_noted(p, "with the server settings in force: a restart applies the file's")
                 for p in in_force if (p.message, p.path) not in seen]
        if any(p.severity == "error" for p in found):
            raise ConfigError(found)
        return [p for p in known if (p.message, p.path) not in only_the_files] + found

    def _stores(self, config: StackConfig) -> dict[str, Store]:
        """The new config's stores: unchanged memory:// ones are the old instances (their data stays)."""
        old_specs, old_stores = self.current.config.stores, self.current.context.stores
        # A failed build closes its stores: MemoryStore.close() keeps the data, so the old pipeline
        # is not harmed by sharing it.
        keep = {name: old_stores[name] for name, spec in config.stores.items()
                if name in old_stores and spec.url.startswith("memory:") and old_specs.get(name) == spec}
        return make_stores(config, keep)

    def fingerprint(self) -> tuple[int, int, int, int]:
        """The file's (mtime ns, size, inode, ctime ns) now: two readings differ when it was written or replaced."""
        return self._stat()

    def changed(self) -> bool:
        """Whether the file's mtime, size or inode differs from the one the last (re)load read."""
        return self._stat() != self._mtime

    def settled_change(self, seen: list[tuple[int, int, int, int]]) -> bool:
        """For polling: the file changed since the last load *and* stayed the same since the last poll.

        A file still being written in place (a slow copy) keeps changing between
        polls; waiting for one quiet interval keeps a reload from reading it
        half-written.  ``seen`` holds the previous poll's reading.
        """
        now = self._stat()
        quiet = now == seen[0]
        seen[0] = now
        return quiet and now != self._mtime

    def watch(self, interval: float = 1.0, stop: threading.Event | None = None) -> threading.Thread:
        """Poll the file's mtime every ``interval`` seconds and reload on change, in a daemon thread."""
        stop = stop or threading.Event()

        def run() -> None:
            seen = [self._stat()]
            while not stop.wait(interval):
                if self.settled_change(seen):
                    self.reload()

        thread = threading.Thread(target=run, name="wsgistack-watch", daemon=True)
        thread.start()
        return thread

    def follow_watch(self) -> None:
        """Poll while ``server.reload.watch`` is on, at its ``interval``, now and after every reload."""
        with self._lock:
            self._follow = True
            self._sync_watch()

    def stop_watch(self) -> None:
        """Stop the poller started by :meth:`follow_watch`.

        Without the reload lock: a stop must not wait for a reload in progress (a slow app
        factory would hold a SIGTERM, and a second one, for as long as it builds).
        """
        self._follow = False
        self._watch_stop.set()
        self._watcher = None

    def _sync_watch(self) -> None:
        """Start the poller if the config wants one and none runs (call with ``_lock`` held)."""
        if not self.current.config.server.reload.watch or self._watcher is not None:
            return
        stop = self._watch_stop = threading.Event()

        def run() -> None:
            seen = [self._stat()]
            while True:
                options = self.current.config.server.reload
                if not options.watch or stop.wait(options.interval):
                    break
                if self.settled_change(seen):
                    self.reload()  # may turn watching off: the next round sees it
            with self._lock:
                if self._watcher is threading.current_thread():
                    self._watcher = None
                    if self._follow and self.current.config.server.reload.watch and not stop.is_set():
                        self._sync_watch()  # turned off and on again while this thread was leaving

        self._watcher = threading.Thread(target=run, name="wsgistack-watch", daemon=True)
        self._watcher.start()

    def follow_files(self) -> None:
        """Have the layers that append to files reopen the ones that were moved (log rotation).

        A layer does it on its own when it writes; a process that writes nothing
        through its pipeline (the supervisor of workers) calls this now and then.
        """
        for layer in self.current.instances:
            follow = getattr(layer, "follow", None)
            if callable(follow):
                try:
                    follow()
                except Exception:  # a layer's own trouble; it reports it when it writes
                    log.debug("%sfollowing a layer's file failed", self.label, exc_info=True)

    def after_fork(self, label: str = "") -> None:
        """Make the copy a forked worker inherited usable: fresh lock, no poller, its own label."""
        self._lock = threading.Lock()
        self._watcher = None
        self._watch_stop = threading.Event()
        self._follow = False
        self.label = label


def _removed_layers(old: BuiltStack, new: BuiltStack) -> list[str]:
    """Names of the layers the old pipeline had and the new one lacks (one per missing instance)."""
    remaining = Counter(spec.name for spec in new.config.pipeline)
    gone = []
    for spec in old.config.pipeline:
        if remaining[spec.name] > 0:
            remaining[spec.name] -= 1
        else:
            gone.append(spec.name)
    return gone
