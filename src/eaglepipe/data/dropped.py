"""What each data stage dropped, and why: one table from the stages' `stats.json` files.

    python -m eaglepipe.data.dropped results/<experiment>

Every data stage's stats.json holds `rows_in`, `rows_out` and `dropped` ({reason: rows}); some add
`not_sampled` (rows left out on purpose) and `changed` ({what: rows kept but altered}).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

STAGES = (("download", "data/raw"), ("normalize", "data/chat"), ("regenerate", "data/regen"),
          ("tokenize", "data/tokens"))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "-"


def stage_stats(results: Path) -> list[tuple[str, dict[str, Any]]]:
    """`(stage, stats)` for each data stage that has published its stats.json under `results`, in DAG order."""
    found = []
    for stage, sub in STAGES:
        path = results / sub / "stats.json"
        if path.exists():
            found.append((stage, json.loads(path.read_text())))
    return found


def dropped_table(results: Path) -> str:
    """A Markdown table of rows in, rows out and rows dropped (by reason) per stage, and a closing sentence on
    how many downloaded rows became training samples."""
    stats = stage_stats(results)
    if not stats:
        raise FileNotFoundError(f"{results} holds no data stage stats.json: has the pipeline run?")
    lines = ["| stage | rows in | rows out | dropped | why | notes |", "|---|---:|---:|---:|---|---|"]
    for stage, s in stats:
        dropped = s.get("dropped", {})
        notes = dict(s.get("changed", {}))
        if s.get("not_sampled"):
            notes = {"left out by sampling (data.max_samples)": s["not_sampled"], **notes}
        lines.append(f"| {stage} | {s['rows_in']} | {s['rows_out']} | {sum(dropped.values())} | {_counts(dropped)} "
                     f"| {_counts(notes)} |")
    first, last = stats[0][1], stats[-1][1]
    lines += ["", f"{last['rows_out']} of the {first['rows_out']} rows taken by {stats[0][0]} reached "
                  f"{stats[-1][0]}'s output ({100 * last['rows_out'] / max(first['rows_out'], 1):.0f}%)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table for one experiment's results directory."""
    p = argparse.ArgumentParser(description="Rows each data stage dropped, and why.")
    p.add_argument("results", type=Path, help="results/<experiment>")
    args = p.parse_args(argv)
    try:
        table = dropped_table(args.results)
    except FileNotFoundError as e:
        raise SystemExit(f"dropped: {e}") from None
    print("Rows each data stage dropped:\n")
    print(table)


if __name__ == "__main__":
    main()
