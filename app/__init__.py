"""The thin Flask core of wsgistack: search, search stream, health, config and login.

``create_app(options, context)`` validates ``options`` with :class:`AppOptions`,
sets Flask's defaults, lets the options override them and registers the
blueprints last.  Everything the middleware stack provides is read from
environ (``wsgistack.session``, ``wsgistack.render_error``, ``wsgistack.json``)
or from ``context.services`` at request time, so the app also runs alone::

    from app import create_app
    app = create_app({"search": {"engine": "local", "index_sources": ["json"]}})

Do not put cross-cutting concerns (CORS, rate limits, sessions, auth checks,
caching) here: they are layers of the stack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from app.api import api_blueprint
from app.auth import auth_blueprint
from app.errors import install_error_handlers
from app.options import AppOptions, SearchOptions
from app.search import make_engine
from app.session_adapter import StackSessionInterface
from app.state import SUPPORTED_VERSIONS, AppState
from app.users import UserStore
from middleware.auth import USER_ROLES, USER_SINCE
from middleware.base import ROUTE, ROUTE_TEMPLATE, Context
from middleware.errors import allow_order, status_line

__all__ = ["AppOptions", "AppState", "SearchOptions", "create_app"]

#: Flask settings the options may override (none of them holds a secret).
DEFAULTS: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 1024 * 1024,
}


class _Flask(Flask):
    """Flask, answering an ``OPTIONS`` of a route as an API does."""

    def make_default_options_response(self) -> Response:
        """``204`` with ``Allow`` in one order, as the cors layer answers a preflight (Flask's: an empty
        ``text/html`` 200).  A 200 without content would need a type all the same (``wsgiref.validate``
        refuses one without); serve.py keeps the connection open after a 204 unless the request asks to close it.
        """
        response = super().make_default_options_response()
        allowed = allow_order(response.allow)
        response = self.response_class(status=status_line(204), headers=[("Allow", ", ".join(allowed))])
        del response.headers["Content-Type"]
        return response


def create_app(options: Mapping[str, Any] | None = None, context: Context | None = None) -> Flask:
    """Build the Flask core; ``options`` follow :class:`AppOptions`, ``context`` comes from the stack."""
    opts = AppOptions.model_validate(dict(options or {}))
    ctx = context if context is not None else Context()

    # No static folder: Flask's default /static/<path> route would answer an OPTIONS of any path under it
    # (204, GET allowed) where a GET finds nothing, and give the metrics a route for every one of them.
    app = _Flask(__name__, static_folder=None)
    # An API answers "//" in a path with its 404, not werkzeug's HTML page redirecting to "/".
    app.url_map.merge_slashes = False
    app.config.from_mapping(DEFAULTS)
    app.config.from_mapping(WSGISTACK_OPTIONS=opts)
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False
    app.session_interface = StackSessionInterface()

    state = AppState(opts, ctx, make_engine(opts.search, ctx.logger.getChild("app.search")), UserStore(opts.users_path))
    app.extensions["wsgistack"] = state
    # The stack closes the app with its pipeline (at shutdown, and after a reload replaced it):
    # the users database and the search index's connections go then, not at garbage collection.
    setattr(app, "close", state.close)  # noqa: B010 - Flask has no close() of its own
    # The auth layer gives a session identity the roles the user has now (a removed user's session
    # identifies no one), so `serve.py users remove/set-role` takes effect within a second.
    ctx.services[USER_ROLES] = state.user_roles
    # … and voids sessions, access and refresh tokens from before the user's password was last set.
    ctx.services[USER_SINCE] = state.user_since
    # The metrics layer labels a request refused before routing (or a cache hit) with the route it
    # was for, and anything the routes do not match as "other".
    ctx.services[ROUTE_TEMPLATE] = _route_template(app)
    install_error_handlers(app, debug=opts.debug, logger=ctx.logger.getChild("app"))
    app.before_request(_note_route)

    for version in SUPPORTED_VERSIONS:
        app.register_blueprint(api_blueprint(version, state))
    app.register_blueprint(auth_blueprint(state))
    return app


def _route_template(app: Flask) -> Callable[[str, str], str | None]:
    """``route_template(path, method)``: the rule of the app's routes that matches, or None."""
    urls = app.url_map.bind("localhost")

    def route_template(path: str, method: str) -> str | None:
        try:
            rule, _ = urls.match(path, method=method, return_rule=True)
        except HTTPException:  # not found, another method, a redirect
            return None
        return str(rule.rule)

    return route_template


def _note_route() -> None:
    """Tell the metrics layer which route matched (a template, so labels stay few)."""
    rule = request.url_rule
    if rule is not None:
        request.environ[ROUTE] = rule.rule


# config/ validates ``app.options`` against the factory's ``Options`` before building.
create_app.Options = AppOptions  # type: ignore[attr-defined]
