"""Every built-in layer's page lists exactly its options, each with the default the code has.

A page's options table is its table whose second column is ``default``. A default written as
code (```128```, ```[GET, HEAD, POST]```, ```"__Host-session"```, a list of code spans) must equal
the ``Options`` field's default; one written in words is an option without a default value of its
own: ``none`` and ``required`` stand for ``None`` or an empty string, and any other wording
(``all``, ``derived``, ``1 ms … 10 s``) describes a default the prose spells out.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from config.registry import LAYERS, resolve

ROOT = Path(__file__).resolve().parent.parent
CELL = re.compile(r"(?<!\\)\|")
CODE = re.compile(r"`([^`]*)`")


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in CELL.split(line.strip().strip("|"))]


def options_table(name: str) -> dict[str, str]:
    """The page's options table: key -> the default cell as written."""
    page = ROOT / "docs" / "layers" / f"{name}.md"
    assert page.is_file(), (f"the built-in layer {name!r} has no page docs/layers/{name}.md: write one with an "
                            "options table (| key | default | meaning |, a row per Options field)")
    lines = page.read_text(encoding="utf-8").splitlines()
    tables = []
    for i, line in enumerate(lines[:-1]):
        head = _cells(line) if line.startswith("|") else []
        if len(head) >= 3 and head[1] == "default" and lines[i + 1].startswith("|--"):
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                rows[cells[0].strip("`")] = cells[1]
            tables.append(rows)
    assert len(tables) == 1, f"docs/layers/{name}.md has {len(tables)} tables with a 'default' column, not one"
    return tables[0]


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default(info: Any) -> Any:
    if info.default is not PydanticUndefined:
        return _plain(info.default)
    return _plain(info.default_factory()) if info.default_factory else None


def _written(cell: str) -> list[Any]:
    """What a code-span default cell may mean: its text, and the value YAML reads from it."""
    cell = re.sub(r"\s+\(.*\)$", "", cell)  # "`[]` (any)", "`1048576` (1 MiB)"
    spans = CODE.findall(cell)
    if len(spans) > 1:  # `Host`, `X-Forwarded-Host`, …
        return [spans]
    text = spans[0]
    found: list[Any] = [text]
    with contextlib.suppress(yaml.YAMLError):
        found.append(yaml.safe_load(text))
    if text.startswith("[") and text.endswith("]"):  # [127.0.0.0/8, ::1/128]: not YAML, read as written
        found.append([item.strip().strip('"') for item in text[1:-1].split(",") if item.strip()])
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b or (isinstance(b, str) and str(a) == b)


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_options_table_lists_each_option_with_its_default(name: str) -> None:
    fields = resolve(name).Options.model_fields
    table = options_table(name)
    assert sorted(set(fields) - set(table)) == [], f"options of {name} missing from its page's table"
    assert sorted(set(table) - set(fields)) == [], f"rows of {name}'s table that are no option of the layer"
    wrong = []
    for key, info in fields.items():
        cell, default = table[key], _default(info)
        if cell.startswith("`"):
            if not any(_same(default, w) for w in _written(cell)):
                wrong.append(f"{key}: the code has {default!r}, the page {cell!r}")
        elif cell.split(" (")[0].lower() in ("none", "required") and default not in (None, ""):
            wrong.append(f"{key}: the code has {default!r}, the page {cell!r}")
    assert wrong == []
