"""Where a speculative round's time goes: wall time per round against the GPU time of the captured round, split
into its phases (draft, verify, accept, extend) with the kernels each one launches.

    python benchmarks/round_profile.py --target results/<exp>/target --export results/<exp>/export   # GPU
    python benchmarks/round_profile.py --target <HF dir> --smoke                                    # CPU check

Per sweep point, batch 1, greedy, MT-bench first turns:
  - `wall_ms_round`: the engine's whole request time per verification round (what `spec_decode.py` divides
    tokens by), next to `base_ms_token`, the engine's plain decode time per token in the same run;
    `decode_ms_round` and `base_decode_ms_token` leave out prefill and the first token (timed on their own);
  - `graph_ms_round`: back-to-back replays of the captured round (GPU time, no host work in between);
  - `phases`: per phase, the GPU time of its own captured graph and, from the profiler (that graph replayed
    alone), its kernels per round, their summed run time and the top kernel names. The gap between summed kernel
    time and graph time is what each launch inside a graph costs.
The difference decode - graph is the host's share per round (launch, copy, Python) left after pipelining.
  - `first_token_ms` (and `base_first_token_ms`): prefill and the first token per request through the engine;
    `prefill_ms` splits the speculative one into pieces timed alone (`prefill_breakdown`).
Prints one JSON line per point, writes them all to --out, and appends a row to benchmarks/RESULTS.md unless --smoke,
with the engine's fast paths in its config (the speculative engine always has `graph_rounds`: its round is what is
profiled). On CPU (--smoke) the phases run eagerly and only wall-clock times are given.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from eaglepipe.engine import Engine, SamplingParams
from eaglepipe.speculative import SpecConfig, SpeculativeGenerator
from eaglepipe.speculative.round_graph import RoundGraph
from eaglepipe.target.info import load_tokenizer, resolve_model_dir
from eaglepipe.utils.device import pick_device
from eaglepipe.utils.engine_flags import options_from_args

from decode import append_result_row, engine_options_config, hardware_name, sync, timed, warm_up
from spec_decode import add_drafter_args, first_turn_prompts, parse_sweep, random_export

REPO = Path(__file__).resolve().parents[1]


def engine_wall(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float, int, int]:
    """(seconds, seconds of the same requests cut to their first token, tokens, verification rounds) of decoding
    every prompt alone, after a warm-up. The difference of the two times is the decode after prefill."""
    warm_up(engine, prompts, params)
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    first_s, _ = timed(engine.device, lambda: [engine.generate([p], first)[0] for p in prompts])
    seconds, results = timed(engine.device, lambda: [engine.generate([p], params)[0] for p in prompts])
    return seconds, first_s, sum(r.completion_tokens for r in results), sum(r.spec_verify_ct for r in results)


def start_rows(gen: SpeculativeGenerator, prompt: list[int], rounds: int) -> tuple[RoundGraph, int]:
    """Prefill `prompt` into slot 0 and load it into the round buffers; returns (round graph, context bucket)
    that holds `rounds` more rounds."""
    rg = gen.round_graph
    params = SamplingParams(max_new_tokens=10 ** 6, ignore_eos=True)
    rows = gen.start([prompt], [params], [0], [lambda _: False])
    rg.load(rows)
    need = len(prompt) + (rounds + 1) * rg.width + rg.size  # a round commits at most `width` tokens
    ctx = next((c for c in rg.ctx_sizes if c >= need), None)
    if ctx is None:
        raise ValueError(f"{rounds} rounds after a {len(prompt)}-token prompt pass max_len; use fewer --rounds")
    return rg, ctx


def gpu_round_ms(gen: SpeculativeGenerator, prompt: list[int], rounds: int) -> float:
    """GPU ms per round of the single captured round graph, replayed back to back."""
    rg, ctx = start_rows(gen, prompt, rounds)
    graph = rg.graph(1, ctx, slice(0, 1))
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    end.synchronize()
    gen.runner.release(0)
    return start.elapsed_time(end) / rounds


def phase_profile(gen: SpeculativeGenerator, prompt: list[int], rounds: int, top: int) -> dict:
    """Per phase: GPU ms of its own graph (events), and from the profiler (that graph replayed alone) its kernels
    per round, their summed run time and the `top` kernel names by time."""
    rg, ctx = start_rows(gen, prompt, 2 * rounds + 1)
    phases = rg.capture_phases(1, ctx, slice(0, 1))
    for _, g in phases:  # one untimed round
        g.replay()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
    elapsed = [0.0] * len(phases)
    for _ in range(rounds):
        for i, (_, g) in enumerate(phases):
            marks[i].record()
            g.replay()
        marks[-1].record()
        marks[-1].synchronize()
        for i in range(len(phases)):
            elapsed[i] += marks[i].elapsed_time(marks[i + 1])
    per_phase = []
    for _, g in phases:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(rounds):
                g.replay()
            torch.cuda.synchronize()
        per_phase.append([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA])
    gen.runner.release(0)
    out = {}
    for i, (name, _) in enumerate(phases):
        times: dict[str, float] = defaultdict(float)
        counts: Counter = Counter()
        for e in per_phase[i]:
            times[e.name] += e.time_range.elapsed_us()
            counts[e.name] += 1
        best = sorted(times, key=times.get, reverse=True)[:top]
        out[name] = {"graph_ms": round(elapsed[i] / rounds, 4), "kernels": round(len(per_phase[i]) / rounds, 1),
                     "kernel_ms": round(sum(times.values()) / rounds / 1000, 4),
                     "top": [[n[:60], round(counts[n] / rounds, 1), round(times[n] / rounds, 1)] for n in best]}
    return out


def eager_phases(gen: SpeculativeGenerator, prompt: list[int], rounds: int) -> dict:
    """CPU: wall ms per phase of the round body run eagerly (no graphs, no profiler)."""
    rg, ctx = start_rows(gen, prompt, rounds)
    phases = rg.phases(1, ctx, slice(0, 1))
    spent = [0.0] * len(phases)
    for _ in range(rounds):
        for i, (_, run) in enumerate(phases):
            t = time.perf_counter()
            run()
            spent[i] += time.perf_counter() - t
    gen.runner.release(0)
    return {name: {"wall_ms": round(spent[i] / rounds * 1000, 3)} for i, (name, _) in enumerate(phases)}


def prefill_breakdown(gen: SpeculativeGenerator, prompts: list[list[int]]) -> dict:
    """Mean ms per request, each piece timed on its own between device syncs (slot 0, after the warm-up):
    `target` the plain prefill and first token (what the engine alone does), `target_capture` the same with the
    drafter's aux layers captured, `drafter` the aux fusion and the drafter's prefill over the prompt, and
    `spec_prefill` the speculative path's whole `start`. What the engine's first-token time holds beyond
    `spec_prefill` is request handling around it."""
    runner, dev = gen.runner, gen.runner.device
    greedy = [SamplingParams(max_new_tokens=10 ** 6, ignore_eos=True)]
    spent: dict[str, float] = defaultdict(float)

    def piece(name: str, fn: Callable[[], object]) -> object:
        seconds, out = timed(dev, fn)
        spent[name] += seconds
        return out

    with torch.inference_mode():
        for prompt in prompts:
            piece("target", lambda: runner.prefill([prompt], [0]).last_logits.argmax(-1).tolist())
            out = piece("target_capture", lambda: runner.prefill([prompt], [0], capture_layers=gen.steps.capture))
            tok = int(out.last_logits.argmax(-1)[0])
            ids = torch.tensor([list(prompt[1:]) + [tok]], dtype=torch.long, device=dev)
            zero, slot = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
            piece("drafter", lambda: gen.steps.draft.extend(slot, zero, 0, ids,
                                                            gen.steps.draft_input(out.aux_hidden[0][None]),
                                                            slice(0, 1)))
            piece("spec_prefill", lambda: gen.start([prompt], greedy, [0], [lambda _: False]))
            runner.release(0)
    return {name: round(seconds / len(prompts) * 1000, 3) for name, seconds in spent.items()}


def profile_point(engine: Engine, export: Path, point: SpecConfig, prompts: list[list[int]], new_tokens: int,
                  rounds: int, top: int) -> dict:
    """Every figure of one sweep point (see the module doc)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    cuda = engine.device.type == "cuda"
    gen = SpeculativeGenerator(engine.runner, export, point)  # the engine's options: graph_rounds on
    engine.speculator = gen
    seconds, first_s, tokens, verify = engine_wall(engine, prompts, params)
    row = {"point": point.name, "tau": round(tokens / max(verify, 1), 3),
           "wall_ms_round": round(seconds / max(verify, 1) * 1000, 4),
           "decode_ms_round": round((seconds - first_s) / max(verify, 1) * 1000, 4),
           "first_token_ms": round(first_s / len(prompts) * 1000, 3),
           "prefill_ms": prefill_breakdown(gen, prompts)}
    if cuda:
        row["graph_ms_round"] = round(gpu_round_ms(gen, prompts[0], rounds), 4)
        row["phases"] = phase_profile(gen, prompts[0], rounds, top)
    else:
        row["phases"] = eager_phases(gen, prompts[0], rounds)
    engine.speculator = None
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_drafter_args(ap)
    ap.add_argument("--prompts", type=int, default=8, help="MT-bench first turns for the wall-clock figures")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=40, help="rounds replayed for the GPU figures")
    ap.add_argument("--sweep", default="3,1,4 5,1,6 5,4,8 6,8,32 8,8,64")
    ap.add_argument("--top", type=int, default=6, help="kernel names listed per phase")
    ap.add_argument("--out", type=Path, default=None, help="write every point's JSON here")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: 2 prompts, 8 tokens, 2 points")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.prompts, args.max_new_tokens, args.rounds, args.sweep = "cpu", 2, 8, 3, "2,1,3 2,2,3"
    device = pick_device(args.device)
    target = resolve_model_dir(args.target)
    tokenizer = load_tokenizer(target)
    prompts = first_turn_prompts(tokenizer, args.prompts, None, "messages")
    points = parse_sweep(args.sweep)
    longest_round = max(p.num_steps for p in points) + 1
    max_len = (max(len(p) for p in prompts) + max(p.num_draft_tokens for p in points)
               + max(args.max_new_tokens, longest_round * (2 * args.rounds + 2)) + 64)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    options = options_from_args(args)
    spec_options = replace(options, cuda_graphs=False, graph_rounds=True)  # off CUDA: the round's body, eagerly
    config = {"engine_options": engine_options_config(options, device),
              "speculative_engine_options": engine_options_config(spec_options, device)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export = (args.export or random_export(target, Path(tmp))) if args.smoke else args.export
        if export is None:
            ap.error("--export is required unless --smoke")
        with Engine(target, device=device, max_batch_size=1, max_model_len=max_len, options=options,
                    prefix_reuse=False) as engine:
            seconds, first_s, tokens, _ = engine_wall(engine, prompts, params)
            base_ms = round(seconds / tokens * 1000, 4)
            base_decode_ms = round((seconds - first_s) / (tokens - len(prompts)) * 1000, 4)
            base_first_ms = round(first_s / len(prompts) * 1000, 3)
        with Engine(target, device=device, max_batch_size=1, max_model_len=max_len, options=spec_options,
                    prefix_reuse=False) as engine:
            for point in points:
                row = profile_point(engine, export, point, prompts, args.max_new_tokens, args.rounds, args.top)
                row["base_ms_token"], row["base_decode_ms_token"] = base_ms, base_decode_ms
                row["base_first_token_ms"] = base_first_ms
                row.update(config)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = args.results if args.results is not None else (None if args.smoke else REPO / "benchmarks" / "RESULTS.md")
    if results is not None:
        command = "python benchmarks/round_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
        parts = []
        for r in rows:
            if "graph_ms_round" in r:
                ph = "; ".join(f"{n} {p['graph_ms']:.3f} ms/{p['kernels']:.0f} kernels" for n, p in r["phases"].items())
                rounds = f"graph {r['graph_ms_round']:.3f} ({ph})"
            else:  # off CUDA: eager phases, wall-clock only
                ph = "; ".join(f"{n} {p['wall_ms']:.3f} ms" for n, p in r["phases"].items())
                rounds = f"eager phases ({ph})"
            pre = ", ".join(f"{n} {ms:.2f}" for n, ms in r["prefill_ms"].items())
            parts.append(f"{r['point']}: τ {r['tau']:.2f}, wall {r['wall_ms_round']:.3f} ms/round (decode "
                         f"{r['decode_ms_round']:.3f}), {rounds}; first token {r['first_token_ms']:.2f} ms "
                         f"(synced pieces: {pre})")
        append_result_row(results, "round_profile (MT-bench, batch 1, greedy)", hardware_name(device), command,
                          " · ".join(parts), f"engine plain decode {base_ms:.3f} ms/token (after prefill "
                          f"{rows[0]['base_decode_ms_token']:.3f}), first token {base_first_ms:.2f} ms", config=config)
    sync(device)
    return rows


if __name__ == "__main__":
    main()
