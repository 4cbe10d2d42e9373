"""P-EAGLE (families/peagle.py): COD sampling, the `cod` objective against a slot-by-slot reference, the vLLM export
and its validation, greedy decoding through the parallel round equal to plain decoding (eager round and the static
round body that CUDA captures), and training (resume, offline, two processes)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from eaglepipe.config import to_dict
from eaglepipe.engine import EngineOptions
from eaglepipe.train.loop import Paths, Trainer

from test_export import export_to, keys_of, make_checkpoint
from test_round_graph import MIN_CTX, make_runner, target_dir  # noqa: F401  (module fixture)
from test_spec_decode import greedy_reference, run_spec
from test_train import assert_two_processes_equal_one, conversations, make_chain_cfg, paths, sharp_target  # noqa: F401  (module fixtures)

PROMPTS = [[1, 2, 3, 4, 5, 6], [100, 200, 300, 400], [7, 7, 7, 9, 11, 13, 15, 17, 19, 21]]
NEW_TOKENS = 40
DEPTHS = 5
SPECS = [dict(num_steps=3, topk=1, num_draft_tokens=4), dict(num_steps=5, topk=1, num_draft_tokens=6)]
EAGER, GRAPH = EngineOptions(graph_rounds=False), EngineOptions(graph_rounds=True)  # on CPU: the PyTorch path


def sample(i: int, length: int, answer: tuple[int, int], seed: int = 0) -> dict:
    """A token sample whose loss mask covers positions answer[0]..answer[1]-1."""
    ids = np.random.default_rng(seed + i).integers(0, 50, length)
    mask = np.zeros(length, np.int8)
    mask[answer[0]:answer[1]] = 1
    return {"id": f"s{i}", "input_ids": ids, "loss_mask": mask}


SAMPLES = [sample(0, 40, (8, 40)), sample(1, 30, (5, 30)), sample(2, 25, (3, 25)), sample(3, 36, (10, 30))]


def sets(slots: list[torch.Tensor]) -> list[set[int]]:
    return [set(s.tolist()) for s in slots]


def test_cod_sampling_keeps_nested_rollouts_of_the_drawn_sizes():
    from eaglepipe.train.batches import collate
    from eaglepipe.train.cod import cod_slots

    batch = collate([[SAMPLES[0]], [SAMPLES[1], SAMPLES[2]]], DEPTHS)
    t = batch.input_ids.shape[1]
    drawn = cod_slots(batch, 0.7, 0.2, seed=11)
    full = cod_slots(batch, 0.7, 0.2, seed=None)
    assert torch.equal(drawn.step_slots[0], batch.step_slots[0]) and torch.equal(full.step_slots[0],
                                                                                 batch.step_slots[0])
    supervised = np.bincount(batch.step_slots[0].numpy() // t, minlength=2)
    for d in range(1, DEPTHS):
        # validation: every slot supervised at depth d whose lower depths are kept
        prev = set(range(2 * t)) if d == 1 else sets(full.step_slots)[d - 1]
        assert sets(full.step_slots)[d] == sets(batch.step_slots)[d] & prev
        # training: a subset of the previous depth's, of the drawn size per row, with the same label rows
        prev = set(range(2 * t)) if d == 1 else sets(drawn.step_slots)[d - 1]
        pool = sets(batch.step_slots)[d] & prev
        assert sets(drawn.step_slots)[d] <= pool
        for r in range(2):
            size = int(max(int(supervised[r]) - d, 0) * max(0.7 ** d, 0.2))
            mine = [s for s in drawn.step_slots[d].tolist() if s // t == r]
            assert len(mine) == min(size, len([s for s in pool if s // t == r]))
        row_of = dict(zip(batch.step_slots[d].tolist(), batch.step_rows[d].tolist()))
        assert drawn.step_rows[d].tolist() == [row_of[s] for s in drawn.step_slots[d].tolist()]
    assert sum(s.numel() for s in drawn.step_slots[1:]) < sum(s.numel() for s in full.step_slots[1:])
    # the same seed draws the same slots; a row draws alike whatever micro-batch it is in and wherever
    again = cod_slots(batch, 0.7, 0.2, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(again.step_slots, drawn.step_slots))
    other = cod_slots(collate([[SAMPLES[3]], [SAMPLES[1], SAMPLES[2]], [SAMPLES[0]]], DEPTHS), 0.7, 0.2, seed=11)
    t2 = other.input_ids.shape[1]
    for d in range(1, DEPTHS):
        row1 = [s % t for s in drawn.step_slots[d].tolist() if s // t == 1]
        assert row1 == [s % t2 for s in other.step_slots[d].tolist() if s // t2 == 1]
    assert any(not torch.equal(a, b) for a, b in zip(cod_slots(batch, 0.7, 0.2, seed=12).step_slots, drawn.step_slots))


def tiny_drafter(dtype: torch.dtype = torch.float64):
    """A random P-EAGLE drafter over a 50-token vocabulary, its mask_hidden random too."""
    from eaglepipe.models.build import new_drafter
    from eaglepipe.models.config import DrafterConfig

    cfg = DrafterConfig(algorithm="peagle", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=50, draft_vocab_size=50, target_hidden_size=32,
                        aux_layers=[1, 2, 3], max_position_embeddings=128, mask_token_id=49)
    g = torch.Generator().manual_seed(0)
    model = new_drafter(cfg, torch.randn(50, 32, generator=g), torch.randn(50, 32, generator=g),
                        torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.bool))
    with torch.no_grad():
        model.mask_hidden.normal_(0.0, 1.0, generator=g)
        for p in model.parameters():
            if p.dim() == 2 and p.requires_grad:
                p.mul_(10.0)  # 0.02-initialised weights would make every depth's output nearly alike
    return model.to(dtype)


def test_cod_loss_equals_a_slot_by_slot_reference():
    """Every kept (slot, depth) of the objective, sparse depths and packed documents included, equals the drafter's
    plain causal forward over [its document's tokens up to the slot, d masks] with the mask state fed at the masks
    (what the parallel round computes at inference)."""
    from eaglepipe.train.batches import collate
    from eaglepipe.train.cod import cod_loss, cod_slots
    from eaglepipe.train.objective import Labels, Objective
    from eaglepipe.train.ttt_attention import document_causal_mask, math_step0

    model = tiny_drafter()
    batch = cod_slots(collate([[SAMPLES[0]], [SAMPLES[1], SAMPLES[2]]], DEPTHS), 0.7, 0.2, seed=5)
    b, t = batch.input_ids.shape
    g = torch.Generator().manual_seed(1)
    features = torch.randn(b, t, 3 * 32, generator=g, dtype=torch.float64)
    n = batch.label_pos.numel()
    target = torch.randn(n, 50, generator=g, dtype=torch.float64) * 3
    labels = Labels(logits=target, argmax=target.argmax(-1))
    counts = [float(c) for c in batch.supervised_counts()]
    fused = model.fuse(features)
    loss, sums = cod_loss(model, batch, fused, labels, Objective.of(ttt_steps=DEPTHS), math_step0(
        document_causal_mask(batch.doc_ids)), counts)

    ref, correct = torch.zeros((), dtype=torch.float64), [0] * DEPTHS
    mask = model.mask_state()
    for d in range(DEPTHS):
        depth = torch.zeros((), dtype=torch.float64)
        for slot, row in zip(batch.step_slots[d].tolist(), batch.step_rows[d].tolist()):
            r, s = divmod(slot, t)
            start = int((batch.doc_ids[r] == batch.doc_ids[r, s]).nonzero()[0])
            ids = torch.cat([batch.step_ids[0, r, start:s + 1], torch.full((d,), 49)])
            hidden = torch.cat([fused[r, start:s + 1], mask.expand(d, -1)])
            pos = batch.position_ids[r, start:s + 1]
            pos = torch.cat([pos, pos[-1] + torch.arange(1, d + 1)])
            _, logits, _ = model.step(ids[None], hidden[None], pos[None])
            depth = depth - (F.softmax(target[row], -1) * F.log_softmax(logits[0, -1], -1)).sum()
            correct[d] += int(logits[0, -1].argmax() == labels.argmax[row])
        ref = ref + depth / counts[d]  # each depth's mean, all depths alike
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    assert [int(sums[f"correct_{d}"]) for d in range(DEPTHS)] == correct
    assert [int(sums[f"count_{d}"]) for d in range(DEPTHS)] == [int(c) for c in counts]
    loss.backward()
    assert model.mask_hidden.grad.abs().sum() > 0 and model.embed_tokens.weight.grad is None


# ---------------------------------------------------------------------- export and validation
def test_it_exports_for_vllm_as_vllm_reads_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "peagle")
    summary = export_to(tiny_llama_dir, ckpt, tmp_path / "export", dtype="bfloat16")
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    assert summary["formats"] == ["vllm"] and not (tmp_path / "export" / "sglang").exists()
    dc = json.loads((ckpt / "drafter_config.json").read_text())
    cfg = json.loads((tmp_path / "export" / "vllm" / "config.json").read_text())
    # what vLLM's speculators loader reads (transformers_utils/configs/speculators: base.py, algos.py update_peagle)
    assert cfg["speculators_model_type"] == "peagle" and cfg["architectures"] == ["PEagleSpeculator"]
    sc = cfg["speculators_config"]
    assert sc["algorithm"] == "peagle" and sc["proposal_methods"][0]["speculative_tokens"] == 3
    assert sc["verifier"]["name_or_path"] == str(tiny_llama_dir)
    assert cfg["mask_token_id"] == dc["mask_token_id"] and 0 <= cfg["mask_token_id"] < 49152  # -> pard_token
    assert cfg["norm_before_residual"] is False and cfg["draft_vocab_size"] == 512
    assert cfg["eagle_aux_hidden_state_layer_ids"] == dc["aux_layers"] and cfg["target_hidden_size"] == 64
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["hidden_size"] == 64
    keys = keys_of(tmp_path / "export" / "vllm" / "model.safetensors")
    assert keys["mask_hidden"] == ([1, 3 * 64], "BF16")  # vLLM: mask_hidden.view(1, -1) into [1, 3 * hidden]
    assert keys["fc.weight"] == ([64, 3 * 64], "BF16") and keys["lm_head.weight"] == ([512, 64], "BF16")
    assert "layers.0.self_attn.q_proj.weight" in keys and keys["d2t"] == ([512], "I64")
    assert "embed_tokens.weight" not in keys and not [k for k in keys if k.startswith("midlayer.")]
    weights = load_file(str(tmp_path / "export" / "vllm" / "model.safetensors"))
    src = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(weights["mask_hidden"], src["mask_hidden"].to(torch.bfloat16))
    commands = (tmp_path / "export" / "commands.txt").read_text()
    assert "SGLang does not serve peagle drafters" in commands
    line = next(x for x in commands.splitlines() if x.startswith("vllm serve"))
    spec = json.loads(shlex.split(line)[shlex.split(line).index("--speculative-config") + 1])
    assert spec["method"] == "eagle3" and spec["parallel_drafting"] is True and spec["num_speculative_tokens"] == 3


def broken(export: Path, out: Path, cfg_edit=None, drop: str | None = None) -> Path:
    """A copy of the export dir whose vllm/ config is edited or lacks a tensor; returns its vllm/ dir."""
    import shutil

    shutil.copytree(export, out)
    vllm = out / "vllm"
    if cfg_edit is not None:
        cfg = json.loads((vllm / "config.json").read_text())
        cfg_edit(cfg)
        (vllm / "config.json").write_text(json.dumps(cfg))
    if drop is not None:
        tensors = load_file(str(vllm / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(vllm / "model.safetensors"))
    return vllm


def test_the_validator_checks_what_vllm_needs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from eaglepipe.export.validate import validate_export

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "peagle")
    export_to(tiny_llama_dir, ckpt, tmp_path / "export")
    cases = {
        "no_mask_hidden": (None, "mask_hidden", "missing tensor mask_hidden [1, 192]"),
        "mask_out_of_range": (lambda c: c.update(mask_token_id=49152), None, "mask_token_id must be a token id"),
        "no_mask": (lambda c: c.pop("mask_token_id"), None, "mask_token_id must be a token id"),
        "eagle3_type": (lambda c: c.update(speculators_model_type="eagle3"), None,
                        "speculators_model_type must be peagle"),
        "other_mask": (lambda c: c.update(mask_token_id=7), None, "mask_token_id is 7 as vLLM reads this config"),
    }
    for name, (edit, drop, problem) in cases.items():
        problems = validate_export(broken(tmp_path / "export", tmp_path / name, edit, drop), tiny_llama_dir).problems
        assert any(problem in p for p in problems), (name, problems)


# ---------------------------------------------------------------------- greedy decoding
def fit_peagle(ckpt: Path, runner, seqs: list[list[int]], prompt_lens: list[int], steps: int = 80) -> None:
    """Teach the random drafter the target's greedy continuations at every depth through the `cod` objective (no
    sampling), so that the rounds accept drafts at several depths."""
    from eaglepipe.families.registry import family_of
    from eaglepipe.models.build import load_drafter_weights, save_drafter
    from eaglepipe.models.config import DrafterConfig
    from eaglepipe.train.batches import collate
    from eaglepipe.train.cod import cod_loss, cod_slots
    from eaglepipe.train.objective import Labels, Objective
    from eaglepipe.train.ttt_attention import document_causal_mask, math_step0

    cfg = DrafterConfig.from_json(ckpt / "drafter_config.json")
    model = family_of(cfg).new_module(cfg, None)
    load_drafter_weights(model, ckpt / "model.safetensors")
    out = runner.prefill(seqs, list(range(len(seqs))), capture_layers=cfg.aux_layers)
    for s in range(len(seqs)):
        runner.release(s)
    samples = []
    for i, (seq, plen) in enumerate(zip(seqs, prompt_lens)):
        mask = np.zeros(len(seq), np.int8)
        mask[plen - 1:len(seq) - 1] = 1  # predictions of the greedy continuation
        samples.append({"id": str(i), "input_ids": np.asarray(seq), "loss_mask": mask})
    batch = cod_slots(collate([[s] for s in samples], DEPTHS), 0.7, 0.2, None)
    t = batch.input_ids.shape[1]
    features = torch.zeros(len(seqs), t, out.aux_hidden[0].shape[-1])
    for i, aux in enumerate(out.aux_hidden):
        features[i, :aux.shape[0]] = aux
    nxt = torch.tensor([seqs[p // t][p % t + 1] for p in batch.label_pos.tolist()])
    draft_index = torch.cumsum(model.in_draft_vocab(torch.arange(cfg.vocab_size)).long(), 0) - 1
    labels = Labels(logits=F.one_hot(draft_index[nxt], cfg.draft_vocab_size).float() * 30, argmax=nxt)
    step0 = math_step0(document_causal_mask(batch.doc_ids))
    counts = [float(c) for c in batch.supervised_counts()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss, _ = cod_loss(model, batch, model.fuse(features), labels, Objective.of(ttt_steps=DEPTHS), step0, counts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_drafter(model, ckpt)


@pytest.fixture(scope="module")
def runner(target_dir: Path):  # noqa: F811
    return make_runner(target_dir, 128)


@pytest.fixture(scope="module")
def references(runner) -> list[list[int]]:
    return [greedy_reference(runner, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def exported(target_dir: Path, runner, references, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("peagle")
    seqs = [p + r for p, r in zip(PROMPTS, references)]
    ckpt = make_checkpoint(target_dir, root / "ckpt", "peagle", draft_vocab=128,
                           include_ids=sorted({t for s in seqs for t in s}))
    fit_peagle(ckpt, runner, seqs, [len(p) for p in PROMPTS])
    summary = export_to(target_dir, ckpt, root / "export")
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    return root / "export"


def generators(runner, export: Path, spec: dict):
    """(eager, graph): the drafter decoded by the eager round alone and by the static round body."""
    from eaglepipe.speculative import SpeculativeGenerator
    from eaglepipe.speculative.parallel_round import ParallelRoundSteps
    from eaglepipe.speculative.round_graph import RoundGraph

    eager = SpeculativeGenerator(runner, export, spec, options=EAGER)
    graph = SpeculativeGenerator(runner, export, spec, drafter=eager.loaded, options=GRAPH)
    graph.round_graph = RoundGraph(graph, min_ctx=MIN_CTX)
    assert isinstance(eager.steps, ParallelRoundSteps) and eager.round_graph is None and not eager.steps.fast
    return eager, graph


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"k{s['num_steps']}")
def test_greedy_is_exact(runner, references, exported: Path, spec: dict) -> None:
    """Batch 1 and batched (slots not 0..B-1, rows stopping at different rounds), eager and static rounds: the
    target's own greedy tokens, with drafts accepted at every depth and the same statistics on both rounds."""
    stats = []
    for gen in generators(runner, exported, spec):
        assert [run_spec(gen, [p], limit=NEW_TOKENS)[0][0] for p in PROMPTS] == references
        stats.append(gen.stats)
        gen.reset_stats()
        assert run_spec(gen, PROMPTS, limit=NEW_TOKENS, slots=[3, 1, 2])[0] == references
    assert stats[0] == stats[1]
    assert stats[0].tau > 2.0 and min(stats[0].acceptance_rates()) > 0, stats[0]


def test_greedy_is_exact_up_to_the_end_of_the_cache(target_dir: Path, exported: Path) -> None:  # noqa: F811
    """Rounds near the cache's end draft fewer tokens (the eager round), and the static round hands its rows back."""
    small = make_runner(target_dir, 40)
    limit = 40 - max(len(p) for p in PROMPTS)
    refs = [greedy_reference(small, p, limit) for p in PROMPTS]
    for gen in generators(small, exported, SPECS[1]):
        assert [run_spec(gen, [p], limit=limit)[0][0] for p in PROMPTS] == refs
        assert run_spec(gen, PROMPTS, limit=limit)[0] == refs


# ---------------------------------------------------------------------- training
def test_resume_after_a_kill_gives_bit_identical_weights(conversations, sharp_target, tmp_path):  # noqa: F811
    cfg = make_chain_cfg(algorithm="peagle", max_steps=5, ttt_steps=4)
    Trainer(cfg, paths(conversations, sharp_target, tmp_path / "a" / "train")).train()
    first = Trainer(cfg, paths(conversations, sharp_target, tmp_path / "b" / "train"))
    first.train(stop_after=3)
    resumed = Trainer(cfg, paths(conversations, sharp_target, tmp_path / "b" / "train"))
    assert resumed.step == 3
    summary = resumed.train()
    name = (tmp_path / "a" / "train" / "LATEST").read_text().strip()
    assert summary["latest"] == name and summary["algorithm"] == "peagle"
    wa, wb = (load_file(str(tmp_path / x / "train" / "checkpoints" / name / "model.safetensors")) for x in "ab")
    assert wa.keys() == wb.keys() and "mask_hidden" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = [r for r in resumed.history.rows if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) and "acc_3" in r for r in rows)
    published = json.loads((tmp_path / "b" / "train" / "checkpoints" / name / "drafter_config.json").read_text())
    assert published["trained_depth"] == 4  # train.ttt_steps: the depths COD supervised


def test_rounds_past_the_trained_depth_are_refused_from_the_export_to_the_bench(tiny_llama_dir: Path,
                                                                                tmp_path: Path) -> None:
    """The depths a P-EAGLE drafter was trained on (its drafter_config.json's trained_depth) travel with its export:
    a round of more drafts is refused by the export's launch point, the loader and the bench's sweep check."""
    from eaglepipe.bench.drafter import check_sweep, checked_drafter
    from eaglepipe.config.schema import SweepPoint
    from eaglepipe.speculative.drafter_loader import format_dir_config
    from eaglepipe.utils.cli import StageError

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "peagle")
    dc = json.loads((ckpt / "drafter_config.json").read_text())
    (ckpt / "drafter_config.json").write_text(json.dumps({**dc, "trained_depth": 3}))
    assert export_to(tiny_llama_dir, ckpt, tmp_path / "export")["validation"]["ok"]  # launch point: 3 drafts
    family, cfg = format_dir_config(tmp_path / "export" / "vllm", 4)
    assert cfg.trained_depth == 3
    family.check_round(cfg, 3, 1, 4)
    with pytest.raises(ValueError, match=r"trained on depths 1\.\.3"):
        family.check_round(cfg, 4, 1, 5)
    drafter = checked_drafter(tmp_path / "export", tiny_llama_dir, "bench.drafter")
    with pytest.raises(StageError, match="s5_k1_n6"):
        check_sweep(drafter, [SweepPoint(num_steps=3, topk=1, num_draft_tokens=4),
                              SweepPoint(num_steps=5, topk=1, num_draft_tokens=6)])
    (ckpt / "drafter_config.json").write_text(json.dumps({**dc, "trained_depth": 2}))
    with pytest.raises(ValueError, match="export.num_steps drafts 3"):
        export_to(tiny_llama_dir, ckpt, tmp_path / "export2")


def test_offline_training_equals_online(conversations, sharp_target, tmp_path):  # noqa: F811
    import yaml

    from eaglepipe.stages.hidden_states import main

    cfg = make_chain_cfg(algorithm="peagle", mode="offline", max_steps=3, ttt_steps=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(cfg)))
    main(["--params", str(params), "--target", str(sharp_target), "--tokens", str(conversations / "tokens"),
          "--vocab", str(conversations / "vocab"), "--out", str(tmp_path / "exp" / "hidden")])
    online = tmp_path / "online"
    online.mkdir()
    (online / "manifest.json").write_text('{"mode": "online"}')

    def train(mode: str, hidden: Path, name: str) -> dict:
        p = Paths(sharp_target, conversations / "tokens", conversations / "vocab", hidden, tmp_path / name / "train")
        return Trainer(make_chain_cfg(algorithm="peagle", mode=mode, max_steps=3, ttt_steps=4), p).train()

    off, on = train("offline", tmp_path / "exp" / "hidden", "off"), train("online", online, "on")
    for split in ("train", "val"):
        assert off["final"][split]["loss"] == pytest.approx(on["final"][split]["loss"], rel=1e-4)
    name = off["latest"]
    w_off, w_on = (load_file(str(tmp_path / x / "train" / "checkpoints" / name / "model.safetensors"))
                   for x in ("off", "on"))
    for k in w_on:
        torch.testing.assert_close(w_off[k], w_on[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(conversations, sharp_target, tmp_path,  # noqa: F811
                                                                    parallel):
    """The COD draws follow the samples, not the rank or micro-batch that holds them."""
    single = make_chain_cfg(algorithm="peagle", max_steps=3, micro_batch_size=4, pack=True, ttt_steps=4)
    two = make_chain_cfg(algorithm="peagle", max_steps=3, micro_batch_size=2, pack=True, ttt_steps=4,
                         parallel=parallel, nproc_per_node=2)
    assert_two_processes_equal_one(single, two, conversations, sharp_target, tmp_path)
