"""Config text made values: YAML read strictly (every scalar stays text, repeated keys and alias bombs refused),
typed by the schema's declared types (`coerce`), and quoted in error messages by a bounded prefix (`shown`)."""

from __future__ import annotations

import contextlib
import math
import reprlib
import typing

import yaml

from .errors import ConfigError

# A config holds ~100 values; an alias graph that expands past this many nodes is an alias bomb
# (10 lines of nested aliases expand to ~10^9 values), refused before anything walks or prints it.
MAX_EXPANDED_NODES = 100_000
QUOTE_CHARS = 80  # error messages quote at most this much of a value
MAX_CONFIG_BYTES = 1 << 20  # a config file is refused by its size before it is read (they are a few KiB)


def shown(value) -> str:
    """repr(value) cut to QUOTE_CHARS, without rendering more of a nested value than that."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 8, 8, 8
    short.maxstring = short.maxother = QUOTE_CHARS
    text = short.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


class _YamlRefused(yaml.YAMLError):
    """A YAML document that parses but is refused: a repeated key, an alias bomb."""


def _expanded_size(node, sizes: dict) -> int:
    """Nodes in the tree the alias graph `node` expands to (memoised per node: linear in the graph)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise _YamlRefused("a YAML alias refers to itself (a recursive value); write the value out")
        return sizes[id(node)]
    sizes[id(node)] = None  # in progress: meeting it again is a cycle
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for item in child if isinstance(child, tuple) else (child,):
            total += _expanded_size(item, sizes)
            if total > MAX_EXPANDED_NODES:
                raise _YamlRefused(
                    f"YAML aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?); "
                    "write the config without nested aliases"
                )
    sizes[id(node)] = total
    return total


class _StrictLoader(yaml.BaseLoader):
    """BaseLoader that refuses repeated keys (at any level) and alias graphs that expand too far."""

    def construct_document(self, node):
        _expanded_size(node, {})
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            if key in first_line:
                raise _YamlRefused(
                    f"duplicate key '{shown(key)[1:-1]}' at line {key_node.start_mark.line + 1} "
                    f"(first at line {first_line[key]}); keep one of them"
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text: str, where: str):
    """YAML with every scalar kept as text (BaseLoader): the schema, not YAML 1.1's guesses, decides
    types, so `1e-3` is a number, `on` stays the string 'on' and `2024` can be a name. A repeated key
    or an alias bomb is an error, not a silent last-wins or minutes of expansion."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _YamlRefused as err:
        raise ConfigError(f"{where}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply for a config; write sections one level deep") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at} ({problem[:QUOTE_CHARS]}); fix the YAML") from None


class Raw(str):
    """An override's text, parsed only once the declared type of its key is known."""


INT_LIMIT = 2**63  # torch and numpy take 64-bit integers
TRUE_WORDS, FALSE_WORDS = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _number(value):
    """A string read as an int, else a float (unchanged when neither takes it); other values as they are."""
    for read in (int, float) if isinstance(value, str) else ():
        with contextlib.suppress(ValueError):
            return read(value.strip())
    return value


def coerce(value, tp, where: str):
    """Convert a value (text from YAML or an override, or already typed) to the annotated type."""
    if isinstance(value, Raw):
        if tp is str:
            return str(value)
        value = read_yaml(value, where)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(
                f"{where}: expected a list of {len(args)} numbers, got {shown(value)}; "
                f"write it as [{', '.join('x' for _ in args)}]"
            )
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError(f"{where}: expected true/false, got {shown(value)}; write true or false")
    if tp is int:
        given, value = value, _number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}; write a whole number such as 8")
        if not -INT_LIMIT < value < INT_LIMIT:
            raise ConfigError(
                f"{where}: {shown(given)} is out of range; write a whole number between -2^63 and 2^63 (e.g. 8)"
            )
        return value
    if tp is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}; write a number such as 0.3 or 1e-3")
        try:
            value = float(value)
        except OverflowError:  # an integer past float's range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {shown(value)}; write a finite number")
        return value
    if tp is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {shown(value)}; write plain text")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error
