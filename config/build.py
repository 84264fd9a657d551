"""Stages 3 to 5: validate the data, then fold the layers around the app.

``parse(document)`` turns composed YAML into a :class:`StackConfig` (every
problem collected, each with file:line:col); ``build(config)`` makes the
stores, the app and the layers.  The fold is the obvious one: walk the specs
in reverse and wrap, so the first entry in the YAML is the outermost layer.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from middleware.base import TIMINGS, Context, LayerOptions, note
from middleware.errors import ErrorsMiddleware
from stores import Store, store_from_url

from .errors import ConfigError, Path, Problem
from .loader import Document
from .registry import LAYERS, import_string, is_path, resolve
from .schema import TOP_LEVEL, AppSection, LoggingOptions, ServerOptions, StoreSpec
from .scope import HTTP_METHODS, Scope, Scoped

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

SCOPE_KEYS = ("paths", "exclude_paths", "methods")
DEFAULT_STORES = {"shared": "memory://"}


@dataclass
class LayerSpec:
    """One pipeline entry, resolved and validated, ready to be built."""

    index: int
    name: str
    target: Any
    options: Any
    scope: Scope
    implicit: bool = False
    path: Path = ()

    @property
    def label(self) -> str:
        return self.name

    @property
    def is_layer_class(self) -> bool:
        opts = getattr(self.target, "Options", None)
        return inspect.isclass(opts) and issubclass(opts, LayerOptions)

    def option(self, name: str, default: Any = None) -> Any:
        if isinstance(self.options, Mapping):
            return self.options.get(name, default)
        return getattr(self.options, name, default)

    def __repr__(self) -> str:
        where = "implicit" if self.implicit else f"pipeline[{self.index}]"
        scope = f" {self.scope!r}" if self.scope else ""
        return f"<{where} {self.name}{scope}>"


@dataclass
class StackConfig:
    """A validated stack.yaml."""

    server: ServerOptions
    stores: dict[str, StoreSpec]
    app: AppSection
    pipeline: list[LayerSpec]
    logging: LoggingOptions
    document: Document


@dataclass
class BuiltStack:
    """The built WSGI app and what went into it."""

    app: WSGIApplication
    config: StackConfig
    context: Context
    warnings: list[Problem] = field(default_factory=list)
    core: Any = None
    instances: list[Any] = field(default_factory=list)

    @property
    def layers(self) -> list[LayerSpec]:
        return self.config.pipeline

    def close(self) -> None:
        """Close layers that hold resources (log files), then the stores."""
        for layer in self.instances:
            close = getattr(layer, "close", None)
            if callable(close):
                close()
        for store in self.context.stores.values():
            store.close()


# ---------------------------------------------------------------- validation


def _model_fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for suggestions."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if not (inspect.isclass(current) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        current = _inner_model(info.annotation)
    if inspect.isclass(current) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    if get_origin(annotation) is None:
        return None
    return None


def suggest(word: str, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` or an empty string."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def validation_problems(
    doc: Document, base: Path, exc: ValidationError, model: type[BaseModel] | None
) -> list[Problem]:
    """Map pydantic errors to problems located in the YAML."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = (*base, *loc)
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind == "extra_forbidden":
            key = str(loc[-1])
            known = _model_fields_at(model, loc[:-1])
            text = f"unknown key {key!r}{suggest(key, known)}"
            if known:
                text += f" (known: {', '.join(known)})"
            problems.append(doc.problem(path, text, key=True))
        elif kind == "missing":
            problems.append(doc.problem(path, f"{loc[-1]} is required" if loc else msg))
        else:
            has_value = loc != () and "input" in err
            problems.append(doc.problem(path, msg, value=err.get("input"), has_value=has_value))
    return problems


def parse(doc: Document) -> StackConfig:
    """Validate composed YAML into a :class:`StackConfig`, or raise one ConfigError with every problem."""
    data = doc.data if doc.data is not None else {}
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise ConfigError([doc.problem((), "the top level must be a mapping of server, stores, app, pipeline")])
    for key in data:
        if key not in TOP_LEVEL:
            text = f"unknown top-level key {key!r}{suggest(key, TOP_LEVEL)} (known: {', '.join(TOP_LEVEL)})"
            problems.append(doc.problem((key,), text, key=True))

    server = _validate(doc, ("server",), ServerOptions, data.get("server") or {}, problems)
    log_opts = _validate(doc, ("logging",), LoggingOptions, data.get("logging") or {}, problems)
    app_section = _validate(doc, ("app",), AppSection, data.get("app") or {}, problems)

    stores: dict[str, StoreSpec] = {}
    raw_stores = data.get("stores")
    if raw_stores is None:
        raw_stores = dict(DEFAULT_STORES)
    if not isinstance(raw_stores, dict):
        problems.append(doc.problem(("stores",), "stores must map names to URLs, e.g. shared: memory://"))
        raw_stores = {}
    for name, spec in raw_stores.items():
        value = {"url": spec} if isinstance(spec, str) else spec
        store = _validate(doc, ("stores", name), StoreSpec, value, problems)
        if store is not None:
            stores[str(name)] = store

    if app_section is not None:
        _check_app_options(doc, app_section, problems)

    pipeline = _parse_pipeline(doc, data.get("pipeline"), problems)
    if problems or server is None or app_section is None or log_opts is None:
        raise ConfigError(problems)
    return StackConfig(server, stores, app_section, pipeline, log_opts, doc)


def _validate(doc: Document, path: Path, model: type[BaseModel], value: Any, problems: list[Problem]) -> Any:
    if not isinstance(value, dict):
        problems.append(doc.problem(path, f"{path[-1]} must be a mapping", value=value, has_value=True))
        return None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems.extend(validation_problems(doc, path, exc, model))
        return None


def _check_app_options(doc: Document, section: AppSection, problems: list[Problem]) -> None:
    try:
        factory = import_string(section.factory)
    except (ImportError, AttributeError) as exc:
        problems.append(doc.problem(("app", "factory"), f"cannot import the app factory: {exc}",
                                    value=section.factory, has_value=True))
        return
    model = getattr(factory, "Options", None)
    if inspect.isclass(model) and issubclass(model, BaseModel):
        try:
            model.model_validate(section.options)
        except ValidationError as exc:
            problems.extend(validation_problems(doc, ("app", "options"), exc, model))


def _parse_pipeline(doc: Document, raw: Any, problems: list[Problem]) -> list[LayerSpec]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        problems.append(doc.problem(("pipeline",), "pipeline must be a list of one-key mappings, outermost first"))
        return []
    specs = []
    for index, entry in enumerate(raw):
        path: Path = ("pipeline", index)
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(doc.problem(path, "each pipeline entry is a one-key mapping: layer name -> options",
                                        value=entry, has_value=True))
            continue
        (name, options), = entry.items()
        name = str(name)
        options = {} if options is None else options
        if isinstance(options, dict):
            options = dict(options)
        opath: Path = (*path, name)
        if not isinstance(options, dict):
            problems.append(doc.problem(opath, "layer options must be a mapping", value=options, has_value=True))
            continue
        if name not in LAYERS and not is_path(name):
            text = f"unknown layer {name!r}{suggest(name, LAYERS)} (known: {', '.join(sorted(LAYERS))}; " \
                   "or write module:attr for your own)"
            problems.append(doc.problem(path, text, key=True))
            continue
        try:
            target = resolve(name)
        except (ImportError, AttributeError) as exc:
            problems.append(doc.problem(path, f"cannot import layer {name!r}: {exc}", key=True))
            continue
        scope_raw = {k: options.pop(k) for k in SCOPE_KEYS if k in options}
        scope = _parse_scope(doc, opath, scope_raw, problems)
        model = getattr(target, "Options", None)
        if inspect.isclass(model) and issubclass(model, LayerOptions):
            try:
                validated: Any = model.model_validate(options)
            except ValidationError as exc:
                problems.extend(validation_problems(doc, opath, exc, model))
                continue
        elif callable(target):
            validated = options
        else:
            problems.append(doc.problem(path, f"{name!r} is not a WSGI middleware class or factory", key=True))
            continue
        specs.append(LayerSpec(index, name, target, validated, scope or Scope(), path=path))
    return specs


def _parse_scope(doc: Document, path: Path, raw: dict[str, Any], problems: list[Problem]) -> Scope | None:
    values: dict[str, list[str]] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(doc.problem((*path, key), f"{key} must be a list of strings", value=value, has_value=True))
            return None
        values[key] = value
    for key in ("paths", "exclude_paths"):
        for i, pattern in enumerate(values.get(key, [])):
            if not pattern.startswith("/"):
                problems.append(doc.problem((*path, key, i), f"{key} patterns start with '/'",
                                            value=pattern, has_value=True))
    for i, method in enumerate(values.get("methods", [])):
        if method.upper() not in HTTP_METHODS:
            known = ", ".join(sorted(HTTP_METHODS))
            text = f"unknown HTTP method{suggest(method.upper(), HTTP_METHODS)} (known: {known})"
            problems.append(doc.problem((*path, "methods", i), text, value=method, has_value=True))
    return Scope(values.get("paths"), values.get("exclude_paths"), values.get("methods"))


def with_default_errors(pipeline: list[LayerSpec]) -> list[LayerSpec]:
    """Guarantee an errors layer: add a default outermost one when the YAML has none."""
    if any(spec.target is ErrorsMiddleware for spec in pipeline):
        return pipeline
    default = LayerSpec(-1, "errors", ErrorsMiddleware, ErrorsMiddleware.Options(), Scope(), implicit=True)
    return [default, *pipeline]


# ---------------------------------------------------------------- build


class _Timed:
    """Append ``(label, inclusive seconds)`` to ``environ[TIMINGS]`` when the layer returns."""

    def __init__(self, label: str, app: WSGIApplication) -> None:
        self.label = label
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        timings = environ.get(TIMINGS)
        if timings is None:
            return self.app(environ, start_response)
        start = time.perf_counter()
        try:
            return self.app(environ, start_response)
        finally:
            timings.append((self.label, time.perf_counter() - start))


class _Traced:
    """For ``serve.py explain``: note that a layer was entered."""

    def __init__(self, label: str, app: WSGIApplication) -> None:
        self.label = label
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        note(environ, self.label, "entered")
        return self.app(environ, start_response)


def make_stores(config: StackConfig) -> dict[str, Store]:
    """Create every named store; one ConfigError lists the ones that cannot be made."""
    stores: dict[str, Store] = {}
    problems = []
    for name, spec in config.stores.items():
        try:
            stores[name] = store_from_url(spec.url, **spec.options)
        except (ValueError, TypeError, ImportError) as exc:
            problems.append(config.document.problem(("stores", name), str(exc), value=spec.url, has_value=True))
    if problems:
        raise ConfigError(problems)
    return stores


def make_app(section: AppSection, context: Context) -> Any:
    """Call the app factory with its options (and the context when it takes one)."""
    factory = import_string(section.factory)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2:
        return factory(dict(section.options), context)
    if len(positional) == 1:
        return factory(dict(section.options))
    return factory(**section.options)


def instantiate(spec: LayerSpec, app: WSGIApplication, context: Context) -> WSGIApplication:
    """Make one layer around ``app``: ``Cls(app, options, context)`` or ``factory(app, **options)``."""
    if spec.is_layer_class:
        layer: WSGIApplication = spec.target(app, spec.options, context)
    else:
        layer = spec.target(app, **spec.options)
    return layer


def build(
    config: StackConfig,
    *,
    trace: bool = False,
    stores: dict[str, Store] | None = None,
    logger: logging.Logger | None = None,
) -> BuiltStack:
    """Fold the pipeline around the app; layer construction errors become ConfigErrors."""
    doc = config.document
    context = Context(
        stores=stores if stores is not None else make_stores(config),
        logger=logger or logging.getLogger("wsgistack"),
        loopback_only=config.server.loopback_only,
        workers=config.server.workers,
        settings={"server": config.server, "config_file": doc.file},
    )
    try:
        core = make_app(config.app, context)
    except ValidationError as exc:
        raise ConfigError(validation_problems(doc, ("app", "options"), exc, None)) from None
    except (ValueError, TypeError, LookupError, OSError) as exc:
        raise ConfigError([doc.problem(("app",), f"the app factory failed: {exc}")]) from None

    pipeline = with_default_errors(config.pipeline)
    config.pipeline = pipeline
    timing = any(
        callable(getattr(spec.target, "wants_layer_timing", None)) and spec.target.wants_layer_timing(spec.options)
        for spec in pipeline
    )
    problems = []
    instances: list[Any] = []
    wrapped: WSGIApplication = _Timed("app", core) if timing else core
    for spec in reversed(pipeline):
        registered = len(context.read_ahead)
        try:
            layer = instantiate(spec, wrapped, context)
        except (ValueError, TypeError, LookupError, OSError) as exc:
            problems.append(doc.problem(spec.path or ("pipeline",), f"{spec.name}: {exc}", key=True))
            continue
        for ahead in context.read_ahead[registered:]:  # read ahead only for requests the layer sees
            ahead.scope = spec.scope if spec.scope else None
        instances.append(layer)
        if timing:
            layer = _Timed(spec.label, layer)
        if trace:
            layer = _Traced(spec.label, layer)
        if spec.scope:
            layer = Scoped(layer, wrapped, spec.scope, spec.label)
        wrapped = layer
    if problems:
        for store in context.stores.values():
            store.close()
        raise ConfigError(problems)
    context.settings["pipeline"] = [describe(spec) for spec in pipeline]
    return BuiltStack(wrapped, config, context, core=core, instances=instances)


def describe(spec: LayerSpec) -> dict[str, Any]:
    """A JSON-ready description of a layer for the operator page and tools (secrets are not masked here)."""
    if isinstance(spec.options, BaseModel):
        options = spec.options.model_dump(mode="json")
    else:
        options = {k: v if isinstance(v, str | int | float | bool | None) else repr(v) for k, v in spec.options.items()}
    return {"name": spec.name, "index": spec.index, "implicit": spec.implicit,
            "scope": repr(spec.scope) if spec.scope else "", "options": options}
