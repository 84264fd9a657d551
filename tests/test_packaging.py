"""What an installed wsgistack needs beyond its modules is declared in pyproject.toml.

A wheel carries only what pyproject.toml names: the layers' pages that ``wsgistack layers`` reads
and the stack file ``wsgistack`` offers to start from (installed under ``share/wsgistack``), every
package the code imports, and every distribution it imports at run time.  Read from the
configuration rather than from a build: building needs a newer setuptools than a fresh venv has.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import importlib.metadata
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from config.registry import LAYERS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PROJECT["tool"]["setuptools"]
MODULES = SETUPTOOLS["py-modules"]
INCLUDE = SETUPTOOLS["packages"]["find"]["include"]


def _packages() -> list[str]:
    """The packages in the checkout that the wheel's ``packages.find`` picks (its include patterns)."""
    found = []
    for top in sorted(p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        for init in sorted(top.rglob("__init__.py")):
            name = ".".join(init.parent.relative_to(ROOT).parts)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in INCLUDE):
                found.append(name)
    return found


def _sources() -> list[Path]:
    files = [ROOT / f"{module}.py" for module in MODULES]
    for package in _packages():
        files += sorted((ROOT / package.replace(".", "/")).glob("*.py"))
    return files


def _run_time_imports(path: Path) -> Iterator[str]:
    """The absolute imports of ``path`` outside ``if TYPE_CHECKING:`` blocks."""
    def walk(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    yield from walk(stmt)
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module
            yield from walk(child)
    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)))


def test_the_wheel_ships_every_file_the_commands_read_from_share() -> None:
    """``serve.shipped_file`` looks for ``docs/layers/<name>.md`` and ``stack.yaml`` under share/wsgistack."""
    shipped: dict[str, str] = {}
    for target, patterns in SETUPTOOLS["data-files"].items():
        assert target.split("/")[:2] == ["share", "wsgistack"], target
        below = "/".join(target.split("/")[2:])
        for pattern in patterns:
            for source in glob.glob(pattern, root_dir=ROOT):
                shipped["/".join(filter(None, (below, Path(source).name)))] = Path(source).as_posix()
    wanted = {"stack.yaml", *(f"docs/layers/{name}.md" for name in LAYERS),
              *(path.relative_to(ROOT).as_posix() for path in (ROOT / "examples").glob("*.yaml"))}
    assert not wanted - shipped.keys(), f"not installed under share/wsgistack: {sorted(wanted - shipped.keys())}"
    moved = {below: source for below, source in shipped.items() if below != source}
    assert not moved, f"installed under another path than the checkout's, where shipped_file looks: {moved}"


def test_the_wheel_has_every_package_the_code_imports() -> None:
    packages = _packages()
    shipped = set(MODULES) | set(packages)
    first_party = {path.stem if path.is_file() else path.name for path in ROOT.iterdir()
                   if (path.is_file() and path.suffix == ".py") or (path / "__init__.py").is_file()}
    missing = set()
    for source in _sources():
        for name in _run_time_imports(source):
            parts = name.split(".")
            if parts[0] not in first_party:
                continue
            # the deepest package on the way to ``name`` (a module's own package, or the package itself)
            package = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                            if (ROOT.joinpath(*parts[:n]) / "__init__.py").is_file()), parts[0])
            if package not in shipped:
                missing.add(f"{source.relative_to(ROOT)}: {name}")
    assert not missing, f"imported but left out of the wheel: {sorted(missing)}"
    typed = {package for package in packages if "." not in package and not (ROOT / package / "py.typed").is_file()}
    assert not typed, f"packages without py.typed: {sorted(typed)}"
    assert "py.typed" in SETUPTOOLS["package-data"].get("*", []), "py.typed is not package data"


#: Modules the run-time code imports from a distribution pyproject.toml does not name, because a declared
#: one pins it to its own exact release as a part of itself: {module: that declared distribution}.
#: Anything else the code imports must be declared itself, not merely arrive with something declared.
COMPANIONS = {
    "pydantic_core": "pydantic",  # pydantic requires pydantic-core==<its build>; serve.py reads its errors' types
}


def _undeclared(dependencies: list[str]) -> set[str]:
    """``source: module (distributions)`` for each third-party module the run-time code imports whose
    distribution is not one of ``dependencies`` (requirement texts) itself, nor a declared one's companion."""
    declared = {canonicalize_name(Requirement(text).name) for text in dependencies}
    first_party = set(MODULES) | {package.split(".")[0] for package in _packages()}
    by_module = importlib.metadata.packages_distributions()
    undeclared = set()
    for source in _sources():
        for name in _run_time_imports(source):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in first_party:
                continue
            dists = {canonicalize_name(dist) for dist in by_module.get(top, [])}
            carrier = COMPANIONS.get(top)
            if dists & declared or (carrier is not None and carrier in declared):
                continue
            undeclared.add(f"{source.relative_to(ROOT)}: {top} ({', '.join(sorted(dists)) or 'not installed'})")
    return undeclared


def test_every_distribution_imported_at_run_time_is_a_direct_dependency() -> None:
    """Not only a dev or bench extra's, nor only another dependency's: that one may drop it in any release."""
    undeclared = _undeclared(PROJECT["project"]["dependencies"])
    assert not undeclared, f"imported at run time, not among [project.dependencies]: {sorted(undeclared)}"


@pytest.mark.parametrize(("module", "carrier"), sorted(COMPANIONS.items()))
def test_a_companion_is_pinned_by_the_dependency_that_brings_it(module: str, carrier: str) -> None:
    """An allowed companion is imported by the code, and its declared carrier requires its exact release."""
    imported = {name.split(".")[0] for source in _sources() for name in _run_time_imports(source)}
    assert module in imported, f"{module} is no longer imported: drop it from COMPANIONS"
    declared = {canonicalize_name(Requirement(text).name) for text in PROJECT["project"]["dependencies"]}
    assert carrier in declared
    companion = {canonicalize_name(dist) for dist in importlib.metadata.packages_distributions()[module]}
    pins = [Requirement(text) for text in importlib.metadata.requires(carrier) or ()]
    assert any(canonicalize_name(req.name) in companion and req.marker is None
               and [spec.operator for spec in req.specifier] == ["=="] for req in pins), (
        f"{carrier} does not pin {module}'s distribution to one release: declare it")


@pytest.mark.parametrize("left_out", ["cryptography", "PyJWT[crypto]", "pyyaml"])
def test_a_module_that_only_arrives_with_another_dependency_is_found(left_out: str) -> None:
    """cryptography arrives with PyJWT[crypto] too; without its own line, the import by auth is undeclared."""
    kept = [text for text in PROJECT["project"]["dependencies"] if not text.startswith(left_out)]
    assert len(kept) == len(PROJECT["project"]["dependencies"]) - 1
    module, dist = {"cryptography": ("cryptography", "cryptography"), "PyJWT[crypto]": ("jwt", "pyjwt"),
                    "pyyaml": ("yaml", "pyyaml")}[left_out]
    assert {line.split(": ")[1] for line in _undeclared(kept)} == {f"{module} ({dist})"}
