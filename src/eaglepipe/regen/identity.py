"""What a regeneration run depends on: source-data hash, model identity, sampling params."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..utils.cli import StageError


def chat_files(chat_dir: str | Path) -> list[Path]:
    """The parquet files of a data/chat dir, in reading order (StageError when there are none)."""
    from ..data.chat_io import chat_files as files

    try:
        return files(chat_dir)
    except FileNotFoundError as e:
        raise StageError(f"{e}: is it the output of the normalize stage?") from None


def source_hash(chat_dir: str | Path) -> str:
    """sha256 over the names and bytes of every parquet file of the chat dir."""
    h = hashlib.sha256()
    for path in chat_files(chat_dir):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def count_conversations(chat_dir: str | Path) -> int:
    """Number of rows over all parquet files (from their footers, without reading the data)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in chat_files(chat_dir))


def model_identity(target: str | Path) -> dict[str, Any]:
    """What identifies the target's outputs: target.json facts when present, else hashes of its config files."""
    target = Path(target)
    if (target / "target.json").exists():
        info = json.loads((target / "target.json").read_text())
        keys = ("source", "name_or_path", "revision", "architecture", "num_layers", "hidden_size", "vocab_size",
                "dtype", "chat_template_sha256")
        return {k: info.get(k) for k in keys}
    files = {}
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (target / name).exists():
            files[name] = hashlib.sha256((target / name).read_bytes()).hexdigest()
    if not files:
        raise StageError(f"{target} is neither a fetch_target output (target.json) nor an HF model dir")
    return {"path": str(target.resolve()), "files": files}
