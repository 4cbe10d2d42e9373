"""Prefill cost of the native engine: the one-off cost of a new pack length, and packed throughput.

The regenerate stage (mode `all`) prefills each turn's whole history, so nearly every packed prefill has a
length never seen before. On an H200, cuDNN's SDPA made the first prefill of each new length cost 64 ms against
11 ms on repeat (RESULTS.md, third lease); prefill now keeps to flash attention. This script measures, on
`LlamaRunner.prefill` alone:
  * first vs repeated latency over `--lengths` distinct new lengths, and whether the first-call cost fades as
    more lengths have been seen (it would, if it were the lazy loading of a finite set of kernels);
  * the same in packs padded up to a multiple of `--bucket` tokens (shapes repeat, so the cost is paid once per
    bucket);
  * profiler tables (top ops by self CPU and self device time) of one new-length call and one repeat;
  * packed throughput (prompt tokens/s) at a repeated shape, for a few prompt sizes;
  * a lone prompt's prefill (what batch-1 serving and speculative decoding do) eager against `PrefillGraphs`
    (padded, replayed from a CUDA graph per bucket), on the same prompts after each bucket has been captured.

    python benchmarks/prefill.py --model results/<exp>/target        # on a GPU; appends to RESULTS.md
    python benchmarks/prefill.py --model <tiny HF dir> --smoke       # CPU check with tiny settings

Prints one JSON line. The engine flags (--token-path ...) set the runner's fast paths, all but its own prefill
graphs (off, so that `LlamaRunner.prefill` is the eager one timed); the results row records them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from eaglepipe.engine.model import LlamaRunner
from eaglepipe.engine.prefill_graphs import PrefillGraphs
from eaglepipe.utils.device import pick_device
from eaglepipe.utils.engine_flags import add_engine_flags, options_from_args

from decode import append_result_row, hardware_name, sync

REPO = Path(__file__).resolve().parents[1]


def timed_prefill(runner: LlamaRunner, prompts: list[list[int]]) -> float:
    """Milliseconds of one packed prefill (prompt i into slot i)."""
    sync(runner.device)
    start = time.perf_counter()
    runner.prefill(prompts, list(range(len(prompts))))
    sync(runner.device)
    return (time.perf_counter() - start) * 1000


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def first_vs_repeat(runner: LlamaRunner, lengths: list[int], vocab: int, rng: random.Random) -> dict:
    """First and repeated latency of single-prompt prefills at each (new) length, in order."""
    first, again = [], []
    for n in lengths:
        first.append(round(timed_prefill(runner, [random_prompt(rng, n, vocab)]), 2))
        again.append(round(timed_prefill(runner, [random_prompt(rng, n, vocab)]), 2))
    quarter = max(len(lengths) // 4, 1)
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    return {"first_ms": first, "repeat_ms": again, "first_median_ms": med(first), "repeat_median_ms": med(again),
            "first_median_ms_first_quarter": med(first[:quarter]),
            "first_median_ms_last_quarter": med(first[-quarter:])}


def padded_first_calls(runner: LlamaRunner, lengths: list[int], bucket: int, vocab: int,
                       rng: random.Random) -> dict:
    """Single prompts packed with a filler prompt (in slot 1) up to a multiple of `bucket` tokens."""
    times = []
    for n in lengths:
        prompts = [random_prompt(rng, n, vocab)]
        pad = -n % bucket
        if pad:
            prompts.append(random_prompt(rng, pad, vocab))
        times.append(round(timed_prefill(runner, prompts), 2))
    return {"bucket": bucket, "ms": times, "median_ms": round(statistics.median(times), 2)}


def profile_tables(runner: LlamaRunner, new_length: int, vocab: int, rng: random.Random, top: int) -> dict:
    """Top ops by self CPU time and self device time for one call at a new length and one repeat."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    out = {}
    for name in ("new_length", "repeat"):
        with profile(activities=activities) as prof:
            timed_prefill(runner, [random_prompt(rng, new_length, vocab)])
        events = prof.key_averages()
        by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        table = {"cpu": [(e.key, round(e.self_cpu_time_total / 1000, 3), e.count) for e in by_cpu]}
        if runner.device.type == "cuda":
            by_dev = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:top]
            table["device"] = [(e.key, round(e.self_device_time_total / 1000, 3), e.count) for e in by_dev]
        out[name] = table
    return out


def lone_prompt_eager_vs_graphs(runner: LlamaRunner, lengths: list[int], vocab: int, rng: random.Random) -> dict:
    """Median ms of a lone prompt's prefill at each length, eager and through `PrefillGraphs` (each bucket
    captured and each prompt run once before the timed pass)."""
    prompts = [random_prompt(rng, n, vocab) for n in lengths]
    out = {"lengths": lengths}
    for name, graphs in (("eager", None), ("graphs", PrefillGraphs(runner.padded_prefill, runner.max_len,
                                                                     runner.device))):
        runner.prefill_graphs = graphs
        for p in prompts:
            timed_prefill(runner, [p])
        out[f"{name}_median_ms"] = round(statistics.median(timed_prefill(runner, [p]) for p in prompts), 3)
    runner.prefill_graphs = None
    out["speedup"] = round(out["eager_median_ms"] / out["graphs_median_ms"], 2)
    return out


def packed_throughput(runner: LlamaRunner, pack_tokens: int, prompt_len: int, vocab: int, rng: random.Random,
                      repeats: int) -> dict:
    """Prompt tokens/s of packs of `pack_tokens` made of prompts of `prompt_len` tokens, at a repeated shape."""
    count = max(1, min(pack_tokens // prompt_len, runner.max_slots))
    prompts = [random_prompt(rng, prompt_len, vocab) for _ in range(count)]
    timed_prefill(runner, prompts)
    ms = [timed_prefill(runner, prompts) for _ in range(repeats)]
    tokens = count * prompt_len
    return {"prompt_len": prompt_len, "prompts": count, "ms": round(statistics.median(ms), 2),
            "tokens_per_s": round(tokens / (statistics.median(ms) / 1000))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or fetch_target output dir")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--lengths", type=int, default=64, help="distinct new prompt lengths to time")
    ap.add_argument("--max-len", type=int, default=4096, help="runner max_len; lengths are drawn below it")
    ap.add_argument("--bucket", type=int, default=256, help="padding bucket for the padded variant")
    ap.add_argument("--pack-tokens", type=int, default=4096, help="tokens per pack in the throughput part")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default: the repo's)")
    add_engine_flags(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.max_len, args.bucket, args.pack_tokens = 4, 128, 32, 96
    device = pick_device(args.device)
    options = replace(options_from_args(args), prefill_graphs=False)
    runner = LlamaRunner(args.model, device=device, max_slots=16, max_len=args.max_len, options=options)
    vocab = runner.shapes.vocab_size
    rng = random.Random(0)
    timed_prefill(runner, [random_prompt(rng, 17, vocab)])  # first call of the process
    pool = list(range(16, args.max_len - args.bucket))
    lengths = rng.sample(pool, 3 * args.lengths)
    report: dict = {"benchmark": "prefill", "device": hardware_name(device),
                    "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default)"),
                    "engine_options": asdict(runner.options)}
    report["unpadded"] = first_vs_repeat(runner, lengths[:args.lengths], vocab, rng)
    report["padded"] = padded_first_calls(runner, lengths[args.lengths:2 * args.lengths], args.bucket, vocab, rng)
    report["profile"] = profile_tables(runner, lengths[-1], vocab, rng, top=8)
    sizes = [s for s in (64, 256, 1024, 2048) if s <= args.pack_tokens] or [args.pack_tokens]
    report["throughput"] = [packed_throughput(runner, args.pack_tokens, s, vocab, rng, 5) for s in sizes]
    lone = [n for n in (20, 45, 70, 100, 150, 230, 350, 500) if n <= args.max_len]
    report["lone_prompt"] = lone_prompt_eager_vs_graphs(runner, lone, vocab, rng)
    print(json.dumps(report))
    if not args.smoke or args.results:
        u, p = report["unpadded"], report["padded"]
        best = max(report["throughput"], key=lambda r: r["tokens_per_s"])
        result = (f"first prefill of a new length {u['first_median_ms']} ms (median; first quarter "
                  f"{u['first_median_ms_first_quarter']}, last {u['first_median_ms_last_quarter']}), repeat "
                  f"{u['repeat_median_ms']} ms; padded to {p['bucket']}: {p['median_ms']} ms; packed "
                  f"{best['tokens_per_s']:,} prompt tok/s ({best['prompts']} x {best['prompt_len']}); lone prompt "
                  f"(20-500 tokens) eager {report['lone_prompt']['eager_median_ms']} ms, CUDA-graph prefill "
                  f"{report['lone_prompt']['graphs_median_ms']} ms ({report['lone_prompt']['speedup']}x)")
        append_result_row(args.results or REPO / "benchmarks" / "RESULTS.md", "prefill.py", report["device"],
                          "python " + " ".join(["benchmarks/prefill.py"] + (argv or sys.argv[1:])), result,
                          "(none: diagnostic)", config={"engine_options": report["engine_options"]})
    return report


if __name__ == "__main__":
    main()
