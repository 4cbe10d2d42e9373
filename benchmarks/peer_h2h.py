"""The head-to-head row of benchmarks/peer_nemo.sh: eaglepipe against NeMo AutoModel's EAGLE-3 recipe, trained on
the same rows with the same budget on one GPU, both drafters through eaglepipe's bench stage.

    python benchmarks/peer_h2h.py --experiment h2h_nemo --nemo-stats <peer_stats.json> --nemo-bench <bench dir>

Reads eaglepipe's train summary and Snakemake stage times (logs/<exp>/times/), the peer's stats (the kit's
run_eagle3.py writes them) and both bench outputs (sweep.csv, metrics.json). Prints a Markdown table and appends
the `peer_nemo_h2h` row to benchmarks/RESULTS.md and results.jsonl.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import yaml

from decode import REPO, append_result_row

POINT_NAME = re.compile(r"^s\d+_k\d+_n\d+$")


def stage_seconds(experiment: str, stage: str) -> float | None:
    """Wall seconds of a Snakemake rule from its benchmark: record (None when it did not run here)."""
    path = REPO / "logs" / experiment / "times" / f"{stage}.tsv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    return float(rows[-1]["s"]) if rows else None


def bench_points(bench_dir: Path) -> dict[str, dict]:
    """Per sweep point at temperature 0: tau, accept@k, decode speedup, match fraction (from sweep.csv)."""
    points: dict[str, dict] = {}
    with (bench_dir / "sweep.csv").open() as f:
        for row in csv.DictReader(f):
            if not POINT_NAME.match(row["config"]) or float(row["temperature"]) != 0.0:
                continue
            rates = sorted((k for k in row if k.startswith("accept_rate_")), key=lambda k: int(k.rsplit("_", 1)[1]))
            accept = [float(row[k]) for k in rates if row[k]]
            points[row["config"]] = {"tau": float(row["tau"]), "accept_at_k": accept,
                                     "speedup": float(row["speedup"]), "decode_tok_s": float(row["decode_tok_s"]),
                                     "match_fraction": float(row["match_fraction"])}
    return points


def ours_training(experiment: str) -> dict:
    """eaglepipe's training figures: the train rule's wall time and the loop's own throughput and memory."""
    summary = json.loads((REPO / "results" / experiment / "train" / "summary.json").read_text())
    run = summary.get("this_run", {})
    return {"train_wall_s": stage_seconds(experiment, "train"), "loop_s": run.get("seconds"),
            "steps": run.get("steps"), "real_tokens": run.get("tokens"), "real_tok_per_s": run.get("tokens_per_s"),
            "peak_gpu_mem_gib": run.get("peak_gpu_mem_gib"),
            "prep_s": {s: stage_seconds(experiment, s) for s in ("download", "normalize", "tokenize", "vocab")}}


def nemo_training(stats_path: Path) -> dict:
    """The peer's training figures from the kit's stats: setup plus loop (incl. its final checkpoint) as wall time."""
    s = json.loads(stats_path.read_text())["summary"]
    return {"train_wall_s": s["setup_s"] + s["loop_s_incl_final_ckpt"], "loop_s": s["loop_s_incl_final_ckpt"],
            "steps": s["optimizer_steps"], "real_tok_per_s": s["all_steps_real_tok_per_s"],
            "steady_real_tok_per_s": s["steady_real_tok_per_s"], "peak_gpu_mem_gib": s["max_cuda_mem_gib"],
            "gpu": s.get("gpu")}


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or a dash where it was not measured (e.g. GPU memory on a CPU run)."""
    return "–" if value is None else format(value, spec)


def table(ours: dict, nemo: dict, ours_points: dict, nemo_points: dict) -> str:
    """The Markdown comparison: one row per sweep point, then the training figures."""
    lines = ["| point | τ eaglepipe | τ NeMo | τ ratio | speedup eaglepipe | speedup NeMo | match eaglepipe / NeMo |",
             "|---|---|---|---|---|---|---|"]
    for name, o in ours_points.items():
        n = nemo_points.get(name)
        if n is None:
            continue
        lines.append(f"| {name} | {o['tau']:.2f} | {n['tau']:.2f} | {o['tau'] / n['tau']:.2f}× | "
                     f"{o['speedup']:.2f}× | {n['speedup']:.2f}× | "
                     f"{o['match_fraction']:.0%} / {n['match_fraction']:.0%} |")
    lines += ["", "| training | wall s | loop s | steps | real tok/s | peak GPU GiB |", "|---|---|---|---|---|---|"]
    for label, t in (("eaglepipe", ours), ("NeMo AutoModel 0.7.0", nemo)):
        lines.append(f"| {label} | {fmt(t['train_wall_s'], '.1f')} | {fmt(t['loop_s'], '.1f')} | {t['steps']} | "
                     f"{fmt(t['real_tok_per_s'], ',.0f')} | {fmt(t['peak_gpu_mem_gib'], '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="h2h_nemo")
    ap.add_argument("--nemo-stats", type=Path, required=True, help="the peer's peer_stats.json")
    ap.add_argument("--nemo-bench", type=Path, required=True, help="bench stage output for the peer's drafter")
    ap.add_argument("--nemo-log", type=Path, default=None, help="the peer's train log (its last val line is kept)")
    ap.add_argument("--hardware", default=None, help="GPU name (default: the peer's stats)")
    ap.add_argument("--command", default="bash benchmarks/peer_nemo.sh")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    exp = REPO / "results" / args.experiment
    ours, nemo = ours_training(args.experiment), nemo_training(args.nemo_stats)
    ours_points, nemo_points = bench_points(exp / "bench"), bench_points(args.nemo_bench)
    if args.nemo_log is not None and args.nemo_log.exists():
        val = [line.strip() for line in args.nemo_log.read_text(errors="replace").splitlines() if "val" in line.lower()]
        nemo["last_val_line"] = val[-1] if val else None
    print(table(ours, nemo, ours_points, nemo_points))
    common = [p for p in ours_points if p in nemo_points]
    ratios = {p: ours_points[p]["tau"] / nemo_points[p]["tau"] for p in common}
    time_ratio = ours["train_wall_s"] / nemo["train_wall_s"] if ours["train_wall_s"] else None
    result = ("τ eaglepipe/NeMo: " + ", ".join(f"{p} {ours_points[p]['tau']:.2f}/{nemo_points[p]['tau']:.2f}"
                                               for p in common)
              + f"; train wall {fmt(ours['train_wall_s'], '.0f')} s vs {nemo['train_wall_s']:.0f} s"
              + (f" ({time_ratio:.2f}×)" if time_ratio else "")
              + f"; real tok/s {ours['real_tok_per_s']:,.0f} vs {nemo['real_tok_per_s']:,.0f}")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    append_result_row(args.results, "peer_nemo_h2h (same rows, seq 2048, TTT 7, vocab 32k, lr 1e-4, 1 epoch)",
                      args.hardware or nemo.get("gpu") or "unknown", args.command, result,
                      "NeMo AutoModel 0.7.0 train_eagle3, same GPU, same run",
                      figures={"eaglepipe": {"training": ours, "bench": ours_points, "tau_ratio": ratios,
                                             "train_time_ratio": time_ratio}},
                      baseline_figures={"nemo_automodel_0.7.0": {"training": nemo, "bench": nemo_points}},
                      config={"params": params}, name="peer_nemo_h2h")


if __name__ == "__main__":
    sys.exit(main())
