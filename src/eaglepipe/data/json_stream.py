"""Streaming readers for JSON arrays (tolerating truncation) and JSON Lines (tolerating malformed lines)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\r\n"


@dataclass
class StreamReport:
    """What a streaming read found besides the good records."""

    complete_records: int = 0
    # set when the array ends early: where, and why
    truncated_at_char: int | None = None
    truncation_reason: str | None = None
    malformed_lines: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.truncated_at_char is not None


def _skip(buf: str, pos: int, chars: str) -> int:
    while pos < len(buf) and buf[pos] in chars:
        pos += 1
    return pos


def iter_json_array(path: str | Path, report: StreamReport) -> Iterator[tuple[Any, str]]:
    """Yield `(value, original_text)` for each element of a top-level JSON array, reading in chunks.

    A file that ends (or breaks) mid-element stops the iteration: every complete element before it is
    yielded and `report` records the position and cause instead of raising.
    """
    decoder = json.JSONDecoder()
    consumed = 0  # chars dropped from the front of buf
    with open(path, encoding="utf-8") as f:
        buf = f.read(CHUNK_CHARS)
        eof = len(buf) < CHUNK_CHARS
        pos = _skip(buf, 0, _WHITESPACE)
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path} is not a JSON array (it does not start with '[')")
        pos += 1
        while True:
            pos = _skip(buf, pos, _WHITESPACE + ",")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
                # a value touching the end of the buffer may continue in the next chunk (e.g. a number)
                if end >= len(buf) and not eof:
                    raise json.JSONDecodeError("value reaches the end of the buffer", buf, end)
            except json.JSONDecodeError as e:
                if not eof:
                    buf = buf[pos:]
                    consumed += pos
                    pos = 0
                    more = f.read(CHUNK_CHARS)
                    eof = len(more) < CHUNK_CHARS
                    buf += more
                    continue
                if pos >= len(buf):
                    report.truncation_reason = "the array is not closed with ']'"
                else:
                    report.truncation_reason = f"element {report.complete_records} is incomplete or malformed: {e.msg}"
                report.truncated_at_char = consumed + pos
                return
            report.complete_records += 1
            yield value, buf[pos:end]
            pos = end
            if pos > CHUNK_CHARS:
                buf = buf[pos:]
                consumed += pos
                pos = 0


def iter_json_lines(path: str | Path, report: StreamReport) -> Iterator[tuple[Any | None, str]]:
    """Yield `(value, line)` per non-blank line; a malformed line yields `(None, line)` and is counted."""
    with open(path, encoding="utf-8") as f:
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
