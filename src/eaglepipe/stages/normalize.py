"""Stage `normalize`: raw records → `chat.parquet` (OpenAI messages), `rejects.jsonl`, `stats.json`.

With data.exclude_benchmark, rows that quote the benchmark's prompts are dropped (data/contamination.py).

python -m eaglepipe.stages.normalize --params params.yaml --raw DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import Config
from ..data.chat_io import write_conversations
from ..data.contamination import BenchmarkIndex, benchmark_prompts
from ..data.normalize import NormalizeStats, all_rejected_message, normalize_rows
from ..utils.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ..utils.cli import StageError, run_stage, stage_parser

log = logging.getLogger("eaglepipe.normalize")


def iter_raw(raw_dir: Path) -> Iterator[tuple[str, int, str]]:
    """`(source, row, record)` from every `part-*.parquet` of a download output, in order."""
    parts = sorted(raw_dir.glob("part-*.parquet"))
    if not parts:
        raise StageError(f"{raw_dir} holds no part-*.parquet files: is it the output of the download stage?")
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    with tqdm(total=total, desc="normalize", unit="row", disable=None) as bar:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(columns=["source", "row", "record"]):
                for r in batch.to_pylist():
                    yield r["source"], r["row"], r["record"]
                bar.update(batch.num_rows)


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Normalise --raw into --out."""
    stats = NormalizeStats()
    rejects: list[dict] = []
    benchmark = BenchmarkIndex(benchmark_prompts(cfg.bench.prompts)) if cfg.data.exclude_benchmark else None
    if benchmark is not None:
        log.info("dropping rows that quote any of %d benchmark prompt turns", len(benchmark.prompts))
    rows = list(normalize_rows(iter_raw(Path(args.raw)), cfg.data.system_prompt == "drop", stats, rejects,
                               benchmark))
    if not rows:
        if stats.rows_in == 0:
            raise StageError(f"{args.raw} holds no rows")
        raise StageError(all_rejected_message(stats, rejects))
    with atomic_dir(args.out) as tmp:
        write_conversations(tmp / "chat.parquet", rows)
        atomic_write_text(tmp / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        atomic_write_json(tmp / "stats.json", {**stats.as_dict(), "system_prompt": cfg.data.system_prompt,
                                               "benchmark_prompt_turns": len(benchmark.prompts) if benchmark else 0})
    dropped = ", ".join(f"{n} x {r}" for r, n in stats.rejected.most_common())
    log.info("kept %d of %d rows (%d assistant turns); dropped %d%s; repairs: %s", stats.rows_out, stats.rows_in,
             stats.assistant_turns_out, len(rejects), f" ({dropped}; see rejects.jsonl)" if dropped else "",
             dict(stats.repairs))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser("Normalise raw records to OpenAI-style messages, rejecting invalid rows with a reason.")
    p.add_argument("--raw", required=True, help="download output directory (data/raw)")
    p.add_argument("--out", required=True, help="output directory (data/chat)")
    run_stage("normalize", p, body, argv)


if __name__ == "__main__":
    main()
