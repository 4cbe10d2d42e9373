"""The fused draft losses against direct float64 computations (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from eaglepipe.train.draft_losses import DRAFT_LOSSES, draft_loss


def reference(draft: torch.Tensor, target: torch.Tensor, kind: str,
              eta: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses written out plainly in float64, differentiated by autograd."""
    q = torch.softmax(draft, -1)
    p = torch.softmax(target, -1)
    alpha = torch.minimum(p, q).sum(-1)
    if kind == "soft_ce":
        loss = -(p * torch.log(q)).sum(-1)
    elif kind == "lk_alpha":
        loss = -torch.log(alpha)
    else:
        lam = torch.exp(-eta * alpha.detach())
        kl = (p * (torch.log(p) - torch.log(q))).sum(-1)
        loss = lam * kl + (1 - lam) * (1 - alpha)
    return loss, alpha


def _inputs(seed: int, n: int = 6, v: int = 13, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, v, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("kind", DRAFT_LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_match_float64_reference(kind: str, seed: int) -> None:
    draft, target = _inputs(seed)
    weights = torch.rand(draft.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))
    ref_in = draft.clone().requires_grad_(True)
    ref_loss, ref_alpha = reference(ref_in, target, kind)
    (ref_loss * weights).sum().backward()
    fused_in = draft.clone().requires_grad_(True)
    loss, alpha = draft_loss(fused_in, target, kind, chunk=4)  # chunks of 4 rows over 6: the split is exercised
    (loss * weights).sum().backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(alpha, ref_alpha, rtol=1e-10, atol=1e-12)
    assert torch.allclose(fused_in.grad, ref_in.grad, rtol=1e-8, atol=1e-12)
    assert not alpha.requires_grad


@pytest.mark.parametrize("kind", DRAFT_LOSSES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_match_reference_on_the_same_rounded_inputs(kind: str, dtype: torch.dtype,
                                                                          tol: float) -> None:
    draft, target = (t.to(dtype) for t in _inputs(3, n=8, v=257))
    ref_in = draft.double().requires_grad_(True)
    ref_loss, _ = reference(ref_in, target.double(), kind)
    ref_loss.sum().backward()
    x = draft.clone().requires_grad_(True)
    loss, _ = draft_loss(x, target, kind)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    rel = (x.grad.double() - ref_in.grad).norm() / ref_in.grad.norm()
    assert rel < tol, float(rel)


def test_lk_alpha_equals_cross_entropy_for_a_one_hot_target() -> None:
    draft, _ = _inputs(4)
    labels = torch.tensor([0, 3, 5, 7, 11, 12])
    one_hot = torch.nn.functional.one_hot(labels, draft.shape[1]).double() * 200.0  # p -> one-hot
    x = draft.clone().requires_grad_(True)
    loss, alpha = draft_loss(x, one_hot, "lk_alpha")
    loss.sum().backward()
    ce_in = draft.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(ce_in, labels, reduction="none")
    ce.sum().backward()
    assert torch.allclose(loss, ce, rtol=1e-9)
    assert torch.allclose(x.grad, ce_in.grad, rtol=1e-7, atol=1e-12)
    assert torch.allclose(alpha, torch.softmax(draft, -1)[torch.arange(6), labels])


def test_identical_distributions_have_full_acceptance_and_zero_gradient() -> None:
    logits, _ = _inputs(5)
    for kind in ("lk_alpha", "lk_lambda"):
        x = logits.clone().requires_grad_(True)
        loss, alpha = draft_loss(x, logits, kind)
        loss.sum().backward()
        assert torch.allclose(alpha, torch.ones_like(alpha))
        assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-12)
        assert x.grad.abs().max() < 1e-12


def test_unknown_loss_is_refused() -> None:
    draft, target = _inputs(6)
    with pytest.raises(ValueError, match="unknown draft loss"):
        draft_loss(draft, target, "lk_beta")


@pytest.mark.parametrize("kind", DRAFT_LOSSES)
def test_compiled_loss_gives_the_eager_values_and_gradient(kind: str) -> None:
    """train.compile_loss (on by default on CUDA) is torch.compile of the same per-chunk work; on CPU Inductor
    compiles it too. Chunks of 5 over 13 rows: the dynamic row count of the last chunk is exercised."""
    draft, target = (t.to(torch.bfloat16) for t in _inputs(8, n=13, v=300))
    grads, outs = [], []
    for compiled in (False, True):
        x = draft.clone().requires_grad_(True)
        loss, alpha = draft_loss(x, target, kind, chunk=5, compiled=compiled)
        loss.sum().backward()
        outs.append((loss, alpha))
        grads.append(x.grad)
    (eager_loss, eager_alpha), (loss, alpha) = outs
    assert loss.dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(alpha, eager_alpha, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[1].float(), grads[0].float(), rtol=2e-2, atol=1e-4)


def test_the_objective_takes_every_loss_setting_from_the_train_config() -> None:
    from dataclasses import fields

    from eaglepipe.config.schema import TrainCfg
    from eaglepipe.train.objective import Objective

    cfg = TrainCfg(loss="lk_lambda", lk_eta=2.0, ttt_steps=5, block_size=16, cod_ratio_min=0.3, compile_loss=False)
    objective = Objective.from_train(cfg)
    assert all(getattr(objective, f.name) == getattr(cfg, f.name) for f in fields(Objective))
    assert (objective.loss, objective.lk_eta, objective.ttt_steps, objective.compile_loss) == ("lk_lambda", 2.0, 5,
                                                                                               False)
