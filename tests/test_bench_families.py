"""The bench sweep's family axis: P-EAGLE's K and DFlash's block sizes are chain points; a sweep a family cannot
draft is refused at compose time (trees for a chain-only family) or by the bench stage before any work (a DFlash
block longer than the trained one), and the bench stage measures both families' exports end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eaglepipe.compose import compose_dict
from eaglepipe.config import ConfigError, params_from_dict

from test_bench import params_file, run_bench_stage
from test_dflash import dflash_checkpoint
from test_export import export_to, make_checkpoint

BENCH = {"prompts": {"source": "mtbench", "num_prompts": 1, "multi_turn": False}, "temperatures": [0.0],
         "max_new_tokens": 8, "warmup_prompts": 0}


def chains(*steps: int) -> list[dict]:
    return [{"num_steps": s, "topk": 1, "num_draft_tokens": s + 1} for s in steps]


@pytest.mark.parametrize("family", ["peagle", "dflash"])
def test_a_chain_only_family_refuses_a_sweep_of_trees_when_composed(family: str) -> None:
    with pytest.raises(ConfigError, match=rf"bench.sweep points \['s5_k4_n8'\] are trees, but a {family} drafter"):
        params_from_dict(compose_dict([f"train={family}"]))
    cfg = params_from_dict(compose_dict([f"train={family}", f"bench={family}"]))
    assert all(p.topk == 1 for p in cfg.bench.sweep)
    # a drafter named by bench.drafter is another one: its own family decides, in the bench stage
    params_from_dict(compose_dict([f"train={family}", "bench.drafter=/models/an-eagle3"]))


def test_the_family_sweeps_are_p_eagles_k_and_dflash_block_sizes() -> None:
    peagle = params_from_dict(compose_dict(["train=peagle", "bench=peagle"])).bench.sweep
    dflash = params_from_dict(compose_dict(["train=dflash", "bench=dflash"]))
    assert [p.num_steps for p in peagle] == [4, 5, 6, 7, 8]
    assert [p.num_draft_tokens for p in dflash.bench.sweep] == [8, 16]
    assert max(p.num_draft_tokens for p in dflash.bench.sweep) <= dflash.train.block_size


@pytest.fixture(scope="module")
def peagle_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peagle_bench")
    assert export_to(tiny_llama_dir, make_checkpoint(tiny_llama_dir, root / "ckpt", "peagle"),
                     root / "export")["validation"]["ok"]
    return root / "export"


@pytest.fixture(scope="module")
def dflash_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dflash_bench")
    assert export_to(tiny_llama_dir, dflash_checkpoint(tiny_llama_dir, root / "ckpt", block=4),
                     root / "export")["validation"]["ok"]
    return root / "export"


def test_the_bench_stage_measures_p_eagle_and_points_at_vllm(tiny_llama_dir: Path, peagle_export: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_bench_stage(params_file(tmp_path, {**BENCH, "sweep": chains(2, 3)}), tiny_llama_dir, peagle_export,
                           out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["all_outputs_match"] is True
    assert metrics["drafter"]["path"] == str((peagle_export / "vllm").resolve())
    best = (out / "best_command.txt").read_text()
    assert best.startswith("# SGLang does not serve peagle drafters; vLLM:\nvllm serve ")
    spec = json.loads(best.split("--speculative-config ", 1)[1].strip().strip("'"))
    assert spec["method"] == "eagle3" and spec["parallel_drafting"] is True
    assert spec["num_speculative_tokens"] == int(metrics["best_speedup_config"].split("_")[0][1:])


def test_the_bench_stage_refuses_what_a_family_cannot_draft_before_any_work(
        tiny_llama_dir: Path, peagle_export: Path, dflash_export: Path, tmp_path: Path) -> None:
    tree = {"num_steps": 2, "topk": 2, "num_draft_tokens": 4}
    proc = run_bench_stage(params_file(tmp_path, {**BENCH, "sweep": [*chains(3), tree]}), tiny_llama_dir,
                           peagle_export, tmp_path / "a")
    assert proc.returncode != 0 and "s2_k2_n4: a peagle drafter drafts a chain" in proc.stderr
    assert "s3_k1_n4" not in proc.stderr.split("cannot draft", 1)[1]
    proc = run_bench_stage(params_file(tmp_path, {**BENCH, "sweep": chains(3, 4, 5)}), tiny_llama_dir, dflash_export,
                           tmp_path / "b")
    assert proc.returncode != 0
    assert "s4_k1_n5: the DFlash drafter was trained on blocks of 4" in proc.stderr and "s5_k1_n6" in proc.stderr
    sglang = {**BENCH, "sweep": chains(3), "engine": "sglang", "sglang": {"dry_run": True}}
    proc = run_bench_stage(params_file(tmp_path, sglang), tiny_llama_dir, peagle_export, tmp_path / "c")
    assert proc.returncode != 0 and "SGLang does not serve peagle drafters" in proc.stderr
    assert not any((tmp_path / d).exists() for d in "abc")


def test_the_bench_stage_sweeps_dflash_blocks_and_launches_sglang_with_the_block(
        tiny_llama_dir: Path, dflash_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_bench_stage(params_file(tmp_path, {**BENCH, "sweep": chains(2, 3)}), tiny_llama_dir, dflash_export,
                           out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["all_outputs_match"] is True
    assert sorted(p.stem for p in (out / "points").iterdir()) == ["baseline_t0.0", "s2_k1_n3_t0.0", "s3_k1_n4_t0.0"]
    block = int(metrics["best_speedup_config"].split("_n")[1])
    best = (out / "best_command.txt").read_text()
    assert f"--speculative-algorithm DFLASH --speculative-draft-model-path {(dflash_export / 'sglang').resolve()} " \
           f"--speculative-num-draft-tokens {block} " in best
    sglang = {**BENCH, "sweep": chains(2, 3), "engine": "sglang", "sglang": {"dry_run": True}}
    proc = run_bench_stage(params_file(tmp_path, sglang), tiny_llama_dir, dflash_export, tmp_path / "dry")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split("--speculative-num-draft-tokens ")[1].split()[0] for line in lines[1:]] == ["3", "4"]
