"""Shared state for the stateful layers: pick a backend with a URL.

``store_from_url("memory://")`` gives the embedded store;
``redis://``, ``rediss://``, ``unix://`` and ``redis+sentinel://`` give the
Redis backend (one connection pool per URL).
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .base import Store, StoreError
from .memory import MAX_CACHE_BYTES, MemoryStore

__all__ = ["SCHEMES", "MemoryStore", "Store", "StoreError", "store_from_url"]

#: URL scheme -> "module:factory".  A factory takes ``(url, **options)``.
SCHEMES: dict[str, str] = {
    "memory": "stores.memory:MemoryStore",
    "redis": "stores.redis:RedisStore",
    "rediss": "stores.redis:RedisStore",
    "unix": "stores.redis:RedisStore",
    "redis+sentinel": "stores.redis:RedisStore",
}

#: Schemes other clients take, and what they are here (difflib would offer redis+sentinel for redis+unix).
_ALIASES = {"redis+unix": "unix", "redis-unix": "unix", "redis+socket": "unix", "redis+tls": "rediss",
            "redis+ssl": "rediss", "redis-sentinel": "redis+sentinel", "sentinel": "redis+sentinel"}

#: A scheme at the start of a URL that lacks part of its ``://``.
_SCHEME_START = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)(?::/?(?!/)|//)")


@functools.cache
def _redis_option_names() -> frozenset[str]:
    """The options a Redis store takes: its own and those of redis-py's pools and connections."""
    import inspect

    import redis
    from redis import connection

    from .redis import RedisStore

    classes = (RedisStore, redis.ConnectionPool, connection.AbstractConnection, connection.Connection,
               connection.SSLConnection, connection.UnixDomainSocketConnection)
    names = {name for cls in classes for name, parameter in inspect.signature(cls.__init__).parameters.items()
             if parameter.kind is parameter.KEYWORD_ONLY or parameter.kind is parameter.POSITIONAL_OR_KEYWORD}
    return frozenset(names - {"self", "url"}) | {"sentinel_kwargs"}


def store_from_url(url: str, **options: Any) -> Store:
    """Create the store for ``url``; raise ``ValueError`` for an unknown scheme."""
    if "://" not in url:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        # `redis:/host`, `redis//host`: a known scheme short of its colon or a slash (the URL is not
        # repeated: it may hold a password).
        near = _SCHEME_START.match(url)
        hint = f"; write it {near.group(1).lower()}:// (a colon and two slashes)" \
            if near is not None and near.group(1).lower() in SCHEMES else ""
        raise ValueError(f"store URL {url!r} has no scheme{hint} (known: {known})")
    scheme = urlsplit(url).scheme
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        close = [_ALIASES[scheme.lower()]] if scheme.lower() in _ALIASES else \
            difflib.get_close_matches(scheme, list(SCHEMES), n=1) if scheme else []
        hint = f"; did you mean '{close[0]}://'?" if close else ""
        raise ValueError(f"unknown store scheme {scheme + '://' if scheme else url!r}{hint} (known: {known})")
    if scheme == "memory":
        query = dict(parse_qsl(urlsplit(url).query))
        found = {name: query.pop(name, options.pop(name, default))
                 for name, default in (("max_entries", 10_000), ("max_cache_bytes", MAX_CACHE_BYTES))}
        if query:
            raise ValueError(f"unknown memory:// option(s): {', '.join(sorted(query))} "
                             "(known: max_entries, max_cache_bytes)")
        # A Redis store's options are let be (``url: ${REDIS_URL:-memory://}`` with Redis options falls
        # back to memory:// as it is); any other name is a mistake that would otherwise pass in silence.
        unknown = sorted(name for name in options if name not in _redis_option_names())
        if unknown:
            raise ValueError(f"unknown memory:// option(s): {', '.join(unknown)} (known: max_entries, "
                             "max_cache_bytes; a Redis store's options are ignored on memory://)")
        whole = {}
        for name, raw in found.items():
            try:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise TypeError  # yes/no/on/off read as booleans by YAML: int(True) would be a bound of 1
                whole[name] = int(raw)
            except (TypeError, ValueError):
                raise ValueError(f"memory:// {name} must be a whole number, got {raw!r}") from None
        return MemoryStore(url=url, **whole)
    import importlib

    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    store: Store = factory(url, **options)
    return store
