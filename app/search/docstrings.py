"""Read the docstrings of installed Python modules with ``ast``, never importing them.

This feeds the ``local`` search engine.  A source is a module name (``json``,
``email.message``), a directory, or a ``.py`` file.  A package source brings
its public submodules with it; files and names that start with ``_`` and
test directories are skipped.  Files that do not parse on this Python are
skipped quietly: site-packages holds code for other versions.  A lone surrogate
(a ``\\ud800`` escape) or a NUL in a docstring becomes U+FFFD: SQLite stores
UTF-8 text, and its snippets end at a NUL.

The default set is the standard library's public top-level modules (with
their packages' first-level submodules) plus the project's own runtime
dependencies, which indexes in a couple of seconds.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DocEntry", "default_sources", "iter_entries"]

#: The distribution whose runtime dependencies join the default set.
PROJECT = "wsgistack"
MAX_FILE_BYTES = 1_000_000
MAX_DOC_CHARS = 8_000
# Standard-library names that are tests, demos or tools rather than APIs.
_STDLIB_SKIP = frozenset({
    "antigravity", "distutils", "encodings", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "test", "this",
    "tkinter", "turtledemo", "venv",
})
_SKIP_DIRS = frozenset({"tests", "test", "testing", "__pycache__", "v1"})
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
#: What a docstring may hold that the index cannot: lone surrogates (not UTF-8) and NUL.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class DocEntry:
    """One documented object: its qualified name, docstring, URL and kind."""

    title: str
    body: str
    url: str
    kind: str


@dataclass(frozen=True, slots=True)
class _ModuleFile:
    name: str
    path: Path
    recursive: bool


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _public(name: str) -> bool:
    return not name.startswith("_")


def default_sources() -> list[str]:
    """The standard library's public top-level modules plus the project's dependencies."""
    names = [n for n in sorted(sys.stdlib_module_names) if _public(n) and n not in _STDLIB_SKIP]
    try:
        requirements = importlib.metadata.requires(PROJECT) or []
    except importlib.metadata.PackageNotFoundError:
        return names
    wanted = set()
    for req in requirements:
        match = _REQ_NAME.match(req)
        if match and "extra ==" not in req:
            wanted.add(_canonical(match.group(1)))
    for top, dists in sorted(importlib.metadata.packages_distributions().items()):
        if _public(top) and top.isidentifier() and any(_canonical(d) in wanted for d in dists):
            names.append(top)
    return names


def _find_module(name: str) -> Path | None:
    """The file of a module name, found without importing anything."""
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    path = Path(spec.origin)
    for part in rest.split(".") if rest else ():
        folder = path.parent
        if path.name != "__init__.py":
            return None
        if (folder / part / "__init__.py").is_file():
            path = folder / part / "__init__.py"
        elif (folder / f"{part}.py").is_file():
            path = folder / f"{part}.py"
        else:
            return None
    return path


def _package_files(mod: _ModuleFile) -> Iterator[_ModuleFile]:
    """The module itself and, for a package, its public submodules."""
    yield mod
    if mod.path.name != "__init__.py":
        return
    for child in sorted(mod.path.parent.iterdir()):
        if not _public(child.name) or child.name in _SKIP_DIRS:
            continue
        if child.suffix == ".py":
            yield _ModuleFile(f"{mod.name}.{child.stem}", child, False)
        elif mod.recursive and (child / "__init__.py").is_file() and child.name.isidentifier():
            yield from _package_files(_ModuleFile(f"{mod.name}.{child.name}", child / "__init__.py", True))


def _directory_files(root: Path) -> Iterator[_ModuleFile]:
    prefix = root.name if (root / "__init__.py").is_file() else ""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        if any(not _public(p) or p in _SKIP_DIRS for p in rel[:-1]):
            continue
        parts = [prefix, *rel] if prefix else list(rel)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(p.isidentifier() for p in parts) and _public(parts[-1]):
            yield _ModuleFile(".".join(parts), path, False)


def _module_files(sources: Iterable[str], default: bool) -> Iterator[_ModuleFile]:
    seen: set[Path] = set()
    for source in sources:
        candidate = Path(source)
        if "/" in source or "\\" in source or source.endswith(".py"):
            if candidate.is_dir():
                found: Iterable[_ModuleFile] = _directory_files(candidate)
            elif candidate.is_file():
                found = [_ModuleFile(candidate.stem, candidate, False)]
            else:
                continue
        else:
            path = _find_module(source)
            if path is None:
                continue
            found = _package_files(_ModuleFile(source, path, not default or source not in sys.stdlib_module_names))
        for mod in found:
            if mod.path not in seen:
                seen.add(mod.path)
                yield mod


class _UrlMaker:
    """docs.python.org for the standard library, the PyPI project page otherwise."""

    def __init__(self) -> None:
        self._dists: Mapping[str, list[str]] | None = None

    def base(self, module: str) -> tuple[str, bool]:
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names:
            return f"https://docs.python.org/3/library/{top}.html", True
        if self._dists is None:
            self._dists = importlib.metadata.packages_distributions()
        dists = self._dists.get(top)
        if dists:
            return f"https://pypi.org/project/{dists[0]}/", False
        return f"https://pypi.org/search/?q={top}", False


def _entries_of(tree: ast.Module, module: str, base: str, anchor: bool) -> Iterator[DocEntry]:
    def entry(qualname: str, doc: str, kind: str) -> DocEntry:
        url = f"{base}#{qualname}" if anchor else base
        return DocEntry(qualname, _UNSTORABLE.sub("\ufffd", doc[:MAX_DOC_CHARS]), url, kind)

    doc = ast.get_docstring(tree)
    if doc:
        yield entry(module, doc, "module")
    stack: list[tuple[list[ast.stmt], str]] = [(tree.body, module)]
    seen: set[str] = set()
    while stack:
        body, prefix = stack.pop()
        for node in body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if not _public(node.name):
                    continue
                qualname = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc and qualname not in seen:
                    seen.add(qualname)
                    yield entry(qualname, doc, "class" if isinstance(node, ast.ClassDef) else "function")
                if isinstance(node, ast.ClassDef):
                    stack.append((node.body, qualname))
            elif isinstance(node, ast.If | ast.Try):
                stack.append((node.body + node.orelse, prefix))


def iter_entries(sources: Iterable[str] | None = None) -> Iterator[DocEntry]:
    """Yield every documented module, class and function of ``sources`` (default set if None)."""
    default = sources is None
    urls = _UrlMaker()
    for mod in _module_files(default_sources() if sources is None else sources, default):
        try:
            if mod.path.stat().st_size > MAX_FILE_BYTES:
                continue
            tree = ast.parse(mod.path.read_bytes(), str(mod.path))
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        base, anchor = urls.base(mod.name)
        yield from _entries_of(tree, mod.name, base, anchor)
