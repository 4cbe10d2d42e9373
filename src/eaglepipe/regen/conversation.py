"""Which assistant turns of a conversation are regenerated, and on top of which history."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ..data.sample_ids import sample_id
from .client import ChatClient, RequestFailed, Sampling


class ConversationRejected(Exception):
    """The conversation cannot be regenerated; `reason` (the detail) and `category` (a short name for the
    stats) go to rejects.jsonl."""

    def __init__(self, reason: str, *, category: str, transport: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.category = category
        self.transport = transport


@dataclass(frozen=True)
class TurnPolicy:
    """Mode (`last` | `all`) and system-prompt policy (`keep` | `drop` | `default`)."""

    mode: str = "last"
    system_prompt_policy: str = "keep"
    default_system_prompt: str = ""


def apply_system_policy(messages: list[dict[str, str]], policy: TurnPolicy) -> list[dict[str, str]]:
    """Keep, drop, or (when none is present) insert the default system prompt."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if policy.system_prompt_policy == "drop":
        return [m for m in msgs if m["role"] != "system"]
    if policy.system_prompt_policy == "default" and policy.default_system_prompt \
            and not any(m["role"] == "system" for m in msgs):
        return [{"role": "system", "content": policy.default_system_prompt}] + msgs
    return msgs


def plan_turns(messages: list[dict[str, str]], policy: TurnPolicy) -> tuple[list[dict[str, str]], list[int]]:
    """The messages to work on and the indices of the assistant turns to regenerate, in order.

    Assistant turns before the first user turn (nothing to answer) and every turn after the last
    assistant turn (no answer to supervise) are dropped. Raises ConversationRejected when no
    assistant turn answers a user turn.
    """
    msgs = apply_system_policy(messages, policy)
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if first_user is None:
        raise ConversationRejected("no user turn", category="no user turn")
    msgs = [m for i, m in enumerate(msgs) if not (m["role"] == "assistant" and i < first_user)]
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not assistant:
        raise ConversationRejected("no assistant turn after a user turn", category="no assistant turn")
    msgs = msgs[:assistant[-1] + 1]
    return msgs, (assistant[-1:] if policy.mode == "last" else assistant)


def with_samples(conversations: Iterable[dict[str, Any]], n: int) -> Iterator[dict[str, Any]]:
    """Each conversation `n` times in a row, as its samples 0..n-1 under their sample ids (`sample_ids`).

    A sample's id keys its seeds (`turn_seed`), so sample k draws the same answers whatever `n` is, and
    sample 0 is the conversation as a run without samples regenerates it.
    """
    for conv in conversations:
        for k in range(n):
            yield {**conv, "id": sample_id(str(conv["id"]), k)}


def turn_seed(base_seed: int, conv_id: str, turn: int) -> int:
    """A per-(conversation, turn) seed, so sampled runs are reproducible and resumable: the first 31 bits of
    sha256("<base_seed>:<conv_id>:<turn>"). For sample k > 0 `conv_id` is the sample's id `<id>#s<k>`."""
    digest = hashlib.sha256(f"{base_seed}:{conv_id}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


async def regenerate_conversation(conv: dict[str, Any], client: ChatClient, policy: TurnPolicy,
                                  sampling: Sampling, base_seed: int = 0) -> tuple[dict[str, Any], int]:
    """The conversation with its assistant turns regenerated, and the completion tokens spent.

    In `all` mode each answer is generated on top of the already regenerated history; when a later turn
    is refused as a bad request (typically: the history outgrew the server's context), the conversation
    ends after the last regenerated turn. Raises ConversationRejected for an unusable conversation, a
    failed request or an empty answer.
    """
    msgs, turns = plan_turns(list(conv["messages"]), policy)
    tokens = 0
    for k, turn in enumerate(turns):
        seed = turn_seed(base_seed, str(conv["id"]), turn) if sampling.temperature > 0 else None
        try:
            answer = await client.chat(msgs[:turn], sampling, seed=seed)
        except RequestFailed as e:
            if k > 0 and e.status in (400, 413):
                msgs = msgs[:turns[k - 1] + 1]
                break
            category = "refused by the server" if e.status in (400, 413) else "request failed"
            raise ConversationRejected(f"assistant turn {turn}: {e}", category=category,
                                       transport=e.transport) from e
        if not answer.text.strip():
            raise ConversationRejected(f"assistant turn {turn}: empty answer from the model "
                                       f"(finish_reason={answer.finish_reason})", category="empty answer")
        msgs[turn] = {"role": "assistant", "content": answer.text}
        tokens += answer.completion_tokens
    return {"id": conv["id"], "source": conv["source"], "messages": msgs}, tokens
