"""TTT attention, unroll, loss and metrics against naive references; packed equals unpacked."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eaglepipe.models.build import new_drafter
from eaglepipe.models.config import DrafterConfig
from eaglepipe.train.batches import collate
from eaglepipe.train.objective import Labels, Objective, summarize, ttt_loss
from eaglepipe.train.ttt_attention import document_causal_mask, flex_step0, math_step0, ttt_attention

V, VD, H = 300, 40, 32


def naive_attention(q, keys, values, doc_ids):
    """Concatenate the keys of all steps and build the full [T, T*(k+1)] mask explicitly."""
    t = q.shape[2]
    rep = q.shape[1] // keys[0].shape[1]
    k_all = torch.cat([k.repeat_interleave(rep, 1) for k in keys], dim=2)
    v_all = torch.cat([v.repeat_interleave(rep, 1) for v in values], dim=2)
    mask = [document_causal_mask(doc_ids)]
    eye = torch.eye(t, dtype=torch.bool)[None, None].expand(q.shape[0], 1, t, t)
    mask += [eye] * (len(keys) - 1)
    mask = torch.cat(mask, dim=-1)
    scores = (q @ k_all.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v_all


def _qkv(steps, b=2, heads=4, kv=2, t=24, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, t, d, generator=g, dtype=torch.float64)
    keys = [torch.randn(b, kv, t, d, generator=g, dtype=torch.float64) for _ in range(steps)]
    values = [torch.randn(b, kv, t, d, generator=g, dtype=torch.float64) for _ in range(steps)]
    doc = torch.tensor([[0] * 10 + [1] * 11 + [-1] * 3, [0] * 24])
    return q, keys, values, doc


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lse_attention_equals_dense_mask_forward_and_backward(steps):
    q, keys, values, doc = _qkv(steps)
    for x in [q, *keys, *values]:
        x.requires_grad_(True)
    fast = ttt_attention(q, keys, values, math_step0(document_causal_mask(doc)))
    ref = naive_attention(q, keys, values, doc)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad((fast * g).sum(), [q, *keys, *values])
    grads_ref = torch.autograd.grad((ref * g).sum(), [q, *keys, *values])
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_flex_step0_forward_matches_dense_mask():
    q, keys, values, doc = _qkv(3)
    q, keys, values = q.float(), [k.float() for k in keys], [v.float() for v in values]
    fast = ttt_attention(q, keys, values, flex_step0(doc, q.shape[1]))
    torch.testing.assert_close(fast, naive_attention(q, keys, values, doc), rtol=1e-4, atol=1e-5)


def _drafter(algorithm="eagle3", seed=0):
    cfg = DrafterConfig(algorithm=algorithm, hidden_size=H, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=V, draft_vocab_size=VD, target_hidden_size=H,
                        aux_layers=[1, 2, 3], fc_norm=algorithm == "eagle3.1", norm_output=algorithm == "eagle3.1",
                        max_position_embeddings=256)
    g = torch.Generator().manual_seed(seed)
    target_ids = torch.sort(torch.randperm(V, generator=g)[:VD]).values
    d2t = target_ids - torch.arange(VD)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[target_ids] = True
    model = new_drafter(cfg, torch.randn(V, H, generator=g), torch.randn(V, H, generator=g), d2t, t2d, seed=seed)
    with torch.no_grad():  # larger weights so that predictions differ between slots
        for p in model.parameters():
            if p.dim() == 2 and p.requires_grad:
                p.mul_(10.0)
    return model.double()


def _samples(lengths, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        m = (rng.random(n) < 0.7).astype(np.int8)
        out.append({"id": f"s{i}", "input_ids": rng.integers(0, V, n), "loss_mask": m})
    return out


def _crafted_labels(batch, drafter, seed=2):
    """Target logits at label positions; every 4th label's argmax is put outside the draft vocab."""
    g = torch.Generator().manual_seed(seed)
    n = batch.label_pos.numel()
    full = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    draft_ids = torch.arange(VD) + drafter.d2t
    full[:, draft_ids] += 6.0
    oov = (~drafter.t2d).nonzero()[:, 0]
    full[::4, oov[0]] = 100.0
    return Labels(logits=full[:, draft_ids], argmax=full.argmax(-1))


def _reference_logits(drafter, batch, fused, steps):
    """Per-step logits through the inference API `step` with past K/V and an explicit dense TTT mask."""
    b, t = batch.input_ids.shape
    base = document_causal_mask(batch.doc_ids)
    eye = torch.eye(t, dtype=torch.bool)[None, None].expand(b, 1, t, t)
    hidden, past, out = fused, None, []
    for k in range(steps):
        mask = torch.cat([base] + [eye] * k, dim=-1)
        hidden, logits, past = drafter.step(batch.step_ids[k], hidden, batch.position_ids + k, past, mask)
        out.append(logits.reshape(b * t, -1)[batch.step_slots[k]])
    return out


def _row_loss(draft_logits, target_logits, kind):
    """The per-row draft loss and acceptance rate written out plainly."""
    q, p = torch.softmax(draft_logits, -1), torch.softmax(target_logits, -1)
    alpha = torch.minimum(p, q).sum(-1)
    if kind == "soft_ce":
        return -(p * torch.log(q)).sum(-1), alpha
    if kind == "lk_alpha":
        return -torch.log(alpha), alpha
    lam = torch.exp(-3.0 * alpha)
    return lam * (p * (torch.log(p) - torch.log(q))).sum(-1) + (1 - lam) * (1 - alpha), alpha


@pytest.mark.parametrize("algorithm,oov,loss_kind", [("eagle3", "drop", "soft_ce"), ("eagle3", "keep", "soft_ce"),
                                                     ("eagle3.1", "drop", "soft_ce"), ("eagle3.1", "keep", "soft_ce"),
                                                     ("eagle3", "drop", "lk_alpha"), ("eagle3.1", "keep", "lk_lambda")])
def test_ttt_loss_and_metrics_equal_hand_computation(algorithm, oov, loss_kind):
    steps = 3
    drafter = _drafter(algorithm)
    batch = collate([_samples([9, 12], seed=3), _samples([15], seed=4)], steps, pad_to=24)
    aux = torch.randn(*batch.input_ids.shape, 3 * H, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _reference_logits(drafter, batch, drafter.fuse(aux), steps)
    labels = _crafted_labels(batch, drafter)
    # make the target agree with the drafter's step-0 guess on every other slot (so accuracy is non-trivial)
    pred0 = drafter.to_target_ids(ref[0].argmax(-1))
    draft_ids = torch.arange(VD) + drafter.d2t
    for i in range(0, len(pred0), 2):
        row = batch.step_rows[0][i]
        labels.logits[row] = -5.0
        labels.logits[row, ref[0][i].argmax()] = 200.0
        labels.argmax[row] = pred0[i]
    assert (draft_ids[ref[0].argmax(-1)] == pred0).all()
    denominators = [float(c) for c in batch.supervised_counts()]
    loss, sums = ttt_loss(drafter, batch, drafter.fuse(aux), labels,
                          Objective.of(ttt_steps=steps, out_of_vocab=oov, loss=loss_kind),
                          math_step0(document_causal_mask(batch.doc_ids)), denominators)
    got = summarize(sums, steps, 0.8)

    b, t = batch.input_ids.shape
    in_vocab = drafter.t2d[labels.argmax]
    prefix = torch.ones(b * t, dtype=torch.bool)
    expected, tau = 0.0, 1.0
    for k in range(steps):
        slots, rows, lg = batch.step_slots[k], batch.step_rows[k], ref[k]
        ce, alpha = _row_loss(lg, labels.logits[rows], loss_kind)
        keep = in_vocab[rows] if oov == "drop" else torch.ones_like(rows, dtype=torch.bool)
        expected += 0.8 ** k * (ce * keep).sum() / denominators[k]
        correct = drafter.to_target_ids(lg.argmax(-1)) == labels.argmax[rows]
        assert got[f"acc_{k}"] == pytest.approx((correct & keep).sum().item() / keep.sum().item())
        assert got[f"loss_{k}"] == pytest.approx(((ce * keep).sum() / keep.sum()).item())
        assert got[f"alpha_{k}"] == pytest.approx(((alpha * keep).sum() / keep.sum()).item())
        dense = torch.zeros(b * t, dtype=torch.bool)
        dense[slots] = correct & in_vocab[rows]
        prev = prefix.sum().item()
        prefix &= dense
        denom = prev if k else slots.numel()
        assert got[f"cond_acc_{k}"] == pytest.approx(prefix.sum().item() / denom if denom else 0.0)
        tau += prefix.sum().item() / batch.step_slots[0].numel()
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-9, atol=1e-9)
    assert got["sim_tau"] == pytest.approx(tau)
    assert 0.3 < got["acc_0"] < 1 and got["sim_tau"] > 1.3
    assert (~in_vocab).any()


def test_batch_alignment_shifts_tokens_and_masks_within_documents():
    s = [{"id": "a", "input_ids": np.array([10, 11, 12, 13]), "loss_mask": np.array([0, 1, 1, 1])},
         {"id": "b", "input_ids": np.array([20, 21, 22]), "loss_mask": np.array([0, 0, 1])}]
    batch = collate([s], ttt_steps=2, pad_to=8)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert batch.step_ids[0, 0].tolist() == [11, 12, 13, 0, 21, 22, 0, 0]
    assert batch.step_ids[1, 0].tolist() == [12, 13, 0, 0, 22, 0, 0, 0]
    assert batch.label_pos.tolist() == [1, 2, 3, 6]
    # step 0: slots 0,1,2 (tokens 11,12,13 supervised), slot 5 (token 22); labels are the target at t+1
    assert batch.step_slots[0].tolist() == [0, 1, 2, 5]
    assert batch.label_pos[batch.step_rows[0]].tolist() == [1, 2, 3, 6]
    assert batch.step_slots[1].tolist() == [0, 1, 4]
    assert batch.label_pos[batch.step_rows[1]].tolist() == [2, 3, 6]


def test_first_answer_marks_the_slots_labelled_by_each_samples_first_answer():
    """Two packed samples, the first with two answers: only slots whose step-0 label is in a sample's first
    answer are marked (slot p is labelled by position p + 1)."""
    s = [{"id": "a", "input_ids": np.arange(10, 20), "loss_mask": np.array([0, 1, 1, 0, 0, 1, 1, 0, 0, 0])},
         {"id": "b", "input_ids": np.array([20, 21, 22]), "loss_mask": np.array([0, 1, 1])}]
    batch = collate([s], ttt_steps=1, pad_to=16)
    assert np.flatnonzero(batch.first_answer.numpy()).tolist() == [0, 1, 10, 11]
    assert set(np.flatnonzero(batch.first_answer.numpy())) <= set(batch.step_slots[0].tolist())


def test_packed_rows_give_the_same_loss_as_unpacked(tiny_llama_dir):
    from eaglepipe.families.registry import family_of
    from eaglepipe.models.target import TargetWithAux
    from eaglepipe.target.info import load_hf_model
    from eaglepipe.train.features import online_features

    model = load_hf_model(tiny_llama_dir)
    target = TargetWithAux(model, [2, 3, 4])
    vocab = model.config.vocab_size
    cfg = DrafterConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, vocab_size=vocab, draft_vocab_size=512, target_hidden_size=64,
                        aux_layers=[2, 3, 4], max_position_embeddings=1024)
    ids = torch.arange(512) * 7
    d2t, t2d = ids - torch.arange(512), torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    drafter = new_drafter(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight, d2t, t2d)
    rng = np.random.default_rng(0)
    samples = [{"id": str(i), "input_ids": rng.integers(0, 3500, n), "loss_mask": (rng.random(n) < .6).astype(np.int8)}
               for i, n in enumerate([40, 25, 31, 50])]
    steps, results = 4, []
    for rows, pad in (([samples[:3], samples[3:]], 128), ([[s] for s in samples], None)):
        batch = collate(rows, steps, pad_to=pad)
        feats, labels = online_features(target, batch, family_of(cfg), family_of(cfg).label_ids(d2t))
        loss, sums = ttt_loss(drafter, batch, drafter.fuse(feats), labels, Objective.of(ttt_steps=steps),
                              math_step0(document_causal_mask(batch.doc_ids)),
                              [float(c) for c in batch.supervised_counts()])
        results.append((loss, summarize(sums, steps, 0.8)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for key in results[0][1]:
        assert results[0][1][key] == pytest.approx(results[1][1][key], rel=1e-5, abs=1e-6)
