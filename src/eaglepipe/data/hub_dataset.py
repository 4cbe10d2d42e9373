"""A hub dataset source: pick the repo's files for a split, download them with huggingface_hub, and slice."""
from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Optional

from .json_stream import StreamReport
from .sources import DATA_SUFFIXES, SourceRecords, add_file, iter_file_records
from .split_spec import parse_split

log = logging.getLogger("eaglepipe.data")
PARQUET_BRANCH = "refs/convert/parquet"


def split_files(repo_files: list[str], split: str, data_files: Optional[str] = None) -> list[str]:
    """The data files of `split` among a dataset repo's files (sorted).

    `data_files` (a glob over repo paths) picks the files directly, whatever the split. Otherwise a file
    belongs to the split when a folder in its path is named like the split or its name starts with the split
    followed by '-', '.' or nothing (so `train` does not take `train_sft-*`). A repo without split-named files
    is a single split, served only as `train`. Parquet wins when a split has both.
    """
    files = [f for f in repo_files if PurePosixPath(f).suffix.lower() in DATA_SUFFIXES
             and not any(p.startswith(".") for p in PurePosixPath(f).parts)]
    if data_files:
        return sorted(f for f in files if fnmatch.fnmatch(f, data_files))
    stem_re = re.compile(rf"^{re.escape(split)}(?:[-.].*)?$")
    chosen = [f for f in files if split in PurePosixPath(f).parts[:-1]
              or stem_re.match(PurePosixPath(f).name.split(".")[0])]
    if not chosen and split == "train":
        named = re.compile(r"^(train|validation|valid|val|test|dev)([-_.]|$)")
        if not any(named.match(PurePosixPath(f).name) for f in files):
            chosen = files
    parquet = [f for f in chosen if f.lower().endswith(".parquet")]
    return sorted(parquet or chosen)


def read_hub_dataset(name: str, repo_id: str, split: str, revision: Optional[str] = None,
                     data_files: Optional[str] = None) -> SourceRecords:
    """Download the files of `split` (with `[a:b]` slicing) from a hub dataset repo and read their records.

    Authentication and the cache location follow huggingface_hub (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE).
    An absolute `[:N]` slice stops downloading once N records are read.
    """
    from huggingface_hub import HfApi, hf_hub_download

    spec = parse_split(split)
    api = HfApi()
    info = api.dataset_info(repo_id, revision=revision)
    sha = info.sha
    files = split_files(api.list_repo_files(repo_id, repo_type="dataset", revision=sha), spec.name, data_files)
    if not files:
        log.info("%s has no raw files for split %s; trying its parquet conversion", repo_id, spec.name)
        sha = PARQUET_BRANCH
        files = split_files(api.list_repo_files(repo_id, repo_type="dataset", revision=sha), spec.name, data_files)
    if not files:
        raise FileNotFoundError(f"dataset {repo_id} has no .parquet/.jsonl/.json files for split {spec.name!r}"
                                + (f" matching {data_files!r}" if data_files else ""))
    limit = None if spec.needs_total else spec.bounds(10**18)[1]
    out = SourceRecords(name)
    for filename in files:
        if limit is not None and len(out.records) >= limit:
            break
        local = Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=sha))
        report = StreamReport()
        before = len(out.records)
        for text in iter_file_records(local, report):
            out.records.append(text)
            if limit is not None and len(out.records) >= limit:
                break
        add_file(out, f"hf://datasets/{repo_id}@{sha}/{filename}", report, len(out.records) - before)
    start, stop = spec.bounds(len(out.records))
    out.records = out.records[start:stop]
    out.first_row = start
    return out
