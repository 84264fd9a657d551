"""Turn stack.yaml into a validated, linted, built WSGI pipeline.

The stages can be entered separately (tests start from a dict or text)::

    read_file(path) -> Document      # YAML composed with marks, ${VAR} interpolated
    parse(document) -> StackConfig   # pydantic validation, every problem located
    lint(config)    -> [Problem]     # order checks: errors and warnings
    build(config)   -> BuiltStack    # stores, app, layers folded (first entry outermost)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path as FsPath
from typing import Any

from pydantic import BaseModel

from middleware.base import resolve_path

from .build import BuiltStack, LayerSpec, StackConfig, build, parse
from .errors import ConfigError, Problem
from .lint import lint
from .loader import Document, read_file, read_text
from .registry import LAYERS, import_string, resolve
from .schema import AppSection

__all__ = [
    "LAYERS",
    "BuiltStack",
    "ConfigError",
    "Document",
    "LayerSpec",
    "Problem",
    "StackConfig",
    "build",
    "build_from_dict",
    "build_from_file",
    "build_from_text",
    "check",
    "config_dir",
    "lint",
    "load",
    "parse",
    "read_file",
    "read_text",
    "resolve",
]


def config_dir(path: str | os.PathLike[str]) -> FsPath:
    """The folder relative paths in the file at ``path`` start from: the one it is named in.

    Symbolic links are not followed: a Kubernetes ConfigMap's ``stack.yaml`` is a
    link into a ``..2026_…`` folder that every update replaces, and the state under
    ``var_dir`` must not move with it.  The ``users`` command and ``.env`` use the same folder.
    """
    return FsPath(os.path.abspath(path)).parent


def _relative_to(document: Document, base_dir: str | os.PathLike[str] | None) -> Document:
    """Resolve the app's relative ``var_dir`` against the config file's folder, and note the folder
    for the layers' own file options (``Context.path``)."""
    if base_dir is None:
        return document
    document.base_dir = str(base_dir)
    data = document.data
    if isinstance(data, dict):
        if data.get("app") is None:
            data["app"] = {}  # the built-in app, with its default options
        app = data["app"]
        if isinstance(app, dict) and app.get("options") is None:
            app["options"] = {}
        options = app.get("options") if isinstance(app, dict) else None
        if isinstance(options, dict):
            if _takes_var_dir(app.get("factory", AppSection.model_fields["factory"].default)):
                options.setdefault("var_dir", "var")  # its default, "var", from here and not the working directory
            search = options.get("search")
            for holder, key in ((options, "var_dir"), (options, "users_db"), (search, "index_path")):
                value = holder.get(key) if isinstance(holder, dict) else None
                if isinstance(value, str) and value.strip():  # as Context.path resolves the layers' files
                    holder[key] = resolve_path(base_dir, value)  # type: ignore[index]
            sources = search.get("index_sources") if isinstance(search, dict) else None
            if isinstance(search, dict) and isinstance(sources, list):  # folders, not modules (json, flask)
                search["index_sources"] = [
                    os.path.normpath(resolve_path(base_dir, s)) if isinstance(s, str) and (
                        "/" in s or s.startswith(("~", "."))) else s for s in sources]
    return document


def _takes_var_dir(factory: Any) -> bool:
    """Whether the app factory takes a ``var_dir`` option: the built-in one, or one whose Options declare it.

    Another factory's options get none they did not ask for (its Options may refuse unknown keys).
    """
    if not isinstance(factory, str):
        return False
    if factory in ("app:create_app", "app.create_app"):
        return True
    try:
        model = getattr(import_string(factory), "Options", None)
    except (Exception, SystemExit):  # parse says why it does not import
        return False
    return isinstance(model, type) and issubclass(model, BaseModel) and "var_dir" in model.model_fields


def load(document: Document, *, strict: bool = True, hosted: bool = False) -> tuple[StackConfig, list[Problem]]:
    """Validate and lint (``hosted``: for another WSGI server); raise ConfigError on any error, return the
    config and its warnings."""
    config = parse(document)
    problems = lint(config, hosted=hosted)
    if strict and any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return config, problems


def check(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of a stack.yaml (errors and warnings), as ``serve`` would find them.

    A file that validates and lints without errors is also built, as ``serve``
    builds it, and closed again: store URLs are parsed (no connection is
    made), listen host names resolved (nothing is bound), the app and every
    layer constructed, so a factory's keyword arguments and the files layers
    open are tried too (the access log file is created when it is missing).
    """
    base = config_dir(path)
    try:
        config, problems = load(_relative_to(read_file(path, env=env), base), strict=False)
    except ConfigError as exc:
        return exc.problems
    if any(p.severity == "error" for p in problems):
        return problems
    try:
        build(config).close()
    except ConfigError as exc:
        return [*exc.problems, *problems]
    return problems


def _build(document: Document, base_dir: Any, strict: bool, **kw: Any) -> BuiltStack:
    config, warnings = load(_relative_to(document, base_dir), strict=strict)
    built = build(config, **kw)
    built.warnings = warnings
    return built


def build_from_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                    strict: bool = True, **kw: Any) -> BuiltStack:
    """Read, validate, lint and build a stack.yaml file, judged by its own ``server:`` section.

    Another WSGI server hosting the stack needs ``serve.hosted_app(path)`` instead (what
    ``serve:app`` serves; ``config.live.LiveStack(path, hosted=True)`` without the ``.env`` and
    logging set-up): it judges the file on ``$WSGISTACK_HOST_LISTEN`` and as several processes'
    (``debug``, ``memory://`` state), since that server's settings are unseen here.
    """
    base = config_dir(path)
    return _build(read_file(path, env=env), base, strict, **kw)


def build_from_text(text: str, *, base_dir: str | os.PathLike[str] | None = None, file: str = "<config>",
                    env: Mapping[str, str] | None = None, strict: bool = True, **kw: Any) -> BuiltStack:
    """Build from YAML text (tests and tools)."""
    return _build(read_text(text, file=file, env=env), base_dir, strict, **kw)


def build_from_dict(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None,
                    strict: bool = True, **kw: Any) -> BuiltStack:
    """Build from an already-parsed mapping (no line numbers in errors)."""
    import copy

    return _build(Document(copy.deepcopy(dict(data)), file="<dict>"), base_dir, strict, **kw)
