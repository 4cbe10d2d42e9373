"""Parsing and applying `datasets`-style split slices: `train`, `train[:200000]`, `train[10%:20%]`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[\s*([^:\]]*)\s*:\s*([^\]]*)\s*\])?\s*$")
_BOUND = re.compile(r"^(-?\d+)(%?)$")


@dataclass(frozen=True)
class Bound:
    """One end of a slice: an absolute row index or a percentage; negative counts from the end."""

    value: int
    percent: bool

    def resolve(self, total: int) -> int:
        """The absolute index for a split of `total` rows, clipped to [0, total]."""
        idx = round(self.value * total / 100) if self.percent else self.value
        if idx < 0:
            idx += total
        return min(max(idx, 0), total)


@dataclass(frozen=True)
class SplitSpec:
    """A split name with an optional `[start:stop]` slice."""

    name: str
    start: Optional[Bound] = None
    stop: Optional[Bound] = None

    @property
    def needs_total(self) -> bool:
        """Whether the slice can only be resolved once the split's length is known."""
        return any(b is not None and (b.percent or b.value < 0) for b in (self.start, self.stop))

    def bounds(self, total: int) -> tuple[int, int]:
        """Absolute `[start, stop)` for a split of `total` rows."""
        start = self.start.resolve(total) if self.start else 0
        stop = self.stop.resolve(total) if self.stop else total
        return start, max(start, stop)


def _bound(text: str, spec: str) -> Optional[Bound]:
    text = text.strip()
    if not text:
        return None
    m = _BOUND.match(text)
    if not m:
        raise ValueError(f"split {spec!r}: slice bound {text!r} must be an integer or a percentage like 10%")
    value, pct = int(m.group(1)), bool(m.group(2))
    if pct and not -100 <= value <= 100:
        raise ValueError(f"split {spec!r}: percentage {text!r} must be within -100%..100%")
    return Bound(value, pct)


def parse_split(spec: str) -> SplitSpec:
    """Parse `name`, `name[a:b]`, `name[:N]`, `name[a%:b%]` (bounds may be empty or negative)."""
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"split {spec!r} must look like train, train[:1000] or train[10%:20%]")
    return SplitSpec(m.group(1), _bound(m.group(2) or "", spec), _bound(m.group(3) or "", spec))
