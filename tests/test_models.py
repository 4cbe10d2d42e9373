"""Drafter modules, config, weights I/O and the target wrapper's aux capture."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from eaglepipe.models.build import load_drafter_weights, new_drafter, save_drafter
from eaglepipe.models.config import DrafterConfig
from eaglepipe.models.target import TargetWithAux
from eaglepipe.target.info import load_hf_model

V, VD, H = 500, 64, 32


def _cfg(algorithm="eagle3", **kw):
    return DrafterConfig(algorithm=algorithm, hidden_size=H, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=V,
                         draft_vocab_size=VD if algorithm.startswith("eagle3") else V, target_hidden_size=H,
                         aux_layers=[1, 2, 3], fc_norm=algorithm == "eagle3.1", norm_output=algorithm == "eagle3.1",
                         max_position_embeddings=256, **kw)


def _build(algorithm="eagle3"):
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(VD) * 7
    d2t, t2d = ids - torch.arange(VD), torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return new_drafter(_cfg(algorithm), torch.randn(V, H, generator=g), torch.randn(V, H, generator=g), d2t, t2d)


def test_eagle3_parameter_names_are_the_sglang_names():
    names = set(_build("eagle3.1").state_dict())
    mid = {f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"} | {f"midlayer.mlp.{p}_proj.weight" for p in
                                                                    ("gate", "up", "down")}
    mid |= {f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")}
    expected = mid | {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | \
        {f"fc_norm.{i}.weight" for i in range(3)}
    assert names == expected
    d = _build("eagle3")
    assert d.midlayer.self_attn.q_proj.weight.shape == (4 * 8, 2 * H)
    assert d.fc.weight.shape == (H, 3 * H) and d.fc.bias is None
    assert not d.embed_tokens.weight.requires_grad


def test_eagle1_layout_and_lm_head():
    d = _build("eagle1")
    names = set(d.state_dict())
    assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight",
            "layers.0.post_attention_layernorm.weight"} <= names
    assert not any("input_layernorm" in n or n.startswith("norm") or "lm_head" in n for n in names)
    x = torch.randn(1, 3, H)
    torch.testing.assert_close(d.logits(x), x @ d.lm_head_weight.t())


def test_lm_head_initialised_from_target_rows_at_draft_ids():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, H, generator=g)
    ids = torch.tensor([3, 10, 11, 400])
    d2t, t2d = ids - torch.arange(4), torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    cfg = _cfg()
    cfg.draft_vocab_size = 4
    d = new_drafter(cfg, torch.randn(V, H, generator=g), head, d2t, t2d)
    torch.testing.assert_close(d.lm_head.weight.data, head[ids])
    assert d.to_target_ids(torch.tensor([0, 3])).tolist() == [3, 400]
    r = new_drafter(cfg, torch.randn(V, H, generator=g), head, d2t, t2d, lm_head_init="random")
    assert not torch.allclose(r.lm_head.weight, head[ids])


@pytest.mark.parametrize("algorithm", ["eagle3", "eagle3.1", "eagle1"])
def test_step_with_cache_equals_one_full_step(algorithm):
    d = _build(algorithm).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 7), generator=g)
    hidden = torch.randn(2, 7, H, generator=g)
    pos = torch.arange(7).expand(2, 7)
    full_h, full_logits, _ = d.step(ids, hidden, pos)
    h1, l1, kv = d.step(ids[:, :4], hidden[:, :4], pos[:, :4])
    h2, l2, kv2 = d.step(ids[:, 4:], hidden[:, 4:], pos[:, 4:], past_kv=kv)
    torch.testing.assert_close(torch.cat([l1, l2], 1), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([h1, h2], 1), full_h, rtol=1e-5, atol=1e-5)
    assert kv2[0].shape == (2, 2, 7, 8)
    with pytest.raises(ValueError, match="attn_mask"):
        d.step(ids, hidden, pos, attn_mask=torch.ones(2, 1, 7, 3, dtype=torch.bool))


def test_norm_output_feeds_the_post_norm_state():
    d3, d31 = _build("eagle3"), _build("eagle3.1")
    x = torch.randn(1, 2, H) * 5
    torch.testing.assert_close(d3.next_state(x), x)
    torch.testing.assert_close(d31.next_state(x), d31.norm(x))
    aux = torch.randn(1, 2, 3 * H)
    chunks = aux.split(H, -1)
    expected = d31.fc(torch.cat([n(c) for n, c in zip(d31.fc_norm, chunks)], -1))
    torch.testing.assert_close(d31.fuse(aux), expected)


def test_config_json_roundtrip_and_unknown_keys(tmp_path):
    cfg = _cfg("eagle3.1", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    assert DrafterConfig.from_json(cfg.to_json()) == cfg
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert DrafterConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        DrafterConfig.from_json('{"algorithm": "eagle3", "bogus": 1}')
    with pytest.raises(ValueError, match="algorithm"):
        DrafterConfig(algorithm="medusa")


def test_weights_roundtrip_and_sglang_layers0_names(tmp_path):
    d = _build("eagle3")
    save_drafter(d, tmp_path / "ours")
    e = _build("eagle3")
    with torch.no_grad():
        for p in e.parameters():
            p.zero_()
    load_drafter_weights(e, tmp_path / "ours" / "model.safetensors")
    for k, v in d.state_dict().items():
        torch.testing.assert_close(e.state_dict()[k], v)
    # an SGLang-style export: layers.0.* names, no embed_tokens
    state = {k.replace("midlayer.", "layers.0."): v for k, v in d.state_dict().items() if k != "embed_tokens.weight"}
    save_file(state, str(tmp_path / "sg.safetensors"))
    f = _build("eagle3")
    load_drafter_weights(f, tmp_path / "sg.safetensors")
    torch.testing.assert_close(f.midlayer.self_attn.q_proj.weight, d.midlayer.self_attn.q_proj.weight)
    bad = dict(load_file(str(tmp_path / "ours" / "model.safetensors")))
    bad["fc.weight"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="fc.weight has shape"):
        load_drafter_weights(f, tmp_path / "bad.safetensors")


def test_aux_capture_equals_hf_hidden_states(tiny_llama_dir):
    model = load_hf_model(tiny_llama_dir)
    n = model.config.num_hidden_layers
    layers = [0, 2, n // 2, n - 3, n]
    target = TargetWithAux(model, layers)
    ids = torch.randint(0, 2000, (2, 11), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(11).expand(2, 11)
    aux, final = target(ids, pos)
    ref = model(ids, output_hidden_states=True)
    hs, h = ref.hidden_states, model.config.hidden_size
    for j, i in enumerate(layers[:-1]):
        torch.testing.assert_close(aux[..., j * h:(j + 1) * h], hs[i], rtol=0, atol=0)
    # h[N] is captured before the final norm; HF's hidden_states[-1] is after it
    pre = aux[..., -h:]
    torch.testing.assert_close(model.model.norm(pre), hs[n])
    assert not torch.allclose(pre, hs[n])
    torch.testing.assert_close(final, hs[n])
    draft_ids = torch.tensor([5, 17, 900])
    logits, argmax = target.label_logits(final.reshape(-1, h), draft_ids, chunk=7)
    torch.testing.assert_close(logits, ref.logits.reshape(-1, ref.logits.shape[-1])[:, draft_ids], rtol=1e-5, atol=1e-5)
    assert argmax.tolist() == ref.logits.reshape(-1, ref.logits.shape[-1]).argmax(-1).tolist()
    with pytest.raises(ValueError, match="outside"):
        TargetWithAux(model, [n + 1])


def test_compiled_target_layers_give_the_eager_aux_states_and_final_hidden(tiny_llama_dir):
    """train.compile_target: each decoder layer's forward through torch.compile (Inductor on CPU here), on packed
    rows; the aux hooks, which stay outside the compiled code, capture the same states, and the layers share
    one graph."""
    from torch._dynamo.utils import counters

    model = load_hf_model(tiny_llama_dir)
    n = model.config.num_hidden_layers
    target = TargetWithAux(model, [1, n // 2, n])
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(15), torch.arange(9)]).expand(2, 24)  # two documents a row
    aux, final = target(ids, pos)
    torch._dynamo.reset()
    counters.clear()
    target.compile_layers()
    aux_c, final_c = target(ids, pos)
    torch.testing.assert_close(aux_c, aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_c, final, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_target_graphs_refuse_what_they_cannot_replay(tiny_llama_dir):
    """train.target_graphs replays the target from CUDA graphs (checked against the eager forward by
    benchmarks/train.py --target-graphs on a GPU). Here: a target whose attention finds the documents on the host
    is refused, and so are inputs off the GPU, with the reason."""
    model = load_hf_model(tiny_llama_dir)
    target = TargetWithAux(model, [1, model.config.num_hidden_layers])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager attention, not flash_attention_2"):
        target.use_cuda_graphs()
    model.config._attn_implementation = "sdpa"
    target.use_cuda_graphs()
    ids = torch.randint(0, 2000, (1, 8))
    with pytest.raises(ValueError, match="replay on a GPU; the inputs are on cpu"):
        target(ids, torch.arange(8)[None])
    aux, final = target.packed_forward(ids, torch.arange(8)[None])  # the eager forward stays available
    assert aux.shape == (1, 8, 2 * model.config.hidden_size) and final.shape == (1, 8, model.config.hidden_size)


def test_the_target_forward_that_graphs_capture_never_waits_for_the_device(tiny_llama_dir):
    """A CUDA graph capture fails on any host sync. The packed forward (HF's model with the mask built from the
    positions) dispatches none of the ops that read a device value on the host."""
    from host_reads import HostReads

    model = load_hf_model(tiny_llama_dir)
    target = TargetWithAux(model, [1, 2, model.config.num_hidden_layers])
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(15), torch.arange(9)]).expand(2, 24)
    with HostReads() as spy:
        target.packed_forward(ids, pos)
    assert spy.seen == []
    with HostReads() as spy:  # the spy sees them where they happen
        torch.arange(3).sum().item()
    assert spy.seen == ["_local_scalar_dense"]


def test_packed_rows_give_each_document_its_own_states(tiny_llama_dir):
    """Two documents packed in a row (positions restarting at 0; the mask built from them) give the aux states
    and final hidden each document gets alone, and the mask is causal and block-diagonal."""
    from eaglepipe.models.target import packed_causal_mask

    model = load_hf_model(tiny_llama_dir)
    target = TargetWithAux(model, [1, 2, model.config.num_hidden_layers])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 2000, (1, 13), generator=g), torch.randint(0, 2000, (1, 7), generator=g)
    aux, final = target(torch.cat([a, b], 1), torch.cat([torch.arange(13), torch.arange(7)])[None])
    for doc, span in ((a, slice(0, 13)), (b, slice(13, 20))):
        aux_alone, final_alone = target(doc, torch.arange(doc.shape[1])[None])
        torch.testing.assert_close(aux[:, span], aux_alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[:, span], final_alone, rtol=1e-5, atol=1e-5)
    mask = packed_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [True, True, True, False, False], [False, False, False, True, False],
                             [False, False, False, True, True]]


@pytest.mark.parametrize("algorithm, layer", [("eagle3", "midlayer"), ("eagle1", "layers.0")])
def test_compiled_drafter_layers_give_the_eager_outputs_and_gradients(algorithm, layer):
    """train.compile: a drafting step's `attention_inputs` (embedding, input norms, RoPE, q/k/v) and its layer's
    `finish` through torch.compile (Inductor on CPU here) give the eager layer output and parameter gradients."""
    import torch.nn.functional as F

    def attend(q, k, v):
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              is_causal=True)

    g = torch.Generator().manual_seed(3)
    ids, hidden = torch.randint(0, V, (2, 10), generator=g), torch.randn(2, 10, H, generator=g)
    pos = torch.arange(10).expand(2, 10)
    runs = []
    for compiled in (False, True):
        drafter = _build(algorithm)
        if compiled:
            drafter.compile_layers()
        out = drafter.layer_forward(ids, hidden, pos, attend)
        out.square().sum().backward()
        runs.append((out.detach(), {n: p.grad for n, p in drafter.named_parameters() if p.grad is not None}))
    (eager_out, eager_grads), (out, grads) = runs
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and f"{layer}.mlp.down_proj.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5)
