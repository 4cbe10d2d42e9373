"""Both wirings follow from the stage declarations: dvc.yaml is the generated one, and the rules Snakemake
builds run each stage with its declared data, its whole import closure as code inputs and the same command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eaglepipe.workflow import dvcgen
from eaglepipe.workflow.imports import module_file
from eaglepipe.workflow.pipeline import STAGES, Stage, code_deps, command, gpu_count, results_dir, stage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def _snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), "--workflow-profile", "none", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def _experiment() -> str:
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())["experiment"]


def _snakemake_jobs() -> dict[str, dict[str, str]]:
    """Each rule of a forced dry run: its `input:`, `output:` ... lines and its shell command."""
    r = _snakemake("-n", "-F", "-p", "--cores", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in r.stdout.splitlines():
        if line.startswith("rule ") and line.endswith(":"):
            current = jobs.setdefault(line[5:-1], {})
        elif current is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            current[key] = value
        elif current is not None and line.startswith("Shell command: "):
            current["shell"] = line[len("Shell command: "):]
    return jobs


def _dvc_stages() -> dict:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {s.name: s for s in repo.index.stages}


def _expected_inputs(s: Stage, results: str) -> list[str]:
    return [f"{results}/{d}" for d in s.deps] + code_deps(s, REPO)


def test_dvc_yaml_is_generated_from_the_declarations():
    assert (REPO / "dvc.yaml").read_text() == dvcgen.render(REPO), \
        "dvc.yaml is out of date: run `PYTHONPATH=src python -m eaglepipe.workflow.dvcgen`"
    r = subprocess.run([sys.executable, "-m", "eaglepipe.workflow.dvcgen", "--check"], cwd=REPO,
                       env={**ENV, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dvcgen_check_fails_on_a_stale_dvc_yaml(tmp_path):
    (tmp_path / "src").symlink_to(REPO / "src")
    (tmp_path / "dvc.yaml").write_text(dvcgen.render(REPO).replace("- src/eaglepipe/stages/bench.py\n", ""))
    r = subprocess.run([sys.executable, "-m", "eaglepipe.workflow.dvcgen", "--check", "--root", str(tmp_path)],
                       cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True)
    assert r.returncode == 1 and "out of date" in r.stderr
    dvcgen.main(["--root", str(tmp_path)])
    assert (tmp_path / "dvc.yaml").read_text() == dvcgen.render(REPO)


def test_snakemake_lint_is_clean():
    r = _snakemake("--lint")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Congratulations" in r.stdout + r.stderr


def test_snakemake_rules_are_the_declared_stages():
    jobs = _snakemake_jobs()
    results = results_dir(_experiment())
    assert set(jobs) - {"all"} == {s.name for s in STAGES}
    for s in STAGES:
        job = jobs[s.name]
        assert job["input"].split(", ") == _expected_inputs(s, results), s.name
        assert job["output"].split(", ") == [f"{results}/{o.path}" for o in s.outs], s.name
        assert job["shell"] == f"{command(s, results)} > logs/{_experiment()}/{s.name}.log 2>&1", s.name
        assert job["benchmark"] == f"logs/{_experiment()}/times/{s.name}.tsv", s.name


def test_dvc_stages_are_the_declared_stages():
    from dvc.dependency.param import ParamsDependency

    stages = _dvc_stages()
    results = results_dir(_experiment())
    assert list(stages) == [s.name for s in STAGES]
    for s in STAGES:
        dvc = stages[s.name]
        deps = [os.path.relpath(d.fs_path, REPO) for d in dvc.deps if not isinstance(d, ParamsDependency)]
        assert deps == _expected_inputs(s, results), s.name
        params = [p for d in dvc.deps if isinstance(d, ParamsDependency) for p in d.params]
        assert params == list(s.params), s.name
        outs = {os.path.relpath(o.fs_path, REPO): (o.metric, o.plot) for o in dvc.outs}
        assert outs == {f"{results}/{o.path}": (o.kind == "metrics", o.kind == "plots") for o in s.outs}, s.name
        assert dvc.cmd == command(s, results), s.name


def test_every_closure_holds_its_stage_cli():
    for s in STAGES:
        cli = module_file(REPO / "src", s.module)
        assert cli is not None and cli.relative_to(REPO).as_posix() in code_deps(s, REPO), s.name


def test_stages_are_declared_in_dependency_order_and_their_paths_are_wired():
    made: set[str] = set()
    for s in STAGES:
        assert set(s.deps) <= made, f"{s.name} reads {set(s.deps) - made}, which no earlier stage writes"
        outs = {o.path for o in s.outs}
        for flag, path in s.args.items():
            assert path in set(s.deps) | outs or any(p.startswith(path + "/") for p in set(s.deps) | outs), \
                f"{s.name} --{flag} {path} is neither a declared input or output nor the folder of one"
        assert all(p == s.args["out"] or p.startswith(s.args["out"] + "/") for p in outs), s.name
        made |= outs


def test_gpu_requests_follow_the_device_and_train_processes():
    params = {"device": "cuda", "train": {"nproc_per_node": 4}}
    assert gpu_count(stage("train"), params) == 4
    assert gpu_count(stage("bench"), params) == 1
    assert gpu_count(stage("tokenize"), params) == 0
    auto = {**params, "device": "auto"}
    assert (gpu_count(stage("train"), auto), gpu_count(stage("bench"), auto)) == (4, 0)
    cpu = {**params, "device": "cpu"}
    assert all(gpu_count(s, cpu) == 0 for s in STAGES)


@pytest.mark.parametrize("device, gpus", [("cuda", "gpu=1"), ("cpu", "gpu=0")])
def test_snakemake_passes_the_gpu_request_to_the_scheduler(device, gpus):
    r = _snakemake("-n", "-F", "--cores", "1", "--config", f"device={device}")
    assert r.returncode == 0, r.stderr[-3000:]
    block = r.stdout.split("rule bench:", 1)[1].split("\n\n", 1)[0]
    resources = next(line for line in block.splitlines() if line.strip().startswith("resources:"))
    assert resources.endswith(gpus), resources


def test_dvc_is_initialised_with_hydra_composition():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text
