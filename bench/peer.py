"""The peer stack: the Flask extensions a user would otherwise pick, on the same Flask core.

``create_peer_app`` takes the very ``app.create_app`` core the wsgistack stacks
wrap and adds, configured to do the same work as the stack's layers:

- Flask-CORS for the app's origin (credentials, the same methods and headers);
- Flask-Session, a server-side session that every request reads (a
  ``before_request`` hook looks up ``session["user"]``, as the auth layer does
  with ``accept_session``); a browser-session cookie (not permanent) and a
  30-minute lifetime in the store, which every request with the cookie slides,
  as the session layer's idle timeout does, without sending the cookie again
  (neither does the session layer); no signer (deprecated since Flask-Session
  0.7: the id is 256 random bits), as a user would set it up, so the peer is
  spared the signature check the session layer makes on every cookie;
- Flask-Limiter keyed on the client IP, one limit for all routes together
  (``application_limits``: ``default_limits`` would count each route apart), as
  the ratelimit layer keys on the client alone, the limit from the bench
  (counted on every request, never refusing), with its rate-limit headers on;
- Flask-Caching around both search views, keyed on the query string, with the
  stack's TTL;
- werkzeug's ProxyFix for one proxy hop (X-Forwarded-For and -Proto).

Backends are in-process memory (cachelib ``SimpleCache``, ``memory://``) or
one Redis URL for all three stateful extensions.  ``GET /peer/login`` puts a
user in the session, the peer's stand-in for ``POST /auth/login``.

Run it (or bare Flask) under Waitress with the Waitress settings serve.py gives
bench/full.yaml, after ``gc.freeze()`` as serve.py does::

    python -m bench.peer --listen 127.0.0.1:8891 [--redis-url redis://...] [--bare]
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import TYPE_CHECKING, Any

from bench.common import CACHE_TTL, FULL_YAML, ORIGIN, RATE_LIMIT, SESSION_SECRET

if TYPE_CHECKING:
    from flask import Flask


def waitress_settings() -> dict[str, Any]:
    """The Waitress adjustments serve.py gives bench/full.yaml (one process), for bare Flask and the peer.

    Read from its ``server:`` section and translated as serve.py translates it (the same body and
    header limits, ``poll()``, untrusted X-Forwarded-* headers kept: ProxyFix applies them as the
    proxy layer does); only the listening socket is the caller's.
    """
    import yaml

    from config.schema import ServerOptions

    server = yaml.safe_load(FULL_YAML.read_text(encoding="utf-8"))["server"]
    for interpolated in ("listen", "workers"):  # ${WSGISTACK_...}: the bench's own, one process here
        server.pop(interpolated, None)
    kwargs = ServerOptions.model_validate(server).waitress_kwargs(proxy_layer=True)
    del kwargs["listen"], kwargs["backlog"]  # serve.py binds its own sockets (backlog 1024, as Waitress)
    kwargs["asyncore_use_poll"] = True  # as serve.py's _run_waitress
    return kwargs


def create_bare_app(var_dir: str) -> Flask:
    """Bare Flask: the core alone, as ``create_app`` builds it."""
    from app import create_app

    return create_app({"var_dir": var_dir, "search": {"engine": "local"}})


def create_peer_app(var_dir: str, redis_url: str | None = None, rate_limit: str = RATE_LIMIT,
                    ttl: int = CACHE_TTL) -> Flask:
    """The core plus Flask-CORS, Flask-Session, Flask-Limiter, Flask-Caching and ProxyFix."""
    from flask import session
    from flask_caching import Cache
    from flask_cors import CORS
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address
    from flask_session import Session  # type: ignore[import-untyped]
    from werkzeug.middleware.proxy_fix import ProxyFix

    app = create_bare_app(var_dir)
    app.config.update(
        SECRET_KEY=SESSION_SECRET,
        SESSION_COOKIE_NAME="peer_session",
        SESSION_COOKIE_SECURE=False,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_PERMANENT=False,  # a permanent one re-sends Set-Cookie on every request: the stack does not
        PERMANENT_SESSION_LIFETIME=1800,  # the store's sliding lifetime all the same
    )
    if redis_url:
        import redis

        app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(redis_url))
        cache_config: dict[str, Any] = {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": redis_url}
    else:
        from cachelib import SimpleCache

        app.config.update(SESSION_TYPE="cachelib", SESSION_CACHELIB=SimpleCache(threshold=10000))
        cache_config = {"CACHE_TYPE": "SimpleCache", "CACHE_THRESHOLD": 10000}
    Session(app)  # replaces the core's session interface with Flask-Session's
    CORS(app, origins=[ORIGIN, "http://127.0.0.1:3000"], methods=["GET", "POST", "PUT", "DELETE"],
         allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-API-Version"],
         expose_headers=["X-Request-ID", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                         "Retry-After"],
         supports_credentials=True)
    Limiter(get_remote_address, app=app, application_limits=[rate_limit], headers_enabled=True,
            strategy="fixed-window", storage_uri=redis_url or "memory://")
    cache = Cache(app, config={**cache_config, "CACHE_DEFAULT_TIMEOUT": ttl})
    for endpoint in ("api_v1.search", "api_v2.search"):
        cached: Any = cache.cached(timeout=ttl, query_string=True)(app.view_functions[endpoint])
        app.view_functions[endpoint] = cached

    @app.before_request
    def read_user() -> None:
        """Read the logged-in user, as an app (or the stack's auth layer) does on every request."""
        session.get("user")

    @app.get("/peer/login")
    def login() -> dict[str, Any]:
        session["user"] = {"sub": "bench", "roles": ["user"]}
        return {"ok": True}

    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1)  # type: ignore[method-assign]
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve bare Flask or the peer stack under Waitress.")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--var-dir", required=True)
    parser.add_argument("--redis-url", default=None, help="Redis for the peer's extensions (default: memory)")
    parser.add_argument("--bare", action="store_true", help="serve the Flask core alone")
    args = parser.parse_args(argv)
    from waitress import serve

    app = create_bare_app(args.var_dir) if args.bare else create_peer_app(args.var_dir, args.redis_url)
    # serve.py freezes what it built before serving (gc.freeze()): the same here, so that the collector
    # treats bare Flask, the peer and the wsgistack servers alike.
    gc.collect()
    gc.freeze()
    serve(app, listen=args.listen, **waitress_settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
