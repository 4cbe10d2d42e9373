"""Batch-1 greedy decode speed: the native engine (with the fast paths the flags leave on, and on GPU also its
PyTorch decode path, both in CUDA graphs) vs HF generate (eager) and HF static cache + torch.compile.

    python benchmarks/decode.py --model results/<exp>/target            # on a GPU; appends to RESULTS.md
    python benchmarks/decode.py --model <tiny HF dir> --smoke           # CPU check with tiny settings

Prints one JSON line. Without --smoke (or with --results PATH) a row is appended to benchmarks/RESULTS.md, with
the engine's fast paths (resolved for the device) in its config.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from eaglepipe.engine import Engine, EngineOptions, SamplingParams, resolve_options
from eaglepipe.target.info import load_hf_model, resolve_model_dir
from eaglepipe.utils.device import compute_dtype, pick_device
from eaglepipe.utils.engine_flags import add_engine_flags, options_from_args

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = [
    "Explain how a hash table works and when it performs badly.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation? Give concrete examples.",
    "Describe the water cycle to a ten-year-old.",
    "Compare Python and Rust for writing a command-line tool.",
    "Give me a three-day itinerary for a first visit to Rome.",
    "How do vaccines train the immune system?",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
]
RESULTS_HEADER = ("# Benchmark results\n\nRows are appended by the scripts in benchmarks/ (never edited by hand).\n\n"
                  "| date (UTC) | benchmark | hardware | git commit | command | result | baselines (same run) |\n"
                  "|---|---|---|---|---|---|---|\n")


# the results log itself: rows a benchmark has just appended leave the measured code as it was
RESULT_LOGS = ("benchmarks/RESULTS.md", "benchmarks/results.jsonl")
# `git archive` writes the archived commit into this file (.gitattributes: export-subst)
ARCHIVE_COMMIT = "benchmarks/archive_commit.txt"


def git_commit(repo: Path = REPO) -> str:
    """The short commit of this checkout (+dirty with uncommitted changes to tracked files other than the results
    log), or, where the tree travels as a `git archive` without .git, the commit the archive wrote into
    ARCHIVE_COMMIT."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        named = (repo / ARCHIVE_COMMIT).read_text().strip() if (repo / ARCHIVE_COMMIT).exists() else ""
        return named if named and not named.startswith("$Format") else "unknown"
    commit = head.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            *(f":!{log}" for log in RESULT_LOGS)], cwd=repo, capture_output=True, text=True).stdout
    return commit + ("+dirty" if dirty.strip() else "")


def append_result_row(path: Path, benchmark: str, hardware: str, command: str, result: str, baselines: str,
                      figures: dict | None = None, config: dict | None = None, baseline_figures: dict | None = None,
                      name: str | None = None) -> None:
    """Append one row to a RESULTS.md table (created with its header when missing) and the same measurement as a
    JSON object to results.jsonl beside it: name, date, hardware, commit, command, config, figures and the
    same-run baselines (structured where the caller gives them, else the row's text)."""
    date = dt.datetime.now(dt.timezone.utc)
    commit = git_commit()
    cells = [date.strftime("%Y-%m-%d %H:%M"), benchmark, hardware, commit, f"`{command}`", result, baselines]
    row = "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else RESULTS_HEADER
    path.write_text(with_table_row(text, row))
    record = {"name": name or benchmark, "benchmark": benchmark, "date": date.isoformat(timespec="seconds"),
              "hardware": hardware, "commit": commit, "command": command, "config": config or {},
              "figures": figures if figures is not None else {"result": result},
              "baselines": baseline_figures if baseline_figures is not None else {"result": baselines}}
    with path.with_name("results.jsonl").open("a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")


def with_table_row(text: str, row: str) -> str:
    """`text` with `row` added at the end of its first table (the results log, which the write-ups follow)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + row
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    return "".join(lines[:end] + [row] + lines[end:])


def hardware_name(device: torch.device) -> str:
    """GPU name (or CPU model) with core count, for the results table."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def triton_variants() -> int:
    """Compiled variants held by the token path's Triton kernels (0 without Triton). A count that grows with each
    new prompt length would mean the kernels are re-specialised per length."""
    try:
        from eaglepipe.engine.kernels import attention, linear, rope_cache
    except ImportError:
        return 0
    count = 0
    for module in (attention, linear, rope_cache):
        for fn in vars(module).values():
            for cache in getattr(fn, "device_caches", {}).values():
                count += len(cache[0]) if isinstance(cache, tuple) and isinstance(cache[0], dict) else 0
    return count


def warm_up(engine: Engine, prompts: list[list[int]], params: SamplingParams,
            report: dict | None = None) -> None:
    """A full warm-up generation, then a short one alone per distinct prompt length: the first prefill of a new
    length pays a one-off cost (18 ms against 9 ms on repeat on an H200; 64 ms while prefill used cuDNN's
    attention), which is not decode speed.
    `report` receives the first and the repeated time to first token per length and the Triton variant counts."""
    engine.generate([prompts[0]], params)
    variants = [triton_variants()]
    first, again = [], []
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for prompt in {len(p): p for p in prompts}.values():
        for out in (first, again):
            seconds, _ = timed(engine.device, lambda: engine.generate([prompt], one))
            out.append(round(seconds * 1000, 1))
        variants.append(triton_variants())
    if report is not None:
        report.update(first_prefill_ms=first, repeat_prefill_ms=again, triton_variants=variants)


def engine_options_config(options: EngineOptions, device: torch.device) -> dict:
    """A results row's config entry for an engine run: its fast paths, resolved for `device` (what ran)."""
    return asdict(resolve_options(options, device))


def bench_engine(model_dir: Path, device: torch.device, prompts: list[list[int]], new_tokens: int,
                 options: EngineOptions, report: dict | None = None,
                 ignore_eos: bool = True) -> tuple[float, list[list[int]]]:
    """Tokens/s of the engine with the fast paths `options`, one request at a time (batch 1); EOS ignored by
    default, so every prompt makes new_tokens. `report` receives the warm-up's prefill timings (see `warm_up`)."""
    max_len = max(len(p) for p in prompts) + new_tokens + 1
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=ignore_eos)
    with Engine(model_dir, device=device, max_batch_size=1, max_model_len=max_len, options=options,
                prefix_reuse=False) as eng:
        warm_up(eng, prompts, params, report)
        seconds, outs = timed(device, lambda: [eng.generate([p], params)[0].token_ids for p in prompts])
    return sum(len(o) for o in outs) / seconds, outs


def bench_hf(model, device: torch.device, prompts: list[list[int]], new_tokens: int,
             **generate_kwargs) -> tuple[float, list[list[int]]]:
    """Tokens/s of HF generate (greedy, batch 1, exactly new_tokens per prompt)."""
    def run(p: list[int]) -> list[int]:
        ids = torch.tensor([p], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, **generate_kwargs)
        return out[0, len(p):].tolist()

    run(prompts[0])
    run(prompts[0])  # second warm-up: compiled paths settle after the first call
    seconds, outs = timed(device, lambda: [run(p) for p in prompts])
    return len(prompts) * new_tokens / seconds, outs


def bench_hf_compiled(model, device: torch.device, prompts: list[list[int]],
                      new_tokens: int) -> tuple[float, str]:
    """HF's fastest path: static cache + torch.compile, in mode reduce-overhead (CUDA graphs) and, where that
    fails inside transformers, compile's default mode. Returns (tok/s, the mode that ran)."""
    eager_forward = model.forward
    try:
        model.forward = torch.compile(eager_forward, mode="reduce-overhead", fullgraph=True)
        return bench_hf(model, device, prompts, new_tokens, cache_implementation="static")[0], "reduce-overhead"
    except Exception as e:
        print(f"[decode] HF compile reduce-overhead failed ({type(e).__name__}); trying the default mode",
              file=sys.stderr, flush=True)
        torch.compiler.reset()
        model.forward = torch.compile(eager_forward, fullgraph=True)
        return bench_hf(model, device, prompts, new_tokens, cache_implementation="static")[0], "default"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or fetch_target output dir")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=len(QUESTIONS), help="number of prompts (each decoded alone)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--hf-prompts", type=int, default=None,
                    help="run the HF baselines on the first N prompts only (they are slow; default all)")
    ap.add_argument("--no-hf-compile", action="store_true", help="skip the HF static cache + torch.compile baseline")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: 2 prompts, 8 tokens, no compile baseline")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to append to (default benchmarks/RESULTS.md; --smoke writes only if given)")
    add_engine_flags(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.prompts, args.max_new_tokens, args.no_hf_compile = "cpu", 2, 8, True
    device = pick_device(args.device)
    dtype = compute_dtype(device)
    model_dir = resolve_model_dir(args.model)
    from eaglepipe.target.info import load_tokenizer

    tok = load_tokenizer(model_dir)
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[:args.prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in questions]
    options = options_from_args(args)
    config = {"engine_options": engine_options_config(options, device)}
    cuda_graphs = config["engine_options"]["cuda_graphs"]

    warm: dict = {}
    engine_tps, engine_out = bench_engine(model_dir, device, prompts, args.max_new_tokens, options, report=warm)
    # progress on stderr, so that a run stopped in a slow baseline still shows the engine's figure
    print(f"[decode] engine: {engine_tps:.1f} tok/s ({config['engine_options']})", file=sys.stderr, flush=True)
    torch_path = None
    if device.type == "cuda" and config["engine_options"]["token_path"]:
        # the same engine with its PyTorch decode step, for the side-by-side ratio
        torch_options = replace(options, token_path=False)
        config["torch_path_engine_options"] = engine_options_config(torch_options, device)
        torch_path = bench_engine(model_dir, device, prompts, args.max_new_tokens, torch_options)
        print(f"[decode] engine, PyTorch path: {torch_path[0]:.1f} tok/s", file=sys.stderr, flush=True)
    hf = load_hf_model(model_dir, device, dtype)
    hf_set = prompts[:args.hf_prompts] if args.hf_prompts else prompts
    hf_tps, hf_out = bench_hf(hf, device, hf_set, args.max_new_tokens)
    record = {
        "bench": "decode", "model": str(args.model), "device": hardware_name(device), "dtype": str(dtype),
        "batch_size": 1, "prompts": len(prompts), "hf_prompts": len(hf_set), "max_new_tokens": args.max_new_tokens,
        "cuda_graphs": cuda_graphs, "engine_options": config["engine_options"],
        "engine_tok_s": round(engine_tps, 1), "hf_eager_tok_s": round(hf_tps, 1),
        "speedup_vs_hf_eager": round(engine_tps / hf_tps, 2),
        # tokens agreeing with HF eager greedy before the first difference (bf16 kernels may diverge late)
        "mean_common_prefix_with_hf": round(sum(common_prefix(a, b) for a, b in zip(engine_out, hf_out))
                                            / len(hf_set), 1),
        **warm,
    }
    if torch_path is not None:
        record["engine_torch_path_tok_s"] = round(torch_path[0], 1)
        record["token_path_speedup_vs_torch_path"] = round(engine_tps / torch_path[0], 2)
    if not args.no_hf_compile:
        try:
            tps, mode = bench_hf_compiled(hf, device, hf_set, args.max_new_tokens)
            record["hf_static_compile_tok_s"] = round(tps, 1)
            record["hf_compile_mode"] = mode
            record["speedup_vs_hf_static_compile"] = round(engine_tps / tps, 2)
        except Exception as e:  # the baseline failing must not hide the engine's figure
            record["hf_static_compile_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(record), flush=True)

    results = args.results if args.results is not None else (None if args.smoke else REPO / "benchmarks" / "RESULTS.md")
    if results is not None:
        command = "python benchmarks/decode.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        baselines = f"HF generate eager {record['hf_eager_tok_s']} tok/s ({len(hf_set)} of the prompts)"
        if "hf_static_compile_tok_s" in record:
            baselines += (f"; HF static cache + torch.compile ({record['hf_compile_mode']}) "
                          f"{record['hf_static_compile_tok_s']} tok/s")
        elif "hf_static_compile_error" in record:
            baselines += f"; HF static+compile failed ({record['hf_static_compile_error'][:80]})"
        result = (f"engine {record['engine_tok_s']} tok/s, batch 1 greedy, {dtype}, {len(prompts)} prompts x "
                  f"{args.max_new_tokens} tokens, CUDA graphs {'on' if cuda_graphs else 'off'}; "
                  f"{record['speedup_vs_hf_eager']}x HF eager")
        if "engine_torch_path_tok_s" in record:
            baselines += f"; engine PyTorch path (CUDA graphs) {record['engine_torch_path_tok_s']} tok/s"
        append_result_row(results, "decode (batch 1)", record["device"], command, result, baselines, config=config)
    return record


if __name__ == "__main__":
    main()
