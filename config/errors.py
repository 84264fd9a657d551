"""The config failure family: every problem names file:line:col and a dotted key path."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Literal

from stores.base import mask_secrets, secret_value

Path = tuple[str | int, ...]

MASK = "***"

#: Where a password masked already ends: ``***`` as a whole value (after ``:`` or ``=``, before what ends one).
_MASK_ENDS = re.compile(r"(?<=[:=]\*\*\*)(?=[\s@&'\");,\]]|\Z)")


def is_secret(path: Path, value: Any) -> bool:
    """Whether ``value`` at ``path`` is a secret's: any value but a flag under a secret-named key."""
    if value is None or isinstance(value, bool):
        return False
    return any(isinstance(part, str) and secret_value(part, value) for part in path)


def masked(path: Path, value: Any) -> Any:
    """``value`` fit to print: a secret-named key's value hidden, passwords in URLs replaced by ``***``."""
    if is_secret(path, value):
        return MASK
    if isinstance(value, str) and ("://" in value or "@" in value or "=" in value):
        return mask_secrets(value, MASK)
    if isinstance(value, list | tuple):
        return type(value)(masked((), item) for item in value)
    if isinstance(value, dict):
        return {k: masked((k,) if isinstance(k, str) else (), v) for k, v in value.items()}
    return value


def masked_message(message: str) -> str:
    """``message`` with its passwords masked, and those it shows masked already (a store's URL) left as they are.

    Masking free text reads a ``password=`` up to the next space and userinfo up to
    the line's last ``@``: run over a value that is ``***`` already, it ate the
    words after it (``?password=***): authentication failed`` lost its ``):``).
    Each part up to such a mask is masked on its own.
    """
    return "".join(mask_secrets(part, MASK) for part in _MASK_ENDS.split(message))


def dotted(path: Path) -> str:
    """Render ``("pipeline", 3, "cors", "max_age")`` as ``pipeline[3].cors.max_age``.

    A key holding what does not print (a line break, a terminal's escape sequence) is shown quoted, with
    escapes, as messages quote values: a problem stays one line of plain text on the terminal and for a
    script reading ``check``'s output, and a key cannot forge the line of another.
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part) if str(part).isprintable() else repr(str(part))
            out += f".{text}" if out else text
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    """One error or warning, printable like a compiler message."""

    message: str
    path: Path = ()
    file: str = "<config>"
    line: int = 0
    column: int = 0
    severity: Literal["error", "warning"] = "error"
    value: Any = None
    has_value: bool = False

    def __post_init__(self) -> None:
        # Problems are printed, logged and shown on the operator page: a secret never travels in one.
        if self.has_value:
            object.__setattr__(self, "value", masked(self.path, self.value))
        if "@" in self.message or "=" in self.message:  # a URL a message quotes (a store's, a layer's own)
            object.__setattr__(self, "message", masked_message(self.message))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        text = f"{where} {dotted(self.path)}: {self.message}"
        if self.has_value and self.value != MASK:  # a hidden value adds nothing to the line
            try:
                value = self.value
                # A YAML date or timestamp as it was written, not as Python's repr of it
                shown = value.isoformat() if isinstance(value, datetime.date | datetime.time) \
                    else ascii(value)  # ASCII: a lone surrogate, a control character print as escapes
            except ValueError:  # an int of more digits than Python prints
                shown = f"<a number of {self.value.bit_length()} bits>"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            if f"got {shown}" not in self.message:  # a validator's own message may show it already
                text += f" (got {shown})"
        if self.severity == "warning":
            text = f"{where} warning: {dotted(self.path)}: {self.message}"
        return text


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
