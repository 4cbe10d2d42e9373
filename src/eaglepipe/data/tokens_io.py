"""Reading and writing tokenized samples (`data/tokens/`): `<split>-NNNNN.parquet` with id/input_ids/loss_mask."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKENS_SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                           ("loss_mask", pa.list_(pa.int8()))])
SPLITS = ("train", "val")


def token_files(directory: str | Path, split: str = "train") -> list[Path]:
    """The shard files of one split, in name order (may be empty, e.g. a val split of 0 samples)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a tokenize output directory")
    return sorted(directory.glob(f"{split}-*.parquet"))


def read_tokens(directory: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """All samples of a split as `{"id": str, "input_ids": int32 array, "loss_mask": int8 array}`."""
    samples: list[dict[str, Any]] = []
    for path in token_files(directory, split):
        table = pq.read_table(path, columns=["id", "input_ids", "loss_mask"])
        ids = table.column("id").to_pylist()
        input_ids = table.column("input_ids").combine_chunks()
        loss_mask = table.column("loss_mask").combine_chunks()
        offsets = input_ids.offsets.to_numpy()
        flat_ids = input_ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        flat_mask = loss_mask.values.to_numpy(zero_copy_only=False).astype(np.int8, copy=False)
        for i, sid in enumerate(ids):
            a, b = offsets[i], offsets[i + 1]
            samples.append({"id": sid, "input_ids": flat_ids[a:b].copy(), "loss_mask": flat_mask[a:b].copy()})
    return samples


def write_token_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples (`id`, `input_ids`, `loss_mask` sequences of equal length) to one parquet shard."""
    ids: list[str] = []
    input_ids: list[Sequence[int]] = []
    masks: list[Sequence[int]] = []
    for s in samples:
        if len(s["input_ids"]) != len(s["loss_mask"]):
            raise ValueError(f"sample {s['id']}: input_ids and loss_mask lengths differ")
        ids.append(str(s["id"]))
        input_ids.append(np.asarray(s["input_ids"], dtype=np.int32).tolist())
        masks.append(np.asarray(s["loss_mask"], dtype=np.int8).tolist())
    table = pa.Table.from_pydict({"id": ids, "input_ids": input_ids, "loss_mask": masks}, schema=TOKENS_SCHEMA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return len(ids)


def write_token_shards(directory: str | Path, split: str, samples: Sequence[dict[str, Any]],
                       shard_size: int = 4096) -> list[Path]:
    """Write a split as `<split>-00000.parquet`, ... with at most `shard_size` samples each."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = []
    for n, start in enumerate(range(0, len(samples), shard_size)):
        path = Path(directory) / f"{split}-{n:05d}.parquet"
        write_token_shard(path, samples[start:start + shard_size])
        paths.append(path)
    return paths
