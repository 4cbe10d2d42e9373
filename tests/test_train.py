"""Training runs on the tiny target: overfitting, resume equivalence, bad configs, DDP, the stage CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from eaglepipe.config import ConfigError, params_from_dict, to_dict
from eaglepipe.config.schema import Config
from eaglepipe.data.tokens_io import write_token_shards
from eaglepipe.data.vocab import build_vocab_maps, save_vocab
from eaglepipe.train.loop import Paths, Trainer

TOPICS = ["the sea", "a red car", "bread", "winter", "music", "a small dog", "the moon", "chess", "rivers",
          "coffee"]


@pytest.fixture(scope="module")
def sharp_target(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with its lm_head scaled by 40: the same greedy outputs, peaked distributions (a random
    tiny model is otherwise near-uniform, which makes argmax agreement a slow thing to learn)."""
    from eaglepipe.target.info import load_hf_model, load_tokenizer

    model = load_hf_model(tiny_llama_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    out = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(out)
    load_tokenizer(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def conversations(sharp_target, tmp_path_factory):
    """Tokens, vocab and online manifest for ten conversations answered greedily by the tiny target."""
    from eaglepipe.target.info import load_hf_model, load_tokenizer

    tok, model = load_tokenizer(sharp_target), load_hf_model(sharp_target)
    samples = []
    for i, topic in enumerate(TOPICS):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Tell me about {topic}."}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)[0]
        mask = np.zeros(len(out), np.int8)
        mask[len(prompt):] = 1
        samples.append({"id": f"c{i}", "input_ids": out.numpy().astype(np.int32), "loss_mask": mask})
    root = tmp_path_factory.mktemp("conv")
    write_token_shards(root / "tokens", "train", samples[:8])
    write_token_shards(root / "tokens", "val", samples[8:])
    freq = torch.zeros(model.config.vocab_size, dtype=torch.long)
    for s in samples:
        freq.index_add_(0, torch.from_numpy(s["input_ids"].astype(np.int64)),
                        torch.from_numpy(s["loss_mask"].astype(np.int64)))
    d2t, t2d = build_vocab_maps(freq, 256)
    save_vocab(root / "vocab", d2t, t2d, freq)
    (root / "hidden").mkdir()
    (root / "hidden" / "manifest.json").write_text('{"mode": "online"}')
    return root


def cfg_dict(**train) -> dict:
    """The default config on CPU with a short sequence length and `train` overrides, as a dict."""
    d = to_dict(Config())
    d["device"] = "cpu"
    d["data"]["seq_length"] = 128
    d["train"].update(dict(max_steps=4, micro_batch_size=2, ttt_steps=2, log_every=1, eval_every=2,
                           save_every=2, lr=1e-3, warmup_ratio=0.0))
    d["train"].update(train)
    return d


def make_cfg(**train):
    """The default config on CPU with a short sequence length and `train` overrides."""
    return params_from_dict(cfg_dict(**train))


def make_chain_cfg(**train):
    """`make_cfg` for a family that drafts one chain a round (no trees): the bench sweep keeps its chains."""
    d = cfg_dict(**train)
    d["bench"]["sweep"] = [p for p in d["bench"]["sweep"] if p["topk"] == 1]
    return params_from_dict(d)


def paths(conv: Path, target: Path, out: Path) -> Paths:
    return Paths(target, conv / "tokens", conv / "vocab", conv / "hidden", out)


# -log(alpha) alone learns slowly from a start far from the target (its gradient mostly goes where raising
# min(p, q) is cheapest, not to the target's token): the reason lk_lambda leads with KL there
@pytest.mark.parametrize("loss,min_acc", [("soft_ce", 0.97), ("lk_lambda", 0.97), ("lk_alpha", 0.6)])
def test_tiny_drafter_overfits_to_near_perfect_step0_accuracy(conversations, sharp_target, tmp_path, loss, min_acc):
    cfg = make_cfg(max_steps=300, micro_batch_size=4, lr=5e-3, eval_every=1000, save_every=1000, log_every=25,
                   pack=False, min_lr_ratio=0.01, max_grad_norm=10.0, ttt_steps=1, loss=loss)
    trainer = Trainer(cfg, paths(conversations, sharp_target, tmp_path / "train"))
    summary = trainer.train()
    first = next(r for r in trainer.history.rows if r["split"] == "train")
    final = summary["final"]["train"]
    assert all(r["step_seconds"] > 0 for r in trainer.history.rows if r["split"] == "train")  # each window timed
    assert final["acc_0"] >= min_acc
    assert final["alpha_0"] >= min_acc - 0.05 and final["alpha_0"] > 2 * first["alpha_0"]


@pytest.mark.parametrize("algorithm", ["eagle3", "eagle3.1", "eagle1"])
def test_resume_after_a_kill_gives_bit_identical_weights(conversations, sharp_target, tmp_path, algorithm):
    straight = Trainer(make_cfg(algorithm=algorithm, max_steps=5),
                       paths(conversations, sharp_target, tmp_path / "a" / "train"))
    straight.train()
    first = Trainer(make_cfg(algorithm=algorithm, max_steps=5), paths(conversations, sharp_target,
                                                                      tmp_path / "b" / "train"))
    first.train(stop_after=3)
    assert not (tmp_path / "b" / "train" / "LATEST").exists()  # nothing published before the end
    resumed = Trainer(make_cfg(algorithm=algorithm, max_steps=5), paths(conversations, sharp_target,
                                                                        tmp_path / "b" / "train"))
    assert resumed.step == 3
    resumed.train()
    a, b = (p / "train" for p in (tmp_path / "a", tmp_path / "b"))
    assert (a / "LATEST").read_text() == (b / "LATEST").read_text()
    name = (a / "LATEST").read_text().strip()
    wa, wb = load_file(str(a / "checkpoints" / name / "model.safetensors")), \
        load_file(str(b / "checkpoints" / name / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "BEST").exists() and (a / "summary.json").exists()
    metrics = json.loads((a / "dvclive" / "metrics.json").read_text())
    assert "acc_0" in metrics["train"] and "sim_tau" in metrics["val"]
    assert (a / "dvclive" / "plots" / "training_curves.png").stat().st_size > 0
    files = {p.name for p in (a / "checkpoints" / name).iterdir()}
    assert files == {"model.safetensors", "drafter_config.json", "vocab.safetensors", "optimizer.pt",
                     "scheduler.pt", "state.json", "rng.pt", "log_windows.pt"}
    ra, rb = (torch.load(p / "checkpoints" / name / "rng.pt", weights_only=False) for p in (a, b))
    assert torch.equal(ra["torch"], rb["torch"])  # nothing drew from the RNG after the resume


@pytest.mark.parametrize("family", [dict(algorithm="eagle3"), dict(algorithm="peagle", ttt_steps=4),
                                    dict(algorithm="dflash", draft_layers=2, block_size=4)],
                         ids=["ttt", "cod", "block"])
def test_metrics_every_n_steps_change_no_weight(conversations, sharp_target, tmp_path, family):
    """Training metrics sampled every third step (and at each history row's last) leave the training itself as it
    was: the same weights bit for bit, the same history rows, each with its metrics."""
    runs = {}
    for every in (1, 3):
        trainer = Trainer(make_chain_cfg(max_steps=7, log_every=4, eval_every=100, save_every=100,
                                         metrics_every=every, **family),
                          paths(conversations, sharp_target, tmp_path / str(every) / "train"))
        trainer.train()
        runs[every] = trainer
    rows = {e: [r for r in t.history.rows if r["split"] == "train"] for e, t in runs.items()}
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[3]] == [4, 7]
    assert all(0 < r["loss_0"] and 0 <= r["acc_0"] <= 1 and r["replay_tau"] >= 1 for r in rows[3])
    # the first window's metrics from its steps 3 and 4 alone, the second's from 6 and 7, against every step
    assert all(a["loss_0"] != b["loss_0"] for a, b in zip(rows[1], rows[3]))
    for name, weight in runs[1].drafter.state_dict().items():
        assert torch.equal(weight, runs[3].drafter.state_dict()[name]), name


def test_bad_configs_are_rejected_before_work(conversations, sharp_target, tmp_path):
    with pytest.raises(ConfigError, match="ttt_steps"):
        make_cfg(ttt_steps=0)
    with pytest.raises(ConfigError, match=re.escape("train.loss must be soft_ce|lk_alpha|lk_lambda, got 'lk'")):
        make_cfg(loss="lk")
    cfg = make_cfg()
    cfg.data.seq_length = 4096
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Trainer(cfg, paths(conversations, sharp_target, tmp_path / "x" / "train"))
    vocab = tmp_path / "bigvocab"
    vocab.mkdir()
    v = 49152 + 64
    t2d = torch.ones(v, dtype=torch.bool)
    save_file({"d2t": torch.zeros(v, dtype=torch.long), "t2d": t2d, "token_freq": torch.zeros(v, dtype=torch.long)},
              str(vocab / "vocab.safetensors"))
    p = paths(conversations, sharp_target, tmp_path / "y" / "train")
    p.vocab = vocab
    with pytest.raises(ConfigError, match="draft vocab .* bigger"):
        Trainer(make_cfg(), p)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*.safetensors"))


def test_on_step_sees_every_optimizer_step_before_its_checkpoint(conversations, sharp_target, tmp_path):
    """Trainer.train's on_step hook runs after each optimizer step and before that step's checkpoint is written, so
    a benchmark's windows of steps end before the save."""
    trainer = Trainer(make_cfg(max_steps=4, save_every=2, eval_every=100), paths(conversations, sharp_target,
                                                                                tmp_path / "out"))
    seen = []

    def on_step(step: int) -> None:
        saved = sorted(p.name for p in (trainer.work / "checkpoints").glob("*")) if \
            (trainer.work / "checkpoints").is_dir() else []
        seen.append((step, saved))

    trainer.train(on_step=on_step)
    assert [step for step, _ in seen] == [1, 2, 3, 4]
    assert not any(name.endswith("step_2") for name in seen[1][1])
    assert any(name.endswith("step_2") for name in seen[2][1])


def test_train_seed_alone_sets_the_drafters_start(conversations, sharp_target, tmp_path):
    """The initial weights follow `train.seed`, else `seed`: naming the experiment's seed as the training seed
    changes nothing, another training seed starts elsewhere, and with `train.seed` set `seed` no longer matters."""
    def start(name: str, seed: int, train_seed) -> torch.Tensor:
        d = cfg_dict(seed=train_seed)
        d["seed"] = seed
        t = Trainer(params_from_dict(d), paths(conversations, sharp_target, tmp_path / name / "train"))
        return t.drafter.fc.weight.detach().clone()

    default = start("default", 0, None)
    torch.testing.assert_close(start("named", 0, 0), default)
    torch.testing.assert_close(start("overridden", 5, 0), default)
    assert not torch.equal(start("other", 0, 1), default)


def test_init_from_our_checkpoint_continues_from_its_weights(conversations, sharp_target, tmp_path):
    Trainer(make_cfg(max_steps=2), paths(conversations, sharp_target, tmp_path / "a" / "train")).train()
    ckpt = tmp_path / "a" / "train" / "checkpoints" / (tmp_path / "a" / "train" / "LATEST").read_text().strip()
    t = Trainer(make_cfg(max_steps=2, init_from=str(ckpt)), paths(conversations, sharp_target,
                                                                 tmp_path / "b" / "train"))
    torch.testing.assert_close(t.drafter.fc.weight.detach(), load_file(str(ckpt / "model.safetensors"))["fc.weight"])


def test_init_from_another_draft_vocab_moves_lm_head_rows_to_this_vocab(conversations, sharp_target, tmp_path):
    """A drafter trained with one draft vocab starts a run whose vocab stage chose another (here: a smaller one
    with extra tokens): the run keeps its own d2t, shared tokens keep the old drafter's lm_head rows, new ones
    start from the target's lm_head, and every other weight is the old drafter's."""
    import shutil

    from eaglepipe.data.vocab import load_vocab
    from eaglepipe.target.info import load_hf_model

    Trainer(make_cfg(max_steps=2), paths(conversations, sharp_target, tmp_path / "a" / "train")).train()
    ckpt = tmp_path / "a" / "train" / "checkpoints" / (tmp_path / "a" / "train" / "LATEST").read_text().strip()
    old = load_file(str(ckpt / "model.safetensors"))
    conv = tmp_path / "conv2"
    shutil.copytree(conversations, conv)
    old_d2t, _ = load_vocab(conversations / "vocab")
    freq = torch.zeros(len(old["t2d"]), dtype=torch.long)
    old_ids = torch.arange(len(old_d2t)) + old_d2t
    freq[old_ids[:100]] = 10  # 100 of the old tokens ...
    freq[torch.nonzero(~old["t2d"]).flatten()[:28]] = 5  # ... and 28 it did not have
    d2t, t2d = build_vocab_maps(freq, 128)
    save_vocab(conv / "vocab", d2t, t2d, freq)
    t = Trainer(make_cfg(max_steps=2, init_from=str(ckpt)), paths(conv, sharp_target, tmp_path / "b" / "train"))
    assert torch.equal(t.drafter.d2t.cpu(), d2t) and torch.equal(t.drafter.t2d.cpu(), t2d)
    head = t.drafter.lm_head.weight.detach().cpu()
    new_ids = torch.arange(128) + d2t
    row_of = {int(tid): r for r, tid in enumerate(old_ids)}
    target_head = load_hf_model(sharp_target).get_output_embeddings().weight.detach()
    carried = 0
    for r, tid in enumerate(new_ids.tolist()):
        if tid in row_of:
            torch.testing.assert_close(head[r], old["lm_head.weight"][row_of[tid]].float())
            carried += 1
        else:
            torch.testing.assert_close(head[r], target_head[tid].float())
    assert carried == 100
    torch.testing.assert_close(t.drafter.fc.weight.detach().cpu(), old["fc.weight"].float())


DDP_RUNNER = """
import sys, json, torch
from pathlib import Path
from eaglepipe.config import params_from_dict
from eaglepipe.train.loop import Paths, Trainer
cfg = params_from_dict(json.loads(Path({cfg!r}).read_text()))
conv, target, out = (Path(p) for p in sys.argv[1:4])
Trainer(cfg, Paths(target, conv / "tokens", conv / "vocab", conv / "hidden", out)).train()
"""


def assert_two_processes_equal_one(single, two, conversations: Path, sharp_target: Path, tmp_path: Path) -> None:
    """Train `single` in this process and `two` on 2 gloo processes (torchrun); both publish the same checkpoint
    with the same weights."""
    Trainer(single, paths(conversations, sharp_target, tmp_path / "one" / "train")).train()
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(two)))
    runner = tmp_path / "runner.py"
    runner.write_text(DDP_RUNNER.format(cfg=str(tmp_path / "cfg.json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(runner), str(conversations), str(sharp_target), str(tmp_path / "two" / "train")],
                   check=True, env=env, timeout=600)
    name = (tmp_path / "one" / "train" / "LATEST").read_text().strip()
    assert (tmp_path / "two" / "train" / "LATEST").read_text().strip() == name
    w1 = load_file(str(tmp_path / "one" / "train" / "checkpoints" / name / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "train" / "checkpoints" / name / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(conversations, sharp_target, tmp_path,
                                                                    parallel):
    """DDP (target replicated) and FSDP2 (target sharded) on 2 gloo processes reach the 1-process weights."""
    assert_two_processes_equal_one(make_cfg(max_steps=3, micro_batch_size=4, pack=True),
                                   make_cfg(max_steps=3, micro_batch_size=2, pack=True, parallel=parallel,
                                            nproc_per_node=2), conversations, sharp_target, tmp_path)


def test_train_stage_cli_publishes_declared_outputs(conversations, sharp_target, tmp_path):
    from eaglepipe.stages.train import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(make_cfg(max_steps=2))))
    out = tmp_path / "results" / "exp" / "train"
    main(["--params", str(params), "--target", str(sharp_target), "--tokens", str(conversations / "tokens"),
          "--vocab", str(conversations / "vocab"), "--hidden", str(conversations / "hidden"), "--out", str(out)])
    for rel in ("LATEST", "BEST", "summary.json", "dvclive/metrics.json", "dvclive/plots"):
        assert (out / rel).exists(), rel
    assert (tmp_path / "results" / "exp" / ".work" / "train").is_dir()
    bad = tmp_path / "hidden_offline"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"mode": "offline"}')
    with pytest.raises(SystemExit) as e:
        main(["--params", str(params), "--target", str(sharp_target), "--tokens", str(conversations / "tokens"),
              "--vocab", str(conversations / "vocab"), "--hidden", str(bad), "--out", str(out)])
    assert e.value.code == 2


@pytest.mark.parametrize("algorithm", ["eagle3", "eagle1", "peagle", "dflash"])
def test_a_training_step_never_reads_a_device_value_on_the_host(conversations, sharp_target, tmp_path, algorithm):
    """The target's features, the family's unroll, its metrics and the backward dispatch none of the ops that
    read a device value on the host, so on a GPU the host queues step after step without waiting for it (the
    batch's index tensors are built on the CPU beforehand)."""
    from host_reads import HostReads

    cfg = make_chain_cfg(algorithm=algorithm, ttt_steps=4) if algorithm in ("peagle", "dflash") else \
        make_cfg(algorithm=algorithm)
    trainer = Trainer(cfg, paths(conversations, sharp_target, tmp_path / "out"))
    rows = trainer.data.step_batches(0)[0]
    batch = trainer.kind.collate([[trainer.train_samples[i] for i in row] for row in rows], trainer.objective,
                                 cfg.data.seq_length, 1)
    attention = trainer.kind.attention(batch, trainer.objective, trainer.drafter.config.num_attention_heads, False)
    with HostReads() as spy:
        feats, labels = trainer.features(batch)
        loss, _ = trainer.module(batch, feats, labels, attention, [float(c) for c in batch.supervised_counts()])
        loss.backward()
    assert spy.seen == []
