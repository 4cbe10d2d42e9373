"""The validator catches each planted export fault, one at a time, and passes a clean export."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_export import export_to, make_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    ckpt = make_checkpoint(tiny_llama_dir, root / "ckpt", "eagle3", draft_vocab=256)
    export_to(tiny_llama_dir, ckpt, root / "export", dtype="bfloat16")
    return root / "export"


def _edit_weights(d: Path, fn: Callable[[dict], None]) -> None:
    state = load_file(str(d / "model.safetensors"))
    fn(state)
    save_file(state, str(d / "model.safetensors"))


def _edit_config(d: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _rename(state: dict) -> None:
    state["midlayer.hidden_layernorm.weight"] = state.pop("midlayer.hidden_norm.weight")


def _reshape(state: dict) -> None:
    state["fc.weight"] = state["fc.weight"][:, :128].contiguous()


def _d2t_out_of_range(state: dict) -> None:
    state["d2t"][-1] += 100000


def _d2t_not_increasing(state: dict) -> None:
    d2t = state["d2t"]
    d2t[0], d2t[1] = d2t[1] + 1, d2t[0] - 1  # swaps the target ids of draft ids 0 and 1


def _off_by_one(cfg: dict) -> None:
    cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = list(cfg["eagle_aux_hidden_state_layer_ids"])


def _shifted_aux(cfg: dict) -> None:
    nested = cfg["eagle_config"]
    nested["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in nested["eagle_aux_hidden_state_layer_ids"]]
    cfg["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]


FAULTS = {
    "renamed key": ("sglang", _rename, None, ["unexpected tensor midlayer.hidden_layernorm.weight",
                                             "missing tensor midlayer.hidden_norm.weight"]),
    "wrong shape": ("sglang", _reshape, None, ["tensor fc.weight has shape [64, 128], expected [64, 192]"]),
    "missing draft_vocab_size": ("sglang", None, lambda c: c.pop("draft_vocab_size"),
                                 ["draft_vocab_size must be present"]),
    "off-by-one aux ids": ("sglang", None, _off_by_one, ["aux ids disagree"]),
    "aux ids shifted in both conventions": ("sglang", None, _shifted_aux,
                                            ["aux_layers is [3, 4, 4] as SGLang reads this config, but the drafter "
                                             "was trained with [2, 3, 3]"]),
    "d2t out of range": ("sglang", _d2t_out_of_range, None, ["d2t out of range at 1 draft ids"]),
    "d2t not increasing": ("sglang", _d2t_not_increasing, None, ["strictly increasing target ids"]),
    "vllm norm_before_residual missing": ("vllm", None, lambda c: c.pop("norm_before_residual"),
                                          ["norm_before_residual must be false explicitly"]),
    "vllm midlayer names": ("vllm", lambda s: s.__setitem__("midlayer.norm_x.weight", torch.ones(64)), None,
                            ["unexpected tensor midlayer.norm_x.weight"]),
    "rope_theta missing": ("sglang", None, lambda c: c.pop("rope_theta"), ["rope_theta must be written explicitly"]),
    "shipped embedding": ("sglang",
                          lambda s: s.__setitem__("embed_tokens.weight", torch.zeros(49152, 64, dtype=torch.bfloat16)),
                          None, ["unexpected tensor embed_tokens.weight"]),
    "wrong dtype": ("sglang", lambda s: s.__setitem__("norm.weight", s["norm.weight"].float()), None,
                    ["tensor norm.weight is F32, expected BF16"]),
}


def test_clean_export_passes(clean_export: Path, tiny_llama_dir: Path) -> None:
    from eaglepipe.export.validate import validate_export

    report = validate_export(clean_export, tiny_llama_dir, expect_dtype="bfloat16")
    assert report.ok, report.problems
    assert set(report.checked) == {"sglang", "vllm"} and not report.warnings
    assert report.reference == str(clean_export / "drafter_config.json")


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_fault_is_caught(clean_export: Path, tiny_llama_dir: Path, tmp_path: Path, fault: str) -> None:
    from eaglepipe.export.validate import validate_export

    fmt, edit_weights, edit_config, expected = FAULTS[fault]
    export = tmp_path / "export"
    shutil.copytree(clean_export, export)
    if edit_weights:
        _edit_weights(export / fmt, edit_weights)
    if edit_config:
        _edit_config(export / fmt, edit_config)
    report = validate_export(export, tiny_llama_dir, expect_dtype="bfloat16")
    assert not report.ok
    for text in expected:
        assert any(text in p for p in report.problems), (text, report.problems)
    assert all(p.startswith(f"{fmt}: ") for p in report.problems), report.problems


def test_aux_ids_beyond_target_depth(clean_export: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from eaglepipe.export.validate import validate_export

    export = tmp_path / "sglang"
    shutil.copytree(clean_export / "sglang", export)

    def deep(cfg: dict) -> None:
        cfg["eagle_aux_hidden_state_layer_ids"] = [2, 3, 6]
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 2, 5]
    _edit_config(export, deep)
    report = validate_export(export, tiny_llama_dir)
    assert any("outside 1..5 for a 6-layer target" in p for p in report.problems), report.problems


def test_cli_lists_all_problems_and_exits_nonzero(clean_export: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(clean_export, export)
    _edit_weights(export / "sglang", _rename)
    _edit_config(export / "sglang", lambda c: c.pop("draft_vocab_size"))
    cmd = [sys.executable, "-m", "eaglepipe.export.validate", str(export), "--target", str(tiny_llama_dir)]
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "draft_vocab_size must be present" in proc.stdout
    assert "missing tensor midlayer.hidden_norm.weight" in proc.stdout and "checked vllm" in proc.stdout
    shifted = tmp_path / "shifted"
    shutil.copytree(clean_export, shifted)
    _edit_config(shifted / "sglang", _shifted_aux)
    proc = subprocess.run([sys.executable, "-m", "eaglepipe.export.validate", str(shifted),
                           "--target", str(tiny_llama_dir)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "as SGLang reads this config, but the drafter was trained with" in proc.stdout
    ok = subprocess.run([sys.executable, "-m", "eaglepipe.export.validate", str(clean_export), "--target",
                         str(tiny_llama_dir), "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True


# ---------------------------------------------------------------------------- against the training checkpoint
def _shift_top_aux(cfg: dict) -> None:
    cfg["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda cfg: cfg.__setitem__(key, value)


def _times_ten(key: str) -> Callable[[dict], None]:
    return lambda cfg: cfg.__setitem__(key, cfg[key] * 10)


def _in_layer(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda cfg: edit(cfg["transformer_layer_config"])


# mismatches every engine loads without complaint, yet the drafter then serves something it was not trained as;
# found with no flag other than --target (the export holds the checkpoint's drafter_config.json)
MISMATCHES = {
    "norm_before_residual flipped in sglang": ("sglang", _set("norm_before_residual", True),
                                               "norm_before_residual must be false, got True"),
    "norm_before_residual missing in sglang": ("sglang", lambda c: c.pop("norm_before_residual"),
                                               "norm_before_residual must be false explicitly"),
    "aux ids shifted in both conventions": ("sglang", _shifted_aux,
                                            "aux_layers is [3, 4, 4] as SGLang reads this config"),
    "aux ids shifted at the vllm top level only": ("vllm", _shift_top_aux,
                                                   "aux_layers is [3, 4, 4] as vLLM reads this config"),
    "norm_output flipped": ("sglang", _set("norm_output", True), "norm_output is True as SGLang reads"),
    "norm_output flipped in vllm": ("vllm", _set("norm_output", True), "norm_output is True as vLLM reads"),
    "wrong rms_norm_eps": ("sglang", _times_ten("rms_norm_eps"), "rms_norm_eps is "),
    "wrong rms_norm_eps in vllm": ("vllm", _in_layer(_times_ten("rms_norm_eps")), "rms_norm_eps is "),
    "rope_theta x10": ("sglang", _times_ten("rope_theta"), "rope_theta is 100000.0 as SGLang reads"),
    "rope_theta x10 in vllm": ("vllm", _in_layer(_times_ten("rope_theta")), "rope_theta is 100000.0 as vLLM reads"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatch_with_the_training_checkpoint_is_caught_without_flags(clean_export: Path, tiny_llama_dir: Path,
                                                                      tmp_path: Path, case: str) -> None:
    from eaglepipe.export.validate import validate_export

    fmt, edit, expected = MISMATCHES[case]
    export = tmp_path / "export"
    shutil.copytree(clean_export, export)
    _edit_config(export / fmt, edit)
    report = validate_export(export, tiny_llama_dir)
    assert any(p.startswith(f"{fmt}: {expected}") for p in report.problems), report.problems
    # the format dir alone finds the drafter config beside it
    alone = validate_export(export / fmt, tiny_llama_dir)
    assert alone.reference == str(export / "drafter_config.json") and not alone.ok


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_caught(clean_export: Path, tiny_llama_dir: Path, tmp_path: Path, value: float) -> None:
    from eaglepipe.export.validate import validate_export

    export = tmp_path / "export"
    shutil.copytree(clean_export, export)

    def plant(state: dict) -> None:
        state["midlayer.mlp.down_proj.weight"][3, 5] = value
    _edit_weights(export / "sglang", plant)
    for strict in (True, False):
        report = validate_export(export / "sglang", tiny_llama_dir, strict=strict)
        assert report.problems == ["sglang: tensor midlayer.mlp.down_proj.weight holds 1 non-finite values "
                                   "(NaN or Inf)"], report.problems


def test_strict_validation_needs_the_checkpoint_config(clean_export: Path, tiny_llama_dir: Path,
                                                       tmp_path: Path) -> None:
    from eaglepipe.export.validate import validate_export

    export = tmp_path / "export"
    shutil.copytree(clean_export, export)
    (export / "drafter_config.json").unlink()
    strict = validate_export(export, tiny_llama_dir)
    assert [p for p in strict.problems if "has no drafter_config.json" in p] and strict.reference is None
    # a drafter from elsewhere has none: it is compared with the target only
    assert validate_export(export, tiny_llama_dir, strict=False).ok
