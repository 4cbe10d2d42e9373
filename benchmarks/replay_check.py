"""Does serving accept what training predicts, on a real target and drafter, and where in a conversation?

    python benchmarks/replay_check.py --target results/<exp>/target --export results/<exp>/export \
        --tokens results/<exp>/data/tokens

1. Agreement. For each prompt (MT-bench first turns, or the first user turns of --prompts-path), the engine
   decodes the target's greedy answer (up to EOS or --max-new-tokens). Then the engine's greedy chain
   (K, 1, K+1) runs on the same prompt with the exported drafter, and the training module replays the same
   sample (TTT unroll of K steps, the drafter loaded from the export). Every round's accepted drafts are
   compared. fp32, so they should agree round for round; a difference means training and serving disagree.
2. With --tokens: the training replay τ over the validation split of a tokenize-stage output, for first
   assistant turns and later ones, over whole answers and over their first --max-new-tokens tokens. The
   training log's `replay_tau` averages every turn of every answer, which can be far from what a benchmark
   of first turns and short answers measures.

Prints one JSON line; appends a row to benchmarks/RESULTS.md (--results '' to skip), with the engine's fast paths
(--token-path ... flags; resolved for the device) in its config.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from eaglepipe.config import params_from_dict, to_dict
from eaglepipe.config.schema import Config
from eaglepipe.data.tokens_io import read_tokens, write_token_shards
from eaglepipe.data.vocab import save_vocab
from eaglepipe.engine import EngineOptions
from eaglepipe.engine.model import LlamaRunner
from eaglepipe.export.layout import WEIGHTS_FILE
from eaglepipe.speculative import SpeculativeGenerator
from eaglepipe.speculative.agreement import compare, replay_by_turn
from eaglepipe.speculative.drafter_loader import drafter_dir, format_dir_config
from eaglepipe.target.info import load_tokenizer, resolve_model_dir
from eaglepipe.train.loop import Paths, Trainer
from eaglepipe.train.setup import target_info
from eaglepipe.utils.device import pick_device
from eaglepipe.utils.engine_flags import add_engine_flags, options_from_args

from decode import append_result_row, engine_options_config, hardware_name
from spec_decode import first_turn_prompts

REPO = Path(__file__).resolve().parents[1]


def greedy_samples(target: Path, prompts: list[list[int]], max_new_tokens: int, eos: int,
                   device: torch.device, options: EngineOptions) -> list[dict]:
    """Each prompt with the target's greedy answer (fp32 engine runner), loss mask on the answer."""
    runner = LlamaRunner(target, device=device, dtype=torch.float32, max_slots=1,
                         max_len=max(map(len, prompts)) + max_new_tokens + 8, options=options)
    samples = []
    for i, prompt in enumerate(prompts):
        tokens = [int(runner.prefill([prompt], [0]).last_logits.argmax(-1)[0])]
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            tokens.append(int(runner.decode([tokens[-1]], [0]).argmax(-1)[0]))
        runner.release(0)
        mask = np.zeros(len(prompt) + len(tokens), np.int8)
        mask[len(prompt):] = 1
        samples.append({"id": f"prompt{i}", "input_ids": np.array(prompt + tokens, np.int32), "loss_mask": mask})
    return samples


def replay_trainer(target: Path, export: Path, samples: list[dict], ttt_steps: int, device: torch.device,
                   work: Path) -> Trainer:
    """A Trainer (fp32, online) whose drafter is the export (its family's training objective), over `samples`, with
    the export's draft vocab."""
    from safetensors.torch import load_file

    weights = load_file(str(export / WEIGHTS_FILE))
    save_vocab(work / "vocab", weights["d2t"], weights["t2d"], torch.zeros(weights["t2d"].numel(), dtype=torch.long))
    write_token_shards(work / "tokens", "train", samples)
    write_token_shards(work / "tokens", "val", samples)
    (work / "hidden").mkdir()
    (work / "hidden" / "manifest.json").write_text('{"mode": "online"}')
    layers = int(target_info(target)["num_layers"])
    d = to_dict(Config())
    d["device"] = device.type
    d["data"]["seq_length"] = max(len(s["input_ids"]) for s in samples)
    _, exported = format_dir_config(export, layers)
    d["target"]["aux_layers"] = exported.aux_layers
    d["train"].update(algorithm=exported.algorithm, ttt_steps=ttt_steps, max_steps=1, micro_batch_size=1,
                      pack=False, precision="fp32", init_from=str(export))
    d["bench"]["sweep"] = [dict(num_steps=ttt_steps, topk=1, num_draft_tokens=ttt_steps + 1)]  # the chain checked
    return Trainer(params_from_dict(d), Paths(target, work / "tokens", work / "vocab", work / "hidden", work / "train"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, type=Path, help="fetch_target output dir or HF model dir")
    ap.add_argument("--export", required=True, type=Path,
                    help="export dir (or its sglang/ or vllm/ dir) of an EAGLE-family or P-EAGLE drafter")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the agreement check (0: skip it)")
    ap.add_argument("--prompts-path", type=Path, default=None, help="JSONL/parquet prompts instead of MT-bench")
    ap.add_argument("--prompts-field", default="messages", help="with --prompts-path: the prompt field")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ttt-steps", type=int, default=7,
                    help="K: chain drafts per round (the TTT unroll's steps, P-EAGLE's depths)")
    ap.add_argument("--tokens", type=Path, default=None, help="tokenize-stage output: split its val answers by turn")
    ap.add_argument("--val-samples", type=int, default=40)
    ap.add_argument("--results", default=None, help="RESULTS.md to append to ('' to skip)")
    add_engine_flags(ap)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    target, export = args.target, drafter_dir(args.export)
    tokenizer = load_tokenizer(resolve_model_dir(target))
    prompts = first_turn_prompts(tokenizer, max(args.prompts, 1), args.prompts_path, args.prompts_field)
    options = options_from_args(args)
    samples = greedy_samples(target, prompts, args.max_new_tokens, tokenizer.eos_token_id, device, options)
    k = args.ttt_steps
    result: dict = {"target": str(args.target), "export": str(args.export), "ttt_steps": k, "device": str(device),
                    "prompts": "MT-bench" if args.prompts_path is None else str(args.prompts_path),
                    "engine_options": engine_options_config(options, device)}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = replay_trainer(target, export, samples, k, device, Path(tmp))
        algorithm = result["algorithm"] = trainer.drafter.config.algorithm
        if args.prompts > 0:
            runner = LlamaRunner(target, device=device, dtype=torch.float32, max_slots=1,
                                 max_len=max(len(s["input_ids"]) for s in samples) + k + 8, options=options)
            generator = SpeculativeGenerator(runner, export, dict(num_steps=k, topk=1, num_draft_tokens=k + 1))
            result["agreement"] = {"samples": len(samples), **compare(trainer, generator, samples, k)}
        if args.tokens is not None:
            val = read_tokens(args.tokens, "val")[:args.val_samples]
            result["val_by_turn"] = replay_by_turn(trainer, val, k, caps=(None, args.max_new_tokens))
    print(json.dumps(result), flush=True)
    results = (REPO / "benchmarks" / "RESULTS.md" if args.results is None
               else (Path(args.results) if args.results else None))
    if results is not None:
        parts = []
        if "agreement" in result:
            a = result["agreement"]
            parts.append(f"{a['samples']} {result['prompts']} answers: engine τ {a['engine_tau']:.3f}, training replay "
                         f"τ {a['replayed_tau']:.3f}, {a['rounds_differing']} of {a['rounds']} rounds differ")
        for v in result.get("val_by_turn", []):
            cap = f" (first {v['cap']} tokens of each answer)" if v["cap"] else ""
            parts.append(f"val replay τ{cap} {v['replay_tau']:.2f}: first turns {v['first']['replay_tau']:.2f}, "
                         f"later turns {v['later']['replay_tau']:.2f} ({v['samples']} samples)")
        command = "python benchmarks/replay_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_result_row(results, f"replay_check ({algorithm}, chain {k}, fp32)", hardware_name(device),
                          command, "; ".join(parts), "(none: training vs serving on the same answers)",
                          config={"engine_options": result["engine_options"]})
    return result


if __name__ == "__main__":
    main()
