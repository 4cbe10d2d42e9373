"""The two wirings (Snakefile and dvc.yaml) describe the same DAG, and Snakemake accepts the workflow."""
from __future__ import annotations

import csv
import io
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def _snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), "--workflow-profile", "none", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def _snakemake_outputs() -> set[tuple[str, str]]:
    r = _snakemake("--summary", "-F", "--cores", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = csv.DictReader(io.StringIO(r.stdout), delimiter="\t")
    return {(row["rule"], row["output_file"].rstrip("/")) for row in rows}


def _dvc_outputs() -> set[tuple[str, str]]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        pairs = set()
        for stage in repo.index.stages:
            for out in stage.outs:
                pairs.add((stage.name, os.path.relpath(out.fs_path, REPO)))
        return pairs


def test_snakemake_dry_run_plans_every_stage():
    r = _snakemake("-n", "-F", "--cores", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("fetch_target", "download", "normalize", "regenerate", "tokenize", "vocab", "hidden_states",
                  "train", "export", "bench"):
        assert f"rule {stage}:" in r.stdout + r.stderr


def test_snakemake_lint_is_clean():
    r = _snakemake("--lint")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Congratulations" in r.stdout + r.stderr


def test_snakefile_and_dvc_yaml_wire_the_same_stages_to_the_same_outputs():
    smk, dvc = _snakemake_outputs(), _dvc_outputs()
    assert {r for r, _ in smk} - {"all"} == {s for s, _ in dvc}
    assert smk - {p for p in smk if p[0] == "all"} == dvc


def test_every_stage_command_is_one_stage_cli_line():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"].split()[:3] == ["${py}", f"eaglepipe.stages.{name}", "--params"], name
        assert (REPO / "src" / "eaglepipe" / "stages" / f"{name}.py").exists(), name
        assert f"src/eaglepipe/stages/{name}.py" in stage["deps"], name


def test_dvc_is_initialised_with_hydra_composition():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text
