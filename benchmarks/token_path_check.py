"""Bit-identity of the Triton token path on the real GPU kernels (the CPU tests run Triton's interpreter).

    python benchmarks/token_path_check.py --model results/<exp>/target      # on a GPU; appends to RESULTS.md

Greedy-decodes a few chat prompts with the token path and checks, at every step, that the logits are the same
bits when the token is decoded alone, in a batch with other sequences, and as a node of a draft tree (a chain
and a sibling branch verified in one forward). It also counts the steps where the token path's argmax agrees
with the PyTorch path's. Prints one JSON line; exits with status 2 if any bit differs (1 is a crash).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from eaglepipe.engine import EngineOptions
from eaglepipe.engine.model import LlamaRunner
from eaglepipe.target.info import load_tokenizer, resolve_model_dir
from eaglepipe.utils.device import pick_device

from decode import QUESTIONS, append_result_row, hardware_name

REPO = Path(__file__).resolve().parents[1]


def check_prompt(fast: LlamaRunner, slow: LlamaRunner, prompt: list[int], steps: int) -> dict[str, int]:
    """Slot 0 decodes alone; slot 1 decodes the same tokens batched with slot 2; slot 3 verifies each step as a
    tree (the token, its greedy child and the runner-up sibling) and keeps only the token. The PyTorch-path
    runner is fed the same tokens (teacher-forced) to compare argmaxes."""
    for slot in range(4):
        first = fast.prefill([prompt], [slot]).last_logits.argmax(-1).tolist()[0]
    slow.prefill([prompt], [0])
    counts = {"steps": 0, "alone_vs_batched": 0, "alone_vs_tree_root": 0, "alone_vs_tree_child": 0,
              "argmax_agrees_with_torch_path": 0}
    tok, child = first, None
    tree = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])
    for _ in range(steps):
        alone = fast.decode([tok], [0])[0]
        batched = fast.decode([tok, 17], [1, 2])[0]
        top2 = alone.topk(2).indices.tolist()
        n = fast.lengths[3]
        logits, _ = fast.forward(torch.tensor([[tok] + top2]), [3], positions=torch.tensor([[n, n + 1, n + 1]]),
                                 tree_mask=tree)
        fast.commit(3, 1)
        counts["steps"] += 1
        counts["alone_vs_batched"] += int(torch.equal(alone, batched))
        counts["alone_vs_tree_root"] += int(torch.equal(alone, logits[0, 0]))
        counts["alone_vs_tree_child"] += int(child is None or torch.equal(alone, child))
        counts["argmax_agrees_with_torch_path"] += int(int(slow.decode([tok], [0])[0].argmax()) == top2[0])
        tok, child = top2[0], logits[0, 1]
    return counts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or fetch_target output dir")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default: on a GPU only)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS[:args.prompts]]
    max_len = max(len(p) for p in prompts) + 2 * args.steps + 8
    fast = LlamaRunner(model_dir, device=device, max_slots=4, max_len=max_len, options=EngineOptions(token_path=True))
    slow = LlamaRunner(model_dir, device=device, max_slots=1, max_len=max_len, options=EngineOptions(token_path=False))
    config = {"engine_options": asdict(fast.options), "reference_engine_options": asdict(slow.options)}
    totals: dict[str, int] = {}
    for prompt in prompts:
        for key, value in check_prompt(fast, slow, prompt, args.steps).items():
            totals[key] = totals.get(key, 0) + value
    identical = all(totals[k] == totals["steps"] for k in totals if k.startswith("alone_vs"))
    record = {"bench": "token_path_check", "model": str(args.model), "device": hardware_name(device),
              "dtype": str(fast.dtype), **totals, "bit_identical": identical}
    print(json.dumps(record), flush=True)
    results = args.results if args.results is not None else (
        REPO / "benchmarks" / "RESULTS.md" if device.type == "cuda" else None)
    if results is not None:
        command = "python benchmarks/token_path_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        result = (f"{totals['steps']} greedy steps: logits bit-identical alone/batched {totals['alone_vs_batched']}, "
                  f"alone/tree root {totals['alone_vs_tree_root']}, alone/tree child {totals['alone_vs_tree_child']}")
        append_result_row(results, "token path bit-identity", record["device"], command, result,
                          f"argmax equal to the PyTorch path at {totals['argmax_agrees_with_torch_path']} steps",
                          config=config)
    if not identical:
        sys.exit(2)
    return record


if __name__ == "__main__":
    main()
