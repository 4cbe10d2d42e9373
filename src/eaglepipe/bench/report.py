"""Writing the bench outputs: points/<name>.json, sweep.csv, metrics.json, README.md and best_command.txt."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from ..utils.atomic import atomic_write_json, atomic_write_text
from .metrics import PointSummary

CSV_FIELDS = ["name", "config", "temperature", "num_steps", "topk", "num_draft_tokens", "num_samples",
              "completion_tokens", "verify_rounds", "tau", "decode_tok_s", "throughput_tok_s", "speedup",
              "outputs_match", "match_fraction"]
SHOWN_POSITIONS = 4

METRIC_NOTES = """\
## What the columns mean
- **τ (acceptance length)**: generated tokens ÷ target verification rounds, over all measured turns. The bonus
  token the target adds in every round counts, so τ = 1 means no draft token was ever accepted and the upper
  bound is num_steps + 1. (SGLang's `completion_tokens / spec_verify_ct`; the first token, from prefill, is
  counted too.)
- **τ by turn** (multi-turn prompts only): τ over each turn separately. A later turn builds on the model's own
  earlier answers, which it may repeat or quote, so its τ is often higher than the first turn's.
- **accept@i**: the chance that the draft token at depth i is accepted given that depths 1..i-1 were, over all
  verification rounds (the CSV has every position; `accept_reach` in points/*.json is the unconditional share
  of rounds that accepted at least i drafts). n/a when the backend does not report per-round acceptance.
- **decode tok/s**: tokens after the first ÷ time from the first to the last token, summed over turns (prefill
  and queueing excluded). Warmup prompts are excluded from every metric.
- **speedup**: decode tok/s ÷ the non-speculative baseline's decode tok/s at the same temperature, measured in
  the same run on the same backend. With bench.baseline_runs 2 the baseline runs before the points and again
  after them, and the faster run is the reference (both speeds are in metrics.json, `baseline_runs`).
- **match**: at temperature 0, whether every output equals the baseline's token for token (text for server
  backends); the fraction of identical outputs is `match_fraction`. At temperature > 0 outputs are samples,
  so match is n/a.
- Configs use SGLang's semantics: `sS_kK_nN` = `--speculative-num-steps S --speculative-eagle-topk K
  --speculative-num-draft-tokens N` (K = 1 is a chain, N counts the root).
"""


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _match(row: PointSummary) -> str:
    if row.config == "baseline":
        return "-"
    if row.outputs_match is None:
        return "n/a"
    return "yes" if row.outputs_match else f"NO ({row.match_fraction:.0%})"


def _accept(row: PointSummary) -> str:
    if row.accept_rate is None:
        return "-" if row.config == "baseline" else "n/a"
    return " / ".join(f"{r:.2f}" for r in row.accept_rate[:SHOWN_POSITIONS])


def _turns(rows: Sequence[PointSummary]) -> int:
    return max((len(r.tau_by_turn) for r in rows if r.tau_by_turn), default=0)


def summary_table(rows: Sequence[PointSummary]) -> str:
    """The summary as a Markdown table (also printed at the end of the stage); a "τ by turn" column when the
    prompts have several turns."""
    by_turn = _turns(rows) > 1
    head = ["config", "T", "τ"] + (["τ by turn"] if by_turn else []) + \
        [f"accept@1..{SHOWN_POSITIONS}", "decode tok/s", "speedup", "match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        speed = "1.00x" if r.config == "baseline" else ("n/a" if r.speedup is None else f"{r.speedup:.2f}x")
        tau_cell = "-" if r.config == "baseline" else _num(r.tau)
        turns = ["-" if r.tau_by_turn is None else " / ".join(_num(t) for t in r.tau_by_turn)] if by_turn else []
        cells = [r.config, f"{r.temperature:g}", tau_cell] + turns + \
            [_accept(r), _num(r.decode_tok_s, 1), speed, _match(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_csv(rows: Sequence[PointSummary]) -> str:
    """sweep.csv: one row per point, with accept_rate_1..K for the deepest point's K positions and tau_turn_1..N
    for the N turns of the prompts."""
    depth = max((len(r.accept_rate) for r in rows if r.accept_rate), default=0)
    turns = _turns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS + [f"accept_rate_{i}" for i in range(1, depth + 1)]
                            + [f"tau_turn_{i}" for i in range(1, turns + 1)], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        rec: dict[str, Any] = {k: getattr(r, k) for k in CSV_FIELDS}
        rec["outputs_match"] = "n/a" if r.outputs_match is None else str(r.outputs_match).lower()
        for i, rate in enumerate(r.accept_rate or [], 1):
            rec[f"accept_rate_{i}"] = round(rate, 6)
        for i, t in enumerate(r.tau_by_turn or [], 1):
            rec[f"tau_turn_{i}"] = None if t is None else round(t, 6)
        writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return buf.getvalue()


def readme(rows: Sequence[PointSummary], metrics: dict[str, Any], best_command: str | None, context: str) -> str:
    """README.md: what was run, the summary table, the best config's server command and what every metric means."""
    parts = ["# Benchmark summary", "", context, "", summary_table(rows), ""]
    best = []
    if metrics.get("best_speedup") is not None:
        best.append(f"best speedup **{metrics['best_speedup']:.2f}x** ({metrics['best_speedup_config']})")
    if metrics.get("best_tau") is not None:
        best.append(f"best τ **{metrics['best_tau']:.2f}** ({metrics['best_tau_config']})")
    if metrics.get("all_outputs_match") is not None:
        best.append(f"all greedy outputs match the baseline: **{'yes' if metrics['all_outputs_match'] else 'NO'}**")
    if best:
        parts.append(f"At T={metrics['temperature']:g}: " + "; ".join(best) + ".")
    if best_command:
        parts += ["", "Best config as a server (SGLang where it serves the drafter, else vLLM):", "", "```bash",
                  best_command, "```"]
    parts += ["", "Plots: `plots/`. Per-point detail (every turn's text and counts): `points/<name>.json`.", "",
              METRIC_NOTES]
    return "\n".join(parts)


def write_outputs(out: Path, rows: Sequence[PointSummary], metrics: dict[str, Any], best_command: str | None,
                  context: str) -> None:
    """Write every file except the plots into `out` (which the stage publishes atomically)."""
    for r in rows:
        atomic_write_json(out / "points" / f"{r.name}.json", r.to_json())
    atomic_write_text(out / "sweep.csv", sweep_csv(rows))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "best_command.txt", (best_command or "# no speculative point was measured") + "\n")
    atomic_write_text(out / "README.md", readme(rows, metrics, best_command, context))
