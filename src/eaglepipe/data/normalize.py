"""The normalize stage's logic: raw records → validated OpenAI-style `messages`.

Accepted shapes: a `messages` list (OpenAI `role`/`content`) or a `conversations` list (ShareGPT
`from`/`value`, or `role`/`content`). Roles map human/user → user, gpt/chatgpt/bing/bard/assistant/model →
assistant, system → system. Content must be a non-empty string (a list of OpenAI text parts is joined).
A key whose value is null counts as absent: tables whose rows mix both schemes hold nulls in the other's columns.

Repairs (counted in stats, the row is kept):
- consecutive turns of the same role are merged into one, joined by a blank line;
- assistant turns before the first user turn are dropped (ShareGPT splits long chats into chunks that
  start mid-conversation with the assistant);
- a trailing user turn (a question without an answer) is dropped;
- with `system_prompt=drop`, system turns are removed.

Rejected (with a reason): malformed JSON, no `messages`/`conversations` list, a turn that is not an
object, an unknown or missing role, empty or non-string content, a system turn after the start, no
assistant turn left; with a benchmark index, a row whose user turns quote a benchmark prompt (`benchmark overlap`,
with the benchmark, question id and turn; see contamination.py).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from .contamination import BenchmarkIndex

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
            "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}
MESSAGE_KEYS = ("messages", "conversations")


class Rejected(Exception):
    """A row that cannot be used: `reason` is a short category, `detail` says exactly what is wrong."""

    def __init__(self, reason: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        # more fields for the row's rejects.jsonl entry
        self.extra = extra


@dataclass
class NormalizeStats:
    """Counts of what normalisation did."""

    rows_in: int = 0
    rows_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)
    roles_seen: Counter = field(default_factory=Counter)
    by_source: dict = field(default_factory=dict)
    turns_out: int = 0
    assistant_turns_out: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready stats."""
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "rows_rejected": sum(self.rejected.values()),
                "dropped": dict(self.rejected.most_common()), "repairs": dict(self.repairs),
                "roles_seen": dict(self.roles_seen.most_common()), "by_source": self.by_source,
                "turns_out": self.turns_out, "assistant_turns_out": self.assistant_turns_out}


def _content_text(content: Any, turn: int) -> str:
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise Rejected("non-string content", f"turn {turn} content is {type(content).__name__}, not a string")
    if not content.strip():
        raise Rejected("empty content", f"turn {turn} content is empty")
    return content


def _either(obj: dict[str, Any], key: str, alt: str) -> Any:
    """`obj[key]`, else `obj[alt]`: a null counts as absent, as in tables whose rows mix both naming schemes."""
    value = obj.get(key)
    return obj.get(alt) if value is None else value


def parse_turns(record: Any, stats: NormalizeStats) -> list[dict[str, str]]:
    """The record's turns as `{"role", "content"}` with canonical roles, validated one by one."""
    if not isinstance(record, dict):
        raise Rejected("not an object", f"record is a JSON {type(record).__name__}, not an object")
    key = next((k for k in MESSAGE_KEYS if record.get(k) is not None), None)
    if key is None:
        raise Rejected("missing messages column",
                       f"no column `messages` or `conversations`; columns are {sorted(record)}")
    turns = record[key]
    if not isinstance(turns, list):
        raise Rejected("messages not a list", f"`{key}` is a {type(turns).__name__}, not a list")
    if not turns:
        raise Rejected("empty conversation", f"`{key}` is an empty list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Rejected("turn not an object", f"turn {i} is a {type(turn).__name__}, not an object")
        raw_role = _either(turn, "role", "from")
        if not isinstance(raw_role, str):
            raise Rejected("missing role", f"turn {i} has no string `role` or `from`")
        stats.roles_seen[raw_role] += 1
        role = ROLE_MAP.get(raw_role.strip().lower())
        if role is None:
            raise Rejected("unknown role", f"turn {i} has role {raw_role!r}; known roles are {sorted(ROLE_MAP)}")
        content = _either(turn, "content", "value")
        out.append({"role": role, "content": _content_text(content, i)})
    return out


def repair_and_validate(turns: list[dict[str, str]], drop_system: bool, repairs: Counter) -> list[dict[str, str]]:
    """Apply the documented repairs (counted in `repairs`), then check: optional leading system, user/assistant
    alternating from a user turn, ending on an assistant turn."""
    if drop_system and any(t["role"] == "system" for t in turns):
        repairs["dropped_system_turns"] += sum(t["role"] == "system" for t in turns)
        turns = [t for t in turns if t["role"] != "system"]
    if any(t["role"] == "system" for t in turns[1:]):
        pos = next(i for i, t in enumerate(turns) if i > 0 and t["role"] == "system")
        raise Rejected("misplaced system turn", f"system turn at position {pos}; only the first turn may be system")
    head, body = (turns[:1], turns[1:]) if turns and turns[0]["role"] == "system" else ([], turns)
    merged: list[dict[str, str]] = []
    for t in body:
        if merged and merged[-1]["role"] == t["role"]:
            merged[-1] = {"role": t["role"], "content": merged[-1]["content"] + "\n\n" + t["content"]}
            repairs["merged_consecutive_turns"] += 1
        else:
            merged.append(dict(t))
    if merged and merged[0]["role"] == "assistant":
        merged = merged[1:]
        repairs["dropped_leading_assistant_turns"] += 1
    if merged and merged[-1]["role"] == "user":
        merged = merged[:-1]
        repairs["dropped_trailing_user_turns"] += 1
    if not any(t["role"] == "assistant" for t in merged):
        raise Rejected("no assistant turn", "no assistant turn answers a user turn")
    return head + merged


def check_benchmark(messages: list[dict[str, str]], benchmark: BenchmarkIndex) -> None:
    """Reject a row whose user turns quote one of the benchmark's prompts."""
    overlap = benchmark.find(messages)
    if overlap is not None:
        raise Rejected("benchmark overlap", overlap.describe(), benchmark=overlap.prompt.benchmark,
                       question_id=overlap.prompt.question_id, question_turn=overlap.prompt.turn)


def normalize_rows(rows: Iterable[tuple[str, int, str]], drop_system: bool, stats: NormalizeStats,
                   rejects: list[dict[str, Any]],
                   benchmark: Optional[BenchmarkIndex] = None) -> Iterator[dict[str, Any]]:
    """Turn raw `(source, row, record_json)` rows into chat rows; bad rows, and with `benchmark` the rows that quote
    its prompts, are appended to `rejects`."""
    for source, row, text in rows:
        stats.rows_in += 1
        per_source = stats.by_source.setdefault(source, {"rows_in": 0, "rows_out": 0, "dropped": {}})
        per_source["rows_in"] += 1
        rid = f"{source}:{row}"
        try:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise Rejected("malformed JSON", f"malformed JSON: {e.msg} at character {e.pos}") from None
            repairs: Counter = Counter()
            messages = repair_and_validate(parse_turns(record, stats), drop_system, repairs)
            if benchmark is not None:
                check_benchmark(messages, benchmark)
        except Rejected as r:
            stats.rejected[r.reason] += 1
            per_source["dropped"][r.reason] = per_source["dropped"].get(r.reason, 0) + 1
            rejects.append({"id": rid, "source": source, "row": row, "reason": r.reason, "detail": r.detail,
                            **r.extra})
            continue
        stats.rows_out += 1
        stats.repairs.update(repairs)
        per_source["rows_out"] += 1
        stats.turns_out += len(messages)
        stats.assistant_turns_out += sum(m["role"] == "assistant" for m in messages)
        yield {"id": rid, "source": source, "messages": messages}


def all_rejected_message(stats: NormalizeStats, rejects: list[dict[str, Any]]) -> str:
    """One sentence naming why every row failed, with the commonest problem's exact detail."""
    reason, count = stats.rejected.most_common(1)[0]
    example = next(r for r in rejects if r["reason"] == reason)
    others = ", ".join(f"{n} {r}" for r, n in stats.rejected.most_common()[1:4])
    return (f"all {stats.rows_in} rows are invalid: {count} x {reason} (e.g. {example['id']}: {example['detail']})"
            + (f"; also {others}" if others else ""))
