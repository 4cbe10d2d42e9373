"""Speculative decoding speed: τ and tok/s per sweep point vs the engine's own decode and HF generate.

    python benchmarks/spec_decode.py --target results/<exp>/target --export results/<exp>/export   # GPU
    python benchmarks/spec_decode.py --target <HF dir> --smoke                                    # CPU check

MT-bench first turns by default, or the first user turns of any JSONL/parquet file (--prompts-path, --prompts-field;
e.g. held-out training conversations, to see how much τ owes to the prompt distribution), chat template applied,
batch 1, greedy, exactly --max-new-tokens tokens per prompt (EOS ignored, so every path does equal work).
--both-turns follows the bench stage's MT-bench protocol instead: every first turn, then every second turn on top of
the engine's own greedy first answer, each stopping at EOS or --max-new-tokens (greedy outputs are the same on
every path, so the work is still equal; tokens/s counts the tokens actually made). For each sweep point
(num_steps, topk, num_draft_tokens in SGLang semantics) it reports τ = generated tokens / verification rounds, the
acceptance rate per draft position, decode tok/s, the speedup over the engine's non-speculative decode, and whether
every output equals the baseline's token for token (where not, `mismatches` names the prompts and the first
differing position, and `same_as_first_point` tells a baseline-side difference, shared by every point, from a
per-point one). Prints one JSON line per point; appends rows to benchmarks/RESULTS.md unless --smoke.
HF generate is timed on first turns only, on the first --hf-prompts of them if given (eager HF is ~30x slower than
the engine, so a few prompts suffice).
--export takes the export stage's output, its sglang/ dir, or any SGLang-format EAGLE drafter dir (NeMo AutoModel's,
SpecForge's, a published one); it is validated as SGLang would load it before anything runs, and every JSON line and
the RESULTS row name it.
--smoke without --export builds a random EAGLE-3 drafter (τ near 1: a plumbing check, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from eaglepipe.bench.drafter import checked_drafter
from eaglepipe.bench.prompts import load_prompts, render_chat
from eaglepipe.config import PromptsCfg
from eaglepipe.engine import Engine, SamplingParams
from eaglepipe.speculative import SpecConfig, SpeculativeGenerator
from eaglepipe.target.info import load_hf_model, load_tokenizer, resolve_model_dir
from eaglepipe.utils.cli import StageError
from eaglepipe.utils.device import compute_dtype, pick_device
from eaglepipe.utils.engine_flags import add_engine_flags, options_from_args

from decode import append_result_row, bench_engine, bench_hf, engine_options_config, hardware_name, timed, warm_up

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SWEEP = "3,1,4 5,1,6 7,1,8 4,2,8 5,4,8 6,8,32"


def random_export(target: Path, out: Path) -> Path:
    """A random EAGLE-3 drafter for `target`, written and validated by the exporter (for --smoke)."""
    from safetensors.torch import load_file

    from eaglepipe.export.checkpoint import read_checkpoint
    from eaglepipe.export.writer import ExportRequest, export_checkpoint
    from eaglepipe.models.build import new_drafter, save_drafter
    from eaglepipe.models.config import DrafterConfig
    from eaglepipe.target.info import describe_model

    info = describe_model(target)
    vocab = info["vocab_size"]
    dv = min(1024, vocab)
    cfg = DrafterConfig.from_target(info, "eagle3", dv)
    weights = load_file(str(target / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"].float()
    d2t = torch.zeros(dv, dtype=torch.long)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[:dv] = True
    save_drafter(new_drafter(cfg, embed, weights.get("lm_head.weight", embed).float(), d2t, t2d), out / "ckpt")
    req = ExportRequest(dtype="float32", formats=("sglang",), verifier_name=str(target))
    export_checkpoint(read_checkpoint(out / "ckpt"), target, out / "export", req)
    return out / "export"


def prompt_source(num_prompts: int, path: Path | None, field: str, multi_turn: bool = False) -> PromptsCfg:
    """User turns (the first alone unless `multi_turn`) of MT-bench (no path) or of a local JSONL/parquet file or
    folder."""
    if path is None:
        return PromptsCfg(num_prompts=num_prompts, multi_turn=multi_turn)
    return PromptsCfg(source="local", path=str(path), field=field, split="", num_prompts=num_prompts,
                      multi_turn=multi_turn)


def render_first_turns(tokenizer, turns: list[list[str]]) -> list[list[int]]:
    """Token ids of each prompt's first user turn, rendered with the target's chat template."""
    return [render_chat(tokenizer, [{"role": "user", "content": t[0]}]) for t in turns]


def first_turn_prompts(tokenizer, num_prompts: int, path: Path | None, field: str) -> list[list[int]]:
    """Token ids of `prompt_source`'s first user turns, rendered with the target's chat template."""
    return render_first_turns(tokenizer, load_prompts(prompt_source(num_prompts, path, field)))


def second_turn_prompts(tokenizer, turns: list[list[str]], first_answers: list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt's second user turn after its first turn and the model's answer to it (prompts
    with one turn are skipped), rendered with the target's chat template."""
    prompts = []
    for user, answer in zip(turns, first_answers):
        if len(user) > 1:
            history = [{"role": "user", "content": user[0]},
                       {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)},
                       {"role": "user", "content": user[1]}]
            prompts.append(render_chat(tokenizer, history))
    return prompts


def add_drafter_args(ap: argparse.ArgumentParser) -> None:
    """--target, --export (optional: --smoke makes a random drafter), --device and the engine's fast-path flags
    (--token-path ...), as the speculative benchmarks take them."""
    ap.add_argument("--target", required=True, type=Path, help="fetch_target output dir or HF model dir")
    ap.add_argument("--export", type=Path, default=None,
                    help="export dir, its sglang/ dir, or any SGLang-format EAGLE drafter dir")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_engine_flags(ap)


def parse_sweep(text: str) -> list[SpecConfig]:
    """`"3,1,4 5,4,8"` -> SpecConfigs (num_steps, topk, num_draft_tokens)."""
    return [SpecConfig(*(int(x) for x in item.split(","))) for item in text.split()]


def bench_point(engine: Engine, export: Path, point: SpecConfig, prompts: list[list[int]], new_tokens: int,
                device: torch.device, ignore_eos: bool = True) -> tuple[dict, list[list[int]]]:
    """Decode every prompt speculatively (batch 1) with one sweep point; returns (metrics, outputs)."""
    engine.speculator = SpeculativeGenerator(engine.runner, export, point)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=ignore_eos)
    warm_up(engine, prompts, params)
    engine.speculator.reset_stats()
    seconds, results = timed(device, lambda: [engine.generate([p], params)[0] for p in prompts])
    tokens = sum(r.completion_tokens for r in results)
    rounds = sum(r.spec_verify_ct for r in results)
    stats = engine.speculator.stats
    return {"point": point.name, "num_steps": point.num_steps, "topk": point.topk,
            "num_draft_tokens": point.num_draft_tokens, "tau": tokens / max(rounds, 1), "tok_s": tokens / seconds,
            "acceptance_per_position": [round(a, 4) for a in stats.acceptance_rates()]}, [r.token_ids for r in results]


def mismatches(outputs: list[list[int]], baseline: list[list[int]], limit: int = 8) -> list[dict]:
    """The first `limit` prompts whose output differs from the baseline's: prompt index, first differing position
    and the two tokens there (None past an output's end)."""
    found = []
    for i, (out, base) in enumerate(zip(outputs, baseline)):
        if out != base and len(found) < limit:
            at = next((j for j, (x, y) in enumerate(zip(out, base)) if x != y), min(len(out), len(base)))
            found.append({"prompt": i, "position": at, "spec": out[at] if at < len(out) else None,
                          "baseline": base[at] if at < len(base) else None})
    return found


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_drafter_args(ap)
    ap.add_argument("--prompts", type=int, default=80, help="prompts (questions)")
    ap.add_argument("--prompts-path", type=Path, default=None,
                    help="JSONL/parquet file or folder of prompts instead of MT-bench")
    ap.add_argument("--prompts-field", default="messages",
                    help="with --prompts-path: the field holding a string, user turns or chat messages")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--both-turns", action="store_true",
                    help="MT-bench as the bench stage runs it: both turns, each stopping at EOS")
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"points 'steps,topk,draft_tokens ...' ({DEFAULT_SWEEP})")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    ap.add_argument("--hf-prompts", type=int, default=None,
                    help="time HF generate on the first N prompts only (it is ~30x slower than the engine)")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: 2 prompts, 8 tokens, 2 points")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    ap.add_argument("--row-name", default="spec_decode",
                    help="the results.jsonl row's name (e.g. mtbench_quality for a full run's final figures)")
    args = ap.parse_args(argv)
    if args.both_turns and not args.no_hf:
        ap.error("--both-turns times HF generate only at fixed lengths: add --no-hf")
    if args.smoke:
        args.device, args.prompts, args.max_new_tokens, args.sweep = "cpu", 2, 8, "2,1,3 2,2,3"
    device = pick_device(args.device)
    target = resolve_model_dir(args.target)
    tokenizer = load_tokenizer(target)
    turns = load_prompts(prompt_source(args.prompts, args.prompts_path, args.prompts_field, args.both_turns))
    prompts = render_first_turns(tokenizer, turns)
    ignore_eos, options = not args.both_turns, options_from_args(args)
    spec_options = replace(options, cuda_graphs=False)  # speculative requests never replay the decode graphs
    config = {"engine_options": engine_options_config(options, device),
              "speculative_engine_options": engine_options_config(spec_options, device)}
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or (random_export(target, Path(tmp)) if args.smoke else None)
        if export is None:
            ap.error("--export is required unless --smoke")
        try:
            draft = checked_drafter(export, args.target, "--export").path
        except StageError as e:
            raise SystemExit(str(e)) from None
        if args.both_turns:
            _, first_answers = bench_engine(target, device, prompts, args.max_new_tokens, options, ignore_eos=False)
            prompts += second_turn_prompts(tokenizer, turns, first_answers)
        base_tok_s, base_out = bench_engine(target, device, prompts, args.max_new_tokens, options,
                                            ignore_eos=ignore_eos)
        hf_tok_s, hf_prompts = None, prompts[:args.hf_prompts or len(prompts)]
        if not args.no_hf:
            model = load_hf_model(target, device, compute_dtype(device))
            hf_tok_s, _ = bench_hf(model, device, hf_prompts, args.max_new_tokens)
            del model
        max_len = max(len(p) for p in prompts) + args.max_new_tokens + 64
        rows, first_outputs = [], None
        with Engine(target, device=device, max_batch_size=1, max_model_len=max_len, options=spec_options,
                    prefix_reuse=False) as engine:
            for point in parse_sweep(args.sweep):
                try:
                    metrics, outs = bench_point(engine, draft, point, prompts, args.max_new_tokens, device,
                                                ignore_eos)
                except Exception as e:  # one point failing must not lose the others' figures
                    print(json.dumps({"point": point.name, "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)
                    continue
                first_outputs = outs if first_outputs is None else first_outputs
                metrics.update(engine_tok_s=base_tok_s, hf_tok_s=hf_tok_s,
                               hf_prompts=len(hf_prompts) if hf_tok_s else 0, speedup=metrics["tok_s"] / base_tok_s,
                               output_match=sum(o == b for o, b in zip(outs, base_out)) / len(prompts),
                               mismatches=mismatches(outs, base_out),
                               same_as_first_point=outs == first_outputs,
                               prompts=len(prompts), max_new_tokens=args.max_new_tokens, device=str(device),
                               turns=2 if args.both_turns else 1, drafter=str(draft), **config)
                print(json.dumps(metrics), flush=True)
                rows.append(metrics)
    results = args.results if args.results is not None else (None if args.smoke else REPO / "benchmarks" / "RESULTS.md")
    if not rows:
        raise SystemExit("every sweep point failed")
    if results is not None:
        best = max(rows, key=lambda r: r["tok_s"])
        command = "python benchmarks/spec_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
        result = (f"drafter `{best['drafter']}`; best {best['point']}: {best['tok_s']:.1f} tok/s, "
                  f"τ {best['tau']:.2f}, {best['speedup']:.2f}× engine, match {best['output_match']:.0%}; all: "
                  + "; ".join(f"{r['point']} τ {r['tau']:.2f} {r['tok_s']:.0f} tok/s" for r in rows))
        hf = f", HF generate {hf_tok_s:.1f} tok/s ({len(hf_prompts)} of the prompts)" if hf_tok_s else ""
        name = "MT-bench" if args.prompts_path is None else args.prompts_path.name
        name += ", both turns, EOS stops" if args.both_turns else ", first turns, EOS ignored"
        figures = {"points": {r["point"]: {k: r[k] for k in ("tau", "tok_s", "speedup", "output_match",
                                                                "acceptance_per_position")} for r in rows},
                   "best_point": best["point"], "best_speedup": best["speedup"],
                   "all_outputs_match": all(r["output_match"] == 1.0 for r in rows),
                   "prompts": len(prompts), "turns": 2 if args.both_turns else 1, "drafter": best["drafter"]}
        append_result_row(results, f"spec_decode ({name}, batch 1, greedy)", hardware_name(device), command, result,
                          f"engine non-spec {base_tok_s:.1f} tok/s{hf}", figures=figures,
                          config={**config, "sweep": args.sweep, "max_new_tokens": args.max_new_tokens},
                          baseline_figures={"engine_tok_s": base_tok_s, "hf_tok_s": hf_tok_s,
                                            "hf_prompts": len(hf_prompts) if hf_tok_s else 0},
                          name=args.row_name)
    return rows


if __name__ == "__main__":
    main()
