"""The pipeline runs on a real SLURM cluster through snakemake-executor-plugin-slurm and gives
the same results as a local run.

Needs the single-node cluster of tests/slurm/setup.sh; `bash tests/slurm/run.sh` starts it,
runs this file and stops it. Both runs happen in temporary copies of the repo with the tiny
experiment composed into their params.yaml, so the checkout's params.yaml and results/ stay as they are.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXPERIMENT = ["experiment=tiny", "regen=none"]
RESULTS = "results/tiny"
# The data stages and a short CPU training; `train` pulls in everything before it.
STAGES = ("fetch_target", "download", "normalize", "regenerate", "tokenize", "vocab", "hidden_states", "train")
TARGET_RULE = "train"
# Stages whose outputs must be identical, file by file, between the two runs.
DETERMINISTIC_DIRS = ("target/model", "data/raw", "data/chat", "data/regen", "data/tokens", "vocab")
PIPELINE_TIMEOUT_S = 1800


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir / "src")
    return env


def _node_state() -> str:
    """The node's state as sinfo reports it (one line per partition, all the same)."""
    r = subprocess.run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unreachable: {r.stderr.strip()[-300:]}"
    return ",".join(sorted(set(r.stdout.split()))) or "no node"


@pytest.fixture(scope="module")
def cluster() -> None:
    """The local cluster is up with its node idle (tests/slurm/setup.sh starts it)."""
    if shutil.which("sbatch") is None:
        pytest.fail("SLURM is not installed; run `bash tests/slurm/run.sh` (installs and starts a local cluster)")
    state = _node_state()
    if state not in ("idle", "mixed", "allocated"):
        pytest.fail(f"the local SLURM node is not usable ({state}); start it with `bash tests/slurm/setup.sh`")


def _repo_copy(dest: Path) -> Path:
    """Copy the repo's tracked and unignored files (not results/ or logs/) and compose the tiny params."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if rel.split("/", 1)[0] in ("results", "logs") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    r = subprocess.run([sys.executable, "-m", "eaglepipe.compose", *EXPERIMENT, "--out", str(dest / "params.yaml")],
                       cwd=dest, env=_env(dest), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dest


class _SnakemakeRun:
    """Snakemake running in `workdir` up to the target rule, its output in `workdir/snakemake.out`."""

    def __init__(self, workdir: Path, *args: str):
        self.workdir, self.args = workdir, args
        self.log = workdir / "snakemake.out"
        self.start = time.monotonic()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args, TARGET_RULE], cwd=workdir,
                                         env=_env(workdir), stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> float:
        """Wait for Snakemake to finish; fail with its output and the stage logs unless it succeeded."""
        try:
            rc = self.proc.wait(timeout=PIPELINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = "timeout"
        elapsed = time.monotonic() - self.start
        if rc != 0:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}"
                           for p in sorted(self.workdir.glob("logs/*/*.log")))
            pytest.fail(f"snakemake {' '.join(self.args)} in {self.workdir} failed ({rc}):\n"
                        f"{self.log.read_text()[-6000:]}{logs}")
        return elapsed

    def stop(self) -> None:
        """Stop Snakemake if it still runs (it cancels its SLURM jobs on SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def _files(root: Path) -> set[str]:
    """Files under root, relative. The stages' resumable state lives in .work/<stage>/<fingerprint>/, and
    train's fingerprint hashes its inputs' absolute paths and mtimes, so it differs between two repo
    copies by design: that path component is replaced by `*`."""
    files = set()
    for p in root.rglob("*"):
        if p.is_file():
            parts = p.relative_to(root).parts
            if len(parts) > 3 and parts[0] == ".work":
                parts = (*parts[:2], "*", *parts[3:])
            files.add("/".join(parts))
    return files


def _assert_same_parquet(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.schema.equals(tb.schema), f"{a.name}: schemas differ"
    assert ta.equals(tb), f"{a.name}: contents differ"


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), f"{a}: tensor names differ"
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), f"{a}: tensor {name} differs"


def _slurm_jobs(workdir: Path) -> dict[str, dict[str, str]]:
    """Per rule, the SLURM job record (`scontrol show job`) of the last job that ran it."""
    jobs = {}
    logs = (workdir / ".snakemake" / "slurm_logs").glob("rule_*/*.log")
    for log in sorted(logs, key=lambda p: int(p.stem)):
        out = subprocess.run(["scontrol", "show", "job", "-o", log.stem], capture_output=True, text=True, check=True)
        fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
        jobs[log.parent.name.removeprefix("rule_")] = fields
    return jobs


def test_cluster_schedules_a_gpu_job_on_the_gpu_partition(cluster, tmp_path):
    out = tmp_path / "job.out"
    r = subprocess.run(["sbatch", "--wait", "--parsable", "-p", "gpu", "--gpus=1", "--cpus-per-gpu=2", "-t", "5",
                        "-o", str(out), "--wrap", "echo $SLURM_JOB_PARTITION $SLURM_JOB_GPUS $SLURM_CPUS_ON_NODE"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_text().split() == ["gpu", "0", "2"]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline run once through SLURM and once locally, each in its own repo copy."""
    slurm_dir = _repo_copy(tmp_path_factory.mktemp("slurm_run"))
    local_dir = _repo_copy(tmp_path_factory.mktemp("local_run"))
    # Both at once on the 2 cores; both give the compute-heavy stages 2 threads (local --cores 2,
    # `cores: 2` in the profile), so they slow each other down but compute the same numbers.
    slurm_run = _SnakemakeRun(slurm_dir, "--workflow-profile", "profiles/slurm-local")
    local_run = _SnakemakeRun(local_dir, "--cores", "2")
    try:
        local_s, slurm_s = local_run.wait(), slurm_run.wait()
    finally:
        slurm_run.stop()
        local_run.stop()
    print(f"\n[slurm test] pipeline up to '{TARGET_RULE}' (both running at once): via SLURM {slurm_s:.0f} s, "
          f"local {local_s:.0f} s")
    return {"slurm": slurm_dir, "local": local_dir}


def test_every_stage_ran_as_a_slurm_job_on_its_partition(runs):
    jobs = _slurm_jobs(runs["slurm"])
    assert set(STAGES) <= set(jobs), f"stages without a SLURM job: {set(STAGES) - set(jobs)}"
    for rule in STAGES:
        assert jobs[rule]["JobState"] == "COMPLETED", (rule, jobs[rule]["JobState"])
        assert jobs[rule]["Comment"].startswith(f"rule_{rule}"), (rule, jobs[rule]["Comment"])
    # A GPU stage is mapped as on a real cluster: the gpu partition, one GPU, cpus_per_gpu CPUs.
    assert jobs["train"]["Partition"] == "gpu"
    assert jobs["train"]["TresPerJob"] == "gres:gpu:1"
    assert jobs["train"]["NumCPUs"] == "2"
    assert jobs["download"]["Partition"] == "cpu"
    assert "gpu" not in jobs["download"].get("TresPerJob", "")


def test_slurm_run_produces_the_same_files_as_a_local_run(runs):
    slurm, local = (runs[k] / RESULTS for k in ("slurm", "local"))
    assert _files(slurm) == _files(local)
    assert (slurm / "train" / "LATEST").read_text().strip()


def test_deterministic_artefacts_are_identical(runs):
    slurm, local = (runs[k] / RESULTS for k in ("slurm", "local"))
    compared = 0
    for sub in DETERMINISTIC_DIRS:
        for rel in sorted(_files(slurm / sub)):
            a, b = slurm / sub / rel, local / sub / rel
            if a.suffix == ".parquet":
                _assert_same_parquet(a, b)
            elif a.suffix == ".safetensors":
                _assert_same_tensors(a, b)
            else:
                continue
            compared += 1
    assert compared >= len(DETERMINISTIC_DIRS), f"only {compared} data files compared"


def test_training_gives_the_same_drafter(runs):
    slurm, local = (runs[k] / RESULTS / "train" for k in ("slurm", "local"))
    latest = (slurm / "LATEST").read_text().strip()
    assert (local / "LATEST").read_text().strip() == latest
    _assert_same_tensors(slurm / "checkpoints" / latest / "model.safetensors",
                         local / "checkpoints" / latest / "model.safetensors")
    metrics = [_quality_metrics(json.loads((d / "dvclive" / "metrics.json").read_text())) for d in (slurm, local)]
    assert metrics[0], "no loss/accuracy/tau in train/dvclive/metrics.json"
    assert metrics[0] == metrics[1]


def _quality_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The loss, accuracy and tau entries of a (nested) metrics dict; timings and throughput differ by run."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _quality_metrics(value, f"{name}/")
        elif any(word in name.lower() for word in ("loss", "acc", "tau")):
            flat[name] = value
    return flat
