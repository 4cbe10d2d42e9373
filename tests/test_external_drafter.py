"""Drafters trained elsewhere (NeMo AutoModel's layout) through the validator, the loader, the bench stage and
spec_decode.py. Each is built from our own tiny export, so the drafter it must load as is known exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_bench import params_file
from test_export import export_to, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
DEPTH_PROBLEM = ("sglang: num_hidden_layers must be 1, got 30 (SGLang 0.5.23 would build 29 more decoder layers "
                 "that no weight fills)")


@pytest.fixture(scope="module")
def our_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("external")
    ckpt = make_checkpoint(tiny_llama_dir, root / "ckpt", "eagle3", draft_vocab=512)
    export_to(tiny_llama_dir, ckpt, root / "export")
    return root / "export"


def nemo_style(export: Path, target: Path, out: Path, layer_prefix: str = "model.layers.0.",
               num_hidden_layers: int = 1, architecture: str = "LlamaForCausalLMEagle3",
               draft_order: torch.Tensor | None = None) -> Path:
    """Our SGLang export as NeMo AutoModel 0.7.0 saves a draft (after its kit's unpack): decoder-layer weights
    under `layer_prefix` instead of midlayer., fc/norm with a model. prefix, the target's embedding shipped,
    RoPE only in transformers 5's rope_parameters, no aux ids (SGLang's defaults, which our export used), no
    norm_before_residual, `dtype` for torch_dtype, and a speculative_token_map.pt. `draft_order` permutes the
    draft vocab (lm_head rows and d2t together): NeMo's draft ids are not in ascending target-id order."""
    out.mkdir(parents=True)
    state = load_file(str(export / "sglang" / "model.safetensors"))
    if draft_order is not None:
        ids = (torch.arange(state["d2t"].numel()) + state["d2t"])[draft_order]
        state["d2t"] = ids - torch.arange(ids.numel())
        state["lm_head.weight"] = state["lm_head.weight"][draft_order].contiguous()
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("midlayer."):
            name = layer_prefix + name.removeprefix("midlayer.")
        elif name in ("fc.weight", "norm.weight"):
            name = "model." + name
        renamed[name] = tensor
    embed = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]
    renamed["model.embed_tokens.weight"] = embed.to(state["fc.weight"].dtype).contiguous()
    save_file(renamed, str(out / "model.safetensors"))
    cfg = json.loads((export / "sglang" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    for key in ("rope_scaling", "eagle_config", "eagle_aux_hidden_state_layer_ids", "num_aux_hidden_states",
                "norm_before_residual"):
        cfg.pop(key)
    cfg["dtype"] = cfg.pop("torch_dtype")
    cfg.update(num_hidden_layers=num_hidden_layers, architectures=[architecture])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(torch.arange(state["d2t"].numel()) + state["d2t"], out / "speculative_token_map.pt")
    return out


def run_bench(params: Path, target: Path, out: Path) -> subprocess.CompletedProcess:
    """The bench stage with no --export: bench.drafter names the drafter."""
    return subprocess.run([sys.executable, "-m", "eaglepipe.stages.bench", "--params", str(params),
                           "--target", str(target), "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200)


@pytest.mark.parametrize("layer_prefix", ["layers.0.", "model.layers.0."])
def test_nemo_style_drafter_validates_with_warnings_and_loads_as_the_original(
        our_export: Path, tiny_llama_dir: Path, tmp_path: Path, layer_prefix: str) -> None:
    from eaglepipe.export.validate import validate_export
    from eaglepipe.speculative.drafter_loader import load_exported_drafter

    nemo = nemo_style(our_export, tiny_llama_dir, tmp_path / "nemo", layer_prefix)
    report = validate_export(nemo, tiny_llama_dir, strict=False)
    assert report.ok, report.problems
    assert report.reference is None  # no training checkpoint here: compared with the target only
    warnings = "\n".join(report.warnings)
    for text in ("10 tensors are named layers.0.* rather than midlayer.*",
                 "rope_theta is only in rope_parameters", "model.embed_tokens.weight is shipped but unused",
                 "speculative_token_map.pt is ignored"):
        assert text in warnings, report.warnings
    assert not validate_export(nemo, tiny_llama_dir).ok  # what we ship would not be allowed these

    original = load_exported_drafter(our_export, tiny_llama_dir, "cpu", torch.float32)
    loaded = load_exported_drafter(nemo, tiny_llama_dir, "cpu", torch.float32)
    assert loaded.config == original.config
    ours, theirs = original.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    gen = torch.Generator().manual_seed(0)
    aux = torch.randn(2, 7, 3 * 64, generator=gen)
    ids = torch.randint(0, 49152, (2, 7), generator=gen)
    positions = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        (h_ours, logits_ours, _), (h_theirs, logits_theirs, _) = (
            m.model.step(ids, m.model.fuse(aux), positions) for m in (original, loaded))
    assert torch.equal(logits_ours, logits_theirs) and torch.equal(h_ours, h_theirs)


def test_a_draft_vocab_in_any_order_is_served_with_a_warning(our_export: Path, tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    """Both engines map draft id i to i + d2t[i] only, so a permuted vocab drafts the same target tokens."""
    from eaglepipe.export.validate import validate_export
    from eaglepipe.speculative.drafter_loader import load_exported_drafter

    order = torch.randperm(512, generator=torch.Generator().manual_seed(3))
    nemo = nemo_style(our_export, tiny_llama_dir, tmp_path / "nemo", draft_order=order)
    report = validate_export(nemo, tiny_llama_dir, strict=False)
    assert report.ok, report.problems
    assert any("d2t does not map draft ids to strictly increasing target ids" in w for w in report.warnings)
    original = load_exported_drafter(our_export, tiny_llama_dir, "cpu", torch.float32)
    loaded = load_exported_drafter(nemo, tiny_llama_dir, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(1)
    aux, ids = torch.randn(1, 5, 3 * 64, generator=gen), torch.randint(0, 49152, (1, 5), generator=gen)
    positions = torch.arange(5)[None]
    by_target = []
    for m in (original, loaded):
        with torch.no_grad():
            _, logits, _ = m.model.step(ids, m.model.fuse(aux), positions)
        full = torch.full((*logits.shape[:-1], 49152), float("-inf"))
        full[..., torch.arange(512) + m.model.d2t] = logits
        by_target.append(full)
    assert torch.equal(by_target[0], by_target[1])


def test_nemo_raw_depth_and_architecture_are_problems(our_export: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """NeMo's saved config copies the target's depth (30 for SmolLM2) and names its own class."""
    from eaglepipe.export.validate import validate_export
    from eaglepipe.speculative.drafter_loader import load_exported_drafter

    deep = nemo_style(our_export, tiny_llama_dir, tmp_path / "deep", num_hidden_layers=30)
    report = validate_export(deep, tiny_llama_dir, strict=False)
    assert [p for p in report.problems if p.startswith(DEPTH_PROBLEM)], report.problems
    with pytest.raises(ValueError, match="num_hidden_layers is 30"):
        load_exported_drafter(deep, tiny_llama_dir, "cpu", torch.float32)
    raw = nemo_style(our_export, tiny_llama_dir, tmp_path / "raw", num_hidden_layers=30,
                     architecture="LlamaEagle3DraftModel")
    problems = validate_export(raw, tiny_llama_dir, strict=False).problems
    assert [p for p in problems if "architectures ['LlamaEagle3DraftModel'] is none of" in p], problems
    assert [p for p in problems if p.startswith(DEPTH_PROBLEM)], problems


def test_bench_stage_and_spec_decode_refuse_a_drafter_with_30_layers(our_export: Path, tiny_llama_dir: Path,
                                                                     tmp_path: Path) -> None:
    deep = nemo_style(our_export, tiny_llama_dir, tmp_path / "deep", num_hidden_layers=30)
    out = tmp_path / "bench"
    proc = run_bench(params_file(tmp_path, {"drafter": str(deep)}), tiny_llama_dir, out)
    assert proc.returncode == 2 and f"bench.drafter {deep} is not a servable drafter" in proc.stderr
    assert DEPTH_PROBLEM in proc.stderr and not out.exists()
    script = subprocess.run([sys.executable, str(REPO / "benchmarks" / "spec_decode.py"), "--target",
                             str(tiny_llama_dir), "--export", str(deep), "--smoke", "--no-hf",
                             "--results", str(tmp_path / "RESULTS.md")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert script.returncode == 1 and DEPTH_PROBLEM in script.stderr and not (tmp_path / "RESULTS.md").exists()


def test_bench_stage_measures_an_external_drafter_end_to_end(our_export: Path, tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    nemo = nemo_style(our_export, tiny_llama_dir, tmp_path / "nemo").resolve()
    params = params_file(tmp_path, {"drafter": str(nemo),
                                    "prompts": {"source": "mtbench", "num_prompts": 2, "multi_turn": True},
                                    "sweep": [{"num_steps": 3, "topk": 1, "num_draft_tokens": 4}],
                                    "temperatures": [0.0], "max_new_tokens": 10})
    out = tmp_path / "bench"
    proc = run_bench(params, tiny_llama_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # greedy speculative decoding with the external drafter is lossless: every turn equals the baseline's
    assert metrics["all_outputs_match"] is True
    point = json.loads((out / "points" / "s3_k1_n4_t0.0.json").read_text())
    assert point["num_samples"] == 4 and point["match_fraction"] == 1.0 and point["verify_rounds"] > 0
    assert metrics["drafter"]["path"] == str(nemo) and metrics["drafter"]["source"] == "bench.drafter"
    assert any("rope_parameters" in w for w in metrics["drafter"]["warnings"])
    assert f"drafter `{nemo}` (named by bench.drafter)" in (out / "README.md").read_text()
    assert f"--speculative-draft-model-path {nemo} " in (out / "best_command.txt").read_text()


def test_spec_decode_measures_an_external_drafter(our_export: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    nemo = nemo_style(our_export, tiny_llama_dir, tmp_path / "nemo").resolve()
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "spec_decode.py"), "--target",
                           str(tiny_llama_dir), "--export", str(nemo), "--smoke", "--no-hf", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows and all(r["drafter"] == str(nemo) and r["output_match"] == 1.0 for r in rows)
    assert f"drafter `{nemo}`" in results.read_text()
