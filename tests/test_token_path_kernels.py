"""The token path's Triton kernels against plain PyTorch, run by Triton's interpreter on CPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from eaglepipe.engine.kernels import embed_hidden_linear, norm_gate_up, norm_linear, rope_write_kv, virtual_attention  # noqa: E402
from eaglepipe.speculative.kernels import topk_logprobs  # noqa: E402


def _rms(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("m", [1, 5, 33])
def test_norm_linear_matches_torch(m):
    torch.manual_seed(0)
    x, w, g = torch.randn(m, 40), torch.randn(24, 40), torch.rand(40) + 0.5
    b, r = torch.randn(24), torch.randn(m, 24)
    torch.testing.assert_close(norm_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm_linear(x, w, norm_weight=g, eps=1e-5, bias=b, residual=r),
                               r + F.linear(_rms(x, g, 1e-5), w, b), rtol=1e-5, atol=1e-5)


def test_norm_gate_up_matches_torch():
    torch.manual_seed(1)
    x, w, g, b = torch.randn(7, 48), torch.randn(2 * 20, 48), torch.rand(48) + 0.5, torch.randn(40)
    gate, up = F.linear(_rms(x, g, 1e-6), w, b).chunk(2, -1)
    torch.testing.assert_close(norm_gate_up(x, w, norm_weight=g, bias=b), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h", [40, 64, 160])
def test_embed_hidden_linear_is_one_gemm_over_the_normed_concatenation(h):
    torch.manual_seed(4)
    embed, hidden, w = torch.randn(50, h), torch.randn(9, h), torch.randn(24, 2 * h)
    ge, gh, ids = torch.rand(h) + 0.5, torch.rand(h) + 0.5, torch.randint(0, 50, (9,))
    ref = torch.cat([_rms(embed[ids], ge, 1e-6), _rms(hidden, gh, 1e-6)], dim=-1) @ w.T
    full = embed_hidden_linear(ids, embed, ge, hidden, gh, w, 1e-6)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    for rows in ([4], [0, 8], list(range(2, 9))):  # a row's bits do not depend on the rows beside it
        assert torch.equal(embed_hidden_linear(ids[rows], embed, ge, hidden[rows], gh, w, 1e-6), full[rows])
    with pytest.raises(ValueError):
        embed_hidden_linear(ids, embed, ge, hidden, gh, w[:, :h], 1e-6)


def test_rows_are_invariant_to_their_neighbours():
    torch.manual_seed(2)
    x, w, g = torch.randn(20, 64), torch.randn(96, 64), torch.rand(64)
    full = norm_linear(x, w, norm_weight=g)
    for rows in ([3], [0, 19], list(range(5, 20))):
        assert torch.equal(norm_linear(x[rows], w, norm_weight=g), full[rows])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_write_kv_matches_torch(qk_norm):
    torch.manual_seed(3)
    hq, hkv, d, m, max_len = 4, 2, 16, 3, 32
    qkv = torch.randn(m, (hq + 2 * hkv) * d)
    angles = torch.randn(max_len, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    pos, slots, wpos = torch.tensor([5, 0, 31]), torch.tensor([1, 0, 1]), torch.tensor([7, 2, 9])
    kc, vc = torch.zeros(2, hkv, max_len, d), torch.zeros(2, hkv, max_len, d)
    gain = torch.rand(2 * d) + 0.5 if qk_norm else None
    q = rope_write_kv(qkv, cos, sin, pos, slots, wpos, kc, vc, hq, hkv, d, gain, 1e-6)
    q_ref, k_ref, v_ref = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q_ref, k_ref, v_ref = q_ref.view(m, hq, d), k_ref.view(m, hkv, d), v_ref.view(m, hkv, d)
    if qk_norm:
        q_ref, k_ref = _rms(q_ref, gain[:d], 1e-6), _rms(k_ref, gain[d:], 1e-6)

    def rope(x):
        rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos[pos][:, None] + rot * sin[pos][:, None]

    torch.testing.assert_close(q, rope(q_ref), rtol=1e-5, atol=1e-5)
    for r in range(m):
        torch.testing.assert_close(kc[slots[r], :, wpos[r]], rope(k_ref)[r], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vc[slots[r], :, wpos[r]], v_ref[r])


def _attention_ref(q, kc, vc, slot, keys, scale):
    k, v = kc[slot][:, keys], vc[slot][:, keys]  # [Hkv, n, D]
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    probs = torch.softmax((q[:, None, :] @ k.transpose(-1, -2))[:, 0] * scale, -1)
    return (probs[:, None, :] @ v)[:, 0].reshape(-1)


def test_virtual_attention_matches_torch_and_is_chunking_stable():
    torch.manual_seed(4)
    hq, hkv, d, max_len = 6, 2, 16, 200
    kc, vc = torch.randn(3, hkv, max_len, d), torch.randn(3, hkv, max_len, d)
    q = torch.randn(4, hq, d)
    slots = torch.tensor([2, 0, 2, 1])
    prefix = torch.tensor([150, 1, 63, 0])
    pending = torch.tensor([[0, 2, 3, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 2, 3]])
    count = torch.tensor([3, 1, 2, 4])
    out = virtual_attention(q, kc, vc, slots, prefix, pending, count, max_keys=160, scale=0.25)
    for r in range(4):
        keys = list(range(int(prefix[r]))) + [int(prefix[r] + j) for j in pending[r, : count[r]]]
        torch.testing.assert_close(out[r], _attention_ref(q[r], kc, vc, int(slots[r]), keys, 0.25),
                                   rtol=1e-5, atol=1e-5)
    # a larger launch bound and another batch composition leave every row's bits unchanged
    again = virtual_attention(q[[2, 0]], kc, vc, slots[[2, 0]], prefix[[2, 0]], pending[[2, 0]], count[[2, 0]],
                              max_keys=max_len, scale=0.25)
    assert torch.equal(again, out[[2, 0]])


@pytest.mark.parametrize("vocab,k", [(1000, 4), (16384, 8), (40000, 10)])
def test_topk_logprobs_matches_log_softmax_topk(vocab, k):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=gen) * 4
    logits[1, :5] = 30.0  # a tie at the top: the lowest indices come first
    logits[2, [7, vocab - 1]] = 25.0  # a tie across chunks
    values, indices = topk_logprobs(logits, k)
    ref_values, ref_indices = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    assert indices[0].tolist() == ref_indices[0].tolist() and indices[2, 2:].tolist() == ref_indices[2, 2:].tolist()
    assert indices[1, :min(k, 5)].tolist() == list(range(min(k, 5)))
    assert indices[2, :2].tolist() == [7, vocab - 1]
    with pytest.raises(ValueError):
        topk_logprobs(torch.zeros(1, 65537), 2)


def test_kernels_compile_for_hopper():
    """The real compiler (not the interpreter this module runs under) accepts every kernel for sm_90: the token
    path's 16 launch variants and the draft-tree kernels' 6, each for bf16 and fp32."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "eaglepipe.engine.kernels.compile_check", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bytes of cubin") == 44
