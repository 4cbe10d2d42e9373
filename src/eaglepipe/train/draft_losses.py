"""Per-position losses between the drafter's distribution q and the target's p, fused and memory-light.

Both come as logits over the same vocabulary (the draft vocab for EAGLE-3, where p is the target's
distribution renormalised over the draft vocab; see `DRAFT_LOSSES`). Each loss is computed with its gradient
in one chunked pass in the forward; the gradient is kept in the logits' dtype, so no fp32 [N, V] tensor
outlives a chunk. Every loss also returns the acceptance rate alpha = sum_v min(p_v, q_v), the probability
that one drafted token is accepted by speculative sampling (the exact-match rate at temperature 0 is its
greedy analogue).

- `soft_ce`: -sum_v p_v log q_v (the EAGLE-3 objective).
- `lk_alpha`: -log alpha (arXiv 2602.23881): optimises the acceptance rate directly. For a one-hot p it is
  the cross-entropy of the labelled token.
- `lk_lambda`: lam * KL(p || q) + (1 - lam) * TV(p, q) with TV = 1 - alpha and lam = exp(-eta * alpha) per
  position, alpha not differentiated through lam: KL's dense gradient leads while the drafter is far from
  the target, the total-variation term (what acceptance loses) once it is close.

The target's mass outside the draft vocab: the drafter can never propose those tokens, so that mass is a
loss of acceptance no parameter can change. Renormalising p over the draft vocab keeps the objective's
optimum at q = p restricted to the vocab (with the full-vocab p, any q with q_v >= p_v on the vocab
maximises alpha, and the optimum is not unique), keeps -log alpha comparable across positions whose
in-vocab mass differs, and matches `soft_ce`'s target. Positions whose target argmax lies outside the draft
vocab are dropped from the loss altogether (`train.out_of_vocab`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

DRAFT_LOSSES = ("soft_ce", "lk_alpha", "lk_lambda")


def _chunk_loss(draft: torch.Tensor, target: torch.Tensor, kind: str, eta: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [n], alpha [n], d loss / d draft logits [n, V] in the draft's dtype) for one chunk of logits, computed
    in fp32 (fp64 for fp64 inputs)."""
    wide = torch.promote_types(draft.dtype, torch.float32)
    loss, alpha, grad = _wide_loss(draft.to(wide), target.to(wide), kind, eta)
    return loss, alpha, grad.to(draft.dtype)


_compiled_chunk_loss: Optional[Callable] = None


def _fused_chunk_loss() -> Callable:
    """`_chunk_loss` through torch.compile: its ~20 elementwise passes over [n, V] fp32 become a few kernels that
    read the two logit chunks and write the gradient (dynamic row count: one compilation per loss kind)."""
    global _compiled_chunk_loss
    if _compiled_chunk_loss is None:
        _compiled_chunk_loss = torch.compile(_chunk_loss, dynamic=True)
    return _compiled_chunk_loss


def _wide_loss(d: torch.Tensor, t: torch.Tensor, kind: str, eta: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_chunk_loss` on logits already in their computing dtype."""
    logq = torch.log_softmax(d, dim=-1)
    logp = torch.log_softmax(t, dim=-1)
    q, p = logq.exp(), logp.exp()
    log_alpha = torch.logsumexp(torch.minimum(logp, logq), dim=-1)
    alpha = log_alpha.exp()
    if kind == "soft_ce":
        return -(p * logq).sum(-1), alpha, q - p
    # d alpha / d z_j = q_j (c_j - sum_v c_v q_v), c_v = [q_v < p_v]: raising q_v raises min(p_v, q_v) there
    below = (q < p).to(d.dtype)
    spread = below - (below * q).sum(-1, keepdim=True)
    if kind == "lk_alpha":
        # -log alpha and q / alpha in log space: where the draft gives the target's tokens almost no mass, the
        # gradient stays the cross-entropy-like push a clamp on alpha would cut off
        return -log_alpha, alpha, -(logq - log_alpha[:, None]).exp() * spread
    dalpha = q * spread
    lam = torch.exp(-eta * alpha)[:, None]
    kl = (p * (logp - logq)).sum(-1)
    loss = lam[:, 0] * kl + (1 - lam[:, 0]) * (1 - alpha)
    return loss, alpha, lam * (q - p) - (1 - lam) * dalpha


class _FusedDraftLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, draft: torch.Tensor, target: torch.Tensor, kind: str, eta: float, chunk: int, compiled: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _fused_chunk_loss() if compiled else _chunk_loss
        grads = torch.empty_like(draft)
        losses, alphas = [], []
        for s in range(0, draft.shape[0], chunk):
            loss, alpha, grads[s:s + chunk] = rows(draft[s:s + chunk], target[s:s + chunk], kind, eta)
            losses.append(loss)
            alphas.append(alpha)
        ctx.save_for_backward(grads)
        if not losses:
            empty = draft.new_zeros(0, dtype=torch.promote_types(draft.dtype, torch.float32))
            return empty, empty.clone()
        alpha = torch.cat(alphas)
        ctx.mark_non_differentiable(alpha)
        return torch.cat(losses), alpha

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_alpha: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_rows[:, None].to(grad.dtype), None, None, None, None, None


def draft_loss(draft: torch.Tensor, target: torch.Tensor, kind: str = "soft_ce", eta: float = 3.0,
               chunk: int = 8192, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `kind` (one of DRAFT_LOSSES) of draft logits against target logits [N, V], and the
    per-row acceptance rate alpha (no gradient); both fp32 (fp64 for fp64 inputs), [N]. `compiled`: the
    per-chunk work through torch.compile (the same values; the first call of each kind compiles)."""
    if kind not in DRAFT_LOSSES:
        raise ValueError(f"unknown draft loss {kind!r}; expected one of {DRAFT_LOSSES}")
    return _FusedDraftLoss.apply(draft, target, kind, float(eta), chunk, compiled)
