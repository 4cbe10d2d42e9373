"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, seeded)."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy; `seed` makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_token_ids is not None and not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax."""
        return self.temperature == 0 or self.top_k == 1


def make_rng(params: SamplingParams) -> random.Random | None:
    """A per-request RNG on the host (seeded when `params.seed` is set), or None for greedy requests. Each draw is
    one float for the request's next token, so a batch's draws are one list and one copy to the device, whatever
    the batch size, and a request's tokens do not depend on what it is batched with."""
    return None if params.greedy else random.Random(params.seed)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] after temperature, top-k and top-p (nucleus) filtering, in fp32."""
    rows = logits.reshape(-1, logits.shape[-1])
    return filtered_probs_rows(rows, [params] * rows.shape[0]).view(logits.shape)


def filtered_probs_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities [N, V] of logits [N, V], row i after params[i]'s temperature, top-k and top-p filtering, in
    fp32; one set of kernels for all rows."""
    dev, v = logits.device, logits.shape[-1]
    x = logits.float() / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    ks = [p.top_k if 0 < p.top_k < v else v for p in params]
    filtered = [k for k in ks if k < v]
    if filtered:
        top = x.topk(max(filtered), dim=-1).values
        kth = top.gather(1, torch.tensor([min(k, top.shape[-1]) - 1 for k in ks], device=dev)[:, None])
        kth = kth.masked_fill(torch.tensor([k == v for k in ks], device=dev)[:, None], float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=dev)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row of probs [N, V] by inverse CDF at uniforms [N] in [0, 1): the first token whose cumulative
    mass reaches (1 - u) times the row's total, a point in (0, total], so a zero-probability token, before the
    first nonzero one or after the last, is never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    at = ((1.0 - uniforms.double()) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, at)[:, 0].clamp_(max=probs.shape[-1] - 1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                rngs: list[random.Random | None]) -> torch.Tensor:
    """Next token per row of logits [B,V] (stays on device): argmax for greedy rows, a draw from each sampled
    row's filtered distribution with its request's RNG otherwise."""
    tokens = logits.argmax(dim=-1)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        probs = filtered_probs_rows(logits.index_select(0, idx), [params[row] for row in sampled])
        uniforms = torch.tensor([rngs[row].random() for row in sampled], dtype=torch.float64, device=logits.device)
        tokens.index_copy_(0, idx, draw(probs, uniforms))
    return tokens
