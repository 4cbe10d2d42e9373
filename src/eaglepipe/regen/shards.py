"""The resumable work dir of the regenerate stage: a manifest plus atomically committed shards.

Shard k holds the outcome of input rows [k*shard_size, (k+1)*shard_size): the regenerated ones in
`shard-0000k.parquet` (in input order) and the rest in `shard-0000k.meta.json` (rejects and counts). The
input rows are the conversations, or with regen.samples_per_prompt = N > 1 each conversation's N samples
in turn; a meta's `conversations` counts rows. The meta file is written first and the parquet last, so the
parquet's presence means the shard is complete; a complete shard is never rewritten.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from ..utils.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ..utils.cli import StageError

# Manifest keys that must be identical for a resume to continue in the same work dir.
RESUME_KEYS = ("fingerprint", "source_hash", "num_conversations", "shard_size", "params", "model", "backend")
TRIMMED = "trimmed to fit the context"


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"shard-{index:05d}.parquet"


def work_dir_for(out_dir: str | Path, fingerprint: str) -> Path:
    """`results/<exp>/.work/regenerate/<fingerprint>` for an out dir `results/<exp>/data/regen`."""
    out_dir = Path(out_dir).resolve()
    root = out_dir.parent.parent if out_dir.parent.name == "data" else out_dir.parent
    return root / ".work" / "regenerate" / fingerprint


class ShardStore:
    """The shards and manifest in one work dir."""

    def __init__(self, work_dir: str | Path):
        self.dir = Path(work_dir)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def prepare(self, manifest: dict[str, Any]) -> None:
        """Create the work dir with `manifest`, or check that an existing one matches it exactly.

        Leftover temp files of a killed run are removed. A mismatch raises StageError and touches nothing.
        """
        if self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            diffs = [k for k in RESUME_KEYS if _canon(old.get(k)) != _canon(manifest.get(k))]
            if diffs:
                detail = "; ".join(f"{k}: was {_short(old.get(k))}, now {_short(manifest.get(k))}" for k in diffs)
                raise StageError(f"refusing to resume in {self.dir}: its manifest does not match this run "
                                 f"({detail}). Restore the old settings, or delete that directory to start over.")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.manifest_path, manifest)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def is_done(self, index: int) -> bool:
        """True when shard `index` was committed."""
        return (self.dir / shard_name(index)).exists()

    def commit(self, index: int, rows: list[dict[str, Any]], rejects: list[dict[str, Any]],
               counts: dict[str, Any]) -> None:
        """Atomically commit shard `index` (meta first, the parquet last as the completion mark)."""
        from ..data.chat_io import write_conversations

        meta = {"index": index, "rejects": rejects, **counts}
        atomic_write_text(self.dir / f"shard-{index:05d}.meta.json", json.dumps(meta, sort_keys=True) + "\n")
        final = self.dir / shard_name(index)
        tmp = self.dir / f".{final.name}.{os.getpid()}.tmp"
        write_conversations(tmp, rows)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def shard_indices(self) -> list[int]:
        """Indices of the committed shards, ascending."""
        return sorted(int(p.name[6:11]) for p in self.dir.glob("shard-*.parquet"))

    def read_meta(self, index: int) -> dict[str, Any]:
        """The meta record (rejects and counts) of a committed shard."""
        return json.loads((self.dir / f"shard-{index:05d}.meta.json").read_text())

    def record_command(self, command: str) -> None:
        """Remember the server command of the run committing shards here, so a later run that finds every
        shard done still publishes where they came from."""
        atomic_write_text(self.dir / "backend_command.txt", command + "\n")

    def recorded_command(self) -> str | None:
        """The last recorded server command, if a run here started a server."""
        path = self.dir / "backend_command.txt"
        return path.read_text().strip() if path.exists() else None

    def publish(self, out_dir: str | Path, num_shards: int, stats: dict[str, Any],
                manifest_extra: dict[str, Any]) -> dict[str, Any]:
        """Atomically replace `out_dir` with the non-empty shards, manifest.json, rejects.jsonl and stats.json.

        Returns the totals, including `dropped` (rejects by category) and `changed` (conversations whose
        history was trimmed to fit). Raises StageError when a shard is missing.
        """
        missing = [i for i in range(num_shards) if not self.is_done(i)]
        if missing:
            raise StageError(f"cannot publish: {len(missing)} shard(s) not committed in {self.dir} "
                             f"(first: {shard_name(missing[0])})")
        metas = [self.read_meta(i) for i in range(num_shards)]
        totals: dict[str, Any] = {k: sum(int(m.get(k, 0)) for m in metas) for k in
                                  ("conversations", "regenerated", "rejected", "completion_tokens", "trimmed",
                                   "trimmed_turns")}
        dropped = Counter(r.get("category", r["reason"]) for m in metas for r in m["rejects"])
        totals.update(rows_in=totals["conversations"], rows_out=totals["regenerated"],
                      dropped=dict(dropped.most_common()),
                      changed={TRIMMED: totals["trimmed"]} if totals["trimmed"] else {})
        out_dir = Path(out_dir)
        for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):  # a publish killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(out_dir) as tmp:
            for i, m in enumerate(metas):
                if m.get("regenerated", 0) > 0:
                    shutil.copyfile(self.dir / shard_name(i), tmp / shard_name(i))
            _write_jsonl(tmp / "rejects.jsonl", (r for m in metas for r in m["rejects"]))
            manifest = json.loads(self.manifest_path.read_text())
            manifest.update(manifest_extra)
            manifest["counts"] = totals
            manifest["work_dir"] = str(self.dir)
            atomic_write_json(tmp / "manifest.json", manifest)
            atomic_write_json(tmp / "stats.json", {**totals, **stats})
        return totals


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = _canon(value)
    return text if len(text) <= 120 else text[:117] + "..."
