"""Speed of the tokenize stage's work: conversations rendered with the target's chat template, tokenized and masked.

    python benchmarks/tokenize_throughput.py --target results/<exp>/target --chat results/<exp>/data/chat

Times, on the stage's own inputs (a fetch_target directory and a chat directory), the same conversations three
ways, each run `--repeats` times (the fastest counts):
- one at a time (`tokenize_conversations` in chunks of one: one tokenizer call per conversation), the
  baseline;
- in chunks whose texts the Rust tokenizer takes as one batch, in this process (`tokenize_conversations`);
- the same with worker processes, as many as --workers (default: as many as the stage starts on this machine,
  `pick_workers`), where that is more than one.
Every way must give the same samples (ids and masks), else the script exits 2. Appends a `tokenize_throughput`
row to benchmarks/RESULTS.md and results.jsonl unless --no-results.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eaglepipe.data.chat_io import read_conversations
from eaglepipe.data.loss_mask import ChatMasker
from eaglepipe.data.tokenize import TokenizeResult, pick_workers, tokenize_conversations
from eaglepipe.target.info import load_tokenizer, resolve_model_dir

from decode import REPO, append_result_row, hardware_name


def samples_of(res: TokenizeResult) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(s["id"], s["input_ids"], s["loss_mask"]) for s in res.samples]


def same(a: list[tuple[str, np.ndarray, np.ndarray]], b: list[tuple[str, np.ndarray, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and np.array_equal(x[1], y[1]) and np.array_equal(x[2], y[2])
                                    for x, y in zip(a, b))


def fastest(repeats: int, run) -> tuple[float, list]:
    """The least wall seconds of `repeats` calls of `run`, and its result."""
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, required=True, help="a fetch_target output directory")
    ap.add_argument("--chat", type=Path, required=True, help="a chat directory (normalize or regenerate output)")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="the first N conversations only")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="worker processes to time (default: the stage's)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="print only")
    args = ap.parse_args(argv)
    masker = ChatMasker(load_tokenizer(args.target))
    conversations = list(read_conversations(args.chat))[:args.limit]
    tokenizer_dir = str(resolve_model_dir(args.target))
    n = len(conversations)

    base_s, base = fastest(args.repeats, lambda: samples_of(tokenize_conversations(
        masker, conversations, args.seq_length, n, chunk_size=1)))
    ways = {"batched": 1}
    workers = pick_workers(n) if args.workers is None else args.workers
    if workers > 1:
        ways["batched_workers"] = workers
    seconds, match = {}, {}
    for way, procs in ways.items():
        seconds[way], res = fastest(args.repeats, lambda: samples_of(tokenize_conversations(
            masker, conversations, args.seq_length, n, workers=procs, tokenizer_dir=tokenizer_dir)))
        match[way] = same(res, base)
    figures = {"conversations": n, "samples": len(base), "one_at_a_time_s": round(base_s, 3),
               **{f"{way}_s": round(s, 3) for way, s in seconds.items()},
               **{f"{way}_over_one_at_a_time": round(s / base_s, 3) for way, s in seconds.items()},
               "workers": workers, "stage_workers": pick_workers(n), "same_samples": all(match.values())}
    print(figures)
    if not args.no_results:
        best = min(seconds, key=seconds.get)
        append_result_row(
            args.results, "tokenize_throughput", hardware_name(torch.device("cpu")),
            "python benchmarks/tokenize_throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            f"{n} conversations, seq {args.seq_length}: {best} {seconds[best]:.1f} s, "
            f"{seconds[best] / base_s:.2f}× one at a time"
            + "".join(f"; {w} {s:.1f} s" for w, s in seconds.items() if w != best)
            + ("; same samples" if figures["same_samples"] else "; SAMPLES DIFFER"),
            f"one at a time: {base_s:.1f} s (same run)", figures=figures,
            config=vars(args) | {"target": str(args.target), "chat": str(args.chat), "results": str(args.results)},
            baseline_figures={"one_at_a_time_s": round(base_s, 3)}, name="tokenize_throughput")
    return 0 if figures["same_samples"] else 2


if __name__ == "__main__":
    sys.exit(main())
