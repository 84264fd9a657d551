"""Prometheus metrics for the stack: requests, latency, per-layer time, layer events, stores.

The layer counts every request that passes it by method, route template and
status, observes its latency, and serves the Prometheus exposition at
``path`` to the networks in ``allow_from`` (answered here, never by the app).
Layer events (``cache.hit``, ``ratelimit.reject``, ``auth.failure`` …) arrive
through ``context.listeners``; store health and circuit state are read from
``context.stores`` at scrape time.  Each instance owns its registry, so two
stacks (tests, reloads) never collide in the global default registry.

Latency is the time until the app hands back its response (headers ready);
a streamed body is not included, so a long ``text/event-stream`` does not
distort the histogram.

Several worker processes on one port (``server.workers``, or gunicorn with
``$WSGISTACK_METRICS_DIR`` set) each count their own requests; every process
writes its counts to a file in that directory once a second, and a scrape,
whichever worker answers it, adds its own live counts to the other files, so
the totals cover every worker (see :class:`_Merged`).  Process, GC and store
metrics are those of the worker that answered.  Keep ``server_timing`` off on
public listeners: it tells every client how long each layer took.

Another origin's page may not read the exposition (``Sec-Fetch-Site``
``cross-site`` or ``same-site``, or a foreign ``Origin``: 403, also inside
``cors``), and a browser's request for a Host that is neither an IP address,
``localhost`` nor one of ``hosts`` gets 403 (DNS rebinding).  Prometheus sends
none of the browser's headers, so it scrapes by any name until ``hosts`` is
set; from then on every request's Host is checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import itertools
import json
import logging
import math
import os
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as _TEXT_004
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from pydantic import field_validator
from werkzeug.http import parse_accept_header

from .base import (
    ROUTE,
    ROUTE_TEMPLATE,
    TIMINGS,
    Context,
    LayerOptions,
    Listener,
    Networks,
    address_in,
    decorate_error,
    networks,
    refusal_status,
    refuse,
    rewrites_inside,
    rooted_path,
    routed_path,
)
from .health import STORE_CHECK_SECONDS, StoreChecks
from .operator_page import HostCheck, HostNames, cross_origin, from_browser

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["METRICS_DIR", "ROUTE", "STORE_CHECK_SECONDS", "MetricsMiddleware"]

#: The environment variable naming the directory where worker processes share their counts.
METRICS_DIR = "WSGISTACK_METRICS_DIR"
#: How often (seconds) a worker writes its counts for the others' scrapes.
SHARE_INTERVAL = 1.0
_log = logging.getLogger("wsgistack.metrics")

Headers = list[tuple[str, str]]
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
#: Longest path or route a lookup table keeps as a key: a longer one (a client's, sent to pin memory) is
#: looked up again each time instead.
_LONGEST_KEPT = 256
_HEX = "[0-9a-fA-F]"
_ID_SEGMENT = re.compile(
    rf"/(?:\d+|{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}|{_HEX}{{16,}})(?=/|$)"
)
_go_float: Callable[[float], str] = floatToGoString  # how prometheus writes bucket bounds ("0.005", "1.0")
_VERSION = re.compile(r"(?:\d+(?:\.\d+)*)?")
#: The exposition formats each media range of an ``Accept`` covers, in this server's order of preference.
_RANGES = {"*/*": ("text/plain", "application/openmetrics-text"), "text/*": ("text/plain",),
           "application/*": ("application/openmetrics-text",)}
_NOT_TOKEN = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
#: A layer's own time: from 50 µs, as most are, up to 10 s, as the request histogram's default, since the
#: app is timed as a layer too and a store that hangs holds its layer for socket_timeout (past the highest
#: bound only +Inf is left, and histogram_quantile reports that bound for any slower tail).
_LAYER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)
# Counters fed by context events: metric name -> (help, label names).
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "wsgistack_cache_events": ("Cache decisions by result.", ("result",)),
    "wsgistack_ratelimit_events": ("Rate-limit decisions by result and rule.", ("result", "rule")),
    "wsgistack_auth_failures": ("Authentication failures by reason.", ("reason",)),
    "wsgistack_store_errors": ("Store errors by store and layer.", ("store", "layer")),
    "wsgistack_deprecated_version_requests": ("Requests for a deprecated version.", ("version",)),
    "wsgistack_sessions_created": ("Sessions created.", ()),
    "wsgistack_events": ("Other layer events by name.", ("event",)),
}
# event -> (metric, fixed label values, the event's fields that give the other label values)
_EVENTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    **{f"cache.{r}": ("wsgistack_cache_events", (r,), ()) for r in ("hit", "miss", "stale", "bypass")},
    **{f"ratelimit.{r}": ("wsgistack_ratelimit_events", (r,), ("rule",))
       for r in ("pass", "reject", "shadow_reject")},
    "auth.failure": ("wsgistack_auth_failures", (), ("reason",)),
    "store.error": ("wsgistack_store_errors", (), ("store", "layer")),
    "version.deprecated": ("wsgistack_deprecated_version_requests", (), ("version",)),
    "session.created": ("wsgistack_sessions_created", (), ()),
}


class MetricsMiddleware:
    """Count requests, time them and the layers, count layer events, serve ``/metrics``.

    Options:
        ``path`` ("/metrics"): where the exposition is served (GET and HEAD).
        ``allow_from`` (loopback): CIDRs allowed to scrape; other clients get 403.
        ``hosts`` (none): names, besides IP addresses and ``localhost``, a browser may
        reach ``path`` by (DNS rebinding); once set, every request's Host is checked.
        ``max_routes`` (100): distinct route labels kept before new ones count as "other".
        ``buckets``: upper bounds, in seconds, of the request latency histogram.
        ``layer_timing`` (false): observe each layer's own time in a histogram.
        ``server_timing`` (false): send each layer's own time in a ``Server-Timing`` header.
        ``process_metrics`` (true): also export process, platform and GC metrics.

    Example::

        app = MetricsMiddleware(app, MetricsMiddleware.Options(server_timing=True), Context())
        text = generate_latest(app.registry)   # what a scrape from 127.0.0.1 gets
    """

    class Options(LayerOptions):
        path: str = "/metrics"
        allow_from: Networks = ("127.0.0.0/8", "::1/128")
        hosts: HostNames = ()
        max_routes: int = 100
        buckets: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1.0, 2.5, 5.0, 10.0)
        layer_timing: bool = False
        server_timing: bool = False
        process_metrics: bool = True

        @field_validator("path")
        @classmethod
        def _path(cls, value: str) -> str:
            if not value.startswith("/"):
                raise ValueError(f"path must start with '/', got {value!r}")
            return value

        @field_validator("buckets")
        @classmethod
        def _buckets(cls, value: tuple[float, ...]) -> tuple[float, ...]:
            bounds = list(value[:-1] if value and value[-1] == math.inf else value)  # +Inf is implied
            if not bounds or not all(math.isfinite(b) for b in bounds) \
                    or any(a >= b for a, b in itertools.pairwise(bounds)):  # (NaN, -Inf, +Inf inside)
                raise ValueError("buckets must be increasing upper bounds in seconds, e.g. [0.01, 0.1, 1.0]")
            return value

        @field_validator("max_routes")
        @classmethod
        def _max_routes(cls, value: int) -> int:
            if value < 1:
                raise ValueError(f"max_routes must be at least 1, got {value}")
            return value

    @staticmethod
    def wants_layer_timing(options: MetricsMiddleware.Options | Mapping[str, Any]) -> bool:
        """Whether the builder should time every layer (``layer_timing`` or ``server_timing``)."""
        if isinstance(options, Mapping):
            return bool(options.get("layer_timing") or options.get("server_timing"))
        return options.layer_timing or options.server_timing

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app, self.options, self.context = app, options, context
        self.path = options.path
        self.rewrites = rewrites_inside(context)  # versioning inside: the route a refused request's path reaches
        self.networks = networks(options.allow_from)
        self.hosts = HostCheck(options.hosts, "metrics.hosts", "metrics")
        self.every_host = bool(options.hosts)  # listed: every request is checked, else a browser's only
        self.timing = self.wants_layer_timing(options)
        self.registry = registry = CollectorRegistry()
        if options.process_metrics:
            from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        registry.register(_StoreCollector(context))
        # What this process counts lives in a registry of its own; the exposition reads it
        # through _Merged, which adds the counts of the other worker processes, if any.
        counted = CollectorRegistry(auto_describe=False)
        self.counts = _Counts(options.buckets)
        counted.register(self.counts)
        self.layer_time = Histogram("wsgistack_layer_duration_seconds",
                                    "Time spent in each layer itself (inner layers excluded).",
                                    ["layer"], buckets=_LAYER_BUCKETS, registry=counted)
        self.shared = _Merged(counted, {
            "wsgistack_http_request_duration_seconds": _edges(self.counts.bounds),
            "wsgistack_layer_duration_seconds": _edges(_LAYER_BUCKETS),
        })
        registry.register(self.shared)
        self._routes = _Capped(options.max_routes)
        self._templates: dict[tuple[str, str], str] = {}  # (method, path) -> route template the app matched
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._layers: dict[str, tuple[Any, str]] = {}
        self._events = {event: (name, fixed, fields, _Capped(64)) for event, (name, fixed, fields) in _EVENTS.items()}
        self._other_events = _Capped(64)
        self._event_keys: dict[tuple[str, ...], tuple[str, tuple[str, ...]]] = {}
        context.listeners.append(Listener(self._on_event, self._bind_event))

    def _event_key(self, event: str, fields: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """The metric and label values that count ``event``."""
        spec = self._events.get(event)
        raw = (event,) if spec is None else (event, *[str(fields.get(n, "unknown")) for n in spec[2]])
        key = self._event_keys.get(raw)
        if key is None:
            if spec is None:
                key = ("wsgistack_events", (self._other_events(event),))
            else:
                name, fixed, _, cap = spec
                key = (name, (*fixed, *[cap(value) for value in raw[1:]]))
            if len(self._event_keys) < 10_000:
                self._event_keys[raw] = key
        return key

    def _on_event(self, event: str, fields: dict[str, Any]) -> None:
        try:
            self.counts.event(self._event_key(event, fields))
        except Exception:  # counting must never fail the request that emitted the event
            self.context.logger.exception("metrics could not count event %r", event)

    def _bind_event(self, event: str, fields: dict[str, Any]) -> Callable[[], None]:
        """The call that counts this one event (see ``Context.emitter``)."""
        try:
            key = self._event_key(event, fields)
        except Exception:
            return partial(self._on_event, event, fields)  # (it logs the failure, per event)

        def count() -> None:
            try:
                self.counts.event(key)
            except Exception:
                self.context.logger.exception("metrics could not count event %r", event)

        return count

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.shared.pending:
            self.shared.start()
        path = environ.get("PATH_INFO") or ""
        # (the comparisons: a path the router reads as it is, see rooted_path)
        if path == self.path or (not ("/0" <= path < "0" or "/" <= path < "//") and rooted_path(path) == self.path):
            return self._expose(environ, start_response)
        if self.timing:
            return self._timed(environ, start_response)
        statuses: list[str] = []

        def capture(status: str, headers: Headers, exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        start = time.perf_counter()
        try:
            result = self.app(environ, capture)
        except Exception as exc:
            self._record(environ, _exc_status(exc), time.perf_counter() - start)
            raise
        elapsed = time.perf_counter() - start
        if statuses:
            self._record(environ, statuses[-1][:3], elapsed)
            return result
        # The app calls start_response only once iterated: count when it has.
        return _OnFirstChunk(result, lambda: self._record(environ, statuses[-1][:3] if statuses else "500", elapsed),
                             lambda exc: self._record(environ, _exc_status(exc), elapsed))

    def _timed(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Like ``__call__``, but holds the real ``start_response`` until inner times are known.

        PEP 3333 lets a middleware call ``start_response`` any time before it
        yields the first body chunk; the body itself is never buffered.
        """
        environ[TIMINGS] = []
        start = time.perf_counter()
        sent: list[float] = []  # when the headers went out (Server-Timing's total), once they have

        def timed(status: str) -> Headers:  # the headers go out: layer times and Server-Timing
            sent.append(time.perf_counter() - start)
            return self._timings(environ, sent[0])

        def count(status: str) -> None:  # once, when the request's outcome is known
            self._record(environ, status, sent[0] if sent else time.perf_counter() - start)

        held = _Held(start_response, timed)
        try:
            result = self.app(environ, held)
        except Exception as exc:
            # The headers may have gone out with a write(): the failure is the outcome, counted once.
            headers = [] if sent else timed(_exc_status(exc))
            count(_exc_status(exc))
            decorate_error(exc, headers)
            raise
        def flush_counted(body: Any = None) -> None:
            try:
                held.flush()  # the server's start_response (or an outer layer's) may refuse the headers
            except Exception as exc:
                count(_exc_status(exc))
                close = getattr(body, "close", None)  # never handed to the server, which would close it
                if close is not None:
                    close()
                raise

        if held.status is not None:
            flush_counted(result)
            count(held.status[:3])
            return result

        def started() -> None:
            flush_counted()
            count(held.status[:3] if held.status else "500")

        def failed(exc: BaseException) -> None:  # raised before the first chunk: errors renders it
            status = _exc_status(exc)
            headers = [] if sent else timed(status)
            count(status)
            decorate_error(exc, headers)

        return _OnFirstChunk(result, started, failed)

    def _timings(self, environ: WSGIEnvironment, total: float) -> Headers:
        """Observe layer times; return the ``Server-Timing`` header if on."""
        parts = []
        inner = 0.0
        for name, inclusive in environ.get(TIMINGS) or ():  # innermost first
            child, token = self._layer(name)
            own, inner = max(inclusive - inner, 0.0), inclusive
            if self.options.layer_timing:
                child.observe(own)
            parts.append(f"{token};dur={own * 1000:.3f}")
        if not self.options.server_timing:
            return []
        parts.reverse()
        parts.append(f"total;dur={total * 1000:.3f}")
        return [("Server-Timing", ", ".join(parts))]

    def _layer(self, name: str) -> tuple[Any, str]:
        found = self._layers.get(name)
        if found is None:
            found = (self.layer_time.labels(name), _NOT_TOKEN.sub("_", name) or "layer")
            self._layers[name] = found
        return found

    def _route(self, environ: WSGIEnvironment, method: str, status: str) -> str:
        """The ``route`` label of a request no route template was set for (refused before the app, a cache hit).

        The app's routes name it when the app publishes ``route_template``
        (the Flask core does); a path they do not match is ``other``, so a
        client sending random paths that some layer refuses (401, 429…)
        cannot take the label values real routes need.  Without that
        service, refusals (4xx) are ``other`` and other answers the path with
        its ids as ``{id}``.
        """
        path = environ.get("PATH_INFO") or "/"
        if not ("/0" <= path < "0" or "/" <= path < "//"):  # as the router roots it (see rooted_path): one label
            path = rooted_path(path)
        key = (method, path)
        known = self._templates.get(key)
        if known is not None:
            return known
        lookup = self.context.services.get(ROUTE_TEMPLATE)
        if lookup is not None:
            try:
                template = lookup(path, method)
            except Exception:  # a label is not worth failing the request
                template = None
            if template is None and self.rewrites:
                # Refused before a layer inside rewrote its path (auth's 401 of /api/config, which
                # versioning would route to /api/v2/config): the route that path reaches
                routed = routed_path(environ, self.rewrites)
                if routed != path:
                    try:
                        rerouted = lookup(routed, method)
                    except Exception:
                        rerouted = None
                    return "other" if rerouted is None else str(rerouted)  # (not kept: a header may choose it)
            if template is None:
                return "other"
            if len(self._templates) < 1000 and len(path) <= _LONGEST_KEPT:  # (a converter may match any length)
                self._templates[key] = template
            return str(template)
        return "other" if status[:1] == "4" else _ID_SEGMENT.sub("/{id}", path)

    def _record(self, environ: WSGIEnvironment, status: str, elapsed: float) -> None:
        method = environ.get("REQUEST_METHOD", "")
        if method not in _METHODS:  # Waitress passes any token, 256 KiB long: kept as it came, 10,000 of them
            method = "other"        # would hold gigabytes for good
        route = environ.get(ROUTE)
        if route is None:
            route = self._route(environ, method, status)
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = self.counts.series(method, self._routes(route), status)
            if len(self._series) < 10_000 and len(route) <= _LONGEST_KEPT:
                self._series[key] = series
        self.counts.observe(series, elapsed)

    def close(self) -> None:
        """Share the counts a last time (with ``$WSGISTACK_METRICS_DIR``); called when the server stops."""
        self.shared.close()

    def _refused(self, environ: WSGIEnvironment, status: str) -> None:
        environ[ROUTE] = self.path
        self._record(environ, status, 0.0)

    def _expose(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        # Scrapes are not counted; refusals are (someone probing for the metrics shows in them),
        # with the path as the route: this layer sits outside access_log, which never sees them.
        # Who may ask comes first: a client outside allow_from learns nothing, not even the methods.
        if not address_in(environ, self.networks):
            self._refused(environ, "403")
            raise refuse(403, "Metrics are not available to this client.")
        # A scrape sends no browser header: it costs a few dict lookups (and the Host check once hosts is set).
        why = (self.hosts.refusal(environ) if self.every_host or from_browser(environ) else None) \
            or cross_origin(environ, "Metrics", navigable=True)
        if why is not None:
            self._refused(environ, "403")
            raise refuse(403, why)
        if method not in ("GET", "HEAD"):
            self._refused(environ, "405")
            exc = refuse(405, headers=[("Allow", "GET, HEAD")])
            exc.description = f"{self.path} answers GET and HEAD only."  # not 405's first argument
            raise exc
        encoder, content_type = _negotiate(environ.get("HTTP_ACCEPT", ""))
        body = encoder(self.registry)
        headers = [("Content-Type", content_type), ("Cache-Control", "no-store"), ("Vary", "Accept, Accept-Encoding")]
        if parse_accept_header(environ.get("HTTP_ACCEPT_ENCODING"))["gzip"] > 0:  # Prometheus asks on every scrape
            body = gzip.compress(body, compresslevel=6)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [] if method == "HEAD" else [body]


def _negotiate(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The encoder and ``Content-Type`` of the format ``accept`` prefers, as RFC 9110 §12.5.1 weighs it.

    prometheus_client's ``choose_encoder`` takes the first entry it can serve in
    the order written, weights aside, and passes over a ``text/plain`` it serves
    as its default (0.0.4): Prometheus's ``scrape_protocols: [PrometheusText0.0.4,
    OpenMetricsText1.0.0]`` (``text/plain;version=0.0.4;q=0.6,
    application/openmetrics-text;version=1.0.0;q=0.5``) got OpenMetrics, and
    ``application/openmetrics-text;q=0`` (not acceptable) got it too.  So each
    entry is offered to it alone, the heaviest first (the order written among
    equals), ``q=0`` left out: the first it serves in a format of its own is
    chosen, a ``text/plain`` it does not (0.0.4, no version) chooses the text
    format 0.0.4, and so does an ``Accept`` without any.

    ``choose_encoder`` compares the version as numbers and fails on any other
    (``version=abc``: a 500), or echoes it in the ``Content-Type``
    (``version=9.x``): such an entry is left out as if not sent.

    A range (``*/*``, ``text/*``, ``application/*``) admits the formats it covers at
    its own weight, unless the client named that format itself (its own weight
    then counts, ``q=0`` too); between a range and a format named with the same
    weight, the named one is chosen.
    """
    ranked: list[tuple[float, bool, int, str, str]] = []
    named = set()
    for index, entry in enumerate(accept.split(",") if accept else ()):
        media, *params = entry.split(";")
        media, weight = media.strip().lower(), 1.0
        named.add(media)
        for param in params:
            key, _, value = param.strip().partition("=")
            key = key.strip().lower()
            if key == "q":
                try:
                    weight = float(value)
                except ValueError:
                    continue  # (not a weight: as if not given)
            elif key == "version" and not _VERSION.fullmatch(value):
                weight = 0.0
                break
        if weight > 0 and media:
            ranked.append((-weight, media in _RANGES, index, media, ";".join((media, *params))))
    for _, is_range, _, media, entry in sorted(ranked):
        if is_range:
            for covered in _RANGES[media]:
                if covered not in named:
                    return choose_encoder(covered)
            continue
        chosen = choose_encoder(entry)
        if media == "text/plain" or chosen[1] != _TEXT_004:
            return chosen
    return choose_encoder("")


class _Series:
    """The count of one (method, route, status) and the latency histogram of its (method, route)."""

    __slots__ = ("count", "created", "histogram", "labels")

    def __init__(self, labels: tuple[str, str, str], histogram: list[float]) -> None:
        self.labels, self.histogram = labels, histogram
        self.count = 0
        self.created = time.time()


class _Counts:
    """Request counts, latency histograms and event counts, exported when scraped.

    The same series a prometheus ``Counter`` and ``Histogram`` give, kept in
    plain lists under one lock: counting a request takes one lock instead of
    the three (about 4 µs) that ``inc()`` and ``observe()`` take.
    """

    def __init__(self, buckets: Iterable[float]) -> None:
        self.created = time.time()  # of the counters that exist before their first count
        self.bounds = tuple(float(b) for b in buckets if b != math.inf)
        self.lock = threading.Lock()
        self.by_labels: dict[tuple[str, str, str], _Series] = {}
        self.histograms: dict[tuple[str, str], list[float]] = {}  # bucket counts, +Inf, then the sum
        self.events: dict[tuple[str, tuple[str, ...]], list[float]] = {}  # [count, created]

    def series(self, method: str, route: str, status: str) -> _Series:
        with self.lock:
            found = self.by_labels.get((method, route, status))
            if found is None:
                histogram = self.histograms.get((method, route))
                if histogram is None:
                    histogram = self.histograms[(method, route)] = [0.0] * (len(self.bounds) + 2)
                found = self.by_labels[(method, route, status)] = _Series((method, route, status), histogram)
            return found

    def observe(self, series: _Series, seconds: float) -> None:
        slot = bisect_left(self.bounds, seconds)  # the first bound >= seconds, as prometheus counts
        with self.lock:
            series.count += 1
            histogram = series.histogram
            histogram[slot] += 1
            histogram[-1] += seconds

    def event(self, key: tuple[str, tuple[str, ...]]) -> None:
        with self.lock:
            entry = self.events.get(key)
            if entry is None:
                self.events[key] = [1, time.time()]
            else:
                entry[0] += 1

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            series = [(s.labels, s.count, s.created) for s in self.by_labels.values()]
            histograms = [(pair, list(h)) for pair, h in self.histograms.items()]
            events = [(name, values, count, created) for (name, values), (count, created) in self.events.items()]
        requests = CounterMetricFamily("wsgistack_http_requests", "Requests by method, route and status.",
                                       labels=["method", "route", "status"])
        for labels, total, created in series:
            requests.add_metric(labels, total, created=created)
        yield requests
        latency = HistogramMetricFamily("wsgistack_http_request_duration_seconds",
                                        "Time until the response headers were ready.", labels=["method", "route"])
        edges = [_go_float(b) for b in self.bounds] + ["+Inf"]
        for pair, histogram in histograms:
            running, buckets = 0.0, []
            for edge, in_bucket in zip(edges, histogram, strict=False):
                running += in_bucket
                buckets.append((edge, running))
            latency.add_metric(list(pair), buckets, histogram[-1])
        yield latency
        for name, (doc, label_names) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=list(label_names))
            found = [(values, count, created) for n, values, count, created in events if n == name]
            if not label_names and not found:
                found = [((), 0, self.created)]  # a counter without labels is always there, as in prometheus
            for values, count, created in found:
                family.add_metric(list(values), count, created=created)
            yield family


_SEQUENCE = itertools.count()
_TAG: tuple[int, str] = (0, "")


def _process_tag() -> str:
    """``<pid>-<random>``, new in each process: a later process given the same pid names its files apart."""
    global _TAG
    pid = os.getpid()
    if _TAG[0] != pid:
        _TAG = (pid, os.urandom(4).hex())
    return f"{pid}-{_TAG[1]}"
#: The sharing pipelines of this process: one that starts (the first request after a reload) has
#: the others write their counts at once, so a scrape right after a reload never goes backwards.
_SHARING: weakref.WeakSet[_Merged] = weakref.WeakSet()
_SHARING_LOCK = threading.Lock()
#: The files of this process whose pipeline closed (its last counts written), and merged files:
#: only these are merged (a pipeline starting meanwhile keeps its file to itself).
_CLOSED: set[str] = set()


def _edges(bounds: Iterable[float]) -> frozenset[str]:
    """The ``le`` label values of a histogram with these upper bounds."""
    return frozenset([*(_go_float(float(b)) for b in bounds if b != math.inf), "+Inf"])


class _Merged:
    """What this process counted, plus what the other worker processes shared.

    With ``$WSGISTACK_METRICS_DIR`` set, :meth:`start` runs on the first
    request a process serves (a pipeline built before the server forks its
    workers thus starts sharing in every worker, never in the supervisor):
    a daemon thread writes this process's samples to
    ``<dir>/<pid>-<random>-<n>.json`` every ``SHARE_INTERVAL`` seconds (a temporary
    file, then a rename, so a reader never sees half a file), and once more
    when the layer is closed or dropped.  A scrape adds this process's live
    samples to those of every other file: counters and histograms sum (their
    ``_created`` takes the earliest), so the totals cover every worker,
    at most ``SHARE_INTERVAL`` behind for the others (a scrape first writes what it
    reports, so the next one, whichever worker answers it, reports no less).  Files of workers that
    exited, and the counts of pipelines a reload replaced, stay: totals never go
    backwards (a process merges its replaced pipelines' files into one, see
    :func:`_compact`).  The directory belongs to one server run: ``serve.py`` makes a
    fresh one for its workers and removes it when it stops; when you set it
    yourself (say for gunicorn workers), empty it before each start.
    """

    def __init__(self, counted: CollectorRegistry, edges: dict[str, frozenset[str]] | None = None) -> None:
        self.counted = counted
        #: histogram name -> its bucket bounds (``le``) in this pipeline: a file written with
        #: other bounds (before a reload changed ``buckets``) cannot be added bucket by bucket.
        self.edges = edges or {}
        self.pending = True  # start() has not run in this process yet
        self.directory: str | None = None
        self.path: str | None = None
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # the share thread and a newer pipeline's start() both write
        self._final: weakref.finalize[Any, Any] | None = None

    def start(self) -> None:
        """Start sharing; ``pending`` turns false only once a scrape can see every count (no early zero)."""
        with self._lock:
            if not self.pending:
                return
            try:
                self._start()
            finally:
                self.pending = False

    def _start(self) -> None:
        directory = os.environ.get(METRICS_DIR)
        if not directory:
            return
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            _log.error("metrics: cannot share counts in %s ($%s): %s", directory, METRICS_DIR, exc)
            return
        self.path = os.path.join(directory, f"{_process_tag()}-{next(_SEQUENCE)}.json")
        self._final = weakref.finalize(self, _last_write, self.counted, self.path)
        with _SHARING_LOCK:
            older = list(_SHARING)
            _SHARING.add(self)
        for pipeline in older:
            pipeline.write()
        self.write()
        self.directory = directory  # last: a scrape now adds the files, the older pipelines' written
        _merge_exited(directory)  # workers that exited before this one started (gunicorn recycles them)
        threading.Thread(target=_share, args=(weakref.ref(self),), daemon=True,
                         name="wsgistack-metrics-share").start()

    @property
    def sharing(self) -> bool:
        """Whether this pipeline writes its counts to its file (started, not closed)."""
        return self.path is not None and self._final is not None and self._final.alive

    def write(self, unless: str | None = None) -> str | None:
        """Write this pipeline's counts to its file now (unless they serialise to ``unless``)."""
        with self._writing:
            if not self.sharing:
                return None
            assert self.path is not None
            return _write_samples(self.counted, self.path, unless=unless)

    def close(self) -> None:
        """Write the counts a last time and stop sharing (the counts stay for the others).

        The files of this process's closed pipelines are then merged into one, so
        that a server reloaded many times keeps one file of past counts, not one per
        reload for every scrape to read.
        """
        with self._writing:
            if not self.sharing:
                return
            assert self._final is not None
            self._final()
        if self.directory is not None:
            _compact(self.directory)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.directory is None:
            yield from self.counted.collect()
            return
        # What this process reports is what its file says from now on: a scrape that another worker
        # answers next adds at least these counts, so totals never go back between two scrapes.
        with self._writing:
            own = list(self.counted.collect())
            if self.sharing:
                assert self.path is not None
                _write_samples(own, self.path)
        merged: dict[str, tuple[Metric, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for family in itertools.chain(own, self._others()):
            edges = self.edges.get(family.name) if family.type == "histogram" else None
            if edges is not None:
                bounds = {sample.labels["le"] for sample in family.samples if "le" in sample.labels}
                if bounds and bounds != edges:  # another pipeline's buckets (more, fewer, others)
                    family = _on_edges(family, edges)
            found = merged.get(family.name)
            if found is None:
                found = merged[family.name] = (Metric(family.name, family.documentation, family.type,
                                                      family.unit), {})
            values = found[1]
            for sample in family.samples:
                _add(values, (sample.name, tuple(sorted(sample.labels.items()))), sample.value)
        for metric, values in merged.values():
            samples = [Sample(name, dict(labels), value) for (name, labels), value in values.items()]
            metric.samples = _grouped(samples) if metric.type == "histogram" else samples
            yield metric

    def _others(self) -> Iterator[Metric]:
        """The families in every other file of the directory (unreadable files are skipped)."""
        assert self.directory is not None
        own = os.path.basename(self.path or "")
        for families in _read_shared(self.directory, skip=own)[0].values():
            for fname, ftype, doc, unit, samples in families:
                metric = Metric(fname, doc, ftype, unit)
                metric.samples = [Sample(sname, labels, float(value)) for sname, labels, value in samples]
                yield metric


def _grouped(samples: list[Sample]) -> list[Sample]:
    """A histogram's samples series by series, each its buckets (by bound) then its count, sum and created.

    OpenMetrics (what Prometheus asks for first) refuses a page whose series
    interleave, and the merge meets them in any order: series another process
    counted, or a pipeline with other buckets (:func:`_on_edges`).
    """
    series: dict[tuple[tuple[str, str], ...], list[Sample]] = {}
    for sample in samples:
        series.setdefault(tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le")), []).append(sample)
    return [sample for group in series.values()
            for sample in sorted(group, key=lambda s: (0, float(s.labels["le"])) if "le" in s.labels else (1, 0.0))]


def _on_edges(family: Metric, edges: AbstractSet[str]) -> Metric:
    """A histogram counted with other bucket bounds, on ``edges`` (the ``le`` values in force).

    Each edge gets the count of the highest of the family's own bounds not above it:
    exact where both have the bound (``+Inf`` always), else a lower bound.  Its
    ``_count`` and ``_sum`` stay as they are.  So a pipeline reloaded with other
    ``buckets``, or workers reloaded one after the other, never make the merged
    totals go back or jump, whichever process answers the scrape.
    """
    ours = sorted(edges, key=float)
    buckets: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    samples: list[Sample] = []
    for sample in family.samples:
        if "le" in sample.labels:
            rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            buckets.setdefault((sample.name, rest), []).append((float(sample.labels["le"]), sample.value))
        else:
            samples.append(sample)
    for (name, rest), counts in buckets.items():
        for edge in ours:
            limit = float(edge)
            samples.append(Sample(name, {**dict(rest), "le": edge},
                                  max((count for bound, count in counts if bound <= limit), default=0.0)))
    moved = Metric(family.name, family.documentation, family.type, family.unit)
    moved.samples = samples
    return moved


#: A file's families as written: ``[name, type, documentation, unit, [[sample, labels, value], ...]]``.
Families = list[list[Any]]


def _read_shared(directory: str, skip: str = "", prefix: str = "") -> tuple[dict[str, Families], set[str]]:
    """The families of every ``.json`` file (``prefix``: only those whose name starts so), by file name,
    and the names of the files that merged files supersede.

    A merged file (see :func:`_compact`) names the files it ``supersedes``; they
    are left out even while they still exist.  It is written before they are
    removed, so a listing that holds a name that is gone by the time it is read
    was made before the merge: the directory is listed again.
    """
    found: dict[str, Families] = {}
    superseded: set[str] = set()
    for _ in range(5):
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".json") and n.startswith(prefix))
        except OSError:
            return {}, set()
        found, superseded, vanished = {}, set(), False
        for name in names:
            if name == skip:
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as handle:
                    data = json.load(handle)
            except FileNotFoundError:
                vanished = True
                break
            except (OSError, ValueError) as exc:  # not ours
                _log.debug("metrics: skipped %s: %s", name, exc)
                continue
            if isinstance(data, dict):  # a merged file
                superseded.update(data.get("supersedes") or ())
                data = data.get("families")
            if isinstance(data, list):
                found[name] = data
        if not vanished:
            break
    return {name: families for name, families in found.items() if name not in superseded}, superseded


_COMPACTING = threading.Lock()


def _compact(directory: str) -> None:
    """Merge the files of this process's closed pipelines into one that supersedes them, then remove them.

    Counters and histograms add up (``_created`` keeps the earliest); a histogram
    written with other bucket bounds stays a family of its own (a scrape puts it on
    the bounds in force, see ``_on_edges``).  Readers never see a count twice or miss one: the
    merged file names the files it replaces and is in place before they go.
    """
    with _COMPACTING:
        done = frozenset(_CLOSED)
        if len(done) < 2:
            return
        found, superseded = _read_shared(directory, prefix=f"{_process_tag()}-")
        closed = {name: families for name, families in found.items() if name in done}
        if len(closed) < 2:
            return
        # What was read, and what a merged file superseded but could not remove.
        _merge(directory, closed, superseded & done)


def _merge_exited(directory: str) -> None:
    """Merge the files of worker processes that have exited into one file of this process's.

    Under gunicorn's ``--max-requests`` every worker leaves its files behind;
    without this, every scrape would read all of them.  One process merges at a
    time (an exclusive ``flock`` on ``.merge.lock``; a process, or a thread, that
    does not get it at once leaves the merge to the one that has it), so no
    exited file is merged twice and no request waits.  A file whose pid runs
    again (reused) is left alone.
    """
    if not _COMPACTING.acquire(blocking=False):  # a merge runs here now: a request does not wait for it
        return
    try:
        try:
            lock = open(os.path.join(directory, ".merge.lock"), "a")  # noqa: SIM115 - closed below
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return
        try:
            found, superseded = _read_shared(directory)
            own = f"{_process_tag()}-"  # (this process runs; a file of its own is never another's)

            def exited(name: str) -> bool:
                return not name.startswith(own) and not _running(name)

            files = {name: families for name, families in found.items() if exited(name)}
            if len(files) >= 2:
                _merge(directory, files, {n for n in superseded if exited(n)})
        finally:
            lock.close()  # (releases the lock)
    finally:
        _COMPACTING.release()


def _running(name: str) -> bool:
    """Whether the process whose pid starts file ``name`` runs (or might: its pid cannot be read)."""
    try:
        pid = int(name.split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, PermissionError):
        return True
    except ProcessLookupError:
        return False
    return True


def _merge(directory: str, files: dict[str, Families], leftovers: set[str]) -> None:
    """Write one file of this process's with the summed families of ``files``, naming them (and
    ``leftovers``, superseded before but still there) as superseded; then remove them."""
    replaced = sorted({*files, *(n for n in leftovers if os.path.exists(os.path.join(directory, n)))})
    merged: dict[tuple[str, str, frozenset[str]], tuple[list[Any], dict[tuple[str, str], float]]] = {}
    for families in files.values():
        for fname, ftype, doc, unit, samples in families:
            edges = frozenset(str(labels.get("le")) for _, labels, _ in samples if "le" in labels)
            entry = merged.setdefault((fname, ftype, edges), ([fname, ftype, doc, unit], {}))
            values = entry[1]
            for sname, labels, value in samples:
                _add(values, (sname, json.dumps(labels, sort_keys=True)), float(value))
    out = [[*head, [[sname, json.loads(labels), value] for (sname, labels), value in values.items()]]
           for head, values in merged.values()]
    path = os.path.join(directory, f"{_process_tag()}-{next(_SEQUENCE)}.json")
    if not _replace_file(path, json.dumps({"supersedes": replaced, "families": out}, separators=(",", ":"))):
        return
    _CLOSED.add(os.path.basename(path))
    for name in replaced:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
        except OSError:  # superseded all the same; the next merge tries again
            continue
        _CLOSED.discard(name)


def _last_write(counted: CollectorRegistry, path: str) -> None:
    """A pipeline's final counts (at close, or when it is dropped); its file may be merged from now on."""
    _write_samples(counted, path)
    _CLOSED.add(os.path.basename(path))


def _write_samples(counted: CollectorRegistry | list[Metric], path: str, unless: str | None = None) -> str:
    """Write the samples of ``counted`` (or of families it collected) to ``path``, unless they serialise
    to ``unless``; return the text."""
    found = counted.collect() if isinstance(counted, CollectorRegistry) else counted
    families = [[m.name, m.type, m.documentation, m.unit, [[s.name, s.labels, s.value] for s in m.samples]]
                for m in found]
    text = json.dumps(families, separators=(",", ":"))
    if text != unless:  # (nothing counted since the last write: an idle worker leaves its file alone)
        _replace_file(path, text)
    return text


def _replace_file(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half of it."""
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as exc:  # the directory went away (the server is stopping)
        _log.debug("metrics: cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return False
    return True


def _add(values: dict[Any, float], key: Any, value: float) -> None:
    """Add a sample to ``values``: counts and sums add up, a ``_created`` keeps the earliest."""
    before = values.get(key)
    values[key] = value if before is None else min(before, value) if key[0].endswith("_created") else before + value


def _share(ref: weakref.ReferenceType[_Merged]) -> None:
    """Write the counts of ``ref`` every SHARE_INTERVAL while the layer lives."""
    written: str | None = None
    while True:
        time.sleep(SHARE_INTERVAL)
        merged = ref()
        if merged is None:
            return
        written = merged.write(unless=written)
        del merged
        if written is None:  # closed
            return


class _Capped:
    """Hands back a label value unchanged until ``limit`` distinct ones were seen, then "other"."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, set[str]()
        self._lock = threading.Lock()  # a new value only: the count and the add are one step

    def __call__(self, value: object) -> str:
        text = str(value)
        if text in self.seen:
            return text
        if len(text) > _LONGEST_KEPT:  # (a route made of a client's long path)
            return "other"
        with self._lock:
            if text not in self.seen:
                if len(self.seen) >= self.limit:
                    return "other"
                self.seen.add(text)
        return text


class _StoreCollector:
    """Reads ``store.health()`` at scrape time: up/down and circuit-breaker state per store.

    The stores are asked at once and waited for up to ``STORE_CHECK_SECONDS`` in all.
    """

    def __init__(self, context: Context) -> None:
        self.context = context
        self.checks = StoreChecks()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("wsgistack_store_up", "1 when the store answers its health check.",
                               labels=["store", "backend"])
        state = GaugeMetricFamily("wsgistack_store_circuit_state",
                                  "1 for the current circuit-breaker state of the store.",
                                  labels=["store", "state"])
        found = self.checks.facts(sorted(self.context.stores.items()), STORE_CHECK_SECONDS)  # (all at once)
        for name, health in found.items():
            up.add_metric([name, str(health.get("backend", ""))], 1.0 if health.get("ok") else 0.0)
            breaker = health.get("breaker")
            if isinstance(breaker, Mapping):
                breaker = breaker.get("state")
            if breaker:
                state.add_metric([name, str(breaker)], 1.0)
        yield up
        yield state


class _Held:
    """A ``start_response`` that keeps status and headers until :meth:`flush` sends them."""

    __slots__ = ("exc_info", "extra", "headers", "start_response", "status", "write")

    def __init__(self, start_response: StartResponse, extra: Callable[[str], Headers]) -> None:
        self.start_response, self.extra = start_response, extra
        self.status: str | None = None
        self.headers: Headers = []
        self.exc_info: Any = None
        self.write: Callable[[bytes], object] | None = None

    def __call__(self, status: str, headers: Headers, exc_info: Any = None) -> Any:
        if self.write is not None:  # already sent: the server re-raises exc_info itself
            return self.start_response(status, headers, exc_info)
        self.status, self.headers, self.exc_info = status, headers, exc_info
        return self._write

    def _write(self, data: bytes) -> object:
        """The legacy ``write()`` callable: the headers go out first."""
        self.flush()
        assert self.write is not None
        return self.write(data)

    def flush(self) -> None:
        if self.write is None:
            if self.status is None:
                raise AssertionError("the application sent a body before calling start_response")
            headers = [*self.headers, *self.extra(self.status[:3])]
            self.write = self.start_response(self.status, headers, self.exc_info)
            self.exc_info = None


class _OnFirstChunk:
    """The body of an app that calls ``start_response`` lazily: run ``started`` once it has, or
    ``failed`` with what the body raised before its first chunk."""

    def __init__(self, result: Iterable[bytes], started: Callable[[], object],
                 failed: Callable[[BaseException], object]) -> None:
        self.result, self.started, self.failed = result, started, failed

    def __iter__(self) -> Iterator[bytes]:
        pending = True
        try:
            for chunk in self.result:
                if pending:
                    pending = False
                    self.started()
                yield chunk
        except Exception as exc:
            if pending:
                pending = False
                self.failed(exc)  # (the errors layer renders it: counted with the status it will send)
            raise
        if pending:
            self.started()

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()


def _exc_status(exc: BaseException) -> str:
    """The status the errors layer will render an exception with, as a status line begins."""
    return str(refusal_status(exc))
