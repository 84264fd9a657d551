"""Stage 1 and 2: read stack.yaml into plain data, keeping where every value came from.

The YAML is composed (``yaml.compose`` with the safe loader) and turned into
dicts, lists and scalars by hand, so that:

- every value's ``file:line:col`` is kept in :class:`Document.marks`;
- only the standard YAML tags are accepted: ``!!python/...`` and any custom
  tag are refused with an error, never constructed;
- duplicate keys are an error, not a silent overwrite;
- ``${VAR}`` and ``${VAR:-default}`` are interpolated in string scalars
  (``$$`` writes a literal ``$``, as in Compose files), and a missing variable names its line;
  any other ``${`` (``${VAR-default}``, ``${VAR:default}``, an unclosed one)
  is an error, never left in the value as text;
- an alias that contains itself, and a file with no settings at all, are errors.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import yaml

from stores.base import secret_name, secret_value

from .errors import MASK, ConfigError, Path, Problem, dotted, is_secret

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
#: ``$$`` (a literal ``$``), ``${NAME}``, ``${NAME:-default}``, or any other ``${`` (an error).
#: A default runs to the first ``}``, but a literal ``$${…}`` in it keeps its own closing brace.
_TOKEN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:\$\$\{[^}]*\}|[^}])*))?\}|\$\{")
#: A ``$NAME`` without braces (the shell's and Compose's other spelling), which is not read here.
_BARE = re.compile(r"\$\$|\$\{|\$([A-Za-z_][A-Za-z0-9_]*)")
#: What an unsupported ``${...}`` looks like, to suggest the supported spelling.
_NEAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-=?+]|:)([^}]*)\}")
#: More values than any stack.yaml has: aliases expanding beyond this are refused.
#: Levels of nesting a file may have (the composer and the converter recurse once per level).
MAX_DEPTH = 64
MAX_VALUES = 100_000


@dataclass
class Document:
    """Plain data plus the marks of every value and key, by key path."""

    data: Any
    file: str = "<config>"
    #: The folder relative file paths in the document resolve against (the stack file's), or None (the working one).
    base_dir: str | None = None
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    #: Values that came out empty from a variable set to nothing (``REDIS_URL=``): key path -> its name.
    empty: dict[Path, str] = field(default_factory=dict)
    #: Booleans written as words (``off``, ``no``, ``yes``, ``on``): key path -> the word, to say why a value is one.
    words: dict[Path, str] = field(default_factory=dict)
    #: Plain values YAML read as a number, a date or null (``2.0``, ``0x10``, ``2024-01-01``, ``~``, nothing):
    #: key path -> the hint for where text goes (a version, an origin, a prefix), saying how to keep the text.
    read_as: dict[Path, str] = field(default_factory=dict)
    #: Values of variables named like a secret (``JWT_SECRET``, ``SEARXNG_TOKEN``): never shown in a problem,
    #: whatever the key they were written under.
    secrets: set[str] = field(default_factory=set)

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
        path = tuple(path)
        word = self.words.get(path)
        if word is not None and message.startswith("Input should be") and "boolean" not in message:
            # "Input should be a valid string (got False)" of `level: off`: the operator never wrote False
            message += (f"; YAML reads {word} as the boolean {str(word.lower() in ('yes', 'on')).lower()}: "
                        f"quote it ('{word}') to mean the word")
        elif path in self.read_as and message.startswith(("Input should be a valid string", "Input should be '")):
            message += self.read_as[path]  # text was expected (a string, one of some words), not what YAML read
        # "store URL '' has no scheme": the value came from a variable set to nothing; say which.
        empty = [(where, name) for where, name in self.empty.items() if where[:len(path)] == path]
        if empty:
            message += " (" + "; ".join(f"from ${{{name}}}, which is set but empty" if where == path else
                                        f"{dotted(where[len(path):])} comes from ${{{name}}}, which is set but empty"
                                        for where, name in empty) + ")"
        return self.masked(Problem(message, path, self.file, line, col, **kw))

    def masked(self, problem: Problem) -> Problem:
        """``problem`` with the values of secret-named variables (``${JWT_SECRET}``) masked in its text and value.

        In any case: an option may print the value as it reads it (versioning lowercases a version).
        """
        if not self.secrets:
            return problem
        message, path = problem.message, problem.path
        # Longest first: a secret that holds another is masked whole.
        pattern = re.compile("|".join(map(re.escape, sorted(self.secrets, key=len, reverse=True))), re.IGNORECASE)
        message = pattern.sub(MASK, message)
        path = tuple(pattern.sub(MASK, part) if isinstance(part, str) else part for part in path)
        shows = problem.has_value and _shows(problem.value, pattern)
        if message == problem.message and path == problem.path and not shows:
            return problem
        return dataclasses.replace(problem, message=message, path=path, value=MASK if shows else problem.value)


def _shows(value: Any, secrets: re.Pattern[str]) -> bool:
    """Whether ``value`` (text, or a list or mapping holding some) contains a match of ``secrets``."""
    if isinstance(value, str):
        return secrets.search(value) is not None
    if isinstance(value, list | tuple):
        return any(_shows(item, secrets) for item in value)
    if isinstance(value, dict):
        return any(_shows(key, secrets) or _shows(item, secrets) for key, item in value.items())
    return False


def read_text(text: str, *, file: str = "<config>", env: Mapping[str, str] | None = None) -> Document:
    """Compose YAML ``text``, check tags and keys, interpolate ``${VAR}`` from ``env``."""
    env = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        message = f"invalid YAML: {exc.problem or exc}"
        if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
            message += f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        if "'\\t'" in message:
            message += "; YAML indents with spaces only: replace the tab with spaces"
        at = "".join(text.splitlines()[mark.line:mark.line + 1]) if mark is not None else ""  # the line it names
        message += _layout_hint(exc.problem or "", at, mark.column if mark is not None else 0)
        if at and mark is not None and at[mark.column - 1:mark.column] == "*":
            # An unquoted * starts an alias (allow_methods: [*]): the operator meant the text
            message += "; a * on its own starts a YAML alias: quote it ('*') to mean the text"
        elif at and mark is not None and at[max(0, mark.column - 1):mark.column + 1] == "${":
            # {a: ${VAR}} reads the { of ${ as the start of a mapping inside the flow one
            message += '; a value holding ${…} inside {…} or […] must be quoted: "${VAR}"'
        raise ConfigError([Problem(message, (), file, line, col)]) from None
    except yaml.reader.ReaderError as exc:  # a control character or NUL: located like the other problems
        before = text[:exc.position]
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        raise ConfigError([Problem(f"invalid YAML: the character {char!a} may not appear in YAML text; remove "
                                   "it, or write it as an escape in a double-quoted string", (), file, line, col)
                           ]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem("invalid YAML: " + " ".join(str(exc).split()), (), file)]) from None
    except RecursionError:  # the composer recurses once per level of nesting
        raise ConfigError([Problem(f"invalid YAML: nested too deeply (a stack.yaml needs a few levels; "
                                   f"more than {MAX_DEPTH} are refused)", (), file)]) from None
    doc = Document(data={}, file=file)
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
        raise ConfigError([Problem(
            "the file has no settings (it is empty or only comments); a stack needs at least a pipeline, "
            "e.g. pipeline: [errors: {}] (the shipped stack.yaml is a commented example)", (), file, 1, 1,
        )])
    problems: list[Problem] = []
    converter = _Converter(doc, env, problems)
    try:
        doc.data = converter.convert(node, ())
    except _TooMany:
        raise ConfigError([Problem(
            f"the file expands to more than {MAX_VALUES} values (YAML aliases repeating large parts?)",
            (), file, 1, 1,
        )]) from None
    if problems:
        raise ConfigError([doc.masked(problem) for problem in problems])
    return doc


#: A ``key: value`` line, to show how a value holding ``: `` is quoted.
_KEY_VALUE = re.compile(r"(\s*(?:-\s+)?)([^\s:#'\"{\[][^:#]*?):\s+([^\s'\"{\[&*!|>].*?)(?:\s+#.*)?")


def _layout_hint(problem: str, line: str, column: int) -> str:
    """What to look at when the YAML's structure is broken: a value's unquoted ``: `` or the indentation.

    PyYAML names the token it did not expect (``mapping values are not allowed
    here``, ``expected <block end>, but found …``); an operator needs the cause,
    which is nearly always a line indented differently from the one above it.
    """
    if problem == "mapping values are not allowed here" and re.search(r":\s", line[:column]):
        quoted = _KEY_VALUE.fullmatch(line)
        if quoted is None:
            return "; a value holding ': ' must be quoted"
        value = quoted.group(3)
        if is_secret((quoted.group(2).strip(),), value):  # problems are printed, logged and shown: never a secret
            return f"; a value holding ': ' must be quoted: {quoted.group(2)}: '…'"
        shown = f"'{value}'" if "'" not in value else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"; a value holding ': ' must be quoted: {quoted.group(2)}: {shown}"
    if problem == "mapping values are not allowed here" or problem.startswith("expected <block end>, but found"):
        return ("; check the indentation of this line and the one above: the keys of one mapping start in the same "
                "column, and its values further right than their key")
    return ""


def read_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Document:
    """Read and compose a stack.yaml file; the file name appears in every problem."""
    return read_text(read_source(path), file=os.fspath(path), env=env)


def read_source(path: str | os.PathLike[str]) -> str:
    """The text of a stack.yaml file; a ConfigError (located when it is not UTF-8) when it cannot be read."""
    name = os.fspath(path)
    try:
        text = FsPath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("file not found", (), name)]) from None
    except UnicodeDecodeError as exc:  # where: the line and column of the first byte that is not UTF-8
        raw = FsPath(name).read_bytes()[:exc.start]
        line, col = raw.count(b"\n") + 1, exc.start - (raw.rfind(b"\n") + 1) + 1
        raise ConfigError([Problem(f"the file is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} here; save it "
                                   "as UTF-8", (), name, line, col)]) from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError([Problem(f"cannot read the file: {exc}", (), name)]) from None
    return text


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _TooMany(Exception):
    """The composed YAML expands to more than MAX_VALUES values."""


class _Converter:
    """Turn composed nodes into plain data, recording marks and collecting problems."""

    def __init__(self, doc: Document, env: Mapping[str, str], problems: list[Problem]) -> None:
        self.doc, self.env, self.problems = doc, env, problems
        self.active: set[int] = set()  # the nodes being converted: an alias to one of them is a cycle
        #: A scalar's interpolated text, by node: its aliases share one string (59,049 aliases of a
        #: 100 kB value made as many copies: gigabytes from a small file), and its problems are said once.
        self.interpolated: dict[int, tuple[str, str | None]] = {}  # node -> (text, the empty variable in it)
        self.count = 0

    def problem(self, node: yaml.Node, path: Path, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(message, path, self.doc.file, line, col))

    def convert(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise _TooMany
        if len(path) > MAX_DEPTH:
            self.problem(node, path[:4], f"holds values nested more than {MAX_DEPTH} levels deep; a stack.yaml "
                         "needs a few levels")
            return None
        doc = self.doc
        doc.marks[path] = _mark(node)
        if node.tag not in _SAFE_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problem(node, path, f"the YAML tag {tag!r} is not allowed; stack.yaml takes plain values only")
            return None
        if id(node) in self.active:  # the alias's own place is lost in composing: point at its key
            line, col = doc.key_marks.get(path) or _mark(node)
            self.problems.append(Problem("this alias refers to a value that contains it (a YAML alias loop); "
                                         "repeat the settings instead", path, doc.file, line, col))
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            return self.mapping(node, path)
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.Node, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, "mapping keys must be plain scalars")
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":  # before constructing it: SafeConstructor cannot
                self.problem(key_node, path, "YAML merge keys (<<) are not supported; repeat the settings, "
                             "or quote '<<' if it is meant as a key")
                continue
            if _not_text(key_node.value):
                self.scalar(key_node, path, interpolate=False)  # says why, at the key
                continue
            odd = _odd_space(f"the key {key_node.value!a}", key_node.value)
            if odd is not None:  # `\xa0\xa0threads:` indented with pasted no-break spaces: a key nobody wrote
                self.problem(key_node, path, odd)
                continue
            key = self.scalar(key_node, path, interpolate=False)
            if key is None and key_node.tag != "tag:yaml.org,2002:null":  # refused, and said why (017)
                continue
            if isinstance(key, bool):  # YAML 1.1 reads on/off/yes/no as booleans; no key of a stack is one
                self.problem(key_node, (*path, key_node.value), f"the key {key_node.value!r} is read by YAML as the "
                             f"boolean {str(key).lower()}; write it in quotes, \"{key_node.value}\", to mean the word")
                continue
            key = key if isinstance(key, str | int) else str(key)
            child = (*path, key)
            if isinstance(key, str) and "${" in key.replace("$$", ""):  # left as text it would match nothing
                self.problem(key_node, child, f"the key {key!r} holds a ${{…}}, but keys are not interpolated "
                                              "(only values are): write the key itself")
                continue
            if isinstance(key, str) and not (path[:1] == ("pipeline",) and len(path) == 2):  # (not module:attr)
                self.glued_secret(key)
            if key not in out:
                self.doc.key_marks[child] = _mark(key_node)
            if key in out:
                first = self.doc.key_marks.get(child)
                self.problem(key_node, child, f"duplicate key {key!r}" + (
                    f" (first at line {first[0]}): remove one, or merge them" if first else ""))
                continue
            out[key] = self.convert(value_node, child)
        return out

    def glued_secret(self, key: str) -> None:
        """Hide the value of a secret written without a space after its colon (``{secret:…}``, one key to YAML).

        Whatever says the key is unknown (the stack's, a factory's, a store's) would print the secret in it.
        """
        name, colon, rest = key.partition(":")
        rest = rest.strip()
        if colon and len(rest) >= _SHORTEST_SECRET and secret_value(name.strip(), rest):
            self.doc.secrets.add(rest)

    def scalar(self, node: yaml.ScalarNode, path: Path, *, interpolate: bool = True) -> Any:
        # A secret's text is never quoted (problems are printed, logged and shown on the operator page),
        # nor what a constructor says of it (int() quotes the value it refused).
        hidden = is_secret(path, node.value)
        if _not_text(node.value):
            shown = "the value" if hidden else f"the value {node.value!a}"
            self.problem(node, path, f"{shown} holds a lone surrogate (\\ud800-\\udfff), "
                                     "which is not text: write the character itself, or its \\U escape")
            return None
        odd = _odd_space("the value" if hidden else f"the value {node.value!a}", node.value) \
            if interpolate and node.style is None else None  # (quoted, a value may hold one)
        if odd is not None:  # `threads:\xa04` is one word to YAML, not a key and its value
            self.problem(node, path, odd)
            return None
        try:
            value = _scalar(node)
        except Exception as exc:  # a date like 2024-13-45, !!bool maybe, !!int "": whatever the tag's
            # constructor raises for a value it does not fit (ValueError, KeyError, IndexError, AttributeError…)
            why = "" if hidden else (exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None) or (
                " ".join(str(exc).split()) if isinstance(exc, ValueError | OverflowError) else "")
            shown = "the value" if hidden else f"the value {node.value!r}"
            self.problem(node, path, f"cannot read {shown} as {node.tag.replace(_YAML, '!!')}"
                                     f"{': ' + why if why else ''}; quote it to keep it as text")
            return None
        if isinstance(value, bool) and node.value.lower() not in ("true", "false"):
            self.doc.words[path] = node.value  # YAML 1.1: yes, no, on and off are booleans too
        elif node.style is None and not isinstance(value, str | bool) and node.value not in ("null", "Null", "NULL"):
            self.doc.read_as[path] = _read_as(value, node.value, hidden=hidden)
        if isinstance(value, int) and not isinstance(value, bool) and node.style is None \
                and _OCTAL.fullmatch(node.value):  # YAML 1.1: a leading 0 makes the number octal (017 is 15)
            decimal = int(node.value.replace("_", ""), 10)
            self.problem(node, path, "the value is read by YAML as an octal number: quote it to keep it as text"
                         if hidden else f"{node.value} is read by YAML as the octal number {value}: write {value} "
                         f"for that, {decimal} without the leading 0, or quote it to keep it as text")
            return None
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:  # 59:59:… (base 60) gets this far
            self.problem(node, path, f"the number {node.value[:20]}… is far larger than any setting takes")
            return None
        if isinstance(value, int | float) and not isinstance(value, bool) and node.style is None \
                and ":" in node.value:  # YAML 1.1: 1:30 is the base-60 number 90 (ttl: 1:30, idle_timeout: 30:00)
            self.problem(node, path, "the value is read by YAML as a base-60 number: quote it to keep it as text"
                         if hidden else f"{node.value} is read by YAML as the base-60 number {value}: write {value} "
                         f"for that, or quote it ({node.value!r}) to keep it as text")
            return None
        if interpolate and isinstance(value, str) and "$" in value:
            done = self.interpolated.get(id(node))
            if done is None:
                text = _interpolate(value, path, node, self.doc, self.env, self.problems)
                done = self.interpolated[id(node)] = (text, self.doc.empty.get(path))
            elif done[1] is not None:  # an alias of a value from an empty variable: said at each use
                self.doc.empty[path] = done[1]
            value = done[0]
        return value


_YAML = "tag:yaml.org,2002:"
#: A secret variable's value shorter than this is not masked in problems: it would mask words of the message.
_SHORTEST_SECRET = 4
_OCTAL = re.compile(r"[-+]?0[0-7_]+")  # what YAML 1.1 (PyYAML) reads as an octal int
#: An integer of more bits than this (about 4300 digits, Python's limit for printing one) is no setting.
_MAX_INT_BITS = 14_000


#: What looks like a space but is none to YAML: a no-break space, the other Unicode spaces, zero-width ones.
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200d\u202f\u205f\u2060\u3000\ufeff]")


def _odd_space(shown: str, value: str) -> str | None:
    """Why ``value`` (a key, or a value not in quotes) is refused when it holds such a space, else None."""
    found = _ODD_SPACE.search(value)
    if found is None:
        return None
    char = found.group()
    return (f"{shown} holds U+{ord(char):04X} {unicodedata.name(char, 'SPACE')}, which YAML does not read as a space "
            "(pasted from a web page or a chat?): retype it as plain spaces, or delete it")


def _read_as(value: Any, written: str, *, hidden: bool) -> str:
    """The hint for a plain value YAML read as something other than text (``hidden``: a secret's, not shown).

    A refusal of ``versions: [2.0]`` or ``url_prefix:`` said only "Input should be a
    valid string (got 2.0)" or "(got None)", though the operator wrote text.
    """
    if not written:
        return ("; the value is empty, which YAML reads as null (no value): write '' for empty text, or leave the "
                "key out for its default")
    what = "null (no value)" if value is None else "a date and time" if isinstance(value, datetime.datetime) \
        else "a date" if isinstance(value, datetime.date) else "a number"
    if hidden:
        return f"; YAML reads the value as {what}: quote it to keep it as text"
    return f"; YAML reads {written} as {what}: quote it ('{written}') to keep it as text"


def _not_text(value: str) -> bool:
    """Whether ``value`` holds a lone surrogate (a ``"\\ud800"`` escape): it cannot be printed, sent or stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _scalar(node: yaml.Node) -> Any:
    # A fresh constructor per scalar: SafeConstructor caches every node it built, which would leak
    # a little memory on every reload and check.
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _interpolate(
    value: str, path: Path, node: yaml.Node, doc: Document, env: Mapping[str, str], problems: list[Problem]
) -> str:
    def refuse(message: str) -> str:
        line, col = _mark(node)
        problems.append(Problem(message, path, doc.file, line, col))
        return ""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        name, default = match.groups()
        if name is None:
            return refuse(_unsupported(value, match.start(), hide=is_secret(path, value)))
        if default is not None and "${" in default.replace("$$", ""):  # `$${` is a literal `${`
            return refuse(f"{text!r}: a default may not contain another ${{...}}; "
                          "write the default as plain text")
        if name in env and (env[name] != "" or default is None):
            if env[name] == "" and match.group(0) == value:
                doc.empty[path] = name
            if _not_text(env[name]):  # bytes that are not UTF-8 (os.environ keeps them as lone surrogates)
                return refuse(f"environment variable {name} holds bytes that are not UTF-8 text; set it to text")
            if len(env[name]) >= _SHORTEST_SECRET and secret_name(name):
                doc.secrets.add(env[name])
            return env[name]
        if default is not None:
            return default.replace("$$", "$")  # as in the rest of the value
        if secret:  # a default written in the file would be no secret
            return refuse(f"environment variable {name} is not set and has no default: set it in the environment "
                          "or in the .env file beside the configuration (make one with: python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(48))')")
        return refuse(f"environment variable {name} is not set and has no default: set it in the environment or "
                      f"in the .env file beside the configuration, or write ${{{name}:-default}}")

    secret = is_secret(path, value)
    for bare in _BARE.finditer(value):
        name = bare.group(1)
        # Taken as text, $JWT_SECRET would be the secret itself: a key anyone can read in the docs.
        if name is not None and (value.strip() == bare.group(0) or name in env):
            return refuse(f"${name} is not read from the environment (only ${{{name}}} is): write ${{{name}}}"
                          + ("" if secret else f", or $${name} for the text ${name}"))
    return _TOKEN.sub(replace, value)


def _unsupported(value: str, start: int, hide: bool = False) -> str:
    """The message for a ``${`` that is neither ``${NAME}`` nor ``${NAME:-default}``.

    ``hide``: the value is a secret's, so a default written in it (a secret too) is not shown.
    """
    rest = value[start:]
    forms = "the forms are ${NAME} and ${NAME:-default}; $$ writes a literal $"
    near = _NEAR.match(rest)
    if near is not None and "+" not in near.group(2):
        name, operator, default = near.groups()
        if hide:
            default = "…"
        # ${NAME:?message} asks for an error when NAME is missing: ${NAME} already is one.
        better = f"${{{name}}}" if "?" in operator else f"${{{name}:-{default}}}"
        written = f"${{{name}{operator}{default}}}" if hide else near.group(0)
        return f"{written!r} is not an interpolation stack.yaml understands; write {better} ({forms})"
    if hide:
        return f"this secret's ${{...}} is not an interpolation stack.yaml understands ({forms})"
    close = rest.find("}")
    if close < 0:
        shown = rest if len(rest) <= 40 else rest[:37] + "..."
        return f"{shown!r} opens ${{ but never closes it ({forms})"
    return f"{rest[:close + 1]!r} is not an interpolation stack.yaml understands ({forms})"
