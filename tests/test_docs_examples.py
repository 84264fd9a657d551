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
from stack_support import secret

from config import check

ROOT = Path(__file__).resolve().parent.parent
ENV = {"SESSION_SECRET": secret("session", 40), "JWT_SECRET": secret("jwt", 48), "SECRET_KEY": secret("key", 40),
       "OLD_SESSION_SECRET": secret("old session", 40),
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


def _readme_block(after: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split(after, 1)[1].split("```\n", 1)[1].split("```", 1)[0].splitlines()


def _broken(tmp_path: Path, text: str) -> list[str]:
    stack = tmp_path / "stack.yaml"
    stack.write_text(text, encoding="utf-8")
    # the README shortens the list of known layers
    return [re.sub(r"\(known: [^;]*;", "(known: access_log, auth, …;", str(p)).replace(str(stack), "stack.yaml")
            for p in check(stack, env=ENV)]


def test_the_broken_file_in_the_readme_is_the_shipped_one_broken(tmp_path: Path) -> None:
    """The README's sample errors are what `check` says of the shipped stack.yaml with those mistakes."""
    shipped = (ROOT / "stack.yaml").read_text(encoding="utf-8")
    broken = (shipped.replace("  threads: 8\n", "  threads: many\n", 1).replace("  - cors:", "  - corz:", 1)
              .replace('limits: ["${WSGISTACK_RATE_LIMIT:-120/minute}"]', 'limits: ["120 per fortnight"]', 1))
    assert _broken(tmp_path, broken) == _readme_block("A broken file reads like this")
    auth, cache = shipped.index("  - auth:\n"), shipped.index("  - cache:\n")  # cache moves above auth
    end = shipped.index("\n# How serve.py logs") + 1
    reordered = shipped[:auth] + shipped[cache:end] + shipped[auth:cache] + shipped[end:]
    assert _broken(tmp_path, reordered) == _readme_block("run once each entry is valid, and read like this")
