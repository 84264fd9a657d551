"""wsgistack's command line: serve, check, layers, explain, users, cache.

    python serve.py [-c stack.yaml] serve            # the default command
    python serve.py [-c stack.yaml] check            # exit 0 clean, 1 warnings, 2 errors
    python serve.py layers                           # built-in layers and their options
    python serve.py [-c stack.yaml] explain GET /api/v1/search?q=x -H 'Origin: https://a.example' --peer 10.0.0.1
    python serve.py [-c stack.yaml] users add alice --role admin
    python serve.py [-c stack.yaml] cache purge '/api/v1/search*'

The module-level ``app`` lets any WSGI server host the same stack
(``gunicorn serve:app``): taking the attribute builds ``$WSGISTACK_CONFIG``
(default ``stack.yaml``), so an invalid file stops the server at startup with
its located errors.  Importing the module builds nothing.  A ``wsgi.py`` of your own
gets the same with ``application = serve.hosted_app("stack.yaml")``.
"""

from __future__ import annotations

import signal
import sys
import sysconfig

#: Signals the server handles; blocked around fork so a new worker never sees them unhandled.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds a worker whose reload to the supervisor's generation failed waits before trying again, doubled
#: after each failure up to the second figure (a store that did not answer while it built, say).
WORKER_RETRY = (2.0, 60.0)

if __name__ == "__main__":
    # Before the slow imports below: a SIGHUP (`systemctl reload`) or SIGTERM sent while `serve` starts
    # waits for the server's handlers instead of ending the process; main() unblocks them at once for
    # every other command.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)

import argparse
import contextlib
import ctypes
import errno
import functools
import gc
import importlib.metadata
import inspect
import io
import json
import logging
import math
import mmap
import os
import re
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from config import ConfigError, LayerSpec, Problem, build_from_file, check, config_dir, read_file
from config.build import BuiltStack, StackConfig, parse
from config.live import LiveStack, check_hosted, refused_stores
from config.registry import LAYERS, resolve
from config.schema import LoggingOptions
from stores.base import secret_name

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.task import WSGITask

log = logging.getLogger("wsgistack")
DEFAULT_CONFIG = "stack.yaml"


def _env_config() -> str:
    """``$WSGISTACK_CONFIG``, else :data:`DEFAULT_CONFIG`: set but empty (``Environment=WSGISTACK_CONFIG=``,
    ``WSGISTACK_CONFIG="$UNSET"``) counts as unset, as it does for the other ``WSGISTACK_`` variables, not
    as the empty path, which names the current folder."""
    value = os.environ.get("WSGISTACK_CONFIG", "")
    return value if value.strip() else DEFAULT_CONFIG


def _config_path(text: str) -> str:
    """``-c/--config``: a path; the empty one names no file (and would read the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file")
    return text


def _print_problems(problems: Iterable[Problem], stream: Any = None) -> None:
    for problem in problems:
        print(problem, file=stream or sys.stderr)


#: The environment variable that overrides ``logging.level``.
LOG_LEVEL_ENV = "WSGISTACK_LOG_LEVEL"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
#: The handler serve.py gives the root logger (None until :func:`_setup_logging` adds it).
_handler: logging.Handler | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``request_id``, ``message`` (and ``exception``)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line)  # ASCII, control characters escaped: one line whatever the message holds


class TextFormatter(logging.Formatter):
    """``2025-05-01T09:30:12.345Z INFO logger [request id]: message``, the record's one line starting so.

    The time is UTC, as in the JSON lines and the access log.  The message's control
    characters (line breaks of every kind, ANSI escapes) are escaped as
    :func:`middleware.base.escape_control` does: a value a client sent (a header
    Waitress complains of, a token's subject) cannot forge a line of its own.  A
    traceback (or ``stack_info``) follows on lines of its own, each prefixed with
    ``  | `` and escaped the same way but for its line breaks: an exception's message
    holding such a value (``ValueError(f"bad {value}")``) reads as part of the
    traceback, never as a record.
    """

    converter = time.gmtime  # type: ignore[assignment]  # typeshed's gmtime reads as taking no argument
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        from middleware.base import escape_control

        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        from middleware.base import escape_control

        # logging.Formatter.format without its tail: the traceback and stack are added here, prefixed.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:  # (cached on the record, as the base class does)
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                text += "".join(f"\n  | {escape_control(line)}" for line in block.split("\n"))
        return text


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def _setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    global _handler
    from middleware.access_log import LineHandler
    from middleware.request_id import RequestIdLogFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(_formatter(fmt))
    if not logging.getLogger().handlers:
        _handler = handler
    logging.basicConfig(level=level, handlers=[handler])
    access = logging.getLogger("wsgistack.access")  # already one JSON line per request: print it as is
    access.handlers[:] = [LineHandler(sys.stdout)]
    access.propagate = False
    queue = logging.getLogger("waitress.queue")  # "Task queue depth is N": one line per queued request
    if not any(isinstance(f, QueueDepthLines) for f in queue.filters):
        queue.addFilter(QueueDepthLines(10.0))


class QueueDepthLines(logging.Filter):
    """Waitress's "Task queue depth is N": one line per ``seconds``, the next saying how many were held back.

    Waitress warns from its I/O thread for every request that has to wait for a task thread:
    when a store is slow, thousands of lines a second, which drown the lines that say why (and
    a log pipe read slower than that stalls every thread).  Each line's ``write()`` also let go
    of the interpreter lock, and the task threads ran: a held-back line gives it up the same way
    (``sleep(0)``), or under 64 connections the I/O thread kept it and a process served a third
    fewer requests, with a longer tail.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.next = -math.inf
        self.held = 0
        self.since = 0.0  # when the first line held back since the last one let through came (time.time())
        self.deepest = 0  # the deepest queue those lines reported
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        depth = record.args[0] if isinstance(record.args, tuple) and record.args else None
        with self.lock:
            held_back = now < self.next
            if held_back:
                if not self.held:
                    self.since = record.created
                self.held += 1
                if type(depth) is int and depth > self.deepest:
                    self.deepest = depth
            else:
                self.next = now + self.seconds
                held, since, deepest = self.held, self.since, self.deepest
                self.held = self.deepest = 0
        if held_back:
            time.sleep(0)
            return False
        if held:  # they may be from a burst long ago: say when they began, and how deep the queue got
            began = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
            record.msg, record.args = f"{record.getMessage()} ({held} more such lines held back since {began}, " \
                                      f"the deepest {deepest})", ()
        return True


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _env_log_level() -> str | None:
    """``$WSGISTACK_LOG_LEVEL`` in upper case, or None when unset; ValueError when it names no level."""
    value = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if not value:
        return None
    if value.upper() not in _LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV}={value!r} is not a log level: use DEBUG, INFO, WARNING or ERROR")
    return value.upper()


def _apply_logging(options: LoggingOptions) -> None:
    """Apply stack.yaml's ``logging:`` (at start and on every reload); ``$WSGISTACK_LOG_LEVEL`` overrides the level."""
    level = _env_log_level() or options.level
    logging.getLogger().setLevel(level)
    if _handler is not None:
        _handler.setFormatter(_formatter(options.format))


# ---------------------------------------------------------------- serve


#: Why binding one address of a host name may leave it out (with a warning) while another binds: an
#: address family the machine lacks (IPv6 disabled) or an address it does not have.  Any other failure
#: (an address in use, a port not allowed) stops the start: another server would hold part of the name.
_UNAVAILABLE = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def _bind(listen: Sequence[str], backlog: int, reuse_port: bool = False, warn: bool = True) -> list[socket.socket]:
    """Bind the listening sockets in the parent, so forked workers inherit them.

    A host name is bound on every address it resolves to (``localhost``: 127.0.0.1
    and ::1 on a dual-stack machine, so a client resolving it either way is served),
    each address once.  One its machine cannot have (IPv6 disabled) is left out, with
    a warning (unless ``warn`` is false), while another binds; none bound, or any other
    failure, raises OSError whose ``strerror`` says ``cannot listen on HOST:PORT: …``.
    With ``reuse_port`` every socket gets ``SO_REUSEPORT``, so several sets
    can be bound to the same addresses (one per worker, see :func:`_slots`).
    """
    sockets: list[socket.socket] = []
    bound: set[tuple[int, str, int]] = set()  # a name may resolve to one address twice
    try:
        for item in listen:
            host, _, port = item.rpartition(":")
            host = host.strip("[]")
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {item}: {exc.strerror or exc}") from exc
            served, left_out = 0, []
            for family, kind, proto, _, addr in infos:
                address, number = str(addr[0]), int(addr[1])
                key = (int(family), address.split("%", 1)[0], number)
                if key in bound:
                    continue
                bound.add(key)
                where = f"[{address}]:{number}" if family == socket.AF_INET6 else f"{address}:{number}"
                try:
                    sockets.append(_listening(family, kind, proto, addr, backlog, reuse_port))
                    served += 1
                except OSError as exc:
                    why = f"{exc.strerror or exc}" + ("" if where == item else f" ({where})")
                    if exc.errno not in _UNAVAILABLE:
                        raise OSError(exc.errno, f"cannot listen on {item}: {why}") from exc
                    left_out.append((exc, where, why))
            if left_out and not served:
                raise OSError(left_out[0][0].errno,
                              f"cannot listen on {item}: {'; '.join(why for _, _, why in left_out)}")
            for failure, where, _ in left_out if warn else ():
                log.warning("cannot listen on %s at %s (%s); serving on its other addresses", item, where,
                            failure.strerror or failure)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listening(family: int, kind: int, proto: int, addr: Any, backlog: int, reuse_port: bool) -> socket.socket:
    """A socket listening on ``addr`` (an IPv6 one takes IPv6 peers only)."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _slots(listen: Sequence[str], backlog: int, workers: int) -> list[list[socket.socket]]:
    """The listening sockets of each worker slot.

    On Linux every worker gets sockets of its own, bound to the same
    addresses with ``SO_REUSEPORT``: the kernel spreads new connections
    evenly across them.  Workers that share one socket take connections as
    fast as each wakes up first, and keep-alive clients then stay unevenly
    spread: with 16 connections one worker often held all 16 while the other
    idled, and two workers served no more than one.  A worker restarted in a
    slot inherits that slot's sockets from the supervisor, with the
    connections waiting in their backlog.  Elsewhere (no ``SO_REUSEPORT``
    balancing) the workers share one set.  A port another process listens on
    is refused, as without ``SO_REUSEPORT``.
    """
    if workers > 1 and sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"):
        # SO_REUSEPORT would also let this server join another one already on the port (same
        # user) and split its traffic: bind plainly first, which fails if anything listens there.
        for sock in _bind(listen, backlog):
            sock.close()
        slots: list[list[socket.socket]] = []
        try:
            for _ in range(workers):
                slots.append(_bind(listen, backlog, reuse_port=True, warn=False))  # (the first bind warned)
        except BaseException as exc:
            for sock in (s for slot in slots for s in slot):
                sock.close()
            if not isinstance(exc, OSError):
                raise
            log.warning("cannot bind a socket per worker (%s); the workers share one", exc)
            return [_bind(listen, backlog, warn=False)] * workers
        else:
            return slots
    return [_bind(listen, backlog)] * workers


#: Failed starts in a row (a worker dead within a second), in every worker slot, after which the
#: supervisor gives up (exit code 3): restarting it is the service manager's call.
GIVE_UP = 5

#: The environment variable that overrides ``server.drain_timeout``.
DRAIN_ENV = "WSGISTACK_DRAIN_SECONDS"
#: How often the serving loop looks up from the sockets to see whether it should stop.
_TICK = 0.2


class _Beats:
    """The workers' heartbeats, in a page the supervisor shares with them: per slot, the
    ``time.monotonic()`` of its worker's last pass through the serving loop; after them, the
    generation the supervisor serves, which every worker reloads to reach (:meth:`publish`),
    and the length of its text.  The text is in one of two unlinked files the workers inherit
    (nothing is left on disk), written in turn: a worker builds the very text the supervisor
    built, not the file as it is by then (edited again, say, while the supervisor built)."""

    _STAMP = struct.Struct("d")
    _GENERATION = struct.Struct("qq")  # the generation, and its text's length in bytes (-1: none)

    def __init__(self, slots: int, generation: int = 1) -> None:
        self.page = mmap.mmap(-1, self._STAMP.size * slots + self._GENERATION.size)
        self._at = self._STAMP.size * slots
        self._texts = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]  # noqa: SIM115 - closed in close()
        self.publish(generation)

    def publish(self, generation: int, source: str | None = None) -> None:
        """The supervisor's generation now (after a successful reload), and the text it built: the workers
        reload to it.  The text goes to the file the generation before did not use, then the page names it."""
        if source is not None and self._header()[0] == generation:
            return  # (published already: the file a worker may be reading stays as it is)
        length = -1
        if source is not None:
            data = source.encode()
            fd = self._texts[generation % 2].fileno()
            os.ftruncate(fd, 0)
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], written)
            length = len(data)
        self.page[self._at:self._at + self._GENERATION.size] = self._GENERATION.pack(generation, length)

    def _header(self) -> tuple[int, int]:
        """The generation and its text's length (read until two readings agree: never half written)."""
        first = self._GENERATION.unpack_from(self.page, self._at)
        while True:
            again = self._GENERATION.unpack_from(self.page, self._at)
            if again == first:
                return again[0], again[1]
            first = again

    def generation(self) -> int:
        """The generation the supervisor last published."""
        return self._header()[0]

    def published(self) -> tuple[int, str | None]:
        """The generation the supervisor last published and the text it built it from (None: the start's).

        Read again when the supervisor published another meanwhile (it may be rewriting that file).
        """
        while True:
            generation, length = self._header()
            if length < 0:
                return generation, None
            data = os.pread(self._texts[generation % 2].fileno(), length, 0)
            if len(data) == length and self._header() == (generation, length):
                return generation, data.decode()

    def stamp(self, slot: int, when: float | None = None) -> None:
        # One 8-byte store: struct's pack_into zeroes the bytes before it writes them, and the
        # supervisor, reading without a lock, could see 0 and take a healthy worker for one silent
        # since the clock began (it killed one so).
        at = self._STAMP.size * slot
        self.page[at:at + self._STAMP.size] = self._STAMP.pack(time.monotonic() if when is None else when)

    def silent(self, slot: int, now: float) -> float:
        """Seconds since the slot's worker last stamped (0 for a stamp caught half written, if ever)."""
        stamped: float = self._STAMP.unpack_from(self.page, self._STAMP.size * slot)[0]
        return 0.0 if stamped <= 0.0 else now - stamped

    def close(self) -> None:
        self.page.close()
        for text in self._texts:
            text.close()


def _drain_seconds(live: LiveStack) -> float:
    """How long a stopping server lets requests in flight finish: $WSGISTACK_DRAIN_SECONDS, else the config's."""
    seconds = _env_drain_seconds()
    return live.current.config.server.drain_timeout if seconds is None else seconds


def _env_drain_seconds() -> float | None:
    """``$WSGISTACK_DRAIN_SECONDS`` (0 to 3600, as ``server.drain_timeout``), or None when unset; ValueError else.

    Checked at the start (as ``$WSGISTACK_LOG_LEVEL`` is): found wrong only at the stop, it was too late.
    """
    text = os.environ.get(DRAIN_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= 3600:  # (nan and inf fail too)
        raise ValueError(f"{DRAIN_ENV}={text!r} is not a number of seconds from 0 to 3600 (server.drain_timeout's "
                         "range)")
    return seconds


def _idle(channel: Any) -> bool:
    """Whether a connection holds no part of a request: none parsed, none answering, none unread.

    A request the client sent just before the stop may still sit unread in the
    socket; closing the connection then would reset it (the kernel answers
    unread data with RST) although it counts as sent.  So a socket with bytes
    waiting is busy: the loop reads and answers them first.
    """
    if channel.requests or channel.request is not None or channel.total_outbufs_len:
        return False
    try:
        return not channel.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True  # nothing waiting
    except OSError:
        return True  # the connection is already gone


def _close_stalled(smap: Any, timeout: float) -> int:
    """Close the connections whose client took none of the bytes waiting for it in ``timeout`` seconds.

    Waitress's own ``channel_timeout`` only marks a connection to be closed, and
    only one without requests; a client that pipelines requests and never reads
    (its receive window shut) keeps its connection, a slot of ``connection_limit``
    and megabytes of the kernel's memory for good: a few hundred such clients
    lock everyone out.  A connection with bytes waiting and no send for that long
    gets one more try at a send; one that takes nothing is closed.  A task thread
    waiting for such a client to make room is woken, and its request ends as if
    the client had gone.
    """
    from waitress.channel import HTTPChannel

    cutoff = time.time() - timeout  # (Waitress stamps last_activity with time.time())
    closed = 0
    for channel in list(smap.values()):
        if not (isinstance(channel, HTTPChannel) and channel.total_outbufs_len and channel.last_activity < cutoff):
            continue
        # No send for that long says little by itself: the loop only sends when the kernel reports room
        # for half of what is queued, and a client reading slowly through megabytes of send buffer gets
        # no send for a minute. Try one now: a client that takes any byte is reading.
        lock = channel.outbuf_lock
        if not lock.acquire(False):
            continue  # a task thread is writing to it: not stalled
        try:
            before = channel.last_activity
            with contextlib.suppress(OSError):
                channel._flush_some(do_close=False)  # type: ignore[attr-defined]
            taken = channel.last_activity != before or not channel.total_outbufs_len
        finally:
            lock.release()
        if not taken and channel.connected:
            channel.handle_close()
            closed += 1
    if closed:
        log.warning("closed %d connection(s) whose client took nothing of the answers waiting for it in %g s "
                    "(server.channel_timeout)", closed, timeout)
    return closed


def _close_departed(smap: Any) -> int:
    """Close the connections whose client went away while a request of theirs is being answered.

    Waitress reads nothing of a connection while it answers a request there (it
    reads the next one only after), so it never sees such a client's FIN: the
    task thread's next write goes out and draws a reset, the one after that fails,
    and only the write after that one raises ``ClientDisconnected``.  A paced
    stream would hold its thread (and a ``search.max_streams`` slot) for two or
    three more events, and a client that left during the last two would be
    logged as served in full.  A peek tells: a reset means gone; bytes waiting (a
    pipelined request) or nothing yet means the client is still there.  Closing
    the channel makes the task thread's next write raise ``ClientDisconnected``.

    An end of stream alone is no proof: a client that sends its request and then
    half-closes (``shutdown(SHUT_WR)``, ``nc -N``, a load balancer passing its FIN
    on) still reads, and gets its answer, as Waitress would give it.  It counts
    as gone only on a connection a search stream is being sent on
    (``app.stream.STREAMING``), whose client never half-closes: one that does is
    taken as gone there, as Waitress takes any client whose FIN it reads while
    answering (``channel_request_lookahead``).  A client that closes for good is
    noticed there at once, elsewhere after the next write draws its reset.
    """
    from waitress.channel import HTTPChannel

    # Read, not imported: serve.py hosts any app, and until the stack's app imports the module no stream runs.
    stream = sys.modules.get("app.stream")
    streaming = getattr(stream, "STREAMING", ())
    closed = 0
    for channel in list(smap.values()):
        sock = getattr(channel, "socket", None)
        if not (isinstance(channel, HTTPChannel) and channel.requests and channel.connected and sock is not None):
            continue
        try:
            gone = not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) and channel in streaming
        except (BlockingIOError, InterruptedError):
            gone = False  # nothing to read: still there
        except OSError:
            gone = True  # reset (ConnectionResetError, EPIPE), or the socket is gone already
        if gone:
            channel.handle_close()
            closed += 1
    return closed


def _serve_until(server: Any, stop: threading.Event, hurry: threading.Event, drain: Callable[[], float],
                 tick: Callable[[], None] = lambda: None) -> bool:
    """Run Waitress's loop until ``stop``; then stop accepting and let requests in flight finish.

    A connection is in flight while the server holds any part of a request it
    has not answered in full.  Idle keep-alive connections are closed at once;
    the rest get up to ``drain()`` seconds, read when the stop comes (or until ``hurry``).
    ``tick()`` runs on every pass of the loop (it acts on the signals that arrived).
    Return whether every request in flight was answered.
    """
    from waitress import wasyncore
    from waitress.channel import HTTPChannel
    from waitress.server import MultiSocketServer

    smap: Any = server.map if isinstance(server, MultiSocketServer) else server._map
    use_poll = server.adj.asyncore_use_poll
    drained = False
    next_reap = 0.0
    try:
        while not stop.is_set():
            wasyncore.loop(timeout=_TICK, map=smap, use_poll=use_poll, count=1)
            tick()
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + 1.0
                _close_stalled(smap, server.adj.channel_timeout)
                _close_departed(smap)
        for dispatcher in list(smap.values()):
            if getattr(dispatcher, "accepting", False):  # a listening socket: close only the socket
                dispatcher.accepting = False
                wasyncore.dispatcher.close(dispatcher)
        seconds = drain()
        deadline = time.monotonic() + seconds
        while not hurry.is_set():
            tick()
            if time.monotonic() >= next_reap:  # a stream whose client left would hold the drain up
                next_reap = time.monotonic() + 1.0
                _close_departed(smap)
            busy = 0
            for channel in list(smap.values()):
                if not isinstance(channel, HTTPChannel):
                    continue
                with channel.requests_lock:  # type: ignore[attr-defined]
                    if _idle(channel):
                        channel.will_close = True  # idle keep-alive: closed on the next pass
                    else:
                        busy += 1
            if not busy and not any(isinstance(c, HTTPChannel) for c in smap.values()):
                drained = True
                break
            if time.monotonic() > deadline:
                log.warning("%d connection(s) still busy after %g s; closing them", busy, seconds)
                break
            wasyncore.loop(timeout=0.05, map=smap, use_poll=use_poll, count=1)
    finally:
        server.task_dispatcher.shutdown(timeout=1)
        wasyncore.close_all(smap)
    return drained


@functools.cache
def _parser_class() -> type[HTTPRequestParser]:
    """Waitress's ``HTTPRequestParser``, with its reading of a request's framing mended (the server and
    ``explain`` use it).

    - A request with both ``Content-Length`` and ``Transfer-Encoding: chunked`` is read as chunked, as
      Waitress reads it, and the connection closes after its answer, as RFC 9112 §6.1 requires: a front
      end that framed it by its ``Content-Length`` takes the rest of its chunks for the next request
      (request smuggling), and a connection kept open would answer that one.  Waitress kept it open.
    - ``Connection`` is a comma-separated list of options (RFC 9110 §7.6.1), and ``close`` among them
      closes the connection after the answer, as ``close`` alone does: Waitress compared the whole
      value, and kept it open after ``TE, close`` (or two ``Connection`` lines, which it joins).
      Only a value with a comma is split (the common ones, ``keep-alive`` or none, have none).
    - ``Expect: 100-continue`` on a request without a body (no ``Content-Length``, or ``0``, and not
      chunked) is answered at once: no ``100 Continue`` is due where the framing says there is no
      body (RFC 9110 §10.1.1).  Waitress sent one, and by doing so (``send_continue``) set the request,
      which was complete, back to incomplete: it waited for a body that never came, unanswered, until
      ``channel_timeout`` closed the connection.
    - ``Expect: 100-continue`` with a ``Content-Length`` over ``max_request_body_size`` gets the 413
      at once, and the connection closes (Waitress's refusal): the client learns before it sends
      the body.  Waitress sent ``100 Continue``, and the 413 only once the whole body had come.

    A close decided here is the parser's ``connection_close``, which Waitress sets and reads nowhere
    (its task reads the ``Connection`` header again); :func:`_task_class` honours it.  HTTP/1.0 is left
    as it is: Waitress reads no ``Transfer-Encoding`` there, and closes unless asked exactly for
    ``keep-alive``.
    """
    from waitress.parser import HTTPRequestParser

    class Parser(HTTPRequestParser):
        def parse_header(self, header_plus: bytes) -> None:
            super().parse_header(header_plus)
            if self.version != "1.1":
                return
            headers = self.headers
            if self.chunked and "CONTENT_LENGTH" in headers:  # (both framings: the connection is suspect)
                self.connection_close = True
            connection = headers.get("CONNECTION")
            if connection and "," in connection and not self.connection_close:
                self.connection_close = "close" in {option.strip(" \t").lower() for option in connection.split(",")}
            if self.expect_continue and (
                    self.body_rcv is None  # no body: the request is complete as it is
                    or self.content_length >= self.adj.max_request_body_size):  # refused (413) as it is, by received()
                self.expect_continue = False

    return Parser


@functools.cache
def _task_class() -> type[WSGITask]:
    """Waitress's ``WSGITask``, with defects of Waitress 3.0.2 in framing mended (the server and ``explain`` use it).

    - Waitress closes the connection after every response without a ``Content-Length``, also
      after a 204 or 304, which have no body by definition: every CORS preflight, logout
      and revalidation cost the client (or a proxy's upstream keep-alive pool) a connection.
      Such a response now closes it only when the request asks for that: HTTP/1.1 with
      ``Connection: close``, HTTP/1.0 without ``Connection: keep-alive`` (one with it gets
      ``Connection: Keep-Alive`` back, as it does with a ``Content-Length``).  A 1xx an app answers
      still closes it, and is logged: it is no final answer (WSGI has no interim ones), and a client
      would take the next response on the connection, the next request's, for this request's.
    - A ``HEAD`` answered without a ``Content-Length`` says ``Transfer-Encoding: chunked``, as the
      ``GET`` would, and Waitress then wrote the chunked terminator (``0\\r\\n\\r\\n``) after the
      headers, bytes a client reads as the start of the next response, and closed the connection.
      Nothing follows a ``HEAD``'s headers now, neither framing nor a body the app wrote, and the
      connection is kept as after a 204.
    - Waitress drops what an app iterates after the headers of a ``HEAD``, 1xx, 204 or 304 answer, but
      sends a ``wsgi.file_wrapper``'s file all the same: an app that serves a file whatever the method
      (Django's ``FileResponse`` does) put the whole file after a ``HEAD``'s headers, where the client
      reads it as the next response.  Such a file is closed unsent now (:class:`_HeadersOnly`).
    - A 304 with the ``Content-Length`` of the representation (RFC 9110 §8.6 allows it) and no body
      was logged as an app that "returned too few bytes" on every revalidation; it is not now.

    The close a request asks for over HTTP/1.1 is the parser's reading of it (:func:`_parser_class`).
    Everything else is Waitress's: its reading of ``Connection`` over HTTP/1.0 (exactly ``keep-alive``
    keeps the connection), the close after a response with a body and no ``Content-Length`` (a
    chunked ``GET``), its headers and their order.
    """
    from waitress.task import WSGITask

    class Task(WSGITask):
        def set_close_on_finish(self) -> None:
            # Waitress calls this for every answer without a body as it builds the headers (it has no
            # Content-Length), so the rare answers are mended here, and the common one pays nothing.
            request: Any = self.request
            if self.status.startswith("1"):  # not a final answer, though the app has no other: the client waits on
                self.headers_only()
                if not self.close_on_finish:
                    log.warning("the app answered %s %s with %s, an interim status, as its final answer (WSGI has "
                                "no interim answers); the connection closes after it", request.command,
                                request.path, self.status)
            elif not self.has_body or request.command == "HEAD":  # framed by its status or method alone (RFC 9112
                # §6.3), though Waitress would chunk a GET's body: the connection is fit for the next request
                self.headers_only()
                if self.version == "1.1" and not request.connection_close:  # (Connection as _parser_class reads it)
                    return
                if self.version == "1.0" and request.headers.get("CONNECTION", "").lower() == "keep-alive":
                    kept = ("Connection", "Keep-Alive")
                    if not self.wrote_header and kept not in self.response_headers:
                        self.response_headers = [*self.response_headers, kept]
                    return
            super().set_close_on_finish()

        def build_response_header(self) -> bytes:
            request: Any = self.request
            if request.connection_close and self.version == "1.1":  # (a close only the parser saw: _parser_class)
                self.set_close_on_finish()
            head = super().build_response_header()
            if request.command == "HEAD":
                self.chunked_response = False  # no body follows, so no chunk framing (and no terminator) either
                self.headers_only()
            return head

        def headers_only(self) -> None:
            """Nothing but the headers goes out for this answer: not a file the app handed over either, and
            no body is missing whatever its ``Content-Length`` said (:class:`_NoBodyLog`)."""
            if not isinstance(self.channel, _HeadersOnly):
                self.channel = typing.cast(Any, _HeadersOnly(self.channel))
                self.logger = typing.cast(Any, _NoBodyLog(self.logger))

        def write(self, data: bytes) -> None:
            request: Any = self.request
            super().write(b"" if request.command == "HEAD" else data)  # (the headers, once, and nothing after)

    return Task


class _HeadersOnly:
    """A task's channel for an answer without a body (a ``HEAD``'s, a 1xx, 204 or 304), once its headers are built.

    Waitress hands a ``wsgi.file_wrapper`` body to the channel itself, after the headers and past the
    task's ``write``, which drops everything else; this one closes the file instead of sending it.
    The headers were written to the channel itself (Waitress holds it from before), and every other
    attribute is the channel's.
    """

    __slots__ = ("channel",)

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)

    def write_soon(self, data: Any) -> int:
        if isinstance(data, bytes):
            return int(self.channel.write_soon(data))
        data.close()  # the channel would have closed it once sent
        return 0


class _NoBodyLog:
    """Waitress's log for an answer without a body, without its warning that the app "returned too few bytes
    (0) for specified Content-Length": none was due.  A 304 may carry the ``Content-Length`` of the
    representation (RFC 9110 §8.6; Waitress drops it from the headers), and Waitress, which spares a
    ``HEAD`` the warning, gave it on every such revalidation and for every 1xx or 204 with one.
    """

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if not msg.startswith("application returned too few bytes"):
            self.logger.warning(msg, *args, **kwargs)


@functools.cache
def _channel_class() -> type[HTTPChannel]:
    """Waitress's ``HTTPChannel``, reading its requests with :func:`_parser_class` and running them as
    :func:`_task_class` tasks."""
    from waitress.channel import HTTPChannel

    class Channel(HTTPChannel):
        parser_class = _parser_class()
        task_class = _task_class()

    return Channel


def _use_channel(server: Any) -> None:
    """Have every listening socket of ``server`` (one server, or a ``MultiSocketServer`` of several)
    make :func:`_channel_class` channels for the connections it accepts."""
    from waitress.server import BaseWSGIServer, MultiSocketServer

    for each in (server.map or {}).values() if isinstance(server, MultiSocketServer) else [server]:
        if isinstance(each, BaseWSGIServer):
            each.channel_class = _channel_class()


def _run_waitress(live: LiveStack, sockets: list[socket.socket], parent: int | None = None,
                  beat: Callable[[], None] = lambda: None, wanted: Callable[[], int] | None = None,
                  published: Callable[[], tuple[int, str | None]] | None = None) -> int:
    """Serve ``live`` on pre-bound sockets until SIGTERM/SIGINT; SIGHUP reloads; return the exit code.

    The first SIGTERM/SIGINT stops accepting and drains requests in flight; a
    second one exits without waiting.  ``parent`` is the supervisor's pid: a
    worker whose supervisor is gone stops by itself instead of living on as an
    orphan, and a worker ignores a second signal (systemd and a terminal signal
    the whole process group, and the supervisor passes the signal on as well);
    the supervisor decides when a worker must hurry.  ``beat()`` runs on every
    pass of the serving loop (a worker's heartbeat, see :func:`_supervise`).

    A worker reloads when the supervisor says so, not on a SIGHUP of its own: ``wanted()``
    is the generation the supervisor serves, read on every pass, and a worker behind it
    reloads to it (taking that number), building the text ``published()`` gives, the one the
    supervisor built (the file may have changed since).  A SIGHUP sent to a worker (directly, or to the whole
    process group) changes nothing there: the supervisor decides whether it is a reload, and
    only the supervisor polls the file.  So every worker serves the supervisor's generation,
    as does one it starts later, whatever SIGHUPs or edits came and however late a worker's
    loop got to them.  The exit code is 0 when every request in flight was answered, else 1.
    """
    from waitress.server import create_server

    kwargs = dict(live.waitress_kwargs)  # the settings the process started with, also after a reload
    kwargs.pop("listen")
    kwargs.pop("backlog")
    # poll(), not Waitress's default select(): select() raises at the first descriptor of 1024 or more, which
    # ended the serving loop (and the process) once a connection_limit above a thousand filled up.
    kwargs["asyncore_use_poll"] = True
    server = create_server(live, sockets=sockets, **kwargs)
    _use_channel(server)  # (before the loop runs: no connection is accepted before)
    stop, hurry = threading.Event(), threading.Event()

    # A handler only notes the signal; the serving loop acts on it within a tick.  A handler that
    # set an Event (or started a thread) took a lock, and a second signal arriving while the
    # first handler held that lock (systemd and the supervisor both signal a worker) deadlocked it.
    arrived: list[int] = []
    # The supervisor's generation this worker last reloaded for, when, and how long to wait before trying
    # again if that reload failed here (the supervisor built it: it may well build here a moment later).
    asked = [live.generation, 0.0, WORKER_RETRY[0]]

    def note_signal(signum: int, frame: Any) -> None:
        arrived.append(signum)

    def act() -> None:
        beat()
        if wanted is not None and not stop.is_set():
            generation = wanted()
            if generation > asked[0]:
                asked[:] = [generation, time.monotonic(), WORKER_RETRY[0]]
                reloader.ask()
            elif generation > live.generation and not reloader.busy and time.monotonic() - asked[1] >= asked[2]:
                # That reload failed here (it logged why): again, less often each time, so that no worker
                # stays on an older pipeline than its siblings until the next reload.
                log.warning("%sstill at generation %d, behind the supervisor's %d: reloading again",
                            live.label, live.generation, generation)
                asked[1:] = [time.monotonic(), min(2 * asked[2], WORKER_RETRY[1])]
                reloader.ask()
        while arrived:
            signum = arrived.pop(0)
            if signum == signal.SIGHUP:
                if parent is None and stop.is_set():
                    log.info("SIGHUP while stopping: no reload")
                elif parent is None:
                    reloader.ask()
                continue  # a worker: the supervisor decides, and publishes the generation to serve
            if stop.is_set() and parent is None:  # a worker's second signal is the supervisor passing one on
                hurry.set()
            if not stop.is_set() and parent is None:
                log.info("stopping: requests in flight get up to %g s (the same signal again: stop now)",
                         _drain_seconds(live))
            if parent is not None and not stop.is_set() and os.getppid() != parent:
                log.warning("%sthe supervisor (pid %d) is gone; stopping", live.label, parent)
            stop.set()
            # A stopping process reloads no more (a SIGHUP, an edit the polling sees): it would build, and
            # swap in, a pipeline only to close it, and log a new generation serving after "stopping".
            reloader.stop()
            live.stop_watch()

    reloader = _Reloader(live, published=published)
    for signum in HANDLED:
        signal.signal(signum, note_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # a worker starts with them blocked
    if parent is None:
        live.follow_watch()  # (with workers the supervisor alone polls)
    if parent is not None:

        def orphan_watch() -> None:
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    log.warning("%sthe supervisor (pid %d) is gone; stopping", live.label, parent)
                    stop.set()

        threading.Thread(target=orphan_watch, name="wsgistack-parent", daemon=True).start()
    try:
        drained = _serve_until(server, stop, hurry, lambda: _drain_seconds(live), act)
    finally:
        live.stop_watch()
        live.close()
    return 0 if drained else 1


class _Reloader:
    """Reload in a thread of its own, one reload at a time: SIGHUPs that come during a reload ask for one
    more, after it (the file may have changed again), not one each.

    ``published`` (a worker's): the supervisor's generation, which each reload takes, and the text
    the supervisor built it from, which it builds; none is made when the process already serves it.
    After :meth:`stop` (the process stops) it makes none: a reload asked for and not begun is dropped.
    """

    def __init__(self, live: LiveStack, done: Callable[[], None] = lambda: None,
                 published: Callable[[], tuple[int, str | None]] | None = None) -> None:
        self.live, self.done, self.published = live, done, published
        self.wanted = threading.Event()
        self.busy = False  # asked for, or building
        self.lock = threading.Lock()  # busy and wanted change together
        self.thread: threading.Thread | None = None
        self.stopped = False

    def ask(self) -> None:
        with self.lock:
            if self.stopped:
                return
            self.busy = True
            self.wanted.set()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="wsgistack-reload", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Reload no more: a stopping process would build a pipeline it never serves (a reload in progress
        ends on its own, not waited for)."""
        with self.lock:
            self.stopped = True
            self.wanted.clear()

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.stopped:
                continue
            try:
                if self.published is None:
                    self.live.reload()
                else:
                    target, source = self.published()
                    if target > self.live.generation:
                        self.live.reload(generation=target, source=source)
            except BaseException:  # (reload logs a failed build itself; this thread must live on)
                log.exception("%sreload failed", self.live.label)
            with self.lock:  # (not busy only if nobody asked again meanwhile)
                if not self.wanted.is_set():
                    self.busy = False
            self.done()


def _stop_with_parent(parent: int) -> None:
    """Linux: have the kernel send this worker SIGTERM the moment the supervisor dies.

    A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its
    workers; they would keep the port until their once-a-second orphan check,
    so a restart right away found it taken.  With ``PR_SET_PDEATHSIG`` they
    stop (and close their listening sockets) at once.  Elsewhere the orphan
    check alone applies.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call: the kernel will not tell us
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_text(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _supervise(live: LiveStack, slots: list[list[socket.socket]]) -> int:
    """Fork a Waitress process for each slot's sockets; restart the ones that die.

    SIGHUP reloads the supervisor's own copy of the configuration (so a worker
    started later serves the current one); once it succeeded, the supervisor
    publishes its generation in the page it shares with the workers, and each
    worker reloads to it (see :func:`_run_waitress`).  The supervisor alone
    polls a watched file and acts on SIGHUP (each one a reload; those that come
    while one runs make one more);
    SIGTERM and SIGINT stop the workers (which drain) and then the supervisor; a
    second one kills the workers at once.  A worker still running
    ``server.drain_timeout`` (or ``$WSGISTACK_DRAIN_SECONDS``) + 5 s after SIGTERM is killed.
    A worker that dies within a second of starting is restarted after a growing pause (up to 5 s);
    when every slot's worker did so GIVE_UP times in a row, the supervisor stops with exit code 3,
    so that the service manager sees the failure (and restarts, or alerts).

    Each worker's serving loop stamps the time of its last pass in a page the
    processes share (every ``_TICK`` when idle); a worker whose stamp is older than
    ``server.worker_timeout`` seconds (stopped with SIGSTOP, or stuck holding the
    interpreter) is killed and, as any worker that dies, started again.  Only the loop
    is watched: request threads stuck in the app while the loop runs are not.
    """
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    due: dict[int, float] = {}  # slot -> when to start it again
    pause: dict[int, float] = {}  # slot -> the last restart pause
    failed: dict[int, int] = dict.fromkeys(range(len(slots)), 0)  # slot -> its workers' failed starts in a row
    pending: list[int] = []
    supervisor = os.getpid()
    beats = _Beats(len(slots), live.generation)
    hung: set[int] = set()  # workers killed for want of a heartbeat, until reaped
    judged = time.monotonic()  # when the heartbeats were last looked at
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def spawn(slot: int) -> None:
        beats.stamp(slot)  # its start counts as its first beat
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    signal.set_wakeup_fd(-1)
                    os.close(wake_r)
                    os.close(wake_w)
                    for sock in {s for other in slots for s in other} - set(slots[slot]):
                        sock.close()  # other slots' sockets: held here, they would outlive their worker's stop
                    for sig in (*HANDLED, signal.SIGCHLD):
                        signal.signal(sig, signal.SIG_DFL)
                    _stop_with_parent(supervisor)
                    live.after_fork(f"worker {os.getpid()}: ")
                    code = _run_waitress(live, slots[slot], parent=supervisor, beat=lambda: beats.stamp(slot),
                                         wanted=beats.generation, published=beats.published)
                except BaseException:
                    log.exception("worker %d failed", os.getpid())
                    code = 1
                finally:
                    logging.shutdown()
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        children[pid] = (slot, time.monotonic())

    def note_signal(signum: int, frame: Any) -> None:
        pending.append(signum)  # acted on in the loop below; set_wakeup_fd wakes select()

    live.label = "supervisor: "

    def wake() -> None:  # after a reload: the workers follow it, and those waiting for it to end may start now
        beats.publish(live.generation, live.source)
        with contextlib.suppress(OSError):
            os.write(wake_w, b"r")

    reloader = _Reloader(live, wake)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    for sig in (*HANDLED, signal.SIGCHLD):
        signal.signal(sig, note_signal)
    for slot in range(len(slots)):  # after the SIGCHLD handler: a worker that exits at once still wakes the loop
        spawn(slot)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # blocked since the sockets were bound (cmd_serve)
    log.info("supervising %d workers: %s", len(slots), ", ".join(map(str, children)))
    stopping_since: float | None = None
    incomplete = gave_up = False
    grace = _drain_seconds(live) + 5.0
    # A polled change is read once the file stayed the same for an interval; every SIGHUP is a reload
    # (the workers follow whatever the supervisor serves: they neither poll nor act on SIGHUP themselves).
    seen = [live.fingerprint()]
    polled = -math.inf  # when the file was last polled: the next poll is an interval of the configuration now later
    followed = time.monotonic()
    try:
        while children or (stopping_since is None and due):
            now = time.monotonic()
            # (Workers wait for a reload in progress to end: its end wakes the loop, see wake().)
            waits = [] if reloader.busy else [when - now for when in due.values()]
            if stopping_since is not None:
                waits.append(stopping_since + grace - now)
            reload_options = live.current.config.server.reload
            if reload_options.watch and stopping_since is None:
                waits.append(reload_options.interval)
            timeout = live.current.config.server.worker_timeout
            if timeout and stopping_since is None:
                waits.append(min(1.0, timeout / 4))  # the heartbeats are looked at this often
            select.select([wake_r], [], [], max(0.0, min(waits, default=5.0)))
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            # Reap every worker that exited, by its pid: a reload runs the app factory in a thread of this
            # process, and a waitpid(-1) here took the exit status of a command it ran (subprocess then
            # reports 0 for a command that failed).
            for pid in list(children):
                try:
                    reaped, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # (not ours to wait for any more: gone all the same)
                    reaped, status = pid, 0
                if reaped == 0:
                    continue
                slot, started = children.pop(pid)
                hung.discard(pid)
                if stopping_since is not None and status != 0:
                    incomplete = True  # it could not answer everything it held
                if stopping_since is not None:
                    continue
                lived = time.monotonic() - started
                pause[slot] = 0.1 if lived > 1.0 else min(5.0, pause.get(slot, 0.1) * 2)
                failed[slot] = 0 if lived > 1.0 else failed[slot] + 1
                if min(failed.values()) >= GIVE_UP and not children:
                    log.error("worker %d %s after %.1f s; every worker failed to start %d times in a row: "
                              "stopping (exit code 3)", pid, _exit_text(status), lived, GIVE_UP)
                    gave_up = True
                    break
                due[slot] = time.monotonic() + pause[slot]
                log.warning("worker %d %s after %.1f s; starting a new one in %.1f s", pid, _exit_text(status),
                            lived, pause[slot])
            if gave_up:
                break
            if timeout and stopping_since is None:
                now = time.monotonic()
                if now - judged > timeout:  # the supervisor itself was stopped (Ctrl-Z, docker pause, a frozen
                    for slot in range(len(slots)):  # cgroup) with its workers: their silence says nothing
                        beats.stamp(slot, now)
                judged = now
                for pid, (slot, _) in children.items():
                    silent = beats.silent(slot, now)
                    if silent > timeout and pid not in hung:
                        log.error("worker %d has not run its serving loop for %.1f s (stopped, or stuck "
                                  "holding the interpreter): killing it (server.worker_timeout %g s)",
                                  pid, silent, timeout)
                        hung.add(pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            signals = []
            while pending:  # one pop at a time: a handler may append between two bytecodes
                signals.append(pending.pop(0))
            # A stopping server reloads no more (a SIGHUP, a polled edit): it would build a pipeline, and
            # have every draining worker build it too, only to close them, logging a new generation after
            # "stopping"; a stop that comes with the SIGHUP wins over it.
            stopping = stopping_since is not None or signal.SIGTERM in signals or signal.SIGINT in signals
            changed = False
            if reload_options.watch and not stopping and time.monotonic() >= polled + reload_options.interval:
                polled = time.monotonic()
                changed = live.settled_change(seen)
            if signal.SIGHUP in signals:  # (a key file the build reads may have changed, stack.yaml not)
                changed = not stopping
                if stopping:
                    log.info("SIGHUP while stopping: no reload")
                signals = [s for s in signals if s != signal.SIGHUP]  # the workers follow the published generation
            if changed:  # in a thread: a stop (or a worker to reap) must not wait for a slow build
                reloader.ask()  # workers started once it is done get the new configuration
            if time.monotonic() - followed >= 1.0:
                followed = time.monotonic()
                live.follow_files()  # the supervisor writes no log line: let go of rotated files
            for signum in signals:
                if signum == signal.SIGCHLD:
                    continue
                forward = signal.SIGTERM
                if signum in (signal.SIGTERM, signal.SIGINT):
                    if stopping_since is None:
                        log.info("stopping %d worker(s)", len(children))
                        for sock in {s for slot_sockets in slots for s in slot_sockets}:
                            sock.close()  # the kernel would queue new connections nobody accepts
                        stopping_since = time.monotonic()
                        grace = _drain_seconds(live) + 5.0  # the configuration in force now
                        reloader.stop()
                    else:  # asked twice: stop waiting for requests in flight
                        log.warning("stopping %d worker(s) now", len(children))
                        forward, incomplete = signal.SIGKILL, True
                    due.clear()
                for pid in list(children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, forward)
            if stopping_since is None:
                for slot, when in list(due.items()):
                    if when <= time.monotonic() and not reloader.busy:  # one started mid-reload would miss it
                        del due[slot]
                        spawn(slot)
            elif children and time.monotonic() > stopping_since + grace:
                log.warning("workers %s did not stop in %.0f s; killing them", ", ".join(map(str, children)), grace)
                incomplete = True
                for pid in list(children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                stopping_since = time.monotonic()  # wait for them to be reaped
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        beats.close()
    live.close()
    return 3 if gave_up else 1 if incomplete else 0


def cmd_serve(args: argparse.Namespace) -> int:
    # From the start, a SIGHUP or SIGTERM waits for the server's handlers (it would otherwise end the
    # process with the default action: `systemctl reload` right after a start killed it);
    # _run_waitress and _supervise unblock them once the handlers are in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        live = LiveStack(args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        print(f"{args.config}: refusing to start with an invalid configuration", file=sys.stderr)
        _unblock_dropping_pending()
        return 2
    _apply_logging(live.current.config.logging)
    live.on_reload.append(lambda built: _apply_logging(built.config.logging))
    if live.current.config.logging.format == "json":  # one JSON object a line, as a reload logs them
        for warning in live.current.warnings:
            logging.getLogger("wsgistack.config").warning("%s", warning)
    else:
        _print_problems(live.current.warnings)
    server = live.current.config.server
    try:
        slots = _slots(server.listen, server.backlog, server.workers)
    except OSError as exc:
        print((exc.strerror if exc.strerror and exc.strerror.startswith("cannot listen") else
               f"cannot listen on {' '.join(server.listen)}: {exc}") + f" (server.listen in {args.config})",
              file=sys.stderr)
        _unblock_dropping_pending()
        return 2
    _freeze_startup_objects(live)
    sockets = slots[0]
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        log.info("serving on http://%s:%s (generation %d, %d worker(s))",
                 f"[{host}]" if ":" in host else host, port, live.generation, server.workers)
    # Metrics are kept in files of a directory for this run: the workers' counts add up, and so do
    # those of pipelines a reload replaced, one worker or several.
    with _metrics_dir():
        if server.workers > 1:
            return _supervise(live, slots)
        return _run_waitress(live, sockets)


def _unblock_dropping_pending() -> None:
    """Unblock the signals serve blocks while it starts, dropping any that came meanwhile.

    The start failed and said why: a SIGTERM (or Ctrl-C) that came while the stack was built
    must not end the process (143, or a KeyboardInterrupt traceback) instead of its exit code 2.
    A signal ignored while it is pending is discarded (POSIX), so each is ignored while unblocked.
    """
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in HANDLED}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _freeze_startup_objects(live: LiveStack) -> None:
    """Leave what the start built out of the cyclic collector's walks, until the first reload.

    The modules, the app and the pipeline (some 70,000 objects) live as long as the
    process: a full collection walks them all, a pause of about 20 ms (bench machine) for
    every thread under the GIL, and writes to every object it walks, so forked
    workers would lose the pages they share with the supervisor
    (``gc.freeze()``, as the ``gc`` module's documentation advises before forking).
    A reload retires the first pipeline, so it unfreezes: the retired pipeline's
    cycles must be collectable.
    """
    gc.collect()
    gc.freeze()
    live.on_reload.append(lambda built: gc.unfreeze())


_METRICS_PREFIX = "wsgistack-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Remove metrics directories whose supervisor (the pid in the name) is no longer running."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid_text = name[len(_METRICS_PREFIX):].split("-", 1)[0] if name.startswith(_METRICS_PREFIX) else ""
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except OSError:
            continue  # alive, as another user


@contextlib.contextmanager
def _metrics_dir() -> Iterator[None]:
    """A fresh directory where workers and reloaded pipelines share their metrics, removed at the end (unless set).

    Its name carries the supervisor's pid: directories left by supervisors
    that were killed outright (and are not running any more) are removed first.
    """
    from middleware.metrics import METRICS_DIR

    if os.environ.get(METRICS_DIR):
        yield
        return
    _remove_stale_metrics_dirs()
    directory = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    os.environ[METRICS_DIR] = directory
    log.info("workers share their metrics in %s", directory)
    try:
        yield
    finally:
        del os.environ[METRICS_DIR]
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- check, layers


def cmd_check(args: argparse.Namespace) -> int:
    """``check``; ``--hosted``: as ``serve:app`` judges the file under another WSGI server, where its
    ``server:`` section has no effect and ``$WSGISTACK_HOST_LISTEN`` names the address that server binds."""
    problems = check_hosted(args.config) if getattr(args, "hosted", False) else check(args.config)
    _print_problems(problems, sys.stdout)
    if any(p.severity == "error" for p in problems):
        return 2
    if problems:
        return 1
    print(f"{args.config}: ok")
    return 0


def _type_name(annotation: Any) -> str:
    from pydantic import BaseModel, SecretStr

    if annotation is SecretStr:
        return "secret"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):  # a rule: its keys
        return "{" + ", ".join(annotation.model_fields) + "}"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, tuple) and args and inspect.isclass(args[0]) \
            and issubclass(args[0], BaseModel):
        return f"list[{_type_name(args[0])}]"
    text = getattr(annotation, "__name__", None) if inspect.isclass(annotation) else None
    text = text or str(annotation).replace("typing.", "").replace("pydantic.types.SecretStr", "secret")
    # Annotated[str, AfterValidator(func=<function _check at 0x…>)] reads as str: the checks are the layer's.
    return _ANNOTATED.sub(r"\1", text)


_ANNOTATED = re.compile(r"Annotated\[([^,\[\]]+(?:\[[^\[\]]*\])?), [^\[\]]*?\)\]")


@functools.cache
def _installed_data() -> dict[str, str]:
    """The files an installed wheel put under ``share/wsgistack``, by their path below it.

    Read from the distribution's own record, so a ``--user``, ``--prefix`` or ``--target``
    install is found as a virtualenv's is (``sysconfig``'s data path is the interpreter's).
    """
    try:
        dist = importlib.metadata.distribution("wsgistack")
    except importlib.metadata.PackageNotFoundError:
        return {}
    found: dict[str, str] = {}
    for entry in dist.files or ():
        posix = str(entry).replace("\\", "/")
        mark = posix.find("share/wsgistack/")
        if mark >= 0:
            found[posix[mark + len("share/wsgistack/"):]] = os.path.normpath(str(dist.locate_file(entry)))
    return found


def shipped_file(relative: str) -> str | None:
    """A file wsgistack ships (``docs/layers/cors.md``, ``stack.yaml``): beside serve.py in a checkout,
    else where the installer put it; None when neither has it."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, relative), _installed_data().get(relative),
                      os.path.join(here, "share", "wsgistack", relative),  # pip install --target: beside it
                      os.path.join(sysconfig.get_path("data"), "share", "wsgistack", relative)):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _option_docs(name: str) -> tuple[str | None, dict[str, str]]:
    """The layer's page in docs/layers/ and the first sentence of each option's row in its table."""
    page = shipped_file(f"docs/layers/{name}.md")
    if page is None:
        return None, {}
    try:
        with open(page, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None, {}
    docs: dict[str, str] = {}
    for line in lines:
        # Markdown escapes a | inside a cell as \|: split on the others only.
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            text = re.sub(r"[;,]? \(?see (?:below|above)\)?", "", cells[-1])  # the page's own pointers
            end = text.find(". ")
            docs.setdefault(cells[0].strip("`"), text if end < 0 else text[:end + 1])
    inside = os.path.abspath(page).startswith(os.getcwd() + os.sep)  # (from a checkout: docs/layers/cors.md)
    return (os.path.relpath(page) if inside else page), docs


def cmd_layers(args: argparse.Namespace) -> int:
    """List the registered layers and their options; exit 2 when an entry cannot be imported (said on stderr,
    in ``check``'s words: the file and line of a SyntaxError), after listing the others."""
    from pydantic import SecretStr
    from pydantic_core import PydanticUndefined

    from config.build import _why

    broken = False
    for name in LAYERS:
        try:
            target = resolve(name)
        except (Exception, SystemExit) as exc:  # a SyntaxError, any error the module raises (sys.exit too)
            print(f"{name} ({LAYERS[name]}): cannot import layer {name!r}: {_why(exc)}", file=sys.stderr)
            broken = True
            continue
        # The module's first paragraph, else the layer's own (a layer module may start with its class)
        doc = (inspect.getdoc(inspect.getmodule(target)) or inspect.getdoc(target) or "").split("\n\n")[0]
        doc = doc.replace("\n", " ")
        page, option_docs = _option_docs(name)
        print(f"{name}  ({LAYERS[name]})\n    {doc}")
        if page:
            print(f"    docs: {page}")
        model = getattr(target, "Options", None)
        for field_name, info in (model.model_fields.items() if model else ()):
            default: Any = info.default
            if default is PydanticUndefined and info.default_factory:
                default = info.default_factory()
            # An empty secret is no key (session.secret_key): the layer refuses it, as its page says "required".
            secret = isinstance(default, SecretStr)
            required = default is PydanticUndefined or (secret and not default.get_secret_value())
            shown = "(required)" if required else str(default) if secret else repr(default)  # (a secret: ****)
            line = f"    {field_name}: {_type_name(info.annotation)} = {shown}"
            text = info.description.strip().splitlines()[0] if info.description else option_docs.get(field_name)
            if text:
                line += f"\n        {text}"
            print(line)
        print("    paths, exclude_paths, methods: scope (any layer)\n")
    return 2 if broken else 0


# ---------------------------------------------------------------- explain


def _waitress_view(built: BuiltStack, app: Any) -> Any:
    """Apply Waitress's own proxy-header handling exactly as the real server will (waitress/server.py)."""
    kw = built.config.waitress_kwargs()
    if not kw.get("trusted_proxy") and not kw["clear_untrusted_proxy_headers"]:
        return app
    from waitress.proxy_headers import proxy_headers_middleware

    return proxy_headers_middleware(
        app,
        trusted_proxy=kw.get("trusted_proxy"),
        trusted_proxy_count=kw.get("trusted_proxy_count", 1),
        trusted_proxy_headers=kw.get("trusted_proxy_headers", set()),
        clear_untrusted=kw["clear_untrusted_proxy_headers"],
    )


def _waitress_task(built: BuiltStack, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                   peer: str) -> tuple[Any, str]:
    """The task the server would run for this request (:func:`_task_class`), with the settings in force.

    The request is written as bytes and read by the server's parser (:func:`_parser_class`) and task:
    Waitress's path decoding (``%ff`` stays a byte, ``//`` collapses), ``REQUEST_URI``
    with the query, ``url_prefix`` and ``url_scheme``, de-chunked bodies, headers
    with ``_`` dropped.  ``(None, "413 Request Entity Too Large …")`` when Waitress
    refuses the request itself.  The task's ``get_environment()`` is the environ; what it
    writes when run (:func:`_serve`) collects in ``task.channel.written``.
    """
    from types import SimpleNamespace

    from waitress.adjustments import Adjustments
    adj = Adjustments(**built.config.waitress_kwargs())
    host, _, port = built.config.server.listen[0].rpartition(":")
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}:{port}")
    lines += [f"{name}: {value}" for name, value in headers]
    chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)
    if chunked:
        data = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        data = body
        if body and "content-length" not in names:
            lines.append(f"Content-Length: {len(body)}")
    # As curl sends what it is given: UTF-8 text, and an argument's bytes that are not (a Latin-1 header
    # value, a binary body) as they were, which Python holds as surrogate escapes.
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + data
    parser = _parser_class()(adj)
    while raw and not parser.completed:
        raw = raw[parser.received(raw):]
    if parser.error is not None:
        return None, f"{parser.error.code} {parser.error.reason}: {parser.error.body}"
    if not parser.completed:
        return None, "400 Bad Request: the request ended before its body (Waitress waits for the rest)"
    server = SimpleNamespace(adj=adj, effective_port=int(port), server_name=host.strip("[]"), application=None)
    written: list[bytes] = []

    def write_soon(data: Any) -> int:
        chunk = data if isinstance(data, bytes) else b"".join(iter(data))  # a wsgi.file_wrapper buffer
        written.append(chunk)
        return len(chunk)

    channel = SimpleNamespace(server=server, adj=adj, addr=(peer, 50000), written=written, write_soon=write_soon,
                              check_client_disconnected=lambda: False)
    task = _task_class()(typing.cast(Any, channel), typing.cast(Any, parser))
    task.get_environment()  # built now, and kept: explain adds its trace to it
    return task, ""


def _serve(task: Any, app: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run ``task`` as Waitress does, with ``app`` as the server's application: what it sends.

    ``(status, headers, body)`` as they go on the wire: Waitress's header names, order,
    ``Server``, ``Date``, ``Content-Length``, ``Connection: close`` and chunked bodies
    (de-chunked here), no body after a 204 or 304.
    """
    task.channel.server.application = app
    task.service()
    raw = b"".join(task.channel.written)
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = [(name, value) for name, _, value in (line.partition(": ") for line in header_lines)]
    if task.chunked_response:
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            if not int(size, 16):
                break
            chunks.append(rest[:int(size, 16)])
            rest = rest[int(size, 16) + 2:]
        body = b"".join(chunks)
    return first.partition(" ")[2], response_headers, body


def explain(config_path: str, method: str, target: str, headers: Sequence[str] = (), peer: str = "127.0.0.1",
            body: bytes = b"") -> tuple[list[str], int]:
    """Run one request in-process with tracing; return printable lines and the status."""
    from middleware.base import CLIENT_IP, TRACE

    header_pairs = []
    for raw in headers:
        name, sep, value = raw.partition(":")
        if not sep:
            raise ValueError(f"headers are written 'Name: value'; {raw!r} is not")
        header_pairs.append((name.strip(), value.strip()))
    built = build_from_file(config_path, trace=True)
    refused = refused_stores(built)  # what serve would refuse to start with, explain refuses to run
    if refused:
        built.close()
        raise ConfigError(refused)
    task, answered = _waitress_task(built, method.upper(), target, header_pairs, body, peer)
    if task is None:  # Waitress answers such a request itself: no layer sees it
        built.close()
        return [f"{method.upper()} {target} from {peer}", f"  Waitress answers it itself: {answered}"], \
            int(answered.split()[0])
    environ: WSGIEnvironment = task.get_environment()
    trace: list[tuple[str, str]] = []
    environ[TRACE] = trace
    seen: list[Any] = []

    live = LiveStack(config_path, built=built)  # what the server serves: its X-Stack-Generation (1) too

    def capture(env: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(env)
        return live(env, start_response)

    status, response_headers, body_out = _serve(task, _waitress_view(built, capture))
    lines = [f"{method.upper()} {target} from {peer}"]
    decisions: dict[str, list[str]] = {}
    for layer, decision in trace:
        decisions.setdefault(layer, []).append(decision)
    for where, label in [*(("default" if s.implicit else f"[{s.index}]", s.label) for s in built.layers),
                         ("core", "app")]:  # the app is traced as "app": its own refusals are its own
        said = decisions.pop(label, [])
        state = "applied" if "entered" in said else ("skipped" if said else "not reached")
        extra = [d for d in said if d != "entered"]
        lines.append(f"  {where:>8} {label:<12} {state}{': ' + '; '.join(extra) if extra else ''}")
    # Notes under a name no layer is labelled with: a layer of your own names itself as its author chose,
    # not as stack.yaml spells it (module:attr), and what it noted is shown all the same.
    lines.extend(f"  {'note':>8} {layer:<12} {'; '.join(said)}" for layer, said in decisions.items())
    inner = seen[0] if seen else environ
    lines.append(f"  client address: {inner.get(CLIENT_IP) or inner.get('REMOTE_ADDR')}")
    lines.append(f"  scheme: {inner.get('wsgi.url_scheme')}, host: {inner.get('HTTP_HOST')}")
    used = {getattr(spec.options, "store", None) for spec in built.config.pipeline}
    fresh = sorted(name for name, spec in built.config.stores.items()
                   if name in used and spec.url.startswith("memory://"))
    if fresh:  # each process has its own: this one's is new, not the running server's
        lines.append(f"  store{'s' if len(fresh) > 1 else ''} {', '.join(fresh)} {'are' if len(fresh) > 1 else 'is'} "
                     "memory:// and new here: the running server's sessions, rate-limit counts and cached "
                     f"answers are not in {'them' if len(fresh) > 1 else 'it'}")
    lines.append(f"status: {status}")
    lines.extend(f"  {k}: {v}" for k, v in response_headers)
    preview = body_out[:400].decode("utf-8", "replace")
    lines.append(f"body ({len(body_out)} bytes): {preview}")
    built.close()
    return lines, int(status.split()[0])


def cmd_explain(args: argparse.Namespace) -> int:
    # The trace is what the command prints: what the layers write to stdout while the request
    # runs (the access log's line) goes to stderr, so `explain … | less` shows the trace alone.
    for handler in logging.getLogger("wsgistack.access").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            lines, _ = explain(args.config, args.method, args.path, args.header, args.peer,
                               (args.data or "").encode("utf-8", "surrogateescape"))
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------- users, cache


class _Lenient(dict[str, str]):
    """An environment in which every variable is set (to "" when missing), for reading one section."""

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> str:
        return ""


def _peer_address(text: str) -> str:
    """``explain --peer``: an IP address, as a server's REMOTE_ADDR always is."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address (10.0.0.7, ::1)") from None


def _app_option(config_path: str, name: str, default: str) -> str:
    """One of the app's options, without needing the secrets the rest of the file interpolates."""
    doc = read_file(config_path, env=_Lenient(os.environ))
    found: Any = doc.data or {}
    section: tuple[str, ...]
    for section in ((), ("app",), ("app", "options")):  # the sections on the way must be mappings
        if section:
            found = found.get(section[-1]) or {}
        if not isinstance(found, dict):
            what = ".".join(section) or "the top level"
            raise ConfigError([doc.problem(section, f"{what} must be a mapping (got {type(found).__name__})")])
    options: dict[str, Any] = found
    for key in ("var_dir", name):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise ConfigError([doc.problem(("app", "options", key), f"{key} must be a path (got "
                                           f"{type(options[key]).__name__} {options[key]!r})")])
    from middleware.base import resolve_path

    base = str(config_dir(config_path))  # as the server resolves them for the app
    value = options.get(name)
    return resolve_path(base, value) if value else os.path.join(resolve_path(base, options.get("var_dir") or "var"),
                                                                 default)


def cmd_users(args: argparse.Namespace) -> int:
    from app.users import users_cli

    try:
        db_path = _app_option(args.config, "users_db", "users.sqlite3")
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    return int(users_cli(list(args.rest), db_path, prog=_PROG))


def cmd_cache(args: argparse.Namespace) -> int:
    from config.build import make_stores
    from config.lint import kind, unknown_stores
    from middleware.cache import purge
    from stores import StoreError

    if args.pattern[:1] not in ("/", "*", "?", "["):  # a cached path always starts with "/" (decoded_path roots it)
        print(f"cache purge: {args.pattern!r} can match no cached response: their paths start with '/'; "
              f"did you mean {'/' + args.pattern!r}?", file=sys.stderr)
        return 2
    try:
        config = parse(read_file(args.config))
        missing = list(unknown_stores(config, config.pipeline))
        if missing:
            raise ConfigError(missing)
        specs: list[LayerSpec] = [s for s in config.pipeline if kind(s) == "cache"]
        if not specs:
            print(f"{args.config}: the pipeline has no cache layer", file=sys.stderr)
            return 2
        local = [s for s in specs if config.stores[s.options.store].url.startswith("memory:")]
        if local:
            _print_problems(_purge_in_process(config, spec, args.pattern) for spec in local)
            return 2
        stores = make_stores(config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    total = 0
    try:
        for spec in specs:
            store = stores[spec.options.store]
            total += purge(store, args.pattern, prefix=spec.options.key_prefix)
    except StoreError as exc:  # Redis down or refusing: say so, no traceback
        print(f"{args.config}: cannot purge {args.pattern!r} (purged {total} before): {exc}", file=sys.stderr)
        return 1
    finally:
        for store in stores.values():
            store.close()
    print(f"purged {total} cached response(s) matching {args.pattern!r}")
    return 0


def _purge_in_process(config: StackConfig, spec: LayerSpec, pattern: str) -> Problem:
    """Why ``cache purge`` cannot reach a cache on a memory:// store, and what to do instead."""
    store = spec.options.store
    if spec.options.purge_path:
        how = (f"send POST {spec.options.purge_path}?pattern={pattern} to the running server with the token of "
               "a user with a role in purge_roles")
    else:
        how = (f"set the cache layer's purge_path (e.g. /_stack/cache/purge) and send POST "
               f"<purge_path>?pattern={pattern} to the running server with an admin's token")
    return config.document.problem(
        ("stores", store),
        f"the cache at pipeline[{spec.index}] keeps its responses in store {store!r} (memory://), inside the "
        f"running server's process: this command would purge an empty copy of its own; {how}",
    )


# ---------------------------------------------------------------- entry points


#: The program's name in its usage and errors: ``wsgistack`` from the installed command, ``serve.py`` else.
_PROG = "wsgistack" if os.path.basename(sys.argv[0] or "") == "wsgistack" else "serve.py"

def parser() -> argparse.ArgumentParser:
    # The environment each command reads and its exit codes are in its --help: a script or a unit file is
    # written from them (README.md, "For scripts", has the same).
    p = argparse.ArgumentParser(
        prog=_PROG, description="wsgistack: a configuration-driven WSGI stack",
        epilog="The stack file's ${NAME} come from the environment, else from the .env file beside it (which "
               "never overrides a variable that is set); $WSGISTACK_LOG_LEVEL overrides logging.level. Results go "
               "to stdout, diagnostics to stderr. Exit codes: 0 done; 2 a usage error, or an invalid stack file, "
               ".env or WSGISTACK_ variable; 130 Ctrl-C; check: 1 warnings only; cache purge: 1 a store failed; "
               "users: 1 refused; serve: see serve -h.")
    p.add_argument("-c", "--config", default=_env_config(), type=_config_path,
                   help="path to stack.yaml (default: $WSGISTACK_CONFIG or stack.yaml)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser(
        "serve", help="serve the stack with Waitress (default)",
        description="Validate and build the stack, bind server.listen, then serve with Waitress. SIGHUP reloads "
                    "the file (one that fails is logged and the running stack kept); SIGTERM or Ctrl-C drains the "
                    "requests in flight for server.drain_timeout seconds ($WSGISTACK_DRAIN_SECONDS overrides it) "
                    "and stops. Exit codes: 0 stopped, every request in flight answered; 1 stopped before all "
                    "were; 2 not started (an invalid configuration, an address that cannot be bound); 3 every "
                    "worker kept dying as it started.")
    ck = sub.add_parser(
        "check", help="validate and lint; exit 0 clean, 1 warnings, 2 errors",
        description="Print every problem on stdout, one a line, as file:line:col key.path: message (a warning "
                    "says 'warning:' before the key), else 'FILE: ok'. The stack is built, but no store is "
                    "connected to: a Redis that refuses its password or does not answer shows at serve. Exit "
                    "codes: 0 clean, 1 warnings only, 2 errors.")
    ck.add_argument("--hosted", action="store_true",
                    help="judge it as serve:app does under another WSGI server (gunicorn), with "
                         "$WSGISTACK_HOST_LISTEN: run it before every kill -HUP")
    sub.add_parser("layers", help="list built-in layers and their options",
                   description="Every built-in layer and each option's type, default and first sentence of its "
                               "documentation. Exit codes: 0; 2 when a registered layer cannot be imported.")
    ex = sub.add_parser(
        "explain", help="run one request in-process and show each layer's decision",
        description="Run one request through the stack as the server would and print, on stdout, each layer's "
                    "decision, the client address and the answer (the access log goes to stderr). It uses the "
                    "configured stores: on redis:// the request counts against its client's rate limits and may "
                    "be cached, as any other. Exit codes: 0 explained, whatever its status; 2 an invalid stack "
                    "file or argument.")
    ex.add_argument("method", help="GET, POST, ... (sent in upper case)")
    ex.add_argument("path", help="the request target: '/path?query', or absolute-form 'http://host/path'")
    ex.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    ex.add_argument("--peer", default="127.0.0.1", type=_peer_address,
                    help="the connecting address (default 127.0.0.1)")
    ex.add_argument("-d", "--data", help="request body")
    us = sub.add_parser("users", help="manage login users: add, passwd, list, remove, set-role")
    us.add_argument("rest", nargs=argparse.REMAINDER, metavar="add|passwd|list|remove|set-role ...",
                    help="what to do: add NAME [--role ROLE]..., passwd NAME, list, remove NAME, set-role NAME "
                         "ROLE...; `users add -h` and the others say more")
    ca = sub.add_parser("cache", help="cache maintenance")
    ca_sub = ca.add_subparsers(dest="cache_command", required=True, metavar="{purge}")  # (errors name it, not dest)
    purge = ca_sub.add_parser(
        "purge", help="delete cached responses whose path matches a glob",
        description="Delete the responses every cache layer keeps in a Redis store whose path matches PATTERN, "
                    "and print how many. A memory:// store lives inside the server's process: the layer's "
                    "purge_path reaches it. Exit codes: 0 purged; 1 a store failed (Redis down or refusing: "
                    "try again); 2 an invalid stack file or pattern, or a cache on a memory:// store.")
    purge.add_argument("pattern", help="a glob over the path, which starts with '/': '/api/v1/search*'")
    return p


COMMANDS = {
    "serve": cmd_serve,
    "check": cmd_check,
    "layers": cmd_layers,
    "explain": cmd_explain,
    "users": cmd_users,
    "cache": cmd_cache,
}


def load_dotenv(path: str) -> None:
    """Read ``NAME=value`` lines from ``path`` into the environment, never overriding what is set.

    The grammar of Compose's and python-dotenv's ``.env`` files, less interpolation
    (see :func:`parse_dotenv`).  ValueError, with the file's name (and line), when it
    cannot be read as UTF-8 text or a line is not a setting.
    """
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a BOM an editor wrote is not the first name's
            text = handle.read()
    except FileNotFoundError:
        return
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); write it as NAME=value lines in UTF-8") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    settings = parse_dotenv(text, path)
    secret = [name for name in settings if secret_name(name)]
    if secret:  # as the users database warns of its hashes: other accounts of the machine could read them
        with contextlib.suppress(OSError):
            mode = os.stat(path).st_mode & 0o777
            if mode & 0o077:
                print(f"{path}: other accounts on this machine can read it (mode {mode:o}), and it holds "
                      f"{', '.join(secret)}: chmod 600 {path}", file=sys.stderr)
    for name, value in settings.items():
        os.environ.setdefault(name, value)


_DOTENV_NAME = re.compile(r"(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*")
_DOTENV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


_DOTENV_WORD = re.compile(r"(?:export[ \t]+)?([A-Za-z0-9_]+)([ \t:=]?)")


def _dotenv_not_a_setting(line: str) -> str:
    """What is wrong with a ``.env`` line that is not a setting, quoting no more of it than a name before a
    separator: the message goes to stderr (a service's journal), and the line may hold a secret (``JWT_SECRET:
    …``, a value wrapped onto a line of its own)."""
    line = line.rstrip()
    word = _DOTENV_WORD.match(line)
    if word is not None and word.end(1) == len(line):
        return "the line has no '='"
    if word is None or not word.group(2):
        return "the line is not NAME=value"
    if word.group(2) == "=":
        return f"{word.group(1)!r} is not a name"
    return f"{word.group(1)!r} is followed by {word.group(2)!r}, not '='"


def parse_dotenv(text: str, path: str = ".env") -> dict[str, str]:
    """The settings of a ``.env`` file; a later line of a name wins, as in Compose.

    ``NAME=value`` (``export NAME=value`` too); blank lines and ``#`` lines are skipped.
    A value is unquoted (trimmed; `` #`` after a space starts a comment), ``'single'``
    (taken as written) or ``"double"`` (``\\n``, ``\\t``, ``\\"`` and ``\\\\`` are escapes); a
    quoted value may go on over several lines (a PEM key), and after it only a comment
    may follow.  Lines end at ``\\n`` (and ``\\r\\n``) only, as Compose reads them.
    Anything else is a ValueError naming ``path:line``.
    """
    found: dict[str, str] = {}
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    number = 0
    while number < len(lines):
        line = lines[number].lstrip()  # (a quoted value keeps what ends its line: trimmed below if unquoted)
        number += 1
        if not line.strip() or line.startswith("#"):
            continue
        head = _DOTENV_NAME.match(line)
        if head is None:
            raise ValueError(f"{path}:{number}: {_dotenv_not_a_setting(line)}: write NAME=value (a name of letters, "
                             "digits and _, not starting with a digit)")
        name, rest = head.group(1), line[head.end():]
        if rest[:1] not in ("'", '"'):
            comment = re.search(r"[ \t]#", rest)
            found[name] = (rest[:comment.start()] if comment else rest).strip()
            continue
        first, quote, value, i = number, rest[0], [], 1
        while True:
            while i < len(rest) and rest[i] != quote:
                if quote == '"' and rest[i] == "\\" and i + 1 < len(rest):
                    value.append(_DOTENV_ESCAPES.get(rest[i + 1], rest[i:i + 2]))
                    i += 2
                    continue
                value.append(rest[i])
                i += 1
            if i < len(rest):
                break
            if number >= len(lines):  # the quote goes on over the next lines, and closes on none
                raise ValueError(f"{path}:{first}: the value of {name} opens a {quote} quote that never closes")
            value.append("\n")
            rest, i = lines[number], 0  # (its spaces are the value's)
            number += 1
        after = rest[i + 1:].strip()
        if after and not after.startswith("#"):
            raise ValueError(f"{path}:{number}: the value of {name} goes on after its closing {quote}: "
                             "quote the whole value")
        found[name] = "".join(value)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # the `wsgistack` entry point imports layers beside serve.py as `python serve.py` does
        sys.path.insert(0, here)
    args = parser().parse_args(argv)
    if (args.command or "serve") == "serve":  # its signals are its own (cmd_serve)
        return _run(args)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # An argument that is not UTF-8 (a file's name, explain's target) prints back as the bytes it came
        # in, as a C locale's stdout does, not as a UnicodeEncodeError in a UTF-8 locale's.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # blocked at startup for `serve` (see the imports)
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C (a slow app factory, a Redis that does not answer): 130, as shells say it
        return 130


def _run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names, after reading the ``.env`` beside its file; its exit code."""
    if args.command in ("layers", "check", "explain", "cache", "users"):
        # Printing commands: `serve.py layers | head` ends quietly. Never for `serve`, where a
        # client closing its socket must raise EPIPE in that one thread, not end the process.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command in (None, "serve", "check", "explain") and not os.path.exists(args.config):
        starter = shipped_file("stack.yaml")  # (its "file not found" follows, from the command)
        if starter is not None and os.path.abspath(starter) != os.path.abspath(args.config):
            print(f"{args.config}: no such file; a stack file to start from ships with wsgistack: "
                  f"cp {starter} {args.config}", file=sys.stderr)
    try:
        load_dotenv(os.path.join(config_dir(args.config), ".env"))
        level = _env_log_level()
        _env_drain_seconds()
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    _setup_logging(level or "INFO")
    try:
        return COMMANDS[args.command or "serve"](args)
    except MemoryError:  # (exit 1 would read as check's "warnings only")
        print(f"{args.config}: ran out of memory", file=sys.stderr)
        return 2


_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``serve:app`` (PEP 562): the first time any WSGI server takes it, build ``$WSGISTACK_CONFIG``.

    An invalid file prints its located errors and raises :class:`ConfigError`,
    so the server stops at startup instead of answering 500 to every request.
    """
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        live = globals().get("app")
        if live is None:
            live = globals()["app"] = hosted_app()
    return live


def hosted_app(path: str | os.PathLike[str] | None = None) -> LiveStack:
    """The stack at ``path`` (default ``$WSGISTACK_CONFIG``, else ``stack.yaml``) for another WSGI server, as
    ``serve:app`` serves it: ``application = serve.hosted_app("stack.yaml")`` in a ``wsgi.py`` of your own.

    Besides ``LiveStack(path, hosted=True)``, which judges and builds it, this
    reads the ``.env`` beside the file (never overriding what is set), prints its
    problems to stderr (refusing to start on errors), sets the ``wsgistack``
    loggers' level (``$WSGISTACK_LOG_LEVEL``, else ``logging.level``) and, when the
    host configured no logging, writes the access log to stdout.  The host owns
    the log handlers otherwise.
    """
    path = os.fspath(path) if path is not None else _env_config()
    load_dotenv(os.path.join(config_dir(path), ".env"))
    _env_log_level()  # a bad one stops the host at startup, with its ValueError's message
    try:
        live = LiveStack(path, hosted=True)
    except ConfigError as exc:
        _print_problems(exc.problems)
        print(f"{path}: refusing to start with an invalid configuration", file=sys.stderr)
        raise
    _print_problems(live.current.warnings)
    logging.getLogger("wsgistack").setLevel(_env_log_level() or live.current.config.logging.level)
    access = logging.getLogger("wsgistack.access")
    if not access.hasHandlers():  # the host configured no logging: the lines would be dropped unseen
        from middleware.access_log import LineHandler

        access.handlers[:] = [LineHandler(sys.stdout)]
        access.propagate = False
    return live


if __name__ == "__main__":
    sys.exit(main())
