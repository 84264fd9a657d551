"""Stages 3 to 5: validate the data, then fold the layers around the app.

``parse(document)`` turns composed YAML into a :class:`StackConfig` (every
problem collected, each with file:line:col); ``build(config)`` makes the
stores, the app and the layers.  The fold is the obvious one: walk the specs
in reverse and wrap, so the first entry in the YAML is the outermost layer.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import ipaddress
import logging
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from middleware.base import (
    TIMINGS,
    TRACE,
    Context,
    LayerOptions,
    PrimedBody,
    note,
    resolve_path,
    rewrites_inside,
)
from middleware.errors import ErrorsMiddleware
from middleware.proxy import ProxyMiddleware
from stores import Store, store_from_url
from stores.base import secret_name

from .errors import MASK, ConfigError, Path, Problem, is_secret
from .loader import Document
from .registry import LAYERS, import_string, is_path, resolve
from .schema import TOP_LEVEL, AppSection, LoggingOptions, ServerOptions, StoreSpec, split_listen
from .scope import HTTP_METHODS, Scope, Scoped

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

SCOPE_KEYS = ("paths", "exclude_paths", "methods")
_NO_PREVIEW = ("its class sets rewrites_path but has no preview_environ(environ) method: the layers outside learn "
               "the path it routes a request to from that method (the entries it will set, PATH_INFO among them), "
               "so without it their rules and scopes would hold for the path as asked only; give it one, or drop "
               "rewrites_path")
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
    #: ``name#2`` for the second layer of a name (set by :func:`build`); timings and counts use it.
    tag: str = ""

    @property
    def label(self) -> str:
        return self.tag or self.name

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

    @property
    def forwarding_layer(self) -> LayerSpec | None:
        """The first layer that reads X-Forwarded-* / Forwarded itself (``proxy``, werkzeug's ``ProxyFix``)."""
        return next((spec for spec in self.pipeline if reads_forwarding_headers(spec)), None)

    @property
    def clears_proxy_headers(self) -> bool:
        """Whether Waitress will remove the untrusted forwarding headers before any layer runs."""
        return self.server.clears_proxy_headers(proxy_layer=self.forwarding_layer is not None)

    def waitress_kwargs(self) -> dict[str, Any]:
        """The Waitress adjustments this stack is served with."""
        return self.server.waitress_kwargs(proxy_layer=self.forwarding_layer is not None)


def reads_forwarding_headers(spec: LayerSpec) -> bool:
    """Whether a layer reads the forwarding headers itself, which Waitress must then leave in place."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    return inspect.isclass(spec.target) and issubclass(spec.target, ProxyMiddleware | ProxyFix)


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
        """Close layers that hold resources (log files), then the app (its ``close()``, if any), then the stores.

        One that fails to close is logged, and the others are closed all the same.
        """
        _close_all((*self.instances, self.core, *self.context.stores.values()), self.context.logger)


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


#: An option named after an ``X-Forwarded-*`` header (``x_forwarded_for``, ``X-Forwarded-Proto``, ``x_forwarded``).
_X_FORWARDED = re.compile(r"x[-_]forwarded(?:[-_](\w+))?", re.I)


def _colon_spelling(name: str) -> str | None:
    """``module:attr`` for a pipeline name written ``module.attr`` that imports so, else None.

    Only suggested: the pipeline names a layer of your own with a colon, so that a name with
    dots never reads two ways.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest module first
        written = f"{'.'.join(parts[:cut])}:{'.'.join(parts[cut:])}"
        try:
            import_string(written)
        except (Exception, SystemExit):  # not that module, or no such attribute in it
            continue
        return written
    return None


def suggest(word: str, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` or an empty string; case is ignored (``CORS`` gets ``cors``).

    ``x_forwarded_for`` is ``x_for`` (the ``X-Forwarded-For`` count, as werkzeug's
    ``ProxyFix`` spells it), never the closest spelling ``forwarded``: that one reads
    RFC 7239 ``Forwarded``, which a proxy that sets ``X-Forwarded-For`` typically
    passes on from the client as it came, so following the hint would let any
    client choose its address.
    """
    text = str(word)
    known = list(choices)
    forwarding = _X_FORWARDED.fullmatch(text)
    if forwarding is not None:
        header = forwarding.group(1)
        meant = f"x_{header.lower().replace('-', '_')}" if header else ""
        if meant in known:
            return f"; did you mean {meant!r}?"
        known = [choice for choice in known if choice.lower() != "forwarded"]
    by_lower = {choice.lower(): choice for choice in reversed(known)}  # CORS is cors, RateLimit ratelimit
    close = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


#: A key path a message starts with: ``origins``, ``listen[1]``, ``rules[0].origins``, ``deny_patterns['query'][1]``.
_LEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\]|\['[^'\\]*'\]|\.[A-Za-z_][A-Za-z0-9_]*)*")
_LEAD_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^'\\]*)'\]")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()


def data_at(doc: Document, path: Path) -> Any:
    """The composed value at ``path``, or ``_MISSING``."""
    value: Any = doc.data
    for part in path:
        found = part in value if isinstance(value, dict) else (
            isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value))
        if not found:
            return _MISSING
        value = value[part]
    return value


def relocate(doc: Document, path: Path, message: str, fields: Iterable[str] = ()) -> Path:
    """The key path a message about ``path`` (a mapping, a list or a value) is really about.

    Rules between fields are checked on the whole mapping, so their errors
    arrive located at the mapping; the value they name is more useful:

    - a message that starts with a key path, below ``path`` or beside it
      (``secret must be…``, ``listen[1] repeats…``) points at that path;
    - one about a mapping with ``fields`` points at the first of them it names
      that the YAML sets (``…may not be true when origins contains…``);
    - one about a list that quotes its items points at the item quoted first.
    """
    lead = _LEAD.match(message)
    if lead is not None:
        named: Path = tuple(m.group(1) or (int(m.group(2)) if m.group(2) else m.group(3))
                            for m in _LEAD_PART.finditer(lead.group(0)))
        candidates = [(*path, *named)]
        if path and path[-1] == named[0]:
            candidates.append((*path[:-1], *named))
        for candidate in candidates:
            if candidate in doc.marks:  # and of a list, the item it names next (origins entry 'x' is not…)
                rest = message[lead.end():]
                return _quoted_item(doc, candidate, rest) if re.match(r"(?: entry)? '", rest) else candidate
    known = set(fields)
    for word in _WORD.findall(message):
        if word in known and (*path, word) in doc.marks:
            return (*path, word)
    return _quoted_item(doc, path, message)


def _quoted_item(doc: Document, path: Path, message: str) -> Path:
    """The item of the list at ``path`` that ``message`` quotes first, or ``path``."""
    value = data_at(doc, path)
    if isinstance(value, list):
        hits = sorted((message.find(repr(item)), i) for i, item in enumerate(value)
                      if isinstance(item, str | int | float) and not isinstance(item, bool) and repr(item) in message)
        if hits:  # the item quoted first: '10/fortnight' is not a rate limit; write it like '10/second'
            return (*path, hits[0][1])
    return path


def _located(doc: Document, path: Path, message: str, fields: Iterable[str] = (), **kw: Any) -> Problem:
    """A problem at :func:`relocate`'s answer, showing the value found there (never a secret's)."""
    where = relocate(doc, path, message, fields)
    if where != path:
        value = data_at(doc, where)
        secret = is_secret(where[len(path):], value)
        shown = value is not _MISSING and not isinstance(value, dict | list) and not secret
        kw = {**kw, "value": value if shown else None, "has_value": shown}
    return doc.problem(where, message, **kw)


#: A pydantic union member's name in an error's location: ``str``, ``list[str]``, ``datetime``, ``function-after[...]``.
_UNION_MEMBER = re.compile(r"[a-z][a-z0-9_-]*(\[.*\])?")
#: A number with a unit, which a field of plain numbers does not take.
_WITH_UNIT = re.compile(r"\s*\d+(\.\d+)?\s*(ms|s|secs?|seconds?|m|mins?|minutes?|h|hours?|d|days?|"
                        r"w|wks?|weeks?|mo|mons?|months?|y|yrs?|years?)\s*", re.I)  # hsts_max_age: 1y


def validation_problems(
    doc: Document, base: Path, exc: ValidationError, model: type[BaseModel] | None
) -> list[Problem]:
    """Map pydantic errors to problems located in the YAML."""
    problems = []
    unions: dict[Path, Problem] = {}  # a value no member of a union took: one problem, at the value
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = (*base, *loc)
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind in ("int_parsing", "float_parsing") and isinstance(err.get("input"), str) \
                and _WITH_UNIT.fullmatch(err["input"]):
            msg += "; write a plain number, without a unit (seconds: 60, not 60s or 1m)"
        if loc and isinstance(loc[-1], str) and _UNION_MEMBER.fullmatch(loc[-1]) and data_at(doc, path) is _MISSING \
                and data_at(doc, path[:-1]) is not _MISSING and kind not in ("missing", "extra_forbidden"):
            # pydantic names the union member each error is from (sunset.datetime, sunset.date; key.str,
            # key.list[str]): no such key is in the file; the value is what is wrong.
            path, loc = path[:-1], loc[:-1]
            found = unions.get(path)
            if found is None:
                unions[path] = _located(doc, path, msg, value=err.get("input"), has_value="input" in err)
                problems.append(unions[path])
            elif msg.startswith("Input should be a valid ") and found.message.startswith("Input should be a valid ") \
                    and "," not in msg and "," not in found.message:  # a valid string, a valid list: either
                index = problems.index(found)
                unions[path] = problems[index] = dataclasses.replace(
                    found, message=f"{found.message} or {msg.removeprefix('Input should be a valid ')}")
            continue
        if kind == "extra_forbidden":
            key = str(loc[-1])
            known = _model_fields_at(model, loc[:-1])
            name, colon, rest = key.partition(":")
            if colon and rest and not rest.startswith(" ") and name in known:
                text = f"unknown key {key!r}; YAML needs a space after the colon: write {name}: {rest}"
            else:
                text = f"unknown key {key!r}{suggest(key, known)}"
                if known:
                    text += f" (known: {', '.join(known)})"
            problems.append(doc.problem(path, text, key=True))
        elif kind == "missing":
            problems.append(doc.problem(path, f"{loc[-1]} is required" if loc else msg))
        else:
            has_value = loc != () and "input" in err
            fields = _model_fields_at(model, loc) if model is not None else []
            problems.append(_located(doc, path, msg, fields, value=err.get("input"), has_value=has_value))
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
        if not isinstance(spec, str | dict):  # `shared: 6379`, or nothing after the colon
            problems.append(doc.problem(("stores", name), f"store {name!r} needs a URL (e.g. {name}: memory:// or "
                                        f"{name}: redis://127.0.0.1:6379/0), or a mapping with url and options",
                                        value=spec, has_value=True))
            continue
        value = {"url": spec} if isinstance(spec, str) else spec
        store = _validate(doc, ("stores", name), StoreSpec, value, problems)
        if store is not None:
            stores[str(name)] = store

    if app_section is not None:
        _check_app_options(doc, app_section, problems)

    pipeline = _parse_pipeline(doc, data.get("pipeline"), problems)
    if problems or server is None or app_section is None or log_opts is None:
        # Found section by section; read top to bottom, as the file is (a stable sort: one place's stay in order).
        raise ConfigError(sorted(problems, key=lambda p: (p.line, p.column)))
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
    except (Exception, SystemExit) as exc:  # a SyntaxError, any error the module raises (sys.exit too)
        problems.append(doc.problem(("app", "factory"), f"cannot import the app factory: {_why(exc)}",
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
            glued = re.fullmatch(r"([A-Za-z_][\w.]*):(\S.*)", entry)
            if glued is not None and (glued.group(1) in LAYERS or glued.group(2)[0] in "{[\"'"):
                layer, options = glued.groups()
                if any(secret_name(word) for word in _OPTION_NAME.findall(options)):  # `- auth:{secret:…}`
                    options = "{…}" if options[0] == "{" else "…"
                problems.append(doc.problem(path, f"{f'{layer}:{options}'!r} is read as one name: YAML needs a "
                                                  f"space after the colon; write - {layer}: {options}"))
                continue
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(doc.problem(path, "each pipeline entry is a one-key mapping: layer name -> options"
                                        + _entry_hint(entry), value=entry, has_value=True))
            continue
        (name, options), = entry.items()
        name = str(name)
        options = {} if options is None else options
        if isinstance(options, dict):
            options = dict(options)
        opath: Path = (*path, name)
        if not isinstance(options, dict):
            hint = _options_hint(name, options)
            if hint:
                problems.append(doc.problem(opath, "layer options must be a mapping" + hint, value=options,
                                            has_value=True))
            else:  # not shown: it may be what the layer's secret was meant to be (`- auth: ${JWT_SECRET}`)
                problems.append(doc.problem(opath, f"layer options must be a mapping, not a {type(options).__name__}"
                                                   f" (write `- {name}: {{option: value}}`)"))
            continue
        if name not in LAYERS and not is_path(name):
            colon = _colon_spelling(name)
            text = (f"unknown layer {name!r}; write {colon!r} (your own layers are named module:attr, with a colon "
                    "before the attribute)") if colon else \
                f"unknown layer {name!r}{suggest(name, LAYERS)} (known: {', '.join(sorted(LAYERS))}; " \
                "or write module:attr for your own)"
            problems.append(doc.problem(path, text, key=True))
            continue
        try:
            target = resolve(name)
        except (Exception, SystemExit) as exc:  # a SyntaxError, any error the module raises (sys.exit too)
            problems.append(doc.problem(path, f"cannot import layer {name!r}: {_why(exc)}", key=True))
            continue
        scope_raw = {k: options.pop(k) for k in SCOPE_KEYS if k in options}
        scope = _parse_scope(doc, opath, scope_raw, problems)
        model = getattr(target, "Options", None)
        if inspect.isclass(model) and issubclass(model, LayerOptions):
            taken = [k for k in scope_raw if k in model.model_fields]
            for key in taken:
                problems.append(doc.problem((*opath, key), (
                    f"{key!r} here scopes the layer (paths, exclude_paths and methods are the builder's), but "
                    f"{name}'s Options also has a {key!r} field, which stack.yaml cannot set: rename the field"),
                    key=True))
            if taken:
                continue
            try:
                validated: Any = model.model_validate(options)
            except ValidationError as exc:
                problems.extend(validation_problems(doc, opath, exc, model))
                continue
        elif callable(target):
            validated = options
            if list(_parameters(target))[:3] == ["app", "options", "context"]:  # a class or a function
                found = "none" if model is None else f"{getattr(model, '__name__', model)!s}, not a LayerOptions"
                attribute = "a class attribute" if inspect.isclass(target) else "an attribute"
                problems.append(doc.problem(opath, (
                    f"{name} takes (app, options, context), as the built-in layers do, so it needs their Options: "
                    f"{attribute} Options that subclasses middleware.base.LayerOptions (it has {found})")))
                continue
            taken = [k for k in scope_raw if k in _parameters(target)]
            for key in taken:
                problems.append(doc.problem((*opath, key), (
                    f"{key!r} here scopes the layer (paths, exclude_paths and methods are the builder's), but "
                    f"{name} also takes a {key!r} argument, which stack.yaml cannot set: wrap the factory in one of "
                    "your own that names it differently"), key=True))
            if taken:
                continue
            unpassable = [(key, (*opath, key) if key in options else opath)
                          for key, required in _by_position_only(target).items() if key in options or required]
            for key, where in unpassable:
                problems.append(doc.problem(where, (
                    f"{name} takes {key} by position only (it comes before the / in its signature), and stack.yaml "
                    f"passes options by name: wrap it in a factory of your own that takes {key} by name"),
                    key=where != opath))
            if unpassable:
                continue
            unknown = _unknown_keywords(target, options)
            if unknown is not None:
                for key in unknown[0]:
                    known = unknown[1]
                    text = f"unknown option {key!r} for {name}{suggest(key, known)} " \
                           f"(known: {', '.join(known) or 'none'})"
                    problems.append(doc.problem((*opath, key), text, key=True))
                if unknown[0]:
                    continue
            wrong = _against_hints(target, options)
            for key, message in wrong:
                problems.append(doc.problem((*opath, key), f"{name} takes {key}: {message}",
                                            value=options[key], has_value=True))
            if wrong:
                continue
        else:
            problems.append(doc.problem(path, f"{name!r} is not a WSGI middleware class or factory: it is "
                                              f"{type(target).__name__} {target!r:.60}", key=True))
            continue
        specs.append(LayerSpec(index, name, target, validated, scope or Scope(), path=path))
    return specs


#: An option's name in the text of a pipeline entry YAML read as one name (``auth:{secret:…}``).
_OPTION_NAME = re.compile(r"([A-Za-z_][\w-]*)\s*:")


def _why(exc: BaseException) -> str:
    """An exception as one line: the message, and its type when the message alone says little."""
    if isinstance(exc, SystemExit):  # a factory or module that gave up: never a silent exit 0 of check or serve
        return f"it called sys.exit({exc.code!r})"
    text = str(exc)
    if isinstance(exc, ImportError | AttributeError | ValueError | TypeError | OSError) and text:
        return text
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"SyntaxError in {exc.filename}, line {exc.lineno}: {exc.msg}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_UNIONS = (Union, UnionType)


def _entry_hint(entry: Any) -> str:
    """What a pipeline entry of several keys probably meant: options not indented under the layer's name.

    ``- validation:`` with its options in the column of ``validation`` makes one
    mapping of them all, the layer's name given nothing; one option less indented
    than the others ends up beside the name.
    """
    if not isinstance(entry, dict) or len(entry) < 2:
        return ""
    (name, options), *rest = entry.items()
    if options is None:
        return f"; indent the options under `{name}:`"
    strays = [str(key) for key, _ in rest]
    if isinstance(options, dict) and options and not any(key in LAYERS or is_path(key) for key in strays):
        return f"; indent {', '.join(strays)} under `{name}:`, as far as its other options"
    return ""


def _options_hint(name: str, options: Any) -> str:
    """What the entry probably meant, when its options are not a mapping because of a typo."""
    if ":{" in name or ":[" in name:  # `- headers:{x: 1}`: YAML needs a space after the colon
        layer, _, rest = name.partition(":")
        return f"; write a space after the colon: `- {layer}: {rest.strip()}…`"
    if isinstance(options, str) and "." in name and ":" not in name and options.isidentifier():
        return f"; `- {name}: {options}` reads as a layer {name!r} with options {options!r}: " \
               f"write `- {name}:{options}` for the attribute {options!r} of module {name!r}"
    return ""


def _against_hints(target: Any, options: dict[str, Any]) -> list[tuple[str, str]]:
    """``(option, why)`` for each option whose value the plain factory's scalar type hint refuses.

    Only ``int``, ``float``, ``bool`` and ``str`` (or one of them or None) are
    checked, with pydantic in lax mode: ``"1"`` for an ``int`` is handed over as
    ``1`` (``options`` is updated).  Other hints are left alone: third-party
    hints are often looser or stricter than what the code takes (werkzeug's
    ``SharedDataMiddleware(disallow: None)`` takes a pattern), and checking an
    ``Iterable`` would hand over a one-shot iterator.
    """
    from pydantic import TypeAdapter

    params = _parameters(target)
    owner = target.__init__ if inspect.isclass(target) else target
    scope = getattr(inspect.unwrap(owner), "__globals__", {})
    wrong = []
    for key, value in options.items():
        param = params.get(key)
        if param is None or param.annotation is inspect.Parameter.empty:
            continue
        hint = param.annotation
        try:
            if isinstance(hint, str):
                hint = eval(hint, dict(scope), {})  # the factory's own annotation text, as typing does
        except Exception:
            continue
        concrete = [h for h in get_args(hint) if h is not type(None)] if get_origin(hint) in _UNIONS else [hint]
        if len(concrete) != 1 or concrete[0] not in (int, float, bool, str):
            continue
        shown = param.annotation if isinstance(param.annotation, str) else getattr(hint, "__name__", hint)
        if isinstance(value, bool) and concrete[0] in (int, float):  # pydantic takes `yes` as 1
            wrong.append((key, f"{shown} (a number is needed, not a boolean: YAML reads yes, no, on, off, "
                               "true and false as booleans)"))
            continue
        adapter: TypeAdapter[Any] = TypeAdapter(hint)
        try:
            options[key] = adapter.validate_python(value)
        except ValidationError as exc:
            wrong.append((key, f"{shown} ({str(exc.errors()[0]['msg']).lower()})"))
    return wrong


def _parameters(target: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters of a callable, by name; none when it has no signature to read (a builtin)."""
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}


def _by_position_only(target: Any) -> dict[str, bool]:
    """The parameters after the app that only a position can give (before the ``/``), and whether each is required."""
    params = list(_parameters(target).values())[1:]
    return {p.name: p.default is p.empty for p in params if p.kind is p.POSITIONAL_ONLY}


def _unknown_keywords(target: Any, options: Mapping[str, Any]) -> tuple[list[str], list[str]] | None:
    """For a plain ``factory(app, **options)``: the option names it does not take, and those it does.

    ``None`` when it cannot be known (no signature, or the factory takes ``**kwargs``).
    """
    params = list(_parameters(target).values())
    if not params or any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    if params and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        params = params[1:]  # the app, passed first
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [str(key) for key in options if key not in known], known


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


class _Primer:
    """Around an app that may return before starting its response: a generator app (PEP 3333 allows
    it) calls ``start_response`` on its body's first iteration.  That chunk is taken within the call,
    so that what the body raises there, before anything was sent, is a refusal from the call for
    every layer outside: each puts its headers on it (the rate limit's, the security headers) and it
    is counted and logged with its own status, as when the app raises it.

    Put around the core and the layers named by a dotted path, unless they are known to start the
    response before they return: the built-in layers (when the app inside them has) and a Flask app.
    """

    __slots__ = ("app",)

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = False

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal started
            started = True
            return start_response(status, headers, exc_info)

        body = self.app(environ, start)
        return body if started else PrimedBody(body)


def _starts_in_call(app: object) -> bool:
    """Whether ``app`` starts its response before its call returns: a Flask app as Flask serves it
    (``Response.__call__`` calls ``start_response`` and returns the body)."""
    flask = sys.modules.get("flask")  # not imported: not a Flask app
    if flask is None or not isinstance(app, flask.Flask):
        return False
    return "wsgi_app" not in vars(app) and type(app).wsgi_app is flask.Flask.wsgi_app \
        and type(app).__call__ is flask.Flask.__call__


def _builtin(spec: LayerSpec) -> bool:
    """Whether ``spec`` is a built-in layer (registered in config/registry.py)."""
    target = LAYERS.get(spec.name)
    return target is not None and spec.target is import_string(target)


class _Traced:
    """For ``serve.py explain``: note that a layer was entered."""

    def __init__(self, label: str, app: WSGIApplication) -> None:
        self.label = label
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        note(environ, self.label, "entered")
        try:
            return self.app(environ, start_response)
        except HTTPException as exc:
            # The innermost layer the refusal passed is the one that made it: say so, unless it did.
            if not getattr(exc, "_wsgistack_traced", False):
                exc._wsgistack_traced = True  # type: ignore[attr-defined]
                said = environ.get(TRACE) or ()
                if not any(layer == self.label and text.startswith("refused") for layer, text in said):
                    note(environ, self.label, f"refused: {exc.code} {exc.name}")
            raise


def make_stores(config: StackConfig, keep: Mapping[str, Store] | None = None) -> dict[str, Store]:
    """Create every named store (no connection is made); one ConfigError lists the ones that cannot be made.

    ``keep``: stores to use as they are instead (a reload's unchanged ``memory://`` ones); on failure
    the stores made here are closed (each gives back its share of a Redis pool), the kept ones are not.
    """
    stores: dict[str, Store] = {}
    made: list[Store] = []
    problems = []
    for name, spec in config.stores.items():
        if keep is not None and name in keep:
            stores[name] = keep[name]
            continue
        try:
            stores[name] = store_from_url(spec.url, **spec.options)
            made.append(stores[name])
        except Exception as exc:  # a malformed URL or option, whatever the backend raises for it
            message = _why(exc)
            option = next((key for key in spec.options if message.startswith(f"store option {key} ")), None)
            if option is not None:  # at the option (the message shows its value)
                problems.append(config.document.problem(("stores", name, "options", option), message))
            else:
                problems.append(config.document.problem(("stores", name), message, value=spec.url, has_value=True))
    if problems:
        for store in made:
            store.close()
        raise ConfigError(problems)
    return stores


def listen_problems(config: StackConfig) -> list[Problem]:
    """Resolve every ``listen`` host name as the server will bind it (no socket is made).

    Every address a name resolves to is bound, so two entries that share
    an address and port are refused as well.
    """
    doc = config.document
    problems: list[Problem] = []
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(config.server.listen):
        host, port = split_listen(item)
        path: Path = ("server", "listen", i)
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                problems.append(doc.problem(path, f"cannot resolve the host {host!r}: {detail}",
                                            value=item, has_value=True))
                continue
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        address = next((a for a in addresses if (a, port) in seen), None)
        if address is not None:
            first = seen[(address, port)]
            problems.append(doc.problem(path, f"listen[{i}] ({item}) is the same address as listen[{first}] "
                                              f"({config.server.listen[first]}): {address} port {port}; remove one",
                                        value=item, has_value=True))
        for address in addresses:
            seen.setdefault((address, port), i)
    return problems


def make_app(section: AppSection, context: Context) -> Any:
    """Call the app factory with its options (and the context when it takes one)."""
    factory = import_string(section.factory)
    params = _parameters(factory)
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
    _check_wsgi(layer)
    return layer


class NotWSGI(TypeError):
    """What a factory returned cannot serve requests (the message names it; no option is at fault)."""


def _check_wsgi(layer: object) -> None:
    """Refuse what a factory made when it cannot be called as ``layer(environ, start_response)``.

    A Paste Deploy ``filter_factory(global_conf, **local_conf)`` returns a filter
    that wants the app, not a request: it would answer every request with a 500.
    """
    if not callable(layer):
        raise NotWSGI(f"the factory returned {type(layer).__name__} {layer!r:.60}, not a WSGI application "
                        "(a callable taking environ and start_response)")
    try:
        signature = inspect.signature(layer)
    except (TypeError, ValueError):  # a builtin, or a callable that hides its signature: trust it
        return
    try:
        signature.bind({}, lambda *args: None)
    except TypeError:
        raise NotWSGI(f"the factory returned {getattr(layer, '__qualname__', type(layer).__name__)}"
                        f"{signature}, which cannot be called as layer(environ, start_response); a Paste Deploy "
                        "filter_factory(global_conf, **local_conf) is not a middleware factory: name its filter "
                        "function instead") from None


def build(
    config: StackConfig,
    *,
    trace: bool = False,
    stores: dict[str, Store] | None = None,
    logger: logging.Logger | None = None,
    server: ServerOptions | None = None,
    hosted: bool = False,
) -> BuiltStack:
    """Fold the pipeline around the app; any failure to build becomes a located ConfigError.

    ``server`` is the server settings in force, when they are not the file's
    (a reload: the sockets stay those the process started with); a layer's
    loopback-only allowances (``debug``) then need both to listen on loopback only.
    ``hosted``: served by another WSGI server, which ``server`` describes alone (the
    file's ``server:`` section, its ``listen`` and ``trusted_proxy``, has no effect there).
    """
    doc = config.document
    problems = [] if hosted else listen_problems(config)
    try:
        made = stores if stores is not None else make_stores(config)
    except ConfigError as exc:
        raise ConfigError([*problems, *exc.problems]) from None
    in_force = server or config.server
    judged = (in_force,) if hosted else (in_force, config.server)
    context = Context(
        stores=made,
        logger=logger or logging.getLogger("wsgistack"),
        loopback_only=all(settings.loopback_only for settings in judged),
        proxied=any(settings.trusted_proxy for settings in judged) or config.forwarding_layer is not None,
        workers=in_force.workers,
        settings={"server": config.server, "config_file": doc.file, "base_dir": doc.base_dir},
    )
    instances: list[Any] = []
    made_app: list[Any] = []

    def fail(found: list[Problem]) -> ConfigError:
        _close_all((*instances, *made_app, *context.stores.values()), context.logger)  # the app too, once made
        return ConfigError(found)

    if problems:
        raise fail(problems)
    try:
        core = make_app(config.app, context)
        made_app.append(core)
    except ValidationError as exc:
        raise fail(validation_problems(doc, ("app", "options"), exc, None)) from None
    except (Exception, SystemExit) as exc:  # its message may quote a secret it was given, as a layer's may
        message = _masked(_why(exc), dict(config.app.options))
        raise fail([doc.problem(("app",), f"the app factory failed: {message}")]) from None
    try:
        _check_wsgi(core)
    except TypeError as exc:  # served, it would answer every request with a 500
        raise fail([doc.problem(("app", "factory"), str(exc), value=config.app.factory, has_value=True)]) from None

    pipeline = with_default_errors(config.pipeline)
    config.pipeline = pipeline
    _tag_repeated_names(pipeline)
    timing = any(
        callable(getattr(spec.target, "wants_layer_timing", None)) and spec.target.wants_layer_timing(spec.options)
        for spec in pipeline
    )
    wrapped: WSGIApplication = core if _starts_in_call(core) else _Primer(core)
    if timing:
        wrapped = _Timed("app", wrapped)
    if trace:  # the core is traced too: a refusal it raises is not the innermost layer's
        wrapped = _Traced("app", wrapped)
    for spec in reversed(pipeline):
        registered = len(context.read_ahead)
        if spec.scope:
            spec.scope.rewrites = rewrites_inside(context)
            spec.scope.every_spelling = getattr(spec.target, "scope_every_spelling", False) is True
        try:
            layer = instantiate(spec, wrapped, context)
        except (Exception, SystemExit) as exc:  # a file it cannot open, a setting only the server can refute…
            problems.append(_build_problem(doc, spec, exc))
            continue
        for ahead in context.read_ahead[registered:]:  # read ahead only for requests the layer sees
            ahead.within(spec.scope)
        preview = getattr(layer, "preview_environ", None)
        if getattr(layer, "rewrites_path", False) and not callable(preview):
            # The layers outside learn the routed path from the preview alone: without one, a rule
            # written for the path it routes to would be stepped around with the path it routes from.
            instances.append(layer)  # (closed with the others)
            problems.append(doc.problem(spec.path or ("pipeline",), f"{spec.name}: {_NO_PREVIEW}", key=True))
            continue
        if callable(preview):  # the reads of the layers inside see the request as this one will change it
            for ahead in context.read_ahead[:registered]:
                ahead.through(preview, spec.scope, spec.label)
            if getattr(layer, "rewrites_path", False):  # the path rules of the layers outside see its rewrite
                context.path_rewrites.append(_within(preview, spec.scope, dict))
                alternatives = getattr(layer, "alternative_paths", None)
                if callable(alternatives):
                    context.path_alternatives.append(_within(alternatives, spec.scope, tuple))
        instances.append(layer)
        if not _builtin(spec):
            layer = _Primer(layer)
        if timing:
            layer = _Timed(spec.label, layer)
        if trace:
            layer = _Traced(spec.label, layer)
        if spec.scope:
            layer = Scoped(layer, wrapped, spec.scope, spec.label)
        wrapped = layer
    if problems:
        raise fail(problems)
    context.settings["pipeline"] = [describe(spec) for spec in pipeline]
    return BuiltStack(wrapped, config, context, core=core, instances=instances)


def _close_all(parts: Iterable[Any], logger: logging.Logger) -> None:
    """Call the ``close()`` of each part that has one, once; one that fails is logged, the others closed all the same.

    A part listed twice is closed in its last place: a factory that hands back the app it was
    given (``return app`` when it has nothing to do) lists that app, or the layer inside it, as
    its own layer too, and the app is closed after every layer around it.
    """
    listed = list(parts)
    last = {id(part): i for i, part in enumerate(listed)}
    for i, part in enumerate(listed):
        if last[id(part)] != i:
            continue
        close = getattr(part, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                logger.exception("closing %r failed", part)


_T = TypeVar("_T")


def _within(look: Callable[[WSGIEnvironment], _T], scope: Any,
            outside: Callable[[], _T]) -> Callable[[WSGIEnvironment], _T]:
    """``look`` (a preview, alternative paths) for requests in the layer's ``scope``; ``outside()`` for the others."""
    if not scope:
        return look
    return lambda environ: look(environ) if scope.matches(environ) else outside()


def _build_problem(doc: Document, spec: LayerSpec, exc: BaseException) -> Problem:
    """Where a layer's construction failed: the option it names or the file it could not open."""
    path = spec.path or ("pipeline",)
    message = _why(exc)
    filename = getattr(exc, "filename", None)
    options = data_at(doc, (*path, spec.name)) if spec.path else None
    if isinstance(options, dict) and not isinstance(exc, NotWSGI):  # (its words are not about an option)
        fields = list(options)
        opath = (*path, spec.name)
        message = _masked(message, options)  # the layer's own message may quote a secret it was given
        for key, value in options.items():
            if filename is not None and isinstance(value, str) and \
                    filename in (value, resolve_path(doc.base_dir, value)):
                opened = "it" if filename == value else filename  # the folder it was looked for in
                return doc.problem((*opath, key), f"{spec.name} cannot open {opened}: {exc.strerror or message}"
                                   if isinstance(exc, OSError) else message, value=value, has_value=True)
        where = relocate(doc, opath, message, fields)
        if where != opath:
            return _located(doc, opath, message, fields)
    return doc.problem(path, f"{spec.name}: {message}", key=True)


def _masked(message: str, options: object, path: tuple[str, ...] = ()) -> str:
    """``message`` with the values of the secret-named ``options`` (a factory's, nested ones too)
    replaced by the mask."""
    if isinstance(options, dict):
        items: Iterable[tuple[object, object]] = options.items()
    elif isinstance(options, list | tuple):
        items = ((None, item) for item in options)
    else:
        return message
    for key, value in items:
        inner = (*path, key) if isinstance(key, str) else path
        if isinstance(value, dict | list | tuple):
            message = _masked(message, value, inner)
            continue
        shown = str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else ""
        if len(shown) >= 4 and is_secret(inner, value):
            message = message.replace(shown, MASK)
    return message


def _tag_repeated_names(pipeline: list[LayerSpec]) -> None:
    """Give layers that share a name distinct labels (``ratelimit#1``, ``ratelimit#2``), so their
    timings, ``Server-Timing`` tokens and operator-page counts are their own."""
    total = Counter(spec.name for spec in pipeline)
    seen: Counter[str] = Counter()
    for spec in pipeline:
        if total[spec.name] > 1:
            seen[spec.name] += 1
            spec.tag = f"{spec.name}#{seen[spec.name]}"


def _plain(value: Any) -> Any:
    """A factory layer's option as JSON-ready data (mappings and lists kept, so secrets in them can be masked)."""
    if isinstance(value, str | int | float | bool | None):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)  # a date, say


def describe(spec: LayerSpec) -> dict[str, Any]:
    """A JSON-ready description of a layer for the operator page and tools (secrets are not masked here)."""
    if isinstance(spec.options, BaseModel):
        options = spec.options.model_dump(mode="json")
    else:
        options = {k: _plain(v) for k, v in spec.options.items()}
    return {"name": spec.name, "label": spec.label, "index": spec.index, "implicit": spec.implicit,
            "scope": repr(spec.scope) if spec.scope else "", "options": options}
