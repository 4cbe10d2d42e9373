"""The block objective's two attention kernels on the GPU: FlexAttention (compiled, what DFlash trains with on CUDA)
against the explicit scores (the CPU kernel, which the CPU tests check against a direct reference).

Several batches of the training's shapes, each with its own random anchors and document boundaries, so that a
compiled kernel that kept an earlier batch's mask would show. Prints one JSON line per batch: the largest absolute
difference of the outputs and of the inputs' gradients, and how far the outputs under the previous batch's mask
would be (what a stale mask would show). Exits 2 where the kernels disagree. A GPU run (or one given --results)
appends a row to benchmarks/RESULTS.md and results.jsonl.

    python benchmarks/block_attention_check.py                      # GPU: SmolLM2's heads, 4 rows of 2,048 tokens
    python benchmarks/block_attention_check.py --rows 1 --length 64 --anchors 8 --device cpu   # quick CPU run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from eaglepipe.train.block_attention import flex_block_attention, math_block_attention

from decode import REPO, append_result_row, hardware_name


def random_layout(rows: int, length: int, anchors: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Document ids [R, T] (2-4 packed documents a row) and sorted distinct anchors [R, A] (the last few -1:
    padding)."""
    doc_ids = torch.zeros(rows, length, dtype=torch.long)
    chosen = torch.full((rows, anchors), -1, dtype=torch.long)
    for r in range(rows):
        cuts = torch.randperm(length - 2, generator=generator)[:int(torch.randint(1, 4, (1,), generator=generator))]
        for cut in cuts.tolist():
            doc_ids[r, cut + 1:] += 1
        used = anchors - int(torch.randint(0, max(anchors // 8, 1), (1,), generator=generator))
        chosen[r, :used] = torch.randperm(length, generator=generator)[:used].sort().values
    return doc_ids, chosen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--anchors", type=int, default=512, help="blocks a row (train.num_anchors)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tolerance", type=float, default=1e-2,
                    help="largest absolute difference of outputs and gradients allowed (fp32; a wrong mask gives ~1)")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to append to (default: the repo's on a GPU; a CPU run appends only where given)")
    args = ap.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    grads = args.device != "cpu"  # FlexAttention has no backward on CPU
    n = args.anchors * args.block
    failed = False
    previous = None
    rows = []
    for batch in range(args.batches):
        doc_ids, anchors = (x.to(args.device) for x in random_layout(args.rows, args.length, args.anchors, generator))

        def tensor(heads: int, length: int) -> torch.Tensor:
            return torch.randn(args.rows, heads, length, args.head_dim, generator=generator).to(args.device)
        q, k_ctx, v_ctx = tensor(args.heads, n), tensor(args.kv_heads, args.length), tensor(args.kv_heads, args.length)
        k_blk, v_blk = tensor(args.kv_heads, n), tensor(args.kv_heads, n)
        inputs = tuple(x.requires_grad_(grads) for x in (q, k_ctx, v_ctx, k_blk, v_blk))
        real = anchors.repeat_interleave(args.block, dim=1)[:, None, :, None].expand_as(q) >= 0
        weight = torch.randn(q.shape, generator=generator).to(args.device) * real

        def outputs_and_grads(attend) -> tuple[torch.Tensor, list[torch.Tensor]]:
            out = attend(*inputs)
            return out.detach(), list(torch.autograd.grad((out * weight).sum(), inputs)) if grads else []
        flex, flex_grads = outputs_and_grads(flex_block_attention(anchors, doc_ids, args.block, args.heads))
        exact, exact_grads = outputs_and_grads(math_block_attention(anchors, doc_ids, args.block))
        diff = (flex - exact).abs()[real].max().item()
        grad_diff = max([(a - b).abs().max().item() for a, b in zip(flex_grads, exact_grads)], default=0.0)
        row = {"batch": batch, "max_abs_diff": diff, "max_abs_grad_diff": grad_diff}
        if previous is not None:  # the kernels under the previous batch's layout: how far a stale mask would be
            with torch.no_grad():
                stale = math_block_attention(*previous, args.block)(*inputs)
            row["stale_mask_diff"] = (stale - exact).abs()[real].max().item()
        previous = (anchors, doc_ids)
        failed |= not (diff <= args.tolerance and grad_diff <= args.tolerance)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.device != "cpu" or args.results:
        worst = {k: max(r[k] for r in rows if k in r) for k in ("max_abs_diff", "max_abs_grad_diff")}
        stale = min((r["stale_mask_diff"] for r in rows if "stale_mask_diff" in r), default=None)
        shape = (f"{args.rows} rows of {args.length}, {args.anchors} blocks of {args.block} a row, {args.heads}/"
                 f"{args.kv_heads} heads of {args.head_dim}, fp32, {args.batches} batches")
        append_result_row(args.results or REPO / "benchmarks" / "RESULTS.md", "block_attention_check.py",
                          hardware_name(torch.device(args.device)),
                          "python " + " ".join(["benchmarks/block_attention_check.py"] + (argv or sys.argv[1:])),
                          f"FlexAttention{' (compiled)' if args.device != 'cpu' else ''} vs explicit scores ({shape}): "
                          f"outputs within "
                          f"{worst['max_abs_diff']:.1e}, gradients within {worst['max_abs_grad_diff']:.1e} "
                          f"({'FAIL' if failed else 'pass'} at {args.tolerance})",
                          f"explicit-score kernel, same batches; a previous batch's mask would differ by "
                          f"{stale:.2f}" if stale is not None else "explicit-score kernel, same batches",
                          figures={"batches": rows, **worst, "passed": not failed},
                          config={"shape": shape, "tolerance": args.tolerance})
    sys.exit(2 if failed else 0)


if __name__ == "__main__":
    main()
