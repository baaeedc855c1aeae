"""JSON request bodies, decoded with bounded depth and in short pieces.

`json.loads` is one C call that holds the GIL until it is done: on a 20 MB
body, a second during which every other thread, the REST event loop
included, stands still. Running it on a thread pool does not help. `decode`
therefore parses a large body piece by piece, at most `CHUNK_CHARS`
characters per `json.loads` call, so the other threads run in between.

First it measures the nesting depth with NumPy (brackets outside strings), so
that nothing recursive (the C scanner, this module's walk, the code that
turns nested lists into arrays) ever goes deeper than `max_depth`: Python's
own json raises RecursionError deep down instead.

With `numeric_rows`, the elements of a large array that are nested lists of
numbers (the rows of a tensor of rank 3 or more, e.g. images) come back as
NumPy arrays, made as soon as each piece is parsed: a million small lists
would otherwise stay alive until the end, cost tens of bytes per number, and
make the garbage collector stop every thread for a long pause.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np

CHUNK_CHARS = 1 << 16

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_scan_value = json.scanner.make_scanner(json.JSONDecoder())
_BRACKETS = np.zeros(256, np.int8)
_BRACKETS[[ord("["), ord("{")]] = 1
_BRACKETS[[ord("]"), ord("}")]] = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


class TooDeep(ValueError):
    """A body nested deeper than the limit."""


class _Structure:
    """Where the brackets outside strings are (in characters), the depth after each,
    and where the strings' quotes are."""

    def __init__(self, data: bytes, text: str):
        raw = np.frombuffer(data, np.uint8)
        quotes = np.flatnonzero(raw == _QUOTE)
        backslashes = np.flatnonzero(raw == _BACKSLASH)
        if quotes.size and backslashes.size:
            quotes = quotes[~_escaped(quotes, backslashes)]
        brackets = np.flatnonzero(_BRACKETS[raw])
        # A bracket is inside a string when an odd number of quotes precede it.
        brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
        steps = _BRACKETS[raw[brackets]]
        if not text.isascii():  # byte offsets to character offsets: skip UTF-8 continuation bytes
            continuation = np.flatnonzero((raw & 0xC0) == 0x80)
            brackets = brackets - np.searchsorted(continuation, brackets)
            quotes = quotes - np.searchsorted(continuation, quotes)
        self.positions = brackets
        self.quotes = quotes
        self.depths = np.cumsum(steps, dtype=np.int32)
        self.max_depth = int(self.depths.max()) if self.depths.size else 0
        self.balanced = not self.depths.size or (int(self.depths.min()) >= 0 and int(self.depths[-1]) == 0)

    def in_string(self, position: int) -> bool:
        return bool(np.searchsorted(self.quotes, position) % 2)

    def opening_quote(self, position: int) -> int:
        """The quote opening the string that holds `position`."""
        return int(self.quotes[np.searchsorted(self.quotes, position) - 1])

    def index(self, position: int) -> int:
        """The index of the first bracket at or after `position`."""
        return int(np.searchsorted(self.positions, position))


def _escaped(quotes: np.ndarray, backslashes: np.ndarray) -> np.ndarray:
    """Which quotes follow an odd run of backslashes."""
    starts_run = np.ones(backslashes.size, bool)
    starts_run[1:] = np.diff(backslashes) != 1
    run_start = backslashes[np.maximum.accumulate(np.where(starts_run, np.arange(backslashes.size), 0))]
    last = np.searchsorted(backslashes, quotes) - 1
    safe = np.maximum(last, 0)
    adjacent = (last >= 0) & (backslashes[safe] == quotes - 1)
    return adjacent & ((quotes - run_start[safe]) % 2 == 1)


def decode(data: bytes, max_depth: int, check: Callable[[], None] | None = None,
           numeric_rows: bool = False):
    """The JSON value of `data`. Raises TooDeep, json.JSONDecodeError or
    UnicodeDecodeError; `check` runs between pieces (it may raise to give up)."""
    encoding = json.detect_encoding(data)  # as json.loads(bytes): UTF-8, with or without BOM, UTF-16, UTF-32
    text = data.decode(encoding, "surrogatepass")
    if encoding != "utf-8":
        data = text.encode("utf-8", "surrogatepass")
    structure = _Structure(data, text)
    if structure.max_depth > max_depth:
        raise TooDeep(f"JSON nested {structure.max_depth} levels deep; at most {max_depth} are allowed")
    if len(text) <= CHUNK_CHARS or not structure.balanced:
        return json.loads(text)  # small, or invalid: json says where
    return _Walk(text, structure, check or (lambda: None), numeric_rows).document()


class _Walk:
    """Descends only into containers larger than a chunk; everything else is parsed
    by json.loads in runs of whole elements of at most CHUNK_CHARS characters."""

    def __init__(self, text: str, structure: _Structure, check: Callable[[], None], numeric_rows: bool):
        self.text, self.structure, self.check, self.numeric_rows = text, structure, check, numeric_rows

    def error(self, message: str, position: int):
        return json.JSONDecodeError(message, self.text, position)

    def skip(self, position: int) -> int:
        return _WHITESPACE.match(self.text, position).end()

    def document(self):
        start = self.skip(0)
        value, end = self.value(start)
        end = self.skip(end)
        if end != len(self.text):
            raise self.error("Extra data", end)
        return value

    def value(self, position: int):
        if self.text.startswith(("[", "{"), position):
            return self.container(position)
        try:
            return _scan_value(self.text, position)
        except StopIteration:
            raise self.error("Expecting value", position) from None

    def loads(self, start: int, end: int, is_object: bool):
        """Elements (or members) start..end of a container, as a list (or dict)."""
        piece = self.text[start:end]
        if not piece.strip():
            raise self.error("Expecting value" if not is_object else "Expecting property name enclosed in "
                             "double quotes", start)
        try:
            part = json.loads(("{" if is_object else "[") + piece + ("}" if is_object else "]"))
        except json.JSONDecodeError as error:
            raise self.error(error.msg, start + error.pos - 1) from None
        if self.numeric_rows and not is_object:
            part = [_numeric_row(element) for element in part]
        return part

    def container(self, start: int):
        is_object = self.text[start] == "{"
        closer = "}" if is_object else "]"
        first = self.structure.index(start)
        if first >= len(self.structure.positions) or self.structure.positions[first] != start:
            raise self.error("Invalid JSON", start)  # only malformed text can mislead the bracket scan
        depth = int(self.structure.depths[first])  # inside this container
        result = {} if is_object else []
        position, expecting = self.skip(start + 1), False  # expecting: an element must follow (after a comma)
        if self.text.startswith(closer, position):
            return result, position + 1
        while True:
            self.check()
            window = position + CHUNK_CHARS
            low, high = self.structure.index(position), self.structure.index(window)
            depths = self.structure.depths[low:high]
            closing = np.flatnonzero(depths < depth)
            if closing.size:  # the container ends within the window: the rest in one piece
                end = int(self.structure.positions[low + closing[0]])
                if self.text[end] != closer:
                    raise self.error("Expecting ',' delimiter", end)
                if end > position or expecting:
                    _add(result, self.loads(position, end, is_object))
                return result, end + 1
            cut = self.last_comma(position, window, low, depth)
            if cut is not None:
                _add(result, self.loads(position, cut, is_object))
                position, expecting = self.skip(cut + 1), True
                continue
            # The next element alone is larger than a chunk.
            if is_object:
                try:
                    key, after = _scan_value(self.text, position)
                except StopIteration:
                    key, after = None, position
                if not isinstance(key, str):
                    raise self.error("Expecting property name enclosed in double quotes", position)
                after = self.skip(after)
                if not self.text.startswith(":", after):
                    raise self.error("Expecting ':' delimiter", after)
                value, after = self.value(self.skip(after + 1))
                result[key] = value
            else:
                value, after = self.value(position)
                result.append(value)
            after = self.skip(after)
            if self.text.startswith(closer, after):
                return result, after + 1
            if not self.text.startswith(",", after):
                raise self.error("Expecting ',' delimiter", after)
            position, expecting = self.skip(after + 1), True

    def last_comma(self, start: int, end: int, low: int, depth: int) -> int | None:
        """The last comma of this container (at `depth`, outside strings) in start..end."""
        structure = self.structure
        while end > start:
            comma = self.text.rfind(",", start, end)
            if comma < 0:
                return None
            if structure.in_string(comma):
                end = structure.opening_quote(comma)
                continue
            before = structure.index(comma) - 1  # the last bracket before the comma
            if before < low or structure.depths[before] == depth:
                return comma
            # Inside a nested element: look before the bracket that opened it.
            level = np.flatnonzero(structure.depths[low:before + 1] == depth)
            end = int(structure.positions[low + level[-1] + 1]) if level.size else int(structure.positions[low])
        return None


def _numeric_row(element):
    """Nested lists of numbers (rectangular) as an array; anything else as it is. A flat
    list stays a list: one object either way, and smaller than an array when short."""
    if not (isinstance(element, list) and element and isinstance(element[0], list)):
        return element
    try:
        array = np.array(element)
    except (ValueError, TypeError, OverflowError):  # ragged: left for the caller to refuse
        return element
    return array if array.dtype.kind in "biuf" else element


def _add(container: list | dict, part: list | dict) -> None:
    if isinstance(container, dict):
        container.update(part)
    else:
        container.extend(part)
