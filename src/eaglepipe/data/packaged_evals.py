"""A `kind: packaged_openai_evals` source: the chat prompts of OpenAI evals' registry (PyPI package `evals`, MIT).

The package ships `evals/registry/data/<eval>/**/*.jsonl`. A file whose first record holds an `input` that is a
string or a list is a prompt file; the others (game states, agent tasks, word lists) are listed in the manifest as
skipped. Each row becomes `{"messages": [...], "eval", "file", "line"}`:
- a string input is one user turn. Chat messages keep their roles; few-shot examples (`name: example_user` /
  `example_assistant`) become user and assistant turns; the leading run of system messages is joined into one; an
  input with no user message is the task itself, so that system text becomes the user turn;
- the reference answer `ideal` (the first one when it is a list) is the assistant turn, which regenerate replaces.
  A row without one keeps no assistant turn, and normalize rejects it.
A row that is not a JSON object with an `input` goes on as it is (counted as malformed), for normalize to reject.
A per-file cap keeps the biggest evals (diabetes: 287k rows, formal_logic: 215k) from crowding out the other 500;
its rows are picked by seed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .mix import choose_rows
from .sources import SourceRecords, package_dir

EVALS_INSTALL = "evals==3.0.1.post1"
DATA_RELPATH = "registry/data"
# The folders that the package's LICENSE.md puts under their own terms instead of its MIT licence.
EXCLUDED = {
    "steganography": "LICENSE.md: parts are CC BY-NC 4.0 (PiC/phrase_similarity, alpaca-gpt4)",
    "theory_of_mind": "LICENSE.md: ToMi is CC BY-NC 4.0",
    "text_compression": "LICENSE.md: mixed (CC BY-SA Wikipedia, ODC-By c4, CC BY 4.0 quotes)",
    "schelling_point": "LICENSE.md: CC BY-SA Wikipedia text",
    "ballots": "LICENSE.md: California ballot proposals, under their own terms",
    "sandbagging": "LICENSE.md: MMLU questions, another benchmark's items",
    "already_said_that": "LICENSE.md: WordNet licence",
}
EXAMPLE_ROLES = {"example_user": "user", "example_assistant": "assistant"}


def evals_data_dir() -> Path:
    """`evals/registry/data` of the installed package."""
    path = package_dir("evals", EVALS_INSTALL) / DATA_RELPATH
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing from the installed evals package; install {EVALS_INSTALL}")
    return path


def _is_message(m: Any, role: str) -> bool:
    return isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str)


def chat_turns(value: Any) -> Any:
    """An eval's `input` as chat turns (see the module doc); a value of another shape is returned unchanged."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        return value
    turns = [{**m, "role": EXAMPLE_ROLES.get(m.get("name"), m.get("role"))} if isinstance(m, dict) else m
             for m in value]
    lead = 0
    while lead < len(turns) and _is_message(turns[lead], "system"):
        lead += 1
    head = [{"role": "system", "content": "\n".join(m["content"] for m in turns[:lead])}] if lead else []
    if head and not any(isinstance(m, dict) and m.get("role") == "user" for m in turns):
        head[0]["role"] = "user"
    return head + [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                   for m in turns[lead:]]


def reference_answer(ideal: Any) -> Optional[str]:
    """The eval's reference answer as text: a string, or the first of a list of strings; None when there is none."""
    if isinstance(ideal, list) and ideal:
        ideal = ideal[0]
    return ideal if isinstance(ideal, str) and ideal.strip() else None


def eval_record(text: str, folder: str, file: str, line: int) -> Optional[str]:
    """One JSONL row as a `messages` record; None when it is not a JSON object with an `input`."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or "input" not in row:
        return None
    messages = chat_turns(row["input"])
    answer = reference_answer(row.get("ideal"))
    if isinstance(messages, list) and answer is not None:
        messages = messages + [{"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages, "eval": folder, "file": file, "line": line}, ensure_ascii=False)


def _lines(path: Path) -> list[tuple[int, str]]:
    """`(line number, text)` of each non-blank line."""
    with open(path, encoding="utf-8-sig") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _is_prompt_file(lines: list[tuple[int, str]]) -> bool:
    """Whether the first record that parses holds an `input` that is a string or a list."""
    for _, text in lines:
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        return isinstance(row, dict) and isinstance(row.get("input"), (str, list))
    return False


def read_openai_evals(name: str, per_file: Optional[int], seed: int) -> SourceRecords:
    """Up to `per_file` rows (all when None) of every prompt file outside EXCLUDED, in path order; each file's rows
    are picked by (`seed`, source name, file path), so one file's picks do not depend on the others."""
    root = evals_data_dir()
    out = SourceRecords(name)
    for path in sorted(root.rglob("*.jsonl")):
        rel = path.relative_to(root).as_posix()
        folder = rel.split("/", 1)[0]
        if folder in EXCLUDED:
            out.files.append({"path": rel, "records": 0, "skipped": EXCLUDED[folder]})
            continue
        lines = _lines(path)
        if not _is_prompt_file(lines):
            out.files.append({"path": rel, "records": 0, "skipped": "not a prompt file: no string or list `input`"})
            continue
        chosen = choose_rows(len(lines), len(lines) if per_file is None else per_file, seed, f"{name}/{rel}")
        info: dict[str, Any] = {"path": rel, "rows": len(lines), "records": len(chosen)}
        for i in chosen:
            number, text = lines[i]
            record = eval_record(text, folder, rel, number)
            if record is None:
                info["malformed_lines"] = info.get("malformed_lines", 0) + 1
            out.records.append(text if record is None else record)
        out.capped += len(lines) - len(chosen)
        out.files.append(info)
    return out
