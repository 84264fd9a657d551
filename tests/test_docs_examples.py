"""Every stack example in the docs passes ``serve.py check`` as written.

The YAML blocks of README.md and docs/ that hold a ``pipeline:`` are checked
with the variables they name set (and validated, linted and built as ``serve``
would), so an example an operator copies never starts life as an error.
Two kinds of placeholders are replaced first: a log directory under /var/log
becomes a temporary one, and a block using the imaginary ``mycompany`` package
is left out (it illustrates adding your own layer).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import check

ROOT = Path(__file__).resolve().parent.parent
ENV = {"SESSION_SECRET": "s" * 40, "JWT_SECRET": "j" * 48, "SECRET_KEY": "k" * 40, "OLD_SESSION_SECRET": "o" * 40,
       "REDIS_PASSWORD": "pw", "REDIS_URL": "memory://"}
BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def examples() -> list[pytest.ParameterSet]:
    found = []
    for page in sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("docs/layers/*.md")]):
        text = page.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            block = match.group(1)
            if "pipeline:" in block and "mycompany." not in block:
                line = text[: match.start()].count("\n") + 2
                found.append(pytest.param(block, id=f"{page.relative_to(ROOT)}:{line}"))
    return found


@pytest.mark.parametrize("block", examples())
def test_the_example_checks_clean(block: str, tmp_path: Path) -> None:
    stack = tmp_path / "stack.yaml"
    stack.write_text(block.replace("/var/log/wsgistack/", f"{tmp_path}/"), encoding="utf-8")
    errors = [str(p) for p in check(stack, env={**ENV, "WSGISTACK_VAR_DIR": str(tmp_path / "var")})
              if p.severity == "error"]
    assert errors == []
