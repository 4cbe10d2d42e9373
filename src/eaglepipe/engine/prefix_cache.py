"""Finished sequences kept in free KV-cache slots, found again by token prefix.

A multi-turn conversation sends each turn as the whole history so far: the previous turn's prompt, its answer,
then the new user message. When a request finishes, its slot still holds the K/V of every token it fed (the
prompt and all generated tokens but the last). `SlotPrefixCache` remembers those token lists. A new request that
shares a long enough prefix with one of them takes over that slot and prefills only the rest.

Lookup hashes the prompt in blocks of `block` tokens, each hash chained to the previous one, so one dict probe
per block finds the entries that share that whole prefix; the match is then extended token by token past the
last shared block. Slots are only borrowed: the engine takes the least recently finished one back whenever it
needs a free slot and none is empty. A hit must also cover at least half of the slot's tokens: a prompt that
shares only a system prompt with a long finished conversation would otherwise take the slot that
conversation's next turn is about to reuse.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence


@dataclass(frozen=True)
class PrefixHit:
    """A cached slot and how many leading tokens of the prompt its K/V already hold."""

    slot: int
    length: int


def iter_block_hashes(tokens: Sequence[int], block: int) -> Iterator[int]:
    """Chained hashes of tokens[:block], tokens[:2*block], ... (whole blocks only), computed as they are read."""
    h = 0
    for start in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[start:start + block])))
        yield h


def block_hashes(tokens: Sequence[int], block: int) -> list[int]:
    """All of `iter_block_hashes`."""
    return list(iter_block_hashes(tokens, block))


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the longest common prefix of a and b, given that the first `start` tokens are known equal."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPrefixCache:
    """Token lists of finished sequences by slot, least recently stored first."""

    def __init__(self, block: int = 64, min_tokens: int = 64):
        if block < 1 or min_tokens < 1:
            raise ValueError("block and min_tokens must be >= 1")
        self.block, self.min_tokens = block, min_tokens
        self._tokens: OrderedDict[int, list[int]] = OrderedDict()
        self._hashes: dict[int, list[int]] = {}
        self._by_hash: dict[int, dict[int, None]] = {}  # block-chain hash -> slots (insertion-ordered)

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, slot: int) -> bool:
        return slot in self._tokens

    def put(self, slot: int, tokens: Sequence[int]) -> None:
        """Remember that `slot` holds the K/V of `tokens` (replacing what it held)."""
        self.drop(slot)
        if len(tokens) < self.min_tokens:
            return
        self._tokens[slot] = list(tokens)
        hashes = block_hashes(tokens, self.block)
        self._hashes[slot] = hashes
        for h in hashes:
            self._by_hash.setdefault(h, {})[slot] = None

    def drop(self, slot: int) -> None:
        """Forget `slot` (it is about to be overwritten)."""
        if self._tokens.pop(slot, None) is None:
            return
        for h in self._hashes.pop(slot):
            slots = self._by_hash[h]
            del slots[slot]
            if not slots:
                del self._by_hash[h]

    def clear(self) -> None:
        """Forget every slot."""
        self._tokens.clear()
        self._hashes.clear()
        self._by_hash.clear()

    def oldest(self) -> int | None:
        """The slot stored longest ago (the one to give back first), or None when empty."""
        return next(iter(self._tokens), None)

    def match(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The cached slot sharing the longest prefix with `prompt`, or None. A hit shares at least `min_tokens`
        tokens and at least half of the slot's own tokens.

        Among slots that share the same whole blocks, the most recently stored one is tried first, and the
        match is extended past the blocks token by token."""
        deepest: dict[int, None] | None = None
        blocks = 0
        for h in iter_block_hashes(prompt, self.block):
            slots = self._by_hash.get(h)
            if not slots:
                break
            deepest, blocks = slots, blocks + 1
        if deepest is None:
            return None
        known = blocks * self.block
        best: PrefixHit | None = None
        for slot in reversed(deepest):
            cached = self._tokens[slot]
            length = common_prefix(prompt, cached, known)
            if 2 * length >= len(cached) and length >= self.min_tokens and (best is None or length > best.length):
                best = PrefixHit(slot, length)
                if length >= len(prompt):
                    break
        return best
