"""The download stage's logic: read every source, subsample and mix them, write raw parquet parts."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DataCfg, SourceCfg
from ..utils.atomic import atomic_write_json, atomic_write_text
from .mix import allocate, choose_rows
from .packaged_chitchat import read_chitchat
from .packaged_evals import read_openai_evals
from .sources import SourceRecords, data_files, packaged_sharegpt_path, read_files

log = logging.getLogger("eaglepipe.data")
RAW_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("record", pa.string())])
PART_ROWS = 50_000


def read_source(src: SourceCfg, seed: int) -> SourceRecords:
    """All records of one configured source (`seed` picks the rows a per-file cap keeps)."""
    if src.kind == "packaged_sharegpt":
        return read_files(src.name, [Path(src.path) if src.path else packaged_sharegpt_path()])
    if src.kind == "packaged_openai_evals":
        return read_openai_evals(src.name, src.per_file, seed)
    if src.kind == "packaged_chitchat":
        return read_chitchat(src.name)
    if src.kind == "local":
        return read_files(src.name, data_files(Path(src.path).expanduser()))
    if src.kind == "hub":
        from .hub_dataset import read_hub_dataset

        return read_hub_dataset(src.name, src.path, src.split, src.revision, src.data_files)
    raise ValueError(f"unknown source kind {src.kind!r}")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per line (an empty file for no records)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_raw_parts(out_dir: Path, rows: list[tuple[str, int, str]]) -> list[str]:
    """Write `(source, row, record)` tuples as `part-NNNNN.parquet` files of at most PART_ROWS rows."""
    names = []
    for n, start in enumerate(range(0, max(len(rows), 1), PART_ROWS)):
        chunk = rows[start:start + PART_ROWS]
        table = pa.Table.from_arrays([pa.array([r[0] for r in chunk], pa.string()),
                                      pa.array([r[1] for r in chunk], pa.int64()),
                                      pa.array([r[2] for r in chunk], pa.string())], schema=RAW_SCHEMA)
        name = f"part-{n:05d}.parquet"
        pq.write_table(table, out_dir / name)
        names.append(name)
    return names


def download(data: DataCfg, out_dir: Path) -> dict[str, Any]:
    """Read, subsample and mix `data.sources` into `out_dir`; returns the manifest.

    Also writes `rejects.jsonl` (the incomplete last record of each truncated file, with its text and reason)
    and `stats.json` (rows in and out, and what was dropped, by reason).
    """
    read = []
    for src in data.sources:
        log.info("reading source %s (%s %s)", src.name, src.kind, src.path or "packaged")
        records = read_source(src, data.seed)
        log.info("source %s: %d records", src.name, len(records.records))
        read.append(records)
    take = allocate([len(r.records) for r in read], [s.samples for s in data.sources],
                    [s.weight for s in data.sources], data.max_samples)
    rows: list[tuple[str, int, str]] = []
    manifest_sources = {}
    for src, records, k in zip(data.sources, read, take):
        if src.samples is not None and k < src.samples:
            log.warning("source %s has only %d records, fewer than samples=%d", src.name, k, src.samples)
        chosen = choose_rows(len(records.records), k, data.seed, src.name)
        rows.extend((src.name, records.first_row + int(i), records.records[i]) for i in chosen)
        manifest_sources[src.name] = {
            "kind": src.kind, "path": src.path, "split": src.split if src.kind == "hub" else None,
            "available": len(records.records), "taken": int(len(chosen)), "capped": records.capped,
            "first_row": records.first_row, "files": records.files, "notes": records.notes}
    if not rows:
        raise ValueError("the configured sources hold no records")
    parts = write_raw_parts(out_dir, rows)
    tails = [t for r in read for t in r.truncated_tails]
    write_jsonl(out_dir / "rejects.jsonl", tails)
    stats = download_stats(manifest_sources, tails)
    atomic_write_json(out_dir / "stats.json", stats)
    manifest = {"seed": data.seed, "max_samples": data.max_samples, "total": len(rows), "parts": parts,
                "sources": manifest_sources}
    log.info("wrote %d rows (%s) in %d parts", len(rows),
             ", ".join(f"{n}: {s['taken']}" for n, s in manifest_sources.items()), len(parts))
    log.info("%s", describe_stats(stats))
    return manifest


def download_stats(sources: dict[str, dict[str, Any]], tails: list[dict[str, Any]]) -> dict[str, Any]:
    """stats.json: rows found (complete, malformed and incomplete), written, left out by sampling (a per-file cap
    included), and dropped."""
    available = sum(s["available"] + s["capped"] for s in sources.values())
    taken = sum(s["taken"] for s in sources.values())
    malformed = sum(f.get(k, 0) for s in sources.values() for f in s["files"]
                    for k in ("malformed_lines", "malformed_elements"))
    return {"rows_in": available + len(tails), "rows_out": taken, "not_sampled": available - taken,
            "malformed_passed_on": malformed, "dropped": dict(Counter(t["reason"] for t in tails)),
            "by_source": {n: {"available": s["available"], "capped": s["capped"], "taken": s["taken"]}
                          for n, s in sources.items()}}


def describe_stats(stats: dict[str, Any]) -> str:
    """The stage's summary line: rows in and out, sampling, what was dropped and why."""
    dropped = stats["dropped"]
    line = (f"read {stats['rows_in']} rows, wrote {stats['rows_out']} ({stats['not_sampled']} left out by "
            f"sampling); dropped {sum(dropped.values())}")
    if dropped:
        line += " (" + ", ".join(f"{n} x {r}" for r, n in dropped.items()) + "; written to rejects.jsonl)"
    if stats["malformed_passed_on"]:
        line += f"; {stats['malformed_passed_on']} malformed records passed on for normalize to reject"
    return line
