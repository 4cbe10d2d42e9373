"""Export of drafter checkpoints for SGLang and vLLM (EAGLE-3, EAGLE-3.1, EAGLE-1) on the tiny random target."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(target_dir: Path, out: Path, algorithm: str, draft_vocab: int = 512, seed: int = 0,
                    include_ids: list[int] | None = None, aux_layers: list[int] | None = None) -> Path:
    """A real drafter checkpoint (random layer weights, the target's embedding) in train/checkpoints/ layout.
    The draft vocabulary holds `include_ids` and random other ids; `aux_layers` default to the target's."""
    from eaglepipe.models.build import new_drafter, save_drafter
    from eaglepipe.models.config import DrafterConfig
    from eaglepipe.target.info import describe_model

    info = describe_model(target_dir)
    cfg = DrafterConfig.from_target(info, algorithm, draft_vocab, aux_layers=aux_layers)
    weights = load_file(str(target_dir / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    lm_head = weights.get("lm_head.weight", embed)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(info["vocab_size"], dtype=torch.bool)
    chosen[torch.tensor(include_ids or [], dtype=torch.long)] = True
    others = torch.randperm(info["vocab_size"], generator=gen)
    others = others[~chosen[others]][:draft_vocab - int(chosen.sum())]
    ids = torch.cat([chosen.nonzero().flatten(), others]).sort().values
    d2t = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(info["vocab_size"], dtype=torch.bool)
    t2d[ids] = True
    model = new_drafter(cfg, embed, lm_head, d2t, t2d, seed=seed)
    save_drafter(model, out)
    save_file({"d2t": d2t, "t2d": t2d}, str(out / "vocab.safetensors"))
    return out


def export_to(target_dir: Path, ckpt: Path, out: Path, dtype: str = "float32", final_out: Path | None = None) -> dict:
    from eaglepipe.export.checkpoint import read_checkpoint
    from eaglepipe.export.writer import ExportRequest, export_checkpoint

    req = ExportRequest(dtype=dtype, verifier_name=str(target_dir), num_steps=3, topk=1, num_draft_tokens=4)
    return export_checkpoint(read_checkpoint(ckpt), target_dir, out, req, final_out=final_out)


def keys_of(path: Path) -> dict[str, tuple[list[int], str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("algorithm", ["eagle3", "eagle3.1"])
def test_eagle3_export_layout(tiny_llama_dir: Path, tmp_path: Path, algorithm: str) -> None:
    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", algorithm)
    summary = export_to(tiny_llama_dir, ckpt, tmp_path / "export", dtype="bfloat16")
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    sg = json.loads((tmp_path / "export/sglang/config.json").read_text())
    assert sg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert sg["num_hidden_layers"] == 1 and sg["tie_word_embeddings"] is False
    assert sg["draft_vocab_size"] == 512 and sg["target_hidden_size"] == 64 and sg["vocab_size"] == 49152
    assert sg["rope_theta"] == 10000.0 and "rope_scaling" in sg and sg["max_position_embeddings"] == 1024
    # the drafter config holds the aux layers it was trained with (a 6-layer target: [2, 3, 3])
    aux = json.loads((ckpt / "drafter_config.json").read_text())["aux_layers"]
    assert sg["eagle_aux_hidden_state_layer_ids"] == aux
    assert sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in aux]
    assert sg["fc_norm"] is (algorithm == "eagle3.1") and sg["norm_output"] is (algorithm == "eagle3.1")
    assert sg["num_aux_hidden_states"] == 3
    assert json.loads((tmp_path / "export/drafter_config.json").read_text()) == \
        json.loads((ckpt / "drafter_config.json").read_text())
    keys = keys_of(tmp_path / "export/sglang/model.safetensors")
    assert "embed_tokens.weight" not in keys
    assert keys["fc.weight"] == ([64, 3 * 64], "BF16")
    assert keys["midlayer.self_attn.q_proj.weight"] == ([64, 128], "BF16")
    assert keys["midlayer.self_attn.k_proj.weight"] == ([32, 128], "BF16")
    assert keys["lm_head.weight"] == ([512, 64], "BF16")
    assert keys["d2t"] == ([512], "I64") and keys["t2d"] == ([49152], "BOOL")
    assert ("fc_norm.0.weight" in keys) is (algorithm == "eagle3.1")
    assert not [k for k in keys if k.startswith("layers.")]

    vl = json.loads((tmp_path / "export/vllm/config.json").read_text())
    assert vl["architectures"] == ["Eagle3Speculator"] and vl["speculators_model_type"] == "eagle3"
    assert vl["norm_before_residual"] is False and vl["eagle_aux_hidden_state_layer_ids"] == aux
    sc = vl["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["proposal_methods"][0] == {
        "proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1, "accept_tolerance": 0.0}
    assert sc["verifier"] == {"name_or_path": str(tiny_llama_dir), "architectures": ["LlamaForCausalLM"]}
    assert vl["transformer_layer_config"]["num_hidden_layers"] == 1
    assert vl["transformer_layer_config"]["num_aux_hidden_states"] == 3
    vkeys = keys_of(tmp_path / "export/vllm/model.safetensors")
    assert "layers.0.self_attn.q_proj.weight" in vkeys and not [k for k in vkeys if k.startswith("midlayer.")]
    assert set(vkeys) == {k.replace("midlayer.", "layers.0.") for k in keys}

    # the exported weights are the checkpoint's, cast
    src = load_file(str(ckpt / "model.safetensors"))
    out = load_file(str(tmp_path / "export/sglang/model.safetensors"))
    assert torch.equal(out["fc.weight"], src["fc.weight"].to(torch.bfloat16))
    assert torch.equal(out["d2t"], src["d2t"])


def test_aux_ids_for_smollm2_depth() -> None:
    """The conventions pinned against DESIGN.md's table: SmolLM2 (30 layers) and Llama-3.1-8B (32 layers)."""
    from eaglepipe.families.eagle3 import sglang_config
    from eaglepipe.target.info import default_aux_layers

    base = {"algorithm": "eagle3", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 8192, "vocab_size": 49152, "draft_vocab_size": 8192,
            "target_hidden_size": 576}
    for n, h_ids, nested in ((30, [2, 15, 27], [1, 14, 26]), (32, [2, 16, 29], [1, 15, 28])):
        cfg = sglang_config({**base, "aux_layers": default_aux_layers(n)}, "bfloat16")
        assert cfg["eagle_aux_hidden_state_layer_ids"] == h_ids
        assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == nested


def test_eagle1_export_with_token_map(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "eagle1")
    # an EAGLE-1 drafter drafts over the full vocab; a reduced vocab map from the vocab stage becomes a token map
    dc = json.loads((ckpt / "drafter_config.json").read_text())
    dc["draft_vocab_size"] = 512
    (ckpt / "drafter_config.json").write_text(json.dumps(dc))
    summary = export_to(tiny_llama_dir, ckpt, tmp_path / "export")
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    assert summary["formats"] == ["sglang"] and not (tmp_path / "export/vllm").exists()
    cfg = json.loads((tmp_path / "export/sglang/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"]
    keys = keys_of(tmp_path / "export/sglang/model.safetensors")
    assert keys["fc.weight"][0] == [64, 128] and keys["fc.bias"][0] == [64]
    assert "layers.0.self_attn.q_proj.weight" in keys and "layers.0.input_layernorm.weight" not in keys
    assert "norm.weight" not in keys and "lm_head.weight" not in keys and "embed_tokens.weight" not in keys
    token_map = torch.load(tmp_path / "export/sglang/speculative_token_map.pt", weights_only=True)
    d2t = load_file(str(ckpt / "vocab.safetensors"))["d2t"]
    assert token_map == (torch.arange(512) + d2t).tolist()
    commands = (tmp_path / "export/commands.txt").read_text()
    assert "--speculative-algorithm EAGLE " in commands and "--speculative-token-map" in commands


def test_export_refuses_unknown_checkpoint_tensor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from eaglepipe.utils.cli import StageError

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "eagle3")
    state = load_file(str(ckpt / "model.safetensors"))
    state["midlayer.extra_norm.weight"] = torch.ones(64)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(StageError, match="extra_norm"):
        export_to(tiny_llama_dir, ckpt, tmp_path / "export")


def test_export_stage_cli(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The stage as DVC/Snakemake run it: train/BEST (not the later LATEST) -> export/ with validation.json and
    commands.txt."""
    train = tmp_path / "train"
    make_checkpoint(tiny_llama_dir, train / "checkpoints" / "epoch_0_step_5", "eagle3")
    make_checkpoint(tiny_llama_dir, train / "checkpoints" / "epoch_0_step_10", "eagle3")
    (train / "BEST").write_text("epoch_0_step_5\n")
    (train / "LATEST").write_text("epoch_0_step_10\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "eaglepipe.stages.export", "--params", str(tmp_path / "params.yaml"),
                           "--target", str(tiny_llama_dir), "--train", str(train), "--out", str(out)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "epoch_0_step_5" in proc.stderr and "epoch_0_step_10" not in proc.stderr
    assert "python -m sglang.launch_server --model-path" in proc.stdout and "vllm serve" in proc.stdout
    validation = json.loads((out / "validation.json").read_text())
    assert validation["ok"] is True and validation["checked"]["sglang"] == f"{out.resolve()}/sglang"
    commands = (out / "commands.txt").read_text()
    assert f"--speculative-draft-model-path {out.resolve()}/sglang" in commands
    assert "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4" in commands
    assert '"num_speculative_tokens": 3' in commands
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_export_stage_missing_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    proc = subprocess.run([sys.executable, "-m", "eaglepipe.stages.export", "--params", str(REPO / "params.yaml"),
                           "--target", str(tiny_llama_dir), "--train", str(tmp_path / "train"),
                           "--out", str(tmp_path / "export")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin"})
    assert proc.returncode == 2 and "BEST does not exist" in proc.stderr
    assert not (tmp_path / "export").exists()


def test_four_aux_layers_export_and_validate_their_count(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """vLLM sizes fc from num_aux_hidden_states (in the layer config it builds from), else from nested ids, else
    for 3: a 4-layer drafter must say so."""
    from eaglepipe.export.validate import validate_export

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "eagle3", aux_layers=[1, 2, 3, 4])
    export = tmp_path / "export"
    assert export_to(tiny_llama_dir, ckpt, export)["validation"]["ok"]
    sg = json.loads((export / "sglang/config.json").read_text())
    vl = json.loads((export / "vllm/config.json").read_text())
    assert sg["num_aux_hidden_states"] == 4 and sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2, 3]
    assert vl["transformer_layer_config"]["num_aux_hidden_states"] == 4
    assert keys_of(export / "vllm/model.safetensors")["fc.weight"][0] == [64, 4 * 64]

    del vl["transformer_layer_config"]["num_aux_hidden_states"]
    (export / "vllm/config.json").write_text(json.dumps(vl))
    strict = validate_export(export, tiny_llama_dir)
    assert [p for p in strict.problems if p.startswith("vllm: num_aux_hidden_states must be written (4)")]
    external = validate_export(export / "vllm", tiny_llama_dir, strict=False)
    assert [p for p in external.problems if p.startswith("vllm: fc is sized for 3 aux hidden states")]
    vl["transformer_layer_config"]["num_aux_hidden_states"] = 3
    (export / "vllm/config.json").write_text(json.dumps(vl))
    assert [p for p in validate_export(export, tiny_llama_dir).problems if "fc is sized for 3" in p]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_export_files_follow_the_umask(tiny_llama_dir: Path, tmp_path: Path, umask: int) -> None:
    """As the export stage writes: into a temp dir published by atomic_dir. Servers running as other users must be
    able to read what a 022 umask allows (safetensors and mkstemp/mkdtemp create private files and dirs)."""
    from eaglepipe.utils.atomic import atomic_dir

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "eagle3")
    out = tmp_path / "export"
    before = os.umask(umask)
    try:
        with atomic_dir(out) as tmp:
            export_to(tiny_llama_dir, ckpt, tmp, final_out=out)
    finally:
        os.umask(before)
    dirs = [out, out / "sglang", out / "vllm"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p: oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {p: oct(0o777 & ~umask) for p in dirs}
    assert {p: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p: oct(0o666 & ~umask) for p in files}
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "validation.json", "commands.txt"}


def test_validation_json_records_the_final_export_path(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from eaglepipe.utils.atomic import atomic_dir

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "ckpt", "eagle3")
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        summary = export_to(tiny_llama_dir, ckpt, tmp, final_out=out)
    recorded = json.loads((out / "validation.json").read_text())
    assert recorded == summary["validation"] and recorded["ok"] is True
    assert recorded["checked"] == {"sglang": str(out / "sglang"), "vllm": str(out / "vllm")}
    assert recorded["reference"] == str(out / "drafter_config.json")
