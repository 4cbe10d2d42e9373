"""The sweep: for each temperature, the baseline and then every point, each over all turns of all prompts.

Turn k of a prompt is rendered on top of the answers *the same config* gave to turns 1..k-1 in this run
(at temperature 0 with lossless speculation these equal the baseline's answers).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from tqdm import tqdm

from ..config import BenchCfg, SweepPoint
from .engines import BenchEngine
from .metrics import PointResult, PointSummary, Sample, summarize
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
    """Every temperature × (baseline + sweep points), summarised against the baseline of the same temperature."""
    configs: list[SweepPoint | None] = ([None] if engine.has_baseline else []) + list(cfg.sweep)
    rows: list[PointSummary] = []
    with tqdm(total=len(configs) * len(cfg.temperatures), desc="bench", unit="point", disable=None) as bar:
        for temperature in cfg.temperatures:
            baseline: PointResult | None = None
            for point in configs:
                bar.set_postfix_str(f"{'baseline' if point is None else point.name} T={temperature}")
                result = measure_point(engine, tokenizer, prompts, point, temperature, cfg.warmup_prompts)
                if point is None:
                    baseline = result
                row = summarize(result, baseline)
                row.extra["samples"] = [_sample_json(s) for s in result.samples]
                log.info("%s: tau=%s decode=%s tok/s speedup=%s match=%s", row.name, _fmt(row.tau),
                         _fmt(row.decode_tok_s), _fmt(row.speedup), row.outputs_match)
                rows.append(row)
                bar.update(1)
    return rows


def _sample_json(s: Sample) -> dict[str, Any]:
    return {"prompt": s.prompt_index, "turn": s.turn, "completion_tokens": s.completion_tokens,
            "verify_rounds": s.verify_rounds, "decode_s": round(s.decode_s, 6), "text": s.text}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
