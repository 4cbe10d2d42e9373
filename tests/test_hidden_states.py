"""The hidden_states stage: online manifest, offline cache (disk estimate, resume, top-k) and offline
training equal to online training on the same data."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from eaglepipe.config import to_dict
from eaglepipe.stages.hidden_states import main
from eaglepipe.train.loop import Paths, Trainer

from test_train import conversations, make_cfg, sharp_target  # noqa: F401  (module fixtures)


def build_hidden(cfg, conv, target, out, tmp_path):
    params = tmp_path / f"params-{out.name}.yaml"
    params.write_text(yaml.safe_dump(to_dict(cfg)))
    main(["--params", str(params), "--target", str(target), "--tokens", str(conv / "tokens"),
          "--vocab", str(conv / "vocab"), "--out", str(out)])


def test_online_mode_writes_only_the_manifest(conversations, sharp_target, tmp_path):
    out = tmp_path / "exp" / "hidden"
    build_hidden(make_cfg(), conversations, sharp_target, out, tmp_path)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"mode": "online"}


def test_offline_training_equals_online_and_the_cache_resumes(conversations, sharp_target, tmp_path, capsys):
    cfg = make_cfg(mode="offline", max_steps=3)
    out = tmp_path / "exp" / "hidden"
    build_hidden(cfg, conversations, sharp_target, out, tmp_path)
    assert "disk estimate" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "offline" and manifest["splits"] == {"train": 8, "val": 2}
    shards = sorted(out.glob("*.safetensors"))
    assert [p.name for p in shards] == ["train-00000.safetensors", "val-00000.safetensors"]
    with safe_open(str(shards[0]), framework="pt") as f:
        keys = set(f.keys())
    assert {"feat.0", "argmax.0", "logits.0"} <= keys
    # resume: a lost shard is rebuilt identically, the others are kept
    work = next((tmp_path / "exp" / ".work" / "hidden_states").iterdir())
    before = load_file(str(work / "train-00000.safetensors"))
    kept = (work / "val-00000.safetensors").stat().st_mtime_ns
    (work / "train-00000.safetensors").unlink()
    build_hidden(cfg, conversations, sharp_target, out, tmp_path)
    after = load_file(str(out / "train-00000.safetensors"))
    assert (work / "val-00000.safetensors").stat().st_mtime_ns == kept
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)

    def train(mode, hidden, name):
        p = Paths(sharp_target, conversations / "tokens", conversations / "vocab", hidden, tmp_path / name / "train")
        return Trainer(make_cfg(mode=mode, max_steps=3), p).train()

    online_hidden = tmp_path / "online"
    online_hidden.mkdir()
    (online_hidden / "manifest.json").write_text('{"mode": "online"}')
    off, on = train("offline", out, "off"), train("online", online_hidden, "on")
    for split in ("train", "val"):
        for key in ("loss", "acc_0", "sim_tau"):
            assert off["final"][split][key] == pytest.approx(on["final"][split][key], rel=1e-4, abs=1e-5)
    name = off["latest"]
    w_off = load_file(str(tmp_path / "off" / "train" / "checkpoints" / name / "model.safetensors"))
    w_on = load_file(str(tmp_path / "on" / "train" / "checkpoints" / name / "model.safetensors"))
    for k in w_on:
        torch.testing.assert_close(w_off[k], w_on[k], rtol=1e-4, atol=1e-5)


def test_offline_topk_cache_trains(conversations, sharp_target, tmp_path):
    cfg = make_cfg(mode="offline", offline_topk=8, max_steps=2)
    out = tmp_path / "exp" / "hidden"
    build_hidden(cfg, conversations, sharp_target, out, tmp_path)
    with safe_open(str(out / "train-00000.safetensors"), framework="pt") as f:
        assert f.get_tensor("topv.0").shape[-1] == 8 and "logits.0" not in set(f.keys())
    p = Paths(sharp_target, conversations / "tokens", conversations / "vocab", out, tmp_path / "t" / "train")
    summary = Trainer(cfg, p).train()
    assert summary["final"]["train"]["loss"] > 0
    with pytest.raises(ValueError, match="cached for eagle3"):
        Trainer(make_cfg(mode="offline", algorithm="eagle1"), p)
