"""Host work of one drafter training step: the PyTorch ops the host dispatches, eager against `train.compile`.

    python benchmarks/train_ops.py                      # EAGLE-3, TTT 7, SmolLM2-shaped, on this machine's CPU
    python benchmarks/train_ops.py --algorithm eagle1 --ttt-steps 1

At a few packed rows a step the training loop on a GPU is bound by the host, which spends roughly the same few
microseconds on every op it dispatches, so the op count of a step is the figure that the compile and graph
switches must bring down. This counts the top-level aten ops (those not issued by another aten op) that the
profiler records for the drafter's part of a step: its forward (TTT unroll, loss, metrics), backward, gradient
clipping and AdamW step; a third count is the compiled step without its training metrics (a step that
`train.metrics_every` skips). The target's forward runs outside the count. The counts do not depend on the
weights or the device, so a random SmolLM2-shaped target (8 layers suffice: it only supplies features) and the CPU
serve; the loss runs eager and step 0's attention as a dense mask, as on CPU (on CUDA both are single compiled
calls).
Appends a `train_ops` row to benchmarks/RESULTS.md and results.jsonl unless --no-results.
"""
from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from eaglepipe.families.registry import family_of
from eaglepipe.models.target import TargetWithAux
from eaglepipe.train.batches import collate, pack_rows
from eaglepipe.train.features import online_features
from eaglepipe.train.module import TTTModule
from eaglepipe.train.objective import Objective
from eaglepipe.train.ttt_attention import document_causal_mask, math_step0

from decode import append_result_row, hardware_name
from train import first_ids_drafter, info_of, synthetic_samples

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
COUNTED = ("aten::", "Torch-Compiled", "CompiledFunction")


def top_level_ops(prof: profile) -> collections.Counter:
    """aten ops the profiler saw that no other aten op (or compiled region) issued."""
    top: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(COUNTED):
            parent = parent.cpu_parent
        if parent is None and event.name.startswith("aten::"):
            top[event.name] += 1
    return top


def count_step_ops(args: argparse.Namespace, compiled: bool, metrics: bool = True) -> dict:
    """Top-level ops of the drafter's part of one training step (the third: the first two warm up), with or
    without its training metrics."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, num_hidden_layers=8)).eval()
    info = info_of(model)
    drafter, vocab = first_ids_drafter(model, args.algorithm, args.draft_vocab)
    cfg = drafter.config
    if compiled:
        drafter.compile_layers()
    module = TTTModule(drafter, Objective.of(ttt_steps=args.ttt_steps, compile_loss=False))
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = TargetWithAux(model, cfg.aux_layers)
    samples = synthetic_samples(16 * args.micro_batch, info["vocab_size"], args.seq, 0)
    rows = pack_rows([len(s["input_ids"]) for s in samples], range(len(samples)), args.seq, True)
    batch = collate([[samples[i] for i in r] for r in rows[:args.micro_batch]], args.ttt_steps, pad_to=args.seq)
    step0 = math_step0(document_causal_mask(batch.doc_ids))
    with torch.no_grad():
        features, labels = online_features(target, batch, family_of(cfg), torch.arange(vocab))
    denominators = [float(c) for c in batch.supervised_counts()]

    def step() -> None:
        loss, _ = module(batch, features, labels, step0, denominators, metrics=metrics)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = top_level_ops(prof)
    return {"ops": sum(top.values()), "most_common": dict(top.most_common(8))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", default="eagle3", help="eagle3 | eagle3.1 | eagle1")
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--seq", type=int, default=256, help="tokens a packed row (the counts do not depend on it)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, default=32000, help="(EAGLE-1 drafts over the whole vocab)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="print only")
    args = ap.parse_args(argv)
    eager, compiled = count_step_ops(args, False), count_step_ops(args, True)
    bare = count_step_ops(args, True, metrics=False)
    figures = {"eager_ops": eager["ops"], "compiled_ops": compiled["ops"],
               "compiled_over_eager": round(compiled["ops"] / eager["ops"], 3),
               "compiled_ops_without_metrics": bare["ops"],
               "metrics_share_of_compiled": round(1 - bare["ops"] / compiled["ops"], 3),
               "eager_most_common": eager["most_common"], "compiled_most_common": compiled["most_common"]}
    print(json.dumps(figures))
    if args.no_results:
        return
    setup = f"{args.algorithm}, TTT {args.ttt_steps}, SmolLM2-shaped, draft vocab {args.draft_vocab}"
    append_result_row(args.results, f"train_ops ({setup})", hardware_name(torch.device("cpu")),
                      "python benchmarks/train_ops.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                      f"{compiled['ops']} top-level ops a drafter training step with train.compile, "
                      f"{figures['compiled_over_eager']}× eager's; {bare['ops']} without its training metrics "
                      f"(a step train.metrics_every skips)", f"eager: {eager['ops']} ops (same run)",
                      figures=figures, config=vars(args) | {"results": str(args.results)},
                      baseline_figures={"eager_ops": eager["ops"]}, name="train_ops")


if __name__ == "__main__":
    main()
