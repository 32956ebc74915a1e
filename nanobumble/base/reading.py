"""One door in: the readers every JSON and YAML file goes through, and the rule
every number a user gives is held to.

    read_json(path)             config.json, adapter_config.json, trainer_state.json, meta.json, ...
    read_yaml(path)             a --yaml_config file, training_args.yaml
    read_bytes / read_text      a file with a size bound of its own (tokenizer.json)
    loads(text)                 JSON already in memory (a JSON Lines record)
    Number                      the values a numeric key accepts (the config table, a LoRA rank)
    cut(value)                  a value as an error message shows it: at most 200 characters

Before a file is trusted: its size is checked before it is read (and the read
stops at the bound, for a file whose size the directory does not know), it must
be UTF-8, and what it holds may nest at most MAX_DEPTH levels (Python's parsers
run out of stack a few hundred levels down: a RecursionError, not an error
naming the file). YAML aliases (*name) are refused: a config is key: value, and
a few aliases of aliases make a 300-byte file expand to hundreds of millions of
items. Every problem is one line naming the file, raised as the caller's error
class (ConfigError, DataError, UserError, ...).

This module imports nothing of the package but errors.py, so every layer can use it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
import stat
from dataclasses import dataclass
from typing import Any

import yaml

from nanobumble.base.errors import ConfigError, UserError

MB = 2**20
MAX_BYTES = 1 * MB  # a config or metadata file; bigger ones (tokenizer.json) name their own bound
MAX_DEPTH = 100  # nesting levels of a JSON or YAML value
SHOWN = 200  # characters of a value an error message shows
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"

_repr = reprlib.Repr()  # a bounded repr: a huge value costs no more than a small one to show
_repr.maxlevel, _repr.maxstring, _repr.maxlong, _repr.maxother = 3, SHOWN, SHOWN, SHOWN
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def cut(value: object, limit: int = SHOWN) -> str:
    """value for an error message, at most `limit` characters: a str as it is
    (cut(repr(s)) to quote it), anything else by its repr."""
    text = value if isinstance(value, str) else _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(n: int) -> str:
    return f"{n / MB:,.1f} MB" if n >= MB else f"{n:,} bytes"


# ---------------------------------------------------------------------------
# Files


def read_bytes(path: str, max_bytes: int, error: type[Exception] = UserError) -> bytes:
    """The file's bytes; a missing file, a directory, a special file, or one over
    max_bytes is an `error` naming it."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{path}: is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
            raise error(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise error(f"{path}: {_size(info.st_size)}, more than the {_size(max_bytes)} such a file may be")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # bounded even if the file grew since stat
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {_size(max_bytes)} such a file may be")
    return data


def decode(data: bytes, source: str, error: type[Exception] = UserError) -> str:
    """UTF-8 bytes -> text (a leading byte order mark dropped), or an `error` naming source."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_text(path: str, max_bytes: int, error: type[Exception] = UserError) -> str:
    return decode(read_bytes(path, max_bytes, error), path, error)


def depth_problem(value: object) -> str | None:
    """TOO_DEEP when value (parsed JSON or YAML) nests more than MAX_DEPTH lists
    and mappings, else None. Walks without recursion, stopping at the first too deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            return TOO_DEEP
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return None


def loads(text: str) -> Any:
    """json.loads, at most MAX_DEPTH levels deep: every problem is a ValueError
    (json.JSONDecodeError when the text is not JSON)."""
    try:
        value = json.loads(text)
    except RecursionError:  # the C parser gives up some hundreds of levels down
        raise ValueError(TOO_DEEP) from None
    problem = depth_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def parse_json(text: str, source: str, error: type[Exception] = UserError) -> Any:
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({cut(str(e))})") from None
    except ValueError as e:  # too deep, or an integer of more digits than Python converts
        raise error(f"{source}: not valid JSON ({cut(str(e))})") from None


def read_json(path: str, max_bytes: int = MAX_BYTES, error: type[Exception] = UserError) -> Any:
    return parse_json(read_text(path, max_bytes, error), path, error)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing aliases and nesting deeper than MAX_DEPTH."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "an alias (*name): nanobumble's YAML files take none (a few aliases of aliases "
                "expand a small file into gigabytes); write the value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def _nested(self, compose, anchor):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, TOO_DEEP, self.peek_event().start_mark)
            return compose(anchor)
        finally:
            self.depth -= 1

    def compose_sequence_node(self, anchor):
        return self._nested(super().compose_sequence_node, anchor)

    def compose_mapping_node(self, anchor):
        return self._nested(super().compose_mapping_node, anchor)


def parse_yaml(text: str, source: str, error: type[Exception] = UserError) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data, no Python objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise error(f"{source}: not valid YAML ({where}{cut(' '.join(str(e.problem).split()))})") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int of too many digits
        raise error(f"{source}: not valid YAML ({cut(' '.join(str(e).split()))})") from None


def read_yaml(path: str, max_bytes: int = MAX_BYTES, error: type[Exception] = UserError) -> Any:
    return parse_yaml(read_text(path, max_bytes, error), path, error)


# ---------------------------------------------------------------------------
# Numbers


def _bound(x: float) -> str:
    """A bound as a message shows it: 2^22 for a large power of two, 100000 rather than 1e+05."""
    if float(x).is_integer() and abs(x) < 1e15:
        x = int(x)
        return f"2^{x.bit_length() - 1}" if x >= 2**16 and x & (x - 1) == 0 else str(x)
    return f"{x:g}"


@dataclass(frozen=True)
class Number:
    """The values a numeric key accepts: a finite number (an int when `integer`)
    from low to high, each end included unless low_open / high_open. `note` says
    what a special value means; it is shown with the error."""
    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def requirement(self, value: object) -> str | None:
        """What value fails ("an integer", "at least 1", ...), or None when it is accepted."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return kind
        # NaN fails every comparison, so it is caught here, not below (an int is finite, of any size)
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            interval = self.interval()
            return f"a finite number {interval}" if interval else "a finite number"
        if value < self.low or (self.low_open and value == self.low):
            return self._low_side()
        if value > self.high or (self.high_open and value == self.high):
            return f"< {_bound(self.high)}" if self.high_open else \
                f"at most {_bound(self.high)}" if self.integer else f"<= {_bound(self.high)}"
        return None

    def _low_side(self) -> str:
        if self.low_open:
            return f"> {_bound(self.low)}"
        return f"at least {_bound(self.low)}" if self.integer and self.low >= 1 else f">= {_bound(self.low)}"

    def interval(self) -> str:
        """"in [0, 1)", "> 0", ... or "" for any finite number."""
        low, high = math.isfinite(self.low), math.isfinite(self.high)
        if low and high:
            return (f"in {'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if low:
            return self._low_side()
        if high:
            return f"{'<' if self.high_open else '<='} {_bound(self.high)}"
        return ""

    def problem(self, key: str, value: object) -> str | None:
        """"key 'X' must be ..., got V" when value is refused, else None."""
        requirement = self.requirement(value)
        if requirement is None:
            return None
        note = f" ({self.note})" if self.note else ""
        shown = cut(repr(value)) if isinstance(value, str) else cut(value)
        return f"key '{key}' must be {requirement}{note}, got {shown}"

    def check(self, key: str, value: object, error: type[Exception] = ConfigError) -> None:
        problem = self.problem(key, value)
        if problem:
            raise error(problem)
