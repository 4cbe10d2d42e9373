"""DFlash (families/dflash.py): the drafter's block forward against a direct reference and against the engine's cached
forward, the block objective's layout and position weights, training (online = offline, resume), the export
SGLang and vLLM load and the validator's pins of their target-layer conventions, and speculative decoding equal
to the target's greedy decode through the eager and the static round."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from eaglepipe.models.config import DrafterConfig

from test_export import export_to
from test_hidden_states import build_hidden
from test_round_graph import (  # noqa: F401  (module fixtures)
    EAGER,
    NEW_TOKENS,
    PROMPTS,
    assert_same_decode,
    decode,
    generators,
    record_calls,
    references,
    runner,
    target_dir,
)
from test_spec_decode import greedy_reference
from test_train import assert_two_processes_equal_one, conversations, make_cfg, make_chain_cfg, paths, sharp_target  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(block: int = 4, layers: int = 2, vocab: int = 97, aux: tuple[int, ...] = (1, 2, 3)) -> DrafterConfig:
    return DrafterConfig(algorithm="dflash", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=vocab, draft_vocab_size=vocab,
                         target_hidden_size=32, aux_layers=list(aux), max_position_embeddings=128,
                         rms_norm_eps=1e-6, rope_theta=500.0, num_hidden_layers=layers, block_size=block,
                         mask_token_id=vocab - 1)


def random_drafter(cfg: DrafterConfig, seed: int = 0):
    """A DFlash drafter with random weights everywhere (norm weights too, so that none is the identity)."""
    from eaglepipe.models.build import new_drafter

    g = torch.Generator().manual_seed(seed)
    model = new_drafter(cfg, torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g),
                        torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight") else p * 5)
    return model


def samples(lengths: list[int], seed: int = 0, vocab: int = 96) -> list[dict]:
    """Token samples whose second half is supervised."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        mask = np.zeros(n, np.int8)
        mask[n // 2:] = 1
        out.append({"id": f"s{i}", "input_ids": rng.integers(0, vocab, n).astype(np.int32), "loss_mask": mask})
    return out


# ---------------------------------------------------------------------------------------------- reference forward
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """RoPE of one head vector at position `pos` (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    angles = pos / theta ** (torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = torch.cos(angles).repeat(2), torch.sin(angles).repeat(2)
    return x * cos + torch.cat([-x[half:], x[:half]]) * sin


def reference_block(model, features: torch.Tensor, tokens: list[int], pos: list[int], doc: list[int],
                    anchor: int) -> torch.Tensor:
    """The logits [B-1, V] of the block at `anchor` of one row, query by query and head by head in float64 from the
    weights: the context (fused features strictly before the anchor in its document) gives K/V to every layer."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    eps, theta, d = cfg.rms_norm_eps, cfg.rope_theta, cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ctx = _rms(features.double() @ w["fc.weight"].t(), w["hidden_norm.weight"], eps)
    seen = [s for s in range(anchor) if doc[s] == doc[anchor]]
    block = [tokens[anchor]] + [cfg.mask_token_id] * (cfg.block_size - 1)
    qpos = [pos[anchor] + i for i in range(cfg.block_size)]
    x = w["embed_tokens.weight"][block]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)

        def heads(inp, name, norm):
            y = (inp @ w[p + f"self_attn.{name}_proj.weight"].t()).view(len(inp), -1, d)
            return _rms(y, w[p + f"self_attn.{norm}.weight"], eps) if norm else y
        q, kb, vb = heads(h, "q", "q_norm"), heads(h, "k", "k_norm"), heads(h, "v", None)
        kc, vc = heads(ctx[seen], "k", "k_norm"), heads(ctx[seen], "v", None)
        keys = [(kc[j], vc[j], pos[s]) for j, s in enumerate(seen)] + \
            [(kb[j], vb[j], qpos[j]) for j in range(len(block))]
        out = torch.zeros(len(block), cfg.num_attention_heads, d, dtype=torch.float64)
        for t in range(len(block)):
            for head in range(cfg.num_attention_heads):
                qv = _rope(q[t, head], qpos[t], theta)
                scores = torch.stack([qv @ _rope(k[head // group], kp, theta) for k, _, kp in keys]) / math.sqrt(d)
                probs = torch.softmax(scores, 0)
                out[t, head] = sum(pr * v[head // group] for pr, (_, v, _) in zip(probs, keys))
        x = x + out.view(len(block), -1) @ w[p + "self_attn.o_proj.weight"].t()
        m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = m @ w[p + "mlp.gate_proj.weight"].t(), m @ w[p + "mlp.up_proj.weight"].t()
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].t()
    return (_rms(x, w["norm.weight"], eps) @ model.lm_head_weight.double().t())[1:]


@pytest.mark.parametrize("pad_to", [None, 32], ids=["unpadded", "padded"])
def test_block_forward_matches_a_direct_reference(pad_to: int | None) -> None:
    """Two packed documents and a second row: every block's logits through the training forward (explicit-score
    attention and FlexAttention) equal the direct computation; rows padded to a fixed length add padding blocks,
    whose outputs stay finite (a NaN there would reach the weights' gradients)."""
    from eaglepipe.train.block_attention import flex_block_attention, math_block_attention
    from eaglepipe.train.block_objective import BLOCK, block_outputs
    from eaglepipe.train.objective import Objective

    cfg = tiny_config()
    model = random_drafter(cfg).eval()
    objective = Objective.of(block_size=cfg.block_size)
    batch = BLOCK.collate([samples([9, 11]), samples([14], seed=1)], objective, pad_to, None)
    features = torch.randn(*batch.input_ids.shape, 3 * 32, generator=torch.Generator().manual_seed(3))
    fused = model.fuse(features)
    with torch.no_grad():
        outs = {name: model.logits(block_outputs(model, batch, fused, cfg.block_size, attend))
                for name, attend in (("math", math_block_attention(batch.anchors, batch.doc_ids, cfg.block_size)),
                                     ("flex", flex_block_attention(batch.anchors, batch.doc_ids, cfg.block_size, 4)))}
    a = batch.anchors.shape[1]
    assert all(torch.isfinite(out).all() for out in outs.values())
    checked = 0
    for r in range(2):
        for j, anchor in enumerate(batch.anchors[r].tolist()):
            if anchor < 0:
                continue
            ref = reference_block(model, features[r], batch.input_ids[r].tolist(), batch.position_ids[r].tolist(),
                                  batch.doc_ids[r].tolist(), anchor)
            for out in outs.values():
                torch.testing.assert_close(out[r * a + j].double(), ref, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == int((batch.anchors >= 0).sum()) >= 10


def test_the_engine_forward_equals_the_training_forward(runner) -> None:  # noqa: F811
    """The serving path (context K/V committed to the cache, then the block proposed over it) gives the logits the
    training forward gives the block anchored at the same position."""
    from eaglepipe.speculative.config import SpecConfig
    from eaglepipe.speculative.context_cache import ContextCacheDrafter
    from eaglepipe.train.block_attention import math_block_attention
    from eaglepipe.train.block_objective import BLOCK, block_outputs
    from eaglepipe.train.objective import Objective

    cfg = tiny_config(block=5, vocab=runner.shapes.vocab_size)
    model = random_drafter(cfg).eval()
    batch = BLOCK.collate([samples([20], vocab=cfg.vocab_size - 1)], Objective.of(block_size=5), None, None)
    features = torch.randn(*batch.input_ids.shape, 96, generator=torch.Generator().manual_seed(4))
    cache = ContextCacheDrafter(model, runner, SpecConfig(4, 1, 5))
    with torch.no_grad():
        fused = model.fuse(features)
        trained = model.logits(block_outputs(model, batch, fused, 5, math_block_attention(batch.anchors,
                                                                                            batch.doc_ids, 5)))
        for j, anchor in enumerate(batch.anchors[0].tolist()):
            slot = torch.tensor([j % runner.max_slots])
            zero = torch.zeros(1, dtype=torch.long)
            cache.commit(slot, zero, 0, batch.input_ids[:, 1:anchor + 1], fused[:, :anchor],
                         torch.tensor([anchor]), None)
            served = cache.propose(batch.input_ids[:, anchor], (None, None), slot, torch.tensor([anchor]),
                                   anchor + 3, None)
            torch.testing.assert_close(served[0], trained[j], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the block objective
def test_blocks_are_anchored_at_supervised_positions_and_labelled_by_the_next_predictions() -> None:
    from eaglepipe.train.block_objective import BLOCK
    from eaglepipe.train.objective import Objective

    rows = [samples([9, 11]), samples([14], seed=1)]
    objective = Objective.of(block_size=4, num_anchors=3)
    full = BLOCK.collate(rows, objective, None, None)
    t = full.input_ids.shape[1]
    label_pos = full.label_pos.tolist()
    anchors = full.anchors.tolist()
    assert [a for row in anchors for a in row if a >= 0] == [p % t for p in label_pos]  # every supervised position
    for k, (slots, rows_k) in enumerate(zip(full.step_slots, full.step_rows)):
        for j, row in zip(slots.tolist(), rows_k.tolist()):
            r, anchor = divmod(j, full.anchors.shape[1])
            at = r * t + anchors[r][anchor] + k  # block position k+1 is the target's prediction at anchor + k
            assert label_pos[row] == at and full.doc_ids.view(-1)[at] == full.doc_ids[r, anchors[r][anchor]]
    # the last supervised position of a document labels no later block position; a document's first, every one
    assert len(full.step_slots[0]) == len(label_pos) > len(full.step_slots[1]) > len(full.step_slots[2])
    drawn = [BLOCK.collate(rows, objective, None, seed).anchors for seed in (7, 7, 8)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    assert drawn[0].shape[1] == 3 and set(drawn[0][drawn[0] >= 0].tolist()) <= {a for row in anchors for a in row}
    # rows padded to a fixed length get a fixed number of blocks (one compiled attention shape): the row length
    # when every position anchors one, num_anchors when they are drawn, whatever the rows hold
    wide = Objective.of(block_size=4, num_anchors=24)
    assert max(len(c) for c in anchors) < 24
    padded = [BLOCK.collate(rows, wide, 32, seed) for seed in (None, 7)]
    assert [b.anchors.shape for b in padded] == [(2, 32), (2, 24)]
    assert t == 32 and padded[0].anchors[:, :full.anchors.shape[1]].tolist() == anchors
    assert (padded[0].anchors[:, full.anchors.shape[1]:] == -1).all()
    assert [s.tolist() for s in padded[0].step_rows] == [s.tolist() for s in full.step_rows]


@pytest.mark.parametrize("weighting", ["decay", "dpace"])
def test_position_weights(weighting: str) -> None:
    """The loss is sum_k exp(-(k-1)/gamma) * mean CE_k (decay), or the D-PACE weights computed block by block from
    the draft's acceptance of each position, detached, over the blocks (dpace)."""
    from eaglepipe.train.block_attention import math_block_attention
    from eaglepipe.train.block_objective import BLOCK, block_loss, block_outputs
    from eaglepipe.train.draft_losses import draft_loss
    from eaglepipe.train.objective import Labels, Objective

    cfg = tiny_config()
    model = random_drafter(cfg)
    objective = Objective.of(block_size=4, position_weighting=weighting, loss_decay_gamma=3.0, dpace_alpha=0.3)
    batch = BLOCK.collate([samples([9, 11]), samples([14], seed=1)], objective, None, None)
    n = batch.label_pos.numel()
    g = torch.Generator().manual_seed(5)
    labels = Labels(logits=torch.randn(n, cfg.vocab_size, generator=g) * 3,
                    argmax=torch.randint(0, cfg.vocab_size, (n,), generator=g))
    fused = model.fuse(torch.randn(*batch.input_ids.shape, 96, generator=g))
    attend = math_block_attention(batch.anchors, batch.doc_ids, 4)
    dens = [float(s.numel()) for s in batch.step_slots]
    total, sums = block_loss(model, batch, fused, labels, objective, attend, dens)
    with torch.no_grad():
        drafts = block_outputs(model, batch, fused, 4, attend)
        ce, alpha = {}, {}
        for k, (slots, rows) in enumerate(zip(batch.step_slots, batch.step_rows)):
            loss_k, alpha_k = draft_loss(model.logits(drafts[slots, k]), labels.logits[rows])
            for j, lo, al in zip(slots.tolist(), loss_k, alpha_k):
                ce[j, k], alpha[j, k] = float(lo), float(al)
        if weighting == "decay":
            expected = sum(math.exp(-k / 3.0) * sum(v for (_, kk), v in ce.items() if kk == k) / dens[k]
                           for k in range(3))
        else:
            expected = 0.0
            for j in {j for j, _ in ce}:
                present = [k for k in range(3) if (j, k) in ce]
                prefix, acc = {}, 1.0
                for k in range(3):
                    acc *= 0.7 * alpha[j, k] + 0.3 if k in present else 1.0
                    prefix[k] = acc
                for k in present:
                    expected += sum(prefix[m] for m in present if m >= k) * ce[j, k] / dens[0]
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(sums["slots"]) == dens[0] and [float(sums[f"count_{k}"]) for k in range(3)] == dens
    assert "rounds" in sums  # every supervised position anchors a block: the rounds are replayed


# ---------------------------------------------------------------------------------------------- training
def dflash_cfg(**train):
    return make_chain_cfg(algorithm="dflash", draft_layers=2, block_size=4, loss_decay_gamma=3.0, **train)


def test_it_trains_online_and_offline_alike(conversations, sharp_target, tmp_path) -> None:  # noqa: F811
    from eaglepipe.train.loop import Paths, Trainer

    cfg = dflash_cfg(mode="offline", max_steps=3, num_anchors=8)
    hidden = tmp_path / "exp" / "hidden"
    build_hidden(cfg, conversations, sharp_target, hidden, tmp_path)
    assert json.loads((hidden / "manifest.json").read_text())["algorithm_family"] == "dflash"
    online = tmp_path / "online"
    online.mkdir()
    (online / "manifest.json").write_text('{"mode": "online"}')
    runs = {}
    for mode, h in (("offline", hidden), ("online", online)):
        p = Paths(sharp_target, conversations / "tokens", conversations / "vocab", h, tmp_path / mode / "train")
        trainer = Trainer(dflash_cfg(mode=mode, max_steps=3, num_anchors=8), p)
        runs[mode] = trainer.train()
    drafter = trainer.drafter
    assert drafter.config.num_hidden_layers == 2 and drafter.config.block_size == 4
    assert drafter.config.mask_token_id == 2  # SmolLM2's tokenizer fills the embedding: its pad token
    for split in ("train", "val"):
        for key in ("loss", "acc_0", "acc_2", "sim_tau"):
            assert runs["offline"]["final"][split][key] == pytest.approx(runs["online"]["final"][split][key],
                                                                         rel=1e-4, abs=1e-5)
    val = runs["online"]["final"]["val"]
    assert "acc_3" not in val and val["replay_tau"] >= 1.0 and val["sim_tau"] >= 1.0
    assert runs["online"]["final"]["train"]["replay_tau"] == 1.0  # sampled anchors: no rounds replayed
    name = runs["online"]["latest"]
    w_off, w_on = (load_file(str(tmp_path / m / "train" / "checkpoints" / name / "model.safetensors"))
                   for m in ("offline", "online"))
    for k in w_on:
        torch.testing.assert_close(w_off[k], w_on[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["decay", "dpace"])
def test_resume_after_a_kill_gives_bit_identical_weights(conversations, sharp_target, tmp_path,  # noqa: F811
                                                         weighting: str) -> None:
    from eaglepipe.train.loop import Trainer

    cfg = dflash_cfg(max_steps=5, num_anchors=6, position_weighting=weighting)
    Trainer(cfg, paths(conversations, sharp_target, tmp_path / "a" / "train")).train()
    Trainer(cfg, paths(conversations, sharp_target, tmp_path / "b" / "train")).train(stop_after=3)
    resumed = Trainer(cfg, paths(conversations, sharp_target, tmp_path / "b" / "train"))
    assert resumed.step == 3
    resumed.train()
    a, b = (tmp_path / x / "train" for x in "ab")
    name = (a / "LATEST").read_text().strip()
    assert (b / "LATEST").read_text().strip() == name
    wa, wb = (load_file(str(d / "checkpoints" / name / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(conversations, sharp_target, tmp_path,  # noqa: F811
                                                                    parallel: str) -> None:
    """The anchors follow the samples, not the rank or micro-batch that holds them, and the weights follow."""

    single = dflash_cfg(max_steps=3, micro_batch_size=4, pack=True, num_anchors=6)
    two = dflash_cfg(max_steps=3, micro_batch_size=2, pack=True, num_anchors=6, parallel=parallel, nproc_per_node=2)
    assert_two_processes_equal_one(single, two, conversations, sharp_target, tmp_path)


def test_a_one_layer_family_refuses_more_layers(conversations, sharp_target, tmp_path) -> None:  # noqa: F811
    from eaglepipe.config import ConfigError
    from eaglepipe.train.loop import Trainer

    with pytest.raises(ConfigError, match="draft_layers=2: a eagle3 drafter has 1 decoder layer"):
        Trainer(make_cfg(draft_layers=2), paths(conversations, sharp_target, tmp_path / "train"))


# ---------------------------------------------------------------------------------------------- export
def dflash_checkpoint(target_dir: Path, out: Path, block: int = 4, layers: int = 2, seed: int = 0) -> Path:
    """A random DFlash checkpoint (train/checkpoints layout) for the target in `target_dir`."""
    from eaglepipe.models.build import new_drafter, save_drafter
    from eaglepipe.target.info import describe_model

    info = describe_model(target_dir)
    cfg = DrafterConfig.from_target(info, "dflash", info["vocab_size"], aux_layers=[1, 2, 3])
    cfg.num_hidden_layers, cfg.block_size, cfg.mask_token_id = layers, block, info["vocab_size"] - 1
    weights = load_file(str(target_dir / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    model = new_drafter(cfg, embed, weights.get("lm_head.weight", embed), seed=seed)
    save_drafter(model, out)
    d2t, t2d = model.vocab_maps()
    save_file({"d2t": d2t, "t2d": t2d}, str(out / "vocab.safetensors"))
    return out


def test_export_format_for_sglang_and_vllm(target_dir, tmp_path: Path) -> None:  # noqa: F811
    ckpt = dflash_checkpoint(target_dir, tmp_path / "ckpt")
    summary = export_to(target_dir, ckpt, tmp_path / "export", dtype="bfloat16")
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    assert summary["validation"]["warnings"] == []
    sg, vl = (json.loads((tmp_path / "export" / f / "config.json").read_text()) for f in ("sglang", "vllm"))
    assert sg == vl  # one layout, which both engines read
    assert sg["architectures"] == ["DFlashDraftModel"] and sg["model_type"] == "qwen3"
    assert sg["block_size"] == 4 and sg["num_hidden_layers"] == 2 and sg["num_target_layers"] == 4
    assert sg["layer_types"] == ["full_attention"] * 2 and sg["tie_word_embeddings"] is False
    # h[1], h[2], h[3]: the outputs of layers 0, 1, 2; vLLM reads the top-level h-indices as they are
    assert sg["dflash_config"] == {"mask_token_id": 511, "target_layer_ids": [0, 1, 2]}
    assert sg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    names = set(load_file(str(tmp_path / "export" / "sglang" / "model.safetensors")))
    layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
             "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
             "post_attention_layernorm"}
    assert names == {f"layers.{i}.{n}.weight" for i in range(2) for n in layer} | \
        {"fc.weight", "hidden_norm.weight", "norm.weight"}
    commands = (tmp_path / "export" / "commands.txt").read_text()
    assert "--speculative-algorithm DFLASH" in commands and "--speculative-num-draft-tokens 4 " in commands
    assert "--speculative-num-steps" not in commands and "--speculative-eagle-topk" not in commands
    assert '"method": "dflash"' in commands and '"num_speculative_tokens": 3' in commands


def test_export_commands_launch_the_trained_block(target_dir, tmp_path: Path) -> None:  # noqa: F811
    """export.num_steps/num_draft_tokens (3, 4 here) are EAGLE's: a DFlash export is launched with its own block."""
    summary = export_to(target_dir, dflash_checkpoint(target_dir, tmp_path / "ckpt", block=6), tmp_path / "export")
    sglang, vllm = (next(c for c in summary["commands"] if c.startswith(p)) for p in ("python -m sglang", "vllm serve"))
    assert "--speculative-num-draft-tokens 6 " in sglang
    assert json.loads(vllm.split("--speculative-config ", 1)[1].strip("'"))["num_speculative_tokens"] == 5


def _problems(src: Path, target_dir: Path, tmp_path: Path, edit, fmt: str = "sglang", strict: bool = False) -> list:
    from eaglepipe.export.validate import validate_export

    d = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}" / fmt
    shutil.copytree(src / fmt, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    report = validate_export(d, target_dir, strict=strict)
    return report.problems + [f"warning: {w}" for w in report.warnings]


def test_the_validator_pins_each_engines_target_layers(target_dir, tmp_path: Path) -> None:  # noqa: F811
    """SGLang reads dflash_config.target_layer_ids (+1); vLLM the top-level h-indices, else target_layer_ids + 1;
    other breakages both engines would serve wrongly."""
    from eaglepipe.families.dflash import served_aux_layers

    export = tmp_path / "export"
    export_to(target_dir, dflash_checkpoint(target_dir, tmp_path / "ckpt"), export)
    ours = json.loads((export / "sglang" / "config.json").read_text())
    assert served_aux_layers(ours, "sglang", 4) == served_aux_layers(ours, "vllm", 4) == [1, 2, 3]
    no_top = {k: v for k, v in ours.items() if k != "eagle_aux_hidden_state_layer_ids"}
    assert served_aux_layers(no_top, "vllm", 4) == [1, 2, 3]
    assert served_aux_layers({**ours, "eagle_aux_hidden_state_layer_ids": [2, 3, 3]}, "vllm", 4) == [2, 3, 3]
    assert served_aux_layers({**ours, "dflash_config": {"mask_token_id": 5}}, "sglang", 4) == [2, 2]  # z-lab's default

    def set_top(ids):
        return lambda c: c.update(eagle_aux_hidden_state_layer_ids=ids)

    cases = [
        (set_top([2, 3, 4]), "sglang", "must be dflash_config.target_layer_ids [0, 1, 2] plus 1"),
        (lambda c: c.pop("eagle_aux_hidden_state_layer_ids"), "vllm", "vLLM builds before 0.20 ignore"),
        (lambda c: c["dflash_config"].update(target_layer_ids=[0, 1, 3]), "sglang", "outside 1..3"),
        (lambda c: c.pop("num_target_layers"), "sglang", "num_target_layers must be written"),
        (lambda c: c.update(num_target_layers=30), "sglang", "the target has 4 layers"),
        (lambda c: c.update(layer_types=["sliding_attention", "full_attention"]), "sglang", "full-attention"),
        (lambda c: c["dflash_config"].update(mask_token_id=512), "sglang", "mask_token_id must be a row"),
        (lambda c: c.update(block_size=1), "sglang", "block_size must be an int >= 2"),
        (lambda c: c.update(num_hidden_layers=3), "sglang", "missing tensor layers.2"),
        (lambda c: c["dflash_config"].update(causal=True), "vllm", "causal"),
    ]
    for edit, fmt, expected in cases:
        found = _problems(export, target_dir, tmp_path, edit, fmt)
        assert any(expected in p for p in found), (expected, found)
    assert _problems(export, target_dir, tmp_path, lambda c: None, "vllm") == []


# ---------------------------------------------------------------------------------------------- decoding
def fit_dflash(ckpt: Path, runner, seqs: list[list[int]], steps: int = 60) -> None:  # noqa: F811
    """Teach the random drafter the target's greedy continuations (every block of every sequence), so that the
    tests see accepted drafts at several depths."""
    from eaglepipe.families.registry import family_of
    from eaglepipe.models.build import load_drafter_weights, save_drafter
    from eaglepipe.train.block_attention import math_block_attention
    from eaglepipe.train.block_objective import BLOCK, block_outputs
    from eaglepipe.train.objective import Objective

    cfg = DrafterConfig.from_json(ckpt / "drafter_config.json")
    model = family_of(cfg).new_module(cfg, runner.weights.lm_head.float().clone())
    load_drafter_weights(model, ckpt / "model.safetensors")
    out = runner.prefill(seqs, list(range(len(seqs))), capture_layers=cfg.aux_layers)
    for s in range(len(seqs)):
        runner.release(s)
    data = []
    for seq, aux in zip(seqs, out.aux_hidden):
        mask = np.ones(len(seq), np.int8)
        mask[-1] = 0  # no next token to label
        batch = BLOCK.collate([[{"id": "s", "input_ids": np.array(seq), "loss_mask": mask}]],
                              Objective.of(block_size=cfg.block_size), None, None)
        padded = F.pad(aux.clone(), (0, 0, 0, batch.input_ids.shape[1] - len(seq)))[None]
        data.append((batch, padded, torch.tensor(seq)[batch.label_pos + 1]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    k = cfg.block_size - 1
    for _ in range(steps):
        loss = 0.0
        for batch, aux, following in data:
            drafts = block_outputs(model, batch, model.fuse(aux), cfg.block_size,
                                   math_block_attention(batch.anchors, batch.doc_ids, cfg.block_size))
            flat = torch.cat([s * k + i for i, s in enumerate(batch.step_slots)])
            logits = model.logits(drafts.reshape(-1, cfg.hidden_size)[flat])
            loss = loss + F.cross_entropy(logits, following[torch.cat(batch.step_rows)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_drafter(model, ckpt)


@pytest.fixture(scope="module")
def exported(target_dir, runner, references, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("dflash")
    ckpt = dflash_checkpoint(target_dir, root / "ckpt", block=5)
    fit_dflash(ckpt, runner, [p + r for p, r in zip(PROMPTS, references)])
    export_to(target_dir, ckpt, root / "export")
    return root / "export"


@pytest.mark.parametrize("steps", [4, 2], ids=["block5", "block3"])
def test_greedy_is_exact_in_the_eager_and_the_static_round(runner, references, exported, monkeypatch,  # noqa: F811
                                                           steps: int) -> None:
    """Batch 1 and batches whose rows stop at different rounds, in gathered and consecutive slots; the static round
    (what CUDA captures) takes every round and gives the eager round's tokens and statistics."""
    spec = dict(num_steps=steps, topk=1, num_draft_tokens=steps + 1)
    eager, graph = generators(runner, exported / "sglang", spec)
    assert type(graph.steps).__name__ == "ParallelRoundSteps"
    eager_rounds = record_calls(monkeypatch, graph, "round")
    rounds = full = 0
    for prompt, ref in zip(PROMPTS, references):
        assert assert_same_decode(eager, graph, [prompt], [NEW_TOKENS], [0]) == [ref]
        assert graph.stats.tau > 1.5, graph.stats  # the fitted drafter is accepted often ...
        rounds, full = rounds + graph.stats.rounds, full + graph.stats.accepted_at[-1]
    assert full < rounds  # ... but not always
    for limits, slots in (([40, 17, 29], [3, 1, 2]), ([12, 40, 33], [0, 1, 2])):
        out = assert_same_decode(eager, graph, PROMPTS, limits, slots)
        assert out == [ref[:n] for ref, n in zip(references, limits)]
    assert not eager_rounds


def test_the_vllm_dir_decodes_alike_and_a_tree_is_refused(runner, references, exported) -> None:  # noqa: F811
    from eaglepipe.speculative import SpeculativeGenerator

    gen = SpeculativeGenerator(runner, exported / "vllm", dict(num_steps=4, topk=1, num_draft_tokens=5),
                               options=EAGER)
    assert decode(gen, PROMPTS, [NEW_TOKENS] * 3, [0, 1, 2])[0] == references
    with pytest.raises(ValueError, match="topk must be 1"):
        SpeculativeGenerator(runner, exported / "sglang", dict(num_steps=3, topk=2, num_draft_tokens=5))


def test_decoding_to_the_end_of_the_cache(target_dir, exported) -> None:  # noqa: F811
    """Rounds near the cache's end draft shorter blocks (the eager round) and stay exact."""
    from eaglepipe.engine.model import LlamaRunner
    from eaglepipe.speculative import SpeculativeGenerator

    short = LlamaRunner(target_dir, device="cpu", dtype=torch.float32, max_slots=2, max_len=40)
    gen = SpeculativeGenerator(short, exported / "sglang", dict(num_steps=4, topk=1, num_draft_tokens=5))
    prompt = PROMPTS[0]
    out = decode(gen, [prompt], [10 ** 6], [0])[0][0]
    assert out == greedy_reference(short, prompt, short.max_len - len(prompt) + 1)
