"""Where the engine's worker thread spends its time, and how full its decode batches are.

The counters answer "why is this run slower than the benchmark": a low mean batch means too few requests in
flight; a large host share means Python bookkeeping (stop rules, detokenisation, callbacks) between GPU steps;
a large prefill share means long prompts (what prefix reuse saved shows in `prefill_reused_tokens`). Times are
wall-clock seconds on the worker thread; the GPU phases end in a host sync (sampled tokens are read back), so
they include the GPU's work.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

PHASES = ("prefill", "decode", "host", "speculative", "idle")  # each has a `<phase>_seconds` counter


@dataclass
class EngineStats:
    """Cumulative counters of one Engine (thread-safe snapshots via `snapshot`)."""

    prefill_forwards: int = 0
    prefill_tokens: int = 0  # prompt tokens computed
    prefill_reused_tokens: int = 0  # prompt tokens whose K/V a cached slot already held
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_row_steps: int = 0  # sum over decode steps of the rows decoded
    decode_seconds: float = 0.0
    host_seconds: float = 0.0  # stop rules, detokenisation, streaming callbacks, slot release
    speculative_seconds: float = 0.0
    idle_seconds: float = 0.0
    requests_finished: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        """Add to counters by name."""
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, Any]:
        """The counters plus the figures `derived` from them."""
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out.update(derived(out))
        for phase in PHASES:
            out[f"{phase}_seconds"] = round(out[f"{phase}_seconds"], 3)
        return out


def derived(counters: dict[str, Any]) -> dict[str, float]:
    """From EngineStats counters (totals, or the difference of two snapshots): the mean decode batch and each
    phase's share of the worker's time."""
    total = sum(counters[f"{p}_seconds"] for p in PHASES)
    steps = counters["decode_steps"]
    out = {"mean_decode_batch": round(counters["decode_row_steps"] / steps, 2) if steps else 0.0}
    for phase in PHASES:
        out[f"{phase}_share"] = round(counters[f"{phase}_seconds"] / total, 4) if total else 0.0
    return out


class Stopwatch:
    """Seconds since the last `lap()` (or creation)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        return elapsed
