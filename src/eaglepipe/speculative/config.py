"""Speculative decoding parameters in SGLang's semantics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class SpecConfig:
    """num_steps = draft depth, topk = branching per step, num_draft_tokens = tokens verified per round
    including the root. topk=1 is a chain and needs num_draft_tokens = num_steps + 1."""

    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int = 4

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.topk < 1 or self.num_draft_tokens < 2:
            raise ValueError(f"{self.name}: num_steps and topk must be >= 1 and num_draft_tokens >= 2")
        if self.topk == 1 and self.num_draft_tokens != self.num_steps + 1:
            raise ValueError(f"{self.name}: topk=1 (a chain) needs num_draft_tokens = num_steps + 1")
        if self.num_draft_tokens > self.num_candidates + 1:
            raise ValueError(f"{self.name}: num_draft_tokens must be <= topk + (num_steps-1)*topk^2 + 1")

    @property
    def name(self) -> str:
        return f"s{self.num_steps}_k{self.topk}_n{self.num_draft_tokens}"

    @property
    def num_candidates(self) -> int:
        """Tree nodes the drafter proposes before the best num_draft_tokens-1 are kept."""
        return self.topk + (self.num_steps - 1) * self.topk * self.topk

    @classmethod
    def from_any(cls, spec: "SpecConfig | Mapping[str, Any] | None") -> "SpecConfig":
        """From a SpecConfig, a dict with (a subset of) the three fields, or None (the defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, SpecConfig):
            return spec
        unknown = set(spec) - {"num_steps", "topk", "num_draft_tokens"}
        if unknown:
            raise ValueError(f"unknown speculative parameters {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in spec.items()})
