"""Fitting a conversation's history into a token budget before its last assistant turn is regenerated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .conversation import ConversationRejected, TurnPolicy, plan_turns

Messages = list[dict[str, str]]
CountFn = Callable[[Messages], int]

TOO_LONG = "prompt too long"


def prompt_counter(tokenizer: Any) -> CountFn:
    """Prompt tokens of a message list as an OpenAI-style server counts them: the chat template with the
    generation prompt, tokenized without extra special tokens."""
    def count(messages: Messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count


@dataclass(frozen=True)
class HistoryFit:
    """Mode `last`: the prompt before the regenerated answer may hold at most `max_prompt_tokens` tokens."""

    policy: TurnPolicy
    max_prompt_tokens: int
    count: CountFn

    def __call__(self, messages: Messages) -> tuple[Messages, int]:
        """The messages up to the last assistant turn with their oldest exchanges dropped until the prompt fits,
        and how many turns were dropped (0 when it fit as it was).

        A leading system turn is kept. Raises ConversationRejected when even the last user turn alone is too
        long, or when the conversation has nothing to regenerate.
        """
        msgs, turns = plan_turns(messages, self.policy)
        last = turns[-1]
        head = msgs[:1] if msgs[0]["role"] == "system" else []
        body = msgs[len(head):last]
        if self.count(head + body) <= self.max_prompt_tokens:
            return msgs, 0
        # where the history may be cut: the start of an exchange (a user turn after a non-user turn)
        cuts = [0] + [i for i in range(1, len(body)) if body[i]["role"] == "user" and body[i - 1]["role"] != "user"]
        need = self.count(head + body[cuts[-1]:])
        if need > self.max_prompt_tokens:
            raise ConversationRejected(f"the last user turn alone needs {need} prompt tokens; at most "
                                       f"{self.max_prompt_tokens} fit", category=TOO_LONG)
        lo, hi = 0, len(cuts) - 1  # cutting at cuts[lo] is too long, at cuts[hi] fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count(head + body[cuts[mid]:]) <= self.max_prompt_tokens:
                hi = mid
            else:
                lo = mid
        return head + body[cuts[hi]:] + [msgs[last]], cuts[hi]
