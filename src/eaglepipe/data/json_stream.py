"""Streaming readers for JSON arrays (tolerating truncation and malformed elements) and JSON Lines.

Both accept a leading UTF-8 byte-order mark.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\r\n"


@dataclass
class StreamReport:
    """What a streaming read found besides the good records."""

    complete_records: int = 0
    # set when the file ends inside an element or before the closing ']': where, why, and the lost text
    truncated_at_char: int | None = None
    truncation_reason: str | None = None
    truncated_text: str | None = None
    # malformed records are yielded as their raw text (value None) for normalize to reject
    malformed_lines: int = 0
    malformed_elements: int = 0

    @property
    def truncated(self) -> bool:
        return self.truncated_at_char is not None


def _skip(buf: str, pos: int, chars: str) -> int:
    while pos < len(buf) and buf[pos] in chars:
        pos += 1
    return pos


class _Window:
    """The unread part of a text file: `text`, whose first character is at `offset` in the file."""

    def __init__(self, f: TextIO):
        self.f = f
        self.text = ""
        self.offset = 0
        self.eof = False

    def grow(self, chars: int) -> None:
        more = self.f.read(chars)
        self.eof = len(more) < chars
        self.text += more

    def drop(self, pos: int) -> None:
        """Forget the text before `pos` (what was at `pos` is now at 0)."""
        self.text = self.text[pos:]
        self.offset += pos


def _same_shape(value: Any, like: Any) -> bool:
    """Could `value` be a sibling of the array element `like`? (Objects must share a key.)"""
    if like is None:
        return isinstance(value, (dict, list))
    if isinstance(like, dict):
        return isinstance(value, dict) and bool(value.keys() & like.keys())
    return type(value) is type(like)


def _resync(text: str, start: int, like: Any) -> tuple[int, int] | None:
    """The first element boundary after `start`: `(comma, next_element)` positions, or None.

    A boundary is a ',' followed by a whole value shaped like the array's elements and then ',' or ']'.
    The shape test keeps a nested object (e.g. one turn of a conversation) from passing for an element.
    """
    decoder = json.JSONDecoder()
    comma = text.find(",", start)
    while comma >= 0:
        nxt = _skip(text, comma + 1, _WHITESPACE)
        try:
            value, end = decoder.raw_decode(text, nxt)
        except json.JSONDecodeError:
            value, end = None, -1
        after = _skip(text, end, _WHITESPACE) if end >= 0 else -1
        if 0 <= after < len(text) and text[after] in ",]" and _same_shape(value, like):
            return comma, nxt
        comma = text.find(",", comma + 1)
    return None


def _after_bad_element(w: _Window, pos: int, err: json.JSONDecodeError, like: Any,
                       report: StreamReport) -> tuple[str | None, int | None]:
    """Handle the element at `pos` that does not parse, with the rest of the file in `w`.

    Returns the malformed element's text (None when the file is truncated inside it) and the position
    where reading resumes (None: nothing follows). What it finds is counted in `report`.
    """
    boundary = _resync(w.text, max(err.pos, pos + 1), like)
    if boundary is not None:
        comma, resume = boundary
        report.malformed_elements += 1
        return w.text[pos:comma].rstrip(), resume
    tail = w.text[pos:].rstrip()
    if tail.endswith("]") and len(tail) > 1:  # the array is closed, so its last element is malformed
        report.malformed_elements += 1
        return tail[:-1].rstrip(), None
    index = report.complete_records + report.malformed_elements
    report.truncated_at_char = w.offset + pos
    report.truncated_text = w.text[pos:]
    report.truncation_reason = f"element {index} is incomplete: {err.msg}" if tail else \
        "the array is not closed with ']'"
    return None, None


def iter_json_array(path: str | Path, report: StreamReport) -> Iterator[tuple[Any | None, str]]:
    """Yield `(value, original_text)` for each element of a top-level JSON array, reading in chunks.

    An element that fails to parse in the middle of the file is yielded as `(None, its_text)` and counted;
    reading resumes at the next element boundary. A file that ends inside an element (or before the
    closing ']') stops the iteration: `report` records where, why and the lost text instead of raising.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        w = _Window(f)
        w.grow(CHUNK_CHARS)
        pos = _skip(w.text, 0, _WHITESPACE)
        if pos >= len(w.text) or w.text[pos] != "[":
            raise ValueError(f"{path} is not a JSON array (it does not start with '[')")
        pos += 1
        last_good: Any = None
        need = CHUNK_CHARS  # grows geometrically while one element spans the window, so reading stays linear
        while True:
            pos = _skip(w.text, pos, _WHITESPACE + ",")
            if pos >= len(w.text) and not w.eof:
                w.grow(need)
                continue
            if pos < len(w.text) and w.text[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(w.text, pos)
                # a value touching the end of the window may continue in the next chunk (e.g. a number)
                if end >= len(w.text) and not w.eof:
                    raise json.JSONDecodeError("value reaches the end of the buffer", w.text, end)
            except json.JSONDecodeError as e:
                if not w.eof:
                    w.grow(need)
                    need *= 2
                    continue
                bad, resume = _after_bad_element(w, pos, e, last_good, report)
                if bad is not None:
                    yield None, bad
                if resume is None:
                    return
                pos = resume
                continue
            need = CHUNK_CHARS
            report.complete_records += 1
            last_good = value
            yield value, w.text[pos:end]
            pos = end
            if pos > max(CHUNK_CHARS, len(w.text) // 2):
                w.drop(pos)
                pos = 0


def iter_json_lines(path: str | Path, report: StreamReport) -> Iterator[tuple[Any | None, str]]:
    """Yield `(value, line)` per non-blank line; a malformed line yields `(None, line)` and is counted."""
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            text = line.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                report.malformed_lines += 1
                yield None, text
                continue
            report.complete_records += 1
            yield value, text
