"""The sweep: for each temperature, the baseline, every point and (bench.baseline_runs 2) the baseline again, each
over all turns of all prompts.

Turn k of a prompt is rendered on top of the answers *the same config* gave to turns 1..k-1 in this run
(at temperature 0 with lossless speculation these equal the baseline's answers).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from tqdm import tqdm

from ..config import BenchCfg, SweepPoint
from .engines import BenchEngine
from .metrics import PointResult, PointSummary, Sample, decode_tok_s, match_fraction, summarize
from .prompts import render_chat

log = logging.getLogger(__name__)


def run_conversations(engine: BenchEngine, tokenizer: Any, prompts: Sequence[list[str]],
                      temperature: float) -> list[Sample]:
    """All turns of all prompts, turn by turn; each later turn sees the model's own earlier answers."""
    histories: list[list[dict[str, str]]] = [[] for _ in prompts]
    samples: list[Sample] = []
    for turn in range(max(len(p) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if turn < len(p)]
        for i in active:
            histories[i].append({"role": "user", "content": prompts[i][turn]})
        ids = [render_chat(tokenizer, histories[i]) for i in active]
        out = engine.generate(ids, [(i, turn) for i in active], temperature)
        for i, s in zip(active, out):
            histories[i].append({"role": "assistant", "content": s.text})
        samples.extend(out)
    return samples


def measure_point(engine: BenchEngine, tokenizer: Any, prompts: Sequence[list[str]], point: SweepPoint | None,
                  temperature: float, warmup_prompts: int) -> PointResult:
    """Warm the config up on the first prompts' first turn (discarded), then time every turn of every prompt."""
    with engine.serving(point):
        if warmup_prompts:
            warm = prompts[:warmup_prompts]
            engine.generate([render_chat(tokenizer, [{"role": "user", "content": p[0]}]) for p in warm],
                             [(i, 0) for i in range(len(warm))], temperature)
        start = time.perf_counter()
        samples = run_conversations(engine, tokenizer, prompts, temperature)
        return PointResult(point, temperature, samples, time.perf_counter() - start)


def run_sweep(engine: BenchEngine, tokenizer: Any, prompts: Sequence[list[str]], cfg: BenchCfg) -> list[PointSummary]:
    """Every temperature × (baseline + sweep points), summarised against the baseline of the same temperature.

    With `cfg.baseline_runs` 2 the baseline is measured before and again after the points (`bracket_baseline`),
    so that one-time work on a fresh process or GPU that slows one of its runs cannot inflate the speedups."""
    with_baseline = engine.has_baseline
    runs = len(cfg.sweep) + (cfg.baseline_runs if with_baseline else 0)
    rows: list[PointSummary] = []
    with tqdm(total=runs * len(cfg.temperatures), desc="bench", unit="point", disable=None) as bar:
        def measure(point: SweepPoint | None, temperature: float) -> PointResult:
            bar.set_postfix_str(f"{'baseline' if point is None else point.name} T={temperature}")
            result = measure_point(engine, tokenizer, prompts, point, temperature, cfg.warmup_prompts)
            bar.update(1)
            return result

        for temperature in cfg.temperatures:
            first = measure(None, temperature) if with_baseline else None
            results = [measure(point, temperature) for point in cfg.sweep]
            if first is None:
                baseline = None
            elif cfg.baseline_runs == 2:
                baseline = bracket_baseline(first, measure(None, temperature))
            else:
                baseline = BracketedBaseline(first, None)
            for result in ([baseline.reference] if baseline is not None else []) + results:
                row = summarize(result, baseline.reference if baseline is not None else None)
                if result.point is None and baseline is not None and baseline.record is not None:
                    row.extra["baseline_runs"] = baseline.record
                row.extra["samples"] = [_sample_json(s) for s in result.samples]
                log.info("%s: tau=%s decode=%s tok/s speedup=%s match=%s", row.name, _fmt(row.tau),
                         _fmt(row.decode_tok_s), _fmt(row.speedup), row.outputs_match)
                rows.append(row)
    return rows


@dataclass
class BracketedBaseline:
    """The baseline's reference run for the speedups, with what its two runs (before and after the points)
    measured; `record` is None where it ran once."""

    reference: PointResult
    record: dict[str, Any] | None


def bracket_baseline(before: PointResult, after: PointResult) -> BracketedBaseline:
    """The faster of the two baseline runs as the reference, with both decode speeds and whether the two runs
    generated the same outputs (greedy decoding must repeat itself) recorded; a spread over 10% is logged."""
    speeds = [decode_tok_s(before.samples), decode_tok_s(after.samples)]
    reference = after if (speeds[1] or 0.0) > (speeds[0] or 0.0) else before
    spread = (max(speeds) / min(speeds) - 1.0) if all(speeds) else None
    if spread is not None and spread > 0.10:
        log.warning("the baseline's two runs differ by %.0f%% in decode speed (%.1f then %.1f tok/s): the faster "
                    "is the reference", 100 * spread, speeds[0], speeds[1])
    repeat = match_fraction(after.samples, before.samples)
    if before.temperature == 0 and repeat < 1.0:
        log.warning("greedy baseline did not repeat itself: %.1f%% of its outputs differ between its two runs",
                    100 * (1 - repeat))
    return BracketedBaseline(reference, {"decode_tok_s": speeds, "spread": spread,
                                         "reference": "after" if reference is after else "before",
                                         "repeat_match_fraction": repeat})


def _sample_json(s: Sample) -> dict[str, Any]:
    return {"prompt": s.prompt_index, "turn": s.turn, "completion_tokens": s.completion_tokens,
            "verify_rounds": s.verify_rounds, "decode_s": round(s.decode_s, 6), "text": s.text}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
