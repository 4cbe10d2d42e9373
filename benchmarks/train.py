"""Drafter training throughput: real (non-padding) tokens/s and MFU of online EAGLE-3 training.

    python benchmarks/train.py --model results/<exp>/target/model        # H100: SmolLM2 + 1B/8B-shaped targets
    python benchmarks/train.py --model <tiny HF dir> --smoke              # CPU check with tiny settings
    python benchmarks/train.py --model results/h2h_nemo/target --shapes smollm2 --micro-batch 8 \
        --samples results/h2h_nemo/data/tokens --profile logs/train_profile.txt   # a run's own rows, profiled

Setup per target: EAGLE-3, ttt_steps 7, seq 2048, packed rows of synthetic chat-like samples (or, for the smollm2
shape, the tokenize stage's train rows with --samples, in file order), bf16, the target
in the loop (online), TTT step-0 attention with FlexAttention. It runs the same pieces as the train stage
(collate/packing, TargetWithAux, online_features, TTTModule, AdamW) without the checkpoint/eval plumbing.
MFU = (target forward + drafter forward/backward over all TTT steps) FLOPs / time / measured bf16 matmul peak.
The Llama-3.2-1B- and Llama-3.1-8B-shaped targets are built on the GPU from configs with random weights.
Prints one JSON line per target; appends rows to benchmarks/RESULTS.md unless --smoke (or with --results PATH).
--profile PATH writes the timed steps' torch.profiler table (the ops by GPU time, then by CPU time) to PATH.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eaglepipe.data.tokens_io import read_tokens
from eaglepipe.families.registry import family_of
from eaglepipe.models.build import new_drafter
from eaglepipe.models.config import DrafterConfig
from eaglepipe.models.target import TargetWithAux
from eaglepipe.target.info import default_aux_layers, resolve_model_dir
from eaglepipe.train.batches import collate, pack_rows
from eaglepipe.train.draft_losses import DRAFT_LOSSES
from eaglepipe.train.features import online_features
from eaglepipe.train.flops import attention_pairs, drafter_flops, measure_matmul_peak, target_flops
from eaglepipe.train.module import TTTModule
from eaglepipe.train.objective import Objective
from eaglepipe.train.ttt_attention import document_causal_mask, flex_step0, math_step0
from eaglepipe.utils.device import pick_device

from decode import append_result_row, hardware_name, sync  # shared RESULTS.md table writer

REPO = Path(__file__).resolve().parents[1]

SHAPES = {  # configs of the public models (weights not needed)
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def random_llama(shape: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Llama of a public model's shape, built directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_parameters=LLAMA3_ROPE, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval().requires_grad_(False)


def info_of(model) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
            "rope_scaling": None, "rms_norm_eps": c.rms_norm_eps, "aux_layers": default_aux_layers(c.num_hidden_layers)}


def first_ids_drafter(model, algorithm: str, draft_vocab: int):
    """A new `algorithm` drafter for `model` whose draft vocab is the target's first `draft_vocab` ids (a benchmark
    needs its shapes, not a real vocab; a family that drafts over the whole vocab takes all of it). Returns the
    drafter (on the CPU) and the draft vocab's size."""
    info = info_of(model)
    cfg = DrafterConfig.from_target(info, algorithm, min(draft_vocab, info["vocab_size"]))
    vocab = cfg.draft_vocab_size if family_of(cfg).uses_draft_vocab else info["vocab_size"]
    d2t = torch.zeros(vocab, dtype=torch.long)
    t2d = torch.zeros(info["vocab_size"], dtype=torch.bool)
    t2d[:vocab] = True
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return new_drafter(cfg, emb, head, d2t, t2d), vocab


def synthetic_samples(n: int, vocab: int, seq: int, seed: int) -> list[dict]:
    """Chat-like samples: lengths 64..seq/2 (ShareGPT-ish), the last 60% of each supervised."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(64, seq // 2))
        mask = np.zeros(length, np.int8)
        mask[int(length * 0.4):] = 1
        out.append({"id": str(i), "input_ids": rng.integers(0, vocab, length), "loss_mask": mask})
    return out


def step_profiler(device: torch.device) -> torch.profiler.profile:
    """A profiler of the CPU and (on CUDA) the GPU side of the timed steps."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    return torch.profiler.profile(activities=acts, record_shapes=False)


def write_profile(profiler: torch.profiler.profile, device: torch.device, path: Path, title: str) -> None:
    """The profiled ops, by GPU time (on CUDA) and by CPU time, appended to `path`."""
    table = profiler.key_averages()
    parts = [f"## {title}"]
    if device.type == "cuda":
        parts += ["### by GPU time", table.table(sort_by="cuda_time_total", row_limit=40)]
    parts += ["### by CPU time", table.table(sort_by="cpu_time_total", row_limit=40)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n\n".join(parts) + "\n\n")


def write_host_profile(profiler: cProfile.Profile, path: Path, title: str) -> None:
    """A cProfile's functions by own time and by cumulative time (40 of each), appended to `path`."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    for order in ("tottime", "cumulative"):
        text.write(f"### by {order}\n")
        stats.sort_stats(order).print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"## {title}\n\n{text.getvalue()}\n")


def bench_one(name: str, model, args, device: torch.device, peak: float) -> dict:
    info = info_of(model)
    drafter, draft_vocab = first_ids_drafter(model, "eagle3", args.draft_vocab)
    drafter, cfg = drafter.to(device), drafter.config
    target = TargetWithAux(model, cfg.aux_layers)
    if args.compile_target and device.type == "cuda":  # what train.compile_target does in the Trainer
        target.compile_layers()
    if args.compile and device.type == "cuda":  # what train.compile does in the Trainer
        drafter.compile_layers()
    graphs_diff = None
    if args.target_graphs and device.type == "cuda":  # what train.target_graphs does in the Trainer
        target.use_cuda_graphs()
    module = TTTModule(drafter, Objective.of(ttt_steps=args.ttt_steps, loss=args.loss,
                                             compile_loss=not args.eager_loss))
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    draft_ids = torch.arange(draft_vocab, device=device)
    samples = read_tokens(args.samples, "train") if args.samples is not None and name == "smollm2" else \
        synthetic_samples(args.micro_batch * (args.steps + args.warmup) * 8, info["vocab_size"], args.seq, 0)
    rows = pack_rows([len(s["input_ids"]) for s in samples], range(len(samples)), args.seq, True)
    groups = [rows[i:i + args.micro_batch] for i in range(0, len(rows), args.micro_batch)]
    batches = [collate([[samples[i] for i in r] for r in g], args.ttt_steps, pad_to=args.seq)
               for g in groups[:args.steps + args.warmup]]
    if target.graphs is not None:  # the replayed forward gives the eager one's outputs (the same kernels)
        first = batches[0].to(device)
        eager = target.packed_forward(first.input_ids, first.position_ids)
        replayed = target(first.input_ids, first.position_ids)
        graphs_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(eager, replayed))
        scale = max(float(a.float().abs().max()) for a in eager)
        if graphs_diff > 1e-2 * scale:
            raise SystemExit(f"{name}: the target's CUDA graph differs from its eager forward by {graphs_diff} "
                             f"(outputs up to {scale})")
    use_flex = device.type == "cuda" and args.ttt_attention == "flex"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if len(batches) < args.steps + args.warmup:
        raise SystemExit(f"{name}: the samples fill {len(batches)} micro-batches, fewer than --warmup + --steps")
    tokens = flops = 0.0
    t0 = warm_start = time.perf_counter()
    profiler = step_profiler(device) if args.profile is not None else contextlib.nullcontext()
    host = cProfile.Profile() if args.cprofile is not None else None
    for i, cpu_batch in enumerate(batches):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
            warmup_seconds = t0 - warm_start
            profiler.__enter__()
            if host is not None:
                host.enable()
        batch = cpu_batch.to(device, pinned=not args.pageable_copies)
        step0 = flex_step0(batch.doc_ids, cfg.num_attention_heads) if use_flex else \
            math_step0(document_causal_mask(batch.doc_ids))
        feats, labels = online_features(target, batch, family_of(cfg), draft_ids)
        with amp:
            loss, _ = module(batch, feats, labels, step0, [float(c) for c in cpu_batch.supervised_counts()],
                             metrics=(i + 1) % args.metrics_every == 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in drafter.parameters() if p.requires_grad], 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            pairs = attention_pairs(cpu_batch)
            tokens += cpu_batch.num_tokens
            flops += target_flops(info, cpu_batch.num_tokens, pairs, int(cpu_batch.label_pos.numel())) + \
                drafter_flops(cfg, cpu_batch.num_tokens, pairs, sum(cpu_batch.supervised_counts()), args.ttt_steps)
    sync(device)
    seconds = time.perf_counter() - t0
    title = f"{name}: {args.steps} steps, mb {args.micro_batch}x{args.seq}, loss {args.loss}, {seconds:.2f} s " \
        "(profiled)"
    if host is not None:
        host.disable()
        write_host_profile(host, args.cprofile, title)
    if args.profile is not None:
        profiler.__exit__(None, None, None)
        write_profile(profiler, device, args.profile, title)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"benchmark": "train", "target": name, "algorithm": "eagle3", "ttt_steps": args.ttt_steps, "seq": args.seq,
            "compile": bool(args.compile and device.type == "cuda"),
            "compile_loss": not args.eager_loss and device.type == "cuda",
            "compile_target": bool(args.compile_target and device.type == "cuda"),
            "pinned_copies": not args.pageable_copies, "metrics_every": args.metrics_every,
            "target_graphs": graphs_diff is not None, "target_graphs_max_diff": graphs_diff,
            "samples": str(args.samples or "synthetic"),
            "loss_kind": args.loss, "profiled": args.profile is not None or args.cprofile is not None,
            "micro_batch": args.micro_batch, "draft_vocab": draft_vocab, "steps": args.steps,
            "real_tokens_per_s": round(tokens / seconds, 1), "seconds_per_step": round(seconds / args.steps, 5),
            "warmup_seconds": round(warmup_seconds, 2), "mfu": round(flops / seconds / peak, 4),
            "peak_tflops": round(peak / 1e12, 1), "max_mem_gib": round(mem, 1), "loss": round(float(loss.detach()), 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="SmolLM2 HF dir (or fetch_target dir)")
    ap.add_argument("--shapes", default="smollm2,llama3.2-1b,llama3.1-8b",
                    help="comma list of: smollm2 (the --model dir), llama3.2-1b, llama3.1-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--micro-batch", type=int, default=16, help="rows of --seq tokens per step (smollm2)")
    ap.add_argument("--big-micro-batch", type=int, default=4, help="rows per step for the 1B/8B shapes")
    ap.add_argument("--draft-vocab", type=int, default=32000)
    ap.add_argument("--ttt-attention", choices=("flex", "math"), default="flex",
                    help="TTT step-0 attention on CUDA: FlexAttention (compiled) or explicit [B,h,T,T] scores")
    ap.add_argument("--compile", action="store_true", help="torch.compile the drafter layer (train.compile)")
    ap.add_argument("--compile-target", action="store_true",
                    help="torch.compile the target's decoder layers (train.compile_target)")
    ap.add_argument("--eager-loss", action="store_true",
                    help="the draft loss without torch.compile (train.compile_loss=false)")
    ap.add_argument("--target-graphs", action="store_true",
                    help="replay the target's forward from CUDA graphs (train.target_graphs), checked against eager")
    ap.add_argument("--pageable-copies", action="store_true",
                    help="copy each batch to the GPU from pageable memory (the host then waits for the GPU at every "
                         "step), the baseline of the training loop's pinned copies")
    ap.add_argument("--metrics-every", type=int, default=1,
                    help="the training metrics on every Nth step only (train.metrics_every)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU, seq 256, 2 steps, smollm2 shape only")
    ap.add_argument("--samples", type=Path, default=None,
                    help="the tokenize stage's output dir: its train rows feed the smollm2 shape (default: synthetic)")
    ap.add_argument("--profile", type=Path, default=None, help="append the timed steps' profiler tables to this file")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="append a cProfile of the timed steps' host side to this file")
    ap.add_argument("--loss", choices=DRAFT_LOSSES, default="soft_ce", help="the draft loss (train.loss)")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq, args.steps, args.warmup, args.micro_batch = 256, 2, 1, 2
        args.shapes, args.draft_vocab = "smollm2", 2048
    device = pick_device("cpu" if args.smoke else "auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_matmul_peak(device, dtype)
    results = args.results if args.results is not None else (None if args.smoke else REPO / "benchmarks" / "RESULTS.md")
    base_mb = args.micro_batch
    for shape in args.shapes.split(","):
        if shape == "smollm2":
            from transformers import AutoModelForCausalLM

            model_dir = resolve_model_dir(args.model)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
            model.to(device).eval().requires_grad_(False)
            args.micro_batch = base_mb
        else:
            model = random_llama(shape, device, dtype)
            args.micro_batch = args.big_micro_batch
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = bench_one(shape, model, args, device, peak)
        print(json.dumps(row), flush=True)
        if results is not None:
            append_result_row(results, f"train ({shape}, EAGLE-3, online)", hardware_name(device),
                              "python benchmarks/train.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                              f"{row['real_tokens_per_s']:.0f} real tok/s, MFU {row['mfu']:.1%} "
                              f"(peak {row['peak_tflops']} TFLOP/s), mb {row['micro_batch']}x{args.seq}, "
                              f"ttt {args.ttt_steps}, draft vocab {row['draft_vocab']}"
                              f"{', drafter layer compiled' if row['compile'] else ''}"
                              f"{', target layers compiled' if row['compile_target'] else ''}"
                              f"{', eager loss' if not row['compile_loss'] else ''}"
                              f"{f', loss {args.loss}' if args.loss != 'soft_ce' else ''}"
                              f"{f', metrics every {args.metrics_every} steps' if args.metrics_every > 1 else ''}, "
                              f"{row['max_mem_gib']} GiB, "
                              f"{row['warmup_seconds']} s for the {args.warmup} warm-up steps, "
                              f"rows: {row['samples']}{' (profiled)' if row['profiled'] else ''}",
                              "NeMo AutoModel 0.7.0 (SmolLM2, issue 4): 11.3k tok/s mb1, 22.6k tok/s mb4",
                              figures=row, name="train",
                              config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
