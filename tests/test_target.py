"""fetch_target: local references, aux-layer overrides and checks, dtype casting, target.json contents."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from eaglepipe.config import Config, TargetCfg, to_dict
from eaglepipe.stages import fetch_target as fetch_stage
from eaglepipe.target.fetch import cast_safetensors, check_hf_dir, fetch_target, resolve_aux_layers
from eaglepipe.target.info import read_target_info, resolve_model_dir

CONTRACT_FIELDS = {"model_path", "source", "name_or_path", "revision", "architecture", "num_layers", "hidden_size",
                   "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                   "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
                   "eos_token_ids", "chat_template_sha256", "aux_layers", "dtype"}


def write_params(path: Path, **target) -> Path:
    params = to_dict(Config())
    params["target"].update(target)
    path.write_text(yaml.safe_dump(params))
    return path


def test_local_target_is_referenced(tiny_llama_dir, tmp_path):
    params = write_params(tmp_path / "params.yaml", source="local", name_or_path=str(tiny_llama_dir))
    out = tmp_path / "target"
    fetch_stage.main(["--params", str(params), "--out", str(out)])
    info = read_target_info(out)
    assert CONTRACT_FIELDS <= set(info)
    assert info["model_path"] == str(tiny_llama_dir.resolve()) and not (out / "model").exists()
    assert resolve_model_dir(out) == tiny_llama_dir.resolve()
    assert (info["num_layers"], info["hidden_size"], info["num_attention_heads"], info["num_key_value_heads"]) == \
        (6, 64, 4, 2)
    assert info["aux_layers"] == [2, 3, 3] and info["source"] == "local"
    assert info["chat_template_sha256"] and len(info["chat_template_sha256"]) == 64
    assert info["vocab_size"] == json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]


def test_aux_layer_override_and_range(tiny_llama_dir, tmp_path, capsys):
    cfg = TargetCfg(source="local", name_or_path=str(tiny_llama_dir), aux_layers=[1, 4, 6])
    assert fetch_target(cfg, tmp_path)["aux_layers"] == [1, 4, 6]
    assert resolve_aux_layers(None, 30) == [2, 15, 27]
    with pytest.raises(ValueError, match="outside the model's hidden_states indices 0..6"):
        resolve_aux_layers([2, 7], 6)
    params = write_params(tmp_path / "params.yaml", source="local", name_or_path=str(tiny_llama_dir),
                          aux_layers=[2, 9])
    with pytest.raises(SystemExit) as exc:
        fetch_stage.main(["--params", str(params), "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "[2, 9]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_local_dir_without_tokenizer_is_rejected(tiny_llama_dir, tmp_path):
    model = tmp_path / "no_tok"
    shutil.copytree(tiny_llama_dir, model, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        check_hf_dir(model)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_hf_dir(tmp_path)


def test_cast_safetensors_to_bfloat16(tiny_llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    assert cast_safetensors(model, "bfloat16") == 1
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    assert cast_safetensors(model, "bfloat16") == 0  # already there
