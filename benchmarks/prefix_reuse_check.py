"""Multi-turn decoding with and without prefix reuse: the same tokens, and what reuse saves.

Synthetic conversations run through the engine in-process the way the regenerate stage drives the server: each
turn's prompt is the previous prompt, its greedy answer and a new user message (seeded random tokens), and a
conversation's next turn is submitted as soon as its previous one finishes. The workload runs twice, on an
engine with `prefix_reuse` and on one without, and the answers are compared turn by turn. On a GPU the decode
graphs also run idle slots, so this checks that cached slots survive them (the engine's decode graphs).

    python benchmarks/prefix_reuse_check.py --model results/<exp>/target          # GPU; appends to RESULTS.md
    python benchmarks/prefix_reuse_check.py --model <tiny HF dir> --smoke         # CPU check

Prints one JSON line. In float32 every answer must match: it exits 2 when some differ. In bf16 the reused K/V
(computed by decode steps) round differently from a recompute's, so some answers drift: it reports how many.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import torch

from eaglepipe.engine import Engine, SamplingParams
from eaglepipe.utils.device import pick_device
from eaglepipe.utils.engine_flags import add_engine_flags, options_from_args

from decode import append_result_row, engine_options_config, hardware_name

REPO = Path(__file__).resolve().parents[1]


def user_message(conversation: int, turn: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 * conversation + turn)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def run_conversations(engine: Engine, conversations: int, turns: int, user_tokens: int, params: SamplingParams
                      ) -> tuple[list[list[list[int]]], float]:
    """Answers[conversation][turn] and the wall time, with every conversation in flight at once."""
    vocab = engine.runner.shapes.vocab_size
    prompts = [user_message(c, 0, user_tokens, vocab) for c in range(conversations)]
    answers: list[list[list[int]]] = [[] for _ in range(conversations)]
    start = time.perf_counter()
    pending: dict[Future, int] = {engine.submit(prompts[c], params): c for c in range(conversations)}
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            c = pending.pop(fut)
            answer = fut.result().token_ids
            answers[c].append(answer)
            if len(answers[c]) < turns:
                prompts[c] = prompts[c] + answer + user_message(c, len(answers[c]), user_tokens, vocab)
                pending[engine.submit(prompts[c], params)] = c
    return answers, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or fetch_target output dir")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--conversations", type=int, default=256)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--user-tokens", type=int, default=96, help="tokens of each new user message")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=256,
                    help="at least --conversations, or the turns evict each other's cached slots")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default: the repo's)")
    add_engine_flags(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.conversations, args.turns, args.user_tokens, args.max_new_tokens, args.max_batch_size = 2, 3, 70, 6, 2
    device = pick_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    max_len = args.turns * (args.user_tokens + args.max_new_tokens) + 1
    options = options_from_args(args)
    report: dict = {"benchmark": "prefix_reuse_check", "device": hardware_name(device), "dtype": args.dtype,
                    "conversations": args.conversations, "turns": args.turns,
                    "engine_options": engine_options_config(options, device)}
    answers = {}
    strict = True
    for reuse in (False, True):
        with Engine(args.model, device=device, dtype=dtype, max_batch_size=args.max_batch_size,
                    max_model_len=max_len, options=options, prefix_reuse=reuse) as engine:
            run_conversations(engine, 2, 2, args.user_tokens, params)  # warm-up
            before = engine.stats.snapshot()
            answers[reuse], seconds = run_conversations(engine, args.conversations, args.turns, args.user_tokens,
                                                        params)
            after = engine.stats.snapshot()
            strict = engine.runner.dtype == torch.float32
        name = "reuse" if reuse else "no_reuse"
        report[f"{name}_seconds"] = round(seconds, 3)
        report[f"{name}_prefill_tokens"] = after["prefill_tokens"] - before["prefill_tokens"]
        report[f"{name}_reused_tokens"] = after["prefill_reused_tokens"] - before["prefill_reused_tokens"]
        report[f"{name}_prefill_seconds"] = round(after["prefill_seconds"] - before["prefill_seconds"], 3)
    pairs = [(a, b) for conv_a, conv_b in zip(answers[False], answers[True]) for a, b in zip(conv_a, conv_b)]
    report["turns_identical"] = sum(a == b for a, b in pairs)
    report["turns_total"] = len(pairs)
    report["speedup"] = round(report["no_reuse_seconds"] / report["reuse_seconds"], 3)
    print(json.dumps(report))
    if not args.smoke or args.results:
        result = (f"{report['turns_identical']}/{report['turns_total']} turns identical with and without reuse "
                  f"({args.dtype}); reuse skipped {report['reuse_reused_tokens']:,} of "
                  f"{report['reuse_reused_tokens'] + report['reuse_prefill_tokens']:,} prompt tokens; "
                  f"{report['speedup']}x wall time")
        append_result_row(args.results or REPO / "benchmarks" / "RESULTS.md", "prefix_reuse_check.py",
                          report["device"], "python " + " ".join(["benchmarks/prefix_reuse_check.py"] +
                                                                  (argv or sys.argv[1:])), result,
                          f"no reuse: {report['no_reuse_seconds']} s, prefill {report['no_reuse_prefill_seconds']} s",
                          config={"engine_options": report["engine_options"]})
    if strict and report["turns_identical"] != report["turns_total"]:
        sys.exit(2)
    return report


if __name__ == "__main__":
    main()
