"""Stage `tokenize`: chat template + assistant-only loss mask, truncated, split into train/val shards.

python -m eaglepipe.stages.tokenize --params params.yaml --target DIR --chat DIR --out DIR
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..config import Config
from ..data.chat_io import chat_files, read_conversations
from ..data.loss_mask import ChatMasker, TemplateMismatch, mark_supervised
from ..data.tokenize import pick_workers, split_by_source, split_stats, tokenize_conversations
from ..data.tokens_io import write_token_shards
from ..target.info import chat_template_sha256, describe_model, load_tokenizer, read_target_info, resolve_model_dir
from ..utils.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ..utils.cli import StageError, run_stage, stage_parser

log = logging.getLogger("eaglepipe.tokenize")


def target_vocab_size(target: Path) -> int:
    """The target's embedding rows (from target.json, else the HF config)."""
    if (target / "target.json").exists():
        return int(read_target_info(target)["vocab_size"])
    return int(describe_model(resolve_model_dir(target))["vocab_size"])


def count_rows(chat_dir: Path) -> int:
    """Number of conversations in a chat dir (from parquet metadata)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in chat_files(chat_dir))


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Tokenize --chat with --target's template into --out."""
    target, chat_dir = Path(args.target), Path(args.chat)
    try:
        tokenizer = load_tokenizer(target)
        masker = ChatMasker(tokenizer)
        total = count_rows(chat_dir)
    except (FileNotFoundError, ValueError, TemplateMismatch) as e:
        raise StageError(str(e)) from e
    vocab_size = target_vocab_size(target)
    log.info("end-of-turn token: %r", masker.end_of_turn)
    workers = pick_workers(total)
    log.info("tokenizing %d conversations with %d process(es)", total, workers)
    res = tokenize_conversations(masker, read_conversations(chat_dir), cfg.data.seq_length, total, workers=workers,
                                 tokenizer_dir=str(resolve_model_dir(target)))
    for reason, err in res.first_errors.items():
        log.warning("%d conversations dropped (%s), first: %s", res.dropped[reason], reason, err)
    if res.misaligned_tokens:
        log.warning("%d supervised tokens straddle the start or end of an assistant span (the template's generation "
                    "prompt merges with the reply in tokenization); they are kept in the loss", res.misaligned_tokens)
    if not res.samples:
        raise StageError(f"no conversation of {res.conversations_in} produced a supervised token "
                         f"(dropped: {dict(res.dropped)}); check the chat template and data.seq_length")
    # the sampled versions of one conversation (regen.samples_per_prompt) stay on one side of the split
    is_val = split_by_source([s["id"] for s in res.samples], cfg.data.val_fraction, cfg.seed)
    train = [s for s, v in zip(res.samples, is_val) if not v]
    val = [s for s, v in zip(res.samples, is_val) if v]
    sample = next((s for s in train if s["loss_mask"].sum() and _turns(s) >= 2), train[0])
    rendered = mark_supervised(tokenizer, sample["input_ids"], sample["loss_mask"])
    stats = {"conversations_in": res.conversations_in, "samples": len(res.samples),
             "rows_in": res.conversations_in, "rows_out": len(res.samples),
             "changed": {"truncated to data.seq_length": res.truncated},
             "dropped": dict(res.dropped), "truncated": res.truncated, "seq_length": cfg.data.seq_length,
             "misaligned_boundary_tokens": res.misaligned_tokens, "end_of_turn_token": masker.end_of_turn,
             "chat_template_sha256": chat_template_sha256(tokenizer.chat_template), "vocab_size": vocab_size,
             "tokenizer_size": len(tokenizer), "train": split_stats(train), "val": split_stats(val),
             "all": split_stats(res.samples), "seed": cfg.seed, "val_fraction": cfg.data.val_fraction}
    with atomic_dir(args.out) as tmp:
        write_token_shards(tmp, "train", train)
        write_token_shards(tmp, "val", val)
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_text(tmp / "sample.txt", f"# {sample['id']}: supervised tokens inside [[...]]\n{rendered}\n")
    print(f"--- sample {sample['id']} (supervised spans in [[...]]) ---\n{rendered}\n---", file=sys.stderr)
    a = stats["all"]
    log.info("%d samples (%d train, %d val), %d tokens, %.1f%% supervised, %d truncated, dropped %s",
             len(res.samples), len(train), len(val), a["tokens"], 100 * a["supervised_fraction"], res.truncated,
             dict(res.dropped))


def _turns(sample: dict) -> int:
    """Number of supervised runs in a sample."""
    m = sample["loss_mask"]
    return int(m[0]) + int(((m[1:] == 1) & (m[:-1] == 0)).sum())


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser("Apply the target's chat template, mask assistant tokens, truncate and split.")
    p.add_argument("--target", required=True, help="fetch_target output (or an HF model dir)")
    p.add_argument("--chat", required=True, help="chat directory (data/chat or data/regen)")
    p.add_argument("--out", required=True, help="output directory (data/tokens)")
    run_stage("tokenize", p, body, argv)


if __name__ == "__main__":
    main()
