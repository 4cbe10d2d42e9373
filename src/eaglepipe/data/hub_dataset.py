"""A `kind: hub` source: a Hugging Face dataset (a hub id, or a local copy of a dataset repo) read with `datasets`.

`datasets` resolves the split and its slice, the data files, the revision and the file formats, and keeps the cache.
Authentication, the cache's location and offline mode are its own (HF_TOKEN, HF_HOME, HF_DATASETS_CACHE,
HF_HUB_OFFLINE: offline, a hub dataset loads from the datasets cache when it was loaded there before).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional

from tqdm import tqdm

from .sources import SourceRecords

# `name[a:b]` with absolute, non-negative bounds: its rows are known without the split's length, so they stream
_WINDOW = re.compile(r"^([\w.-]+)\[(\d*):(\d+)\]$")
_MALFORMED_HINT = ("; datasets cannot read past a malformed record or the cut end of a truncated JSON file: download "
                  "the files and read them with kind: local, which passes malformed records on to normalize and "
                  "keeps a truncated file's complete records")


def _describe(path: str, split: str, e: Exception, reading: bool) -> str:
    import datasets

    msg = f"datasets could not load {path!r} split {split!r}: {type(e).__name__}: {e}"
    if e.__cause__ is not None:
        msg += f" (caused by {type(e.__cause__).__name__}: {e.__cause__})"
    if reading:
        msg += _MALFORMED_HINT
    if isinstance(e, ConnectionError) and datasets.config.HF_HUB_OFFLINE:
        msg += "; HF_HUB_OFFLINE is set, so only datasets already in the datasets cache load"
    return msg


def _rows(builder: Any, spec: str) -> tuple[Iterable[dict[str, Any]], str, int]:
    """The rows of `spec` from `builder`, its split's name and the index of its first row within the split."""
    import datasets

    window = _WINDOW.match(spec)
    if window:
        start = int(window[2] or 0)
        stream = builder.as_streaming_dataset(split=window[1])
        return stream.skip(start).take(max(int(window[3]) - start, 0)), window[1], start
    builder.download_and_prepare()
    lengths = {n: s.num_examples for n, s in builder.info.splits.items()}
    first = datasets.ReadInstruction.from_spec(spec).to_absolute(lengths)[0]
    return builder.as_dataset(split=spec), first.splitname, first.from_


def read_hub_dataset(name: str, path: str, split: str, revision: Optional[str] = None,
                     data_files: Optional[str] = None) -> SourceRecords:
    """The rows of `split` (`train`, `train[:1000]`, `train[10%:20%]`) as JSON text.

    A fixed row window (`train[:N]`, `train[a:b]`) is streamed, so a large dataset is read only as far as needed.
    Any other split (whole, percentages, negative bounds) is prepared in the datasets cache first, since its
    bounds depend on the split's length. `data_files` (a glob over the repo's files) forms the `train` split.
    """
    import datasets

    spec = split.replace(" ", "")
    out = SourceRecords(name)
    failures = (OSError, ValueError, datasets.exceptions.DatasetsError)
    try:
        builder = datasets.load_dataset_builder(path, revision=revision, data_files=data_files)
        rows, split_name, out.first_row = _rows(builder, spec)
    except failures as e:
        reading = isinstance(e, datasets.exceptions.DatasetGenerationError)
        raise ValueError(_describe(path, split, e, reading)) from e
    try:
        total = len(rows) if isinstance(rows, datasets.Dataset) else None
        out.records = [json.dumps(row, ensure_ascii=False, default=str)
                       for row in tqdm(rows, desc=f"source {name}", unit=" rows", total=total, disable=None)]
    except failures as e:
        raise ValueError(_describe(path, split, e, reading=True)) from e
    resolved = (builder.config.data_files or {}).get(split_name, [])
    out.files = [{"path": str(f)} for f in resolved]
    return out

