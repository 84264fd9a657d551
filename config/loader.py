"""Stage 1 and 2: read stack.yaml into plain data, keeping where every value came from.

The YAML is composed (``yaml.compose`` with the safe loader) and turned into
dicts, lists and scalars by hand, so that:

- every value's ``file:line:col`` is kept in :class:`Document.marks`;
- only the standard YAML tags are accepted: ``!!python/...`` and any custom
  tag are refused with an error, never constructed;
- duplicate keys are an error, not a silent overwrite;
- ``${VAR}`` and ``${VAR:-default}`` are interpolated in string scalars
  (``$${`` writes a literal ``${``), and a missing variable names its line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import yaml

from .errors import ConfigError, Path, Problem

_SAFE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
}
_VAR = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Document:
    """Plain data plus the marks of every value and key, by key path."""

    data: Any
    file: str = "<config>"
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """Return (line, column) for ``path``, falling back to the nearest parent."""
        table = self.key_marks if key else self.marks
        probe = tuple(path)
        while probe:
            if probe in table:
                return table[probe]
            if probe in self.marks:
                return self.marks[probe]
            probe = probe[:-1]
        return self.marks.get((), (1, 1))

    def problem(self, path: Path, message: str, *, key: bool = False, **kw: Any) -> Problem:
        line, col = self.locate(path, key=key)
        return Problem(message, tuple(path), self.file, line, col, **kw)


def read_text(text: str, *, file: str = "<config>", env: Mapping[str, str] | None = None) -> Document:
    """Compose YAML ``text``, check tags and keys, interpolate ``${VAR}`` from ``env``."""
    env = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        message = f"invalid YAML: {exc.problem or exc}"
        raise ConfigError([Problem(message, (), file, line, col)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(f"invalid YAML: {exc}", (), file)]) from None
    doc = Document(data={}, file=file)
    if node is None:
        return doc
    problems: list[Problem] = []
    doc.data = _convert(node, (), doc, env, problems)
    if problems:
        raise ConfigError(problems)
    return doc


def read_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Document:
    """Read and compose a stack.yaml file; the file name appears in every problem."""
    name = os.fspath(path)
    try:
        text = FsPath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("file not found", (), name)]) from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError([Problem(f"cannot read the file: {exc}", (), name)]) from None
    return read_text(text, file=name, env=env)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _convert(node: yaml.Node, path: Path, doc: Document, env: Mapping[str, str], problems: list[Problem]) -> Any:
    doc.marks[path] = _mark(node)
    if node.tag not in _SAFE_TAGS:
        line, col = _mark(node)
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        problems.append(Problem(
            f"the YAML tag {tag!r} is not allowed; stack.yaml takes plain values only",
            path, doc.file, line, col,
        ))
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line, col = _mark(key_node)
                problems.append(Problem("mapping keys must be plain scalars", path, doc.file, line, col))
                continue
            key = _scalar(key_node)
            if key == "<<":
                line, col = _mark(key_node)
                problems.append(Problem("YAML merge keys (<<) are not supported", path, doc.file, line, col))
                continue
            key = key if isinstance(key, str | int) else str(key)
            child = (*path, key)
            doc.key_marks[child] = _mark(key_node)
            if key in out:
                line, col = _mark(key_node)
                problems.append(Problem(f"duplicate key {key!r}", child, doc.file, line, col))
                continue
            out[key] = _convert(value_node, child, doc, env, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, env, problems) for i, item in enumerate(node.value)]
    value = _scalar(node)
    if isinstance(value, str) and "$" in value:
        value = _interpolate(value, path, node, doc, env, problems)
    return value


def _scalar(node: yaml.Node) -> Any:
    # A fresh constructor per scalar: SafeConstructor caches every node it built, which would leak
    # a little memory on every reload and check.
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _interpolate(
    value: str, path: Path, node: yaml.Node, doc: Document, env: Mapping[str, str], problems: list[Problem]
) -> str:
    def replace(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        line, col = _mark(node)
        problems.append(Problem(
            f"environment variable {name} is not set and has no default (write ${{{name}:-default}})",
            path, doc.file, line, col,
        ))
        return ""

    return _VAR.sub(replace, value)
