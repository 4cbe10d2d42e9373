"""Stage `vocab`: the draft vocabulary (top supervised target tokens), `d2t`/`t2d`, and its coverage.

python -m eaglepipe.stages.vocab --params params.yaml --tokens DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from ..config import Config
from ..data.tokens_io import read_tokens
from ..data.vocab import build_vocab_maps, count_supervised_tokens, coverage, coverage_curve, save_vocab
from ..utils.atomic import atomic_dir, atomic_write_json
from ..utils.cli import StageError, run_stage, stage_parser

log = logging.getLogger("eaglepipe.vocab")
CURVE_SIZES = [256, 512, 1024, 2048, 4096, 8192, 16384, 32000, 32768, 65536]


def plot_curve(curve: dict[int, float], chosen: int, path: Path) -> None:
    """A PNG of coverage versus draft vocab size, marking the configured size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [100 * curve[k] for k in sizes], marker="o")
    ax.axvline(chosen, color="gray", linestyle="--", label=f"draft_vocab_size={chosen}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("draft vocab size")
    ax.set_ylabel("supervised tokens covered (%)")
    ax.set_title("Draft vocab coverage (train split)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Count supervised tokens of --tokens (train split) and write the draft vocab into --out."""
    tokens = Path(args.tokens)
    stats_path = tokens / "stats.json"
    if not stats_path.exists():
        raise StageError(f"{stats_path} not found: is {tokens} the output of the tokenize stage?")
    vocab_size = int(json.loads(stats_path.read_text())["vocab_size"])
    draft_size = cfg.vocab.draft_vocab_size
    if draft_size > vocab_size:
        raise StageError(f"vocab.draft_vocab_size={draft_size} exceeds the target vocab size {vocab_size}")
    train = read_tokens(tokens, "train")
    if not train:
        raise StageError(f"{tokens} holds no train samples")
    try:
        freq = count_supervised_tokens(train, vocab_size)
        val_freq = count_supervised_tokens(read_tokens(tokens, "val"), vocab_size)
    except ValueError as e:
        raise StageError(str(e)) from e
    d2t, t2d = build_vocab_maps(freq, draft_size)
    distinct = int((freq > 0).sum())
    curve = coverage_curve(freq, sorted({k for k in CURVE_SIZES if k < vocab_size} | {draft_size, vocab_size}))
    info = {"draft_vocab_size": draft_size, "target_vocab_size": vocab_size, "coverage": coverage(freq, t2d),
            "val_coverage": coverage(val_freq, t2d) if int(val_freq.sum()) else None,
            "supervised_tokens": int(freq.sum()), "distinct_supervised_tokens": distinct,
            "padded_with_unseen_ids": max(0, draft_size - distinct),
            "coverage_by_size": [{"size": k, "coverage": v} for k, v in curve.items()]}
    with atomic_dir(args.out) as tmp:
        save_vocab(tmp, d2t, t2d, freq)
        atomic_write_json(tmp / "vocab.json", info)
        plot_curve(curve, draft_size, tmp / "coverage.png")
    if distinct < draft_size:
        log.warning("only %d distinct supervised tokens for a draft vocab of %d: padded with the lowest unused ids",
                    distinct, draft_size)
    log.info("draft vocab %d of %d covers %.2f%% of %d supervised train tokens (val: %s); by size: %s",
             draft_size, vocab_size, 100 * info["coverage"], info["supervised_tokens"],
             "n/a" if info["val_coverage"] is None else f"{100 * info['val_coverage']:.2f}%",
             ", ".join(f"{k}: {100 * v:.1f}%" for k, v in curve.items()))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser("Build the draft vocabulary (d2t/t2d) from supervised token frequencies.")
    p.add_argument("--tokens", required=True, help="tokenize output directory (data/tokens)")
    p.add_argument("--out", required=True, help="output directory (vocab)")
    run_stage("vocab", p, body, argv)


if __name__ == "__main__":
    main()
