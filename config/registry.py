"""The built-in layers: a plain dict from name to ``module:Class``.

Adding a built-in layer takes one module in ``middleware/``, one line here and its page
``docs/layers/<name>.md`` with an options table; the suite also asks for it in the every-layer
stacks of ``tests/test_streaming.py`` and ``tests/test_fuzz.py``, and ``bench/full.yaml`` should
hold it (README, "Adding your own layer", lists what each is for).
Anything else is named in stack.yaml by its ``module:attr`` path and loaded
the same way (a class taking ``(app, options, context)``, or a plain
``factory(app, **kwargs)`` such as werkzeug's ``ProxyFix``).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import sys
from collections.abc import Iterable
from typing import Any

LAYERS: dict[str, str] = {
    "errors": "middleware.errors:ErrorsMiddleware",
    "request_id": "middleware.request_id:RequestIdMiddleware",
    "access_log": "middleware.access_log:AccessLogMiddleware",
    "metrics": "middleware.metrics:MetricsMiddleware",
    "health": "middleware.health:HealthMiddleware",
    "proxy": "middleware.proxy:ProxyMiddleware",
    "validation": "middleware.validation:ValidationMiddleware",
    "headers": "middleware.headers:SecurityHeadersMiddleware",
    "cors": "middleware.cors:CORSMiddleware",
    "csrf": "middleware.csrf:CSRFMiddleware",
    "ratelimit": "middleware.ratelimit:RateLimitMiddleware",
    "session": "middleware.session:SessionMiddleware",
    "auth": "middleware.auth:AuthMiddleware",
    "versioning": "middleware.versioning:VersioningMiddleware",
    "cache": "middleware.cache:CacheMiddleware",
    "operator_page": "middleware.operator_page:OperatorPageMiddleware",
}


def import_string(target: str) -> Any:
    """Import ``module:attr`` (or ``module.attr``) and return the attribute."""
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{target!r} is not a module:attr path")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):  # not an import inside it
            raise ModuleNotFoundError(f"{exc}{_no_module(module, exc.name)}", name=exc.name) from None
        raise
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = {name.lower(): name for name in dir(obj) if not name.startswith("_")}
            close = difflib.get_close_matches(part.lower(), list(names), n=1, cutoff=0.6)
            raise AttributeError(f"{module!r} has no attribute {part!r}"
                                 + (f"; did you mean {names[close[0]]!r}?" if close else "")) from None
    return obj


def _no_module(module: str, missing: str) -> str:
    """Why ``missing`` (``module`` or a package on its way) does not import, with the close name that does.

    A submodule of a package that imports is misspelt rather than not installed: its close names
    are among the package's submodules; a top-level module's, among the modules on ``sys.path``.
    (Called when a stack is checked or built, never per request.)
    """
    parent, _, leaf = missing.rpartition(".")
    rest = module[len(missing):]  # the submodules after the missing one, as written
    if parent:  # the parent imported (else it would be the missing one)
        path = getattr(sys.modules.get(parent), "__path__", None)
        if path is None:
            return ""  # not a package: the exception says so
        close = _close(leaf, (m.name for m in pkgutil.iter_modules(path)))
        return f": {parent!r} has no submodule {leaf!r}" + (f"; did you mean {f'{parent}.{close}{rest}'!r}?"
                                                            if close else "")
    close = _close(missing, [*sys.builtin_module_names, *(m.name for m in pkgutil.iter_modules())])
    if close:
        return f"; did you mean {close + rest!r}?"
    return (f": it is not installed in this Python ({sys.executable}) and not in a folder on its path; install it, "
            "or add the folder that holds it to PYTHONPATH")


def _close(name: str, names: Iterable[str]) -> str | None:
    """The name in ``names`` closest to ``name`` (case aside), if one is close."""
    by_lower = {n.lower(): n for n in names if n != name}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def resolve(name: str) -> Any:
    """Return the layer class or factory for a built-in name or a ``module:attr`` path."""
    return import_string(LAYERS.get(name, name))


def is_path(name: str) -> bool:
    """Whether ``name`` is written as an import path rather than a built-in name."""
    return ":" in name
