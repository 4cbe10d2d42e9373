"""Reading and writing normalised conversations (`data/chat/`, `data/regen/`): parquet with id/source/messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
CHAT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("messages", pa.list_(MESSAGE_TYPE))])


def chat_files(directory: str | Path) -> list[Path]:
    """Every parquet file of a chat directory, in name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of chat parquet files")
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .parquet files")
    return files


def read_conversations(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Yield `{"id", "source", "messages": [{"role", "content"}, ...]}` from every parquet in name order."""
    for path in chat_files(directory):
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(columns=["id", "source", "messages"]):
            yield from batch.to_pylist()


def write_conversations(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write conversations to one parquet file with the contract schema; returns the row count.

    Each row needs `id`, `source` and `messages` (a list of `{"role", "content"}`); extra keys are ignored.
    The caller is responsible for atomicity (write inside `atomic_dir` or to a temp name).
    """
    rows = [{"id": str(r["id"]), "source": str(r["source"]),
             "messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in rows]
    table = pa.Table.from_pylist(rows, schema=CHAT_SCHEMA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return len(rows)
