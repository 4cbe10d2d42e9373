# Helpers shared by all rules. Rules stay thin: inputs, outputs, resources, one shell line.
import os
from pathlib import Path

PY = "PYTHONPATH=src python -m"
R = f"results/{config['experiment']}"
LOGS = f"logs/{config['experiment']}"


def stage_code(*packages):
    """The stage's Python files, so that code edits rerun the rule (Snakemake hashes only shell text)."""
    files = []
    for pkg in packages:
        p = Path("src/eaglepipe") / pkg
        files += [str(f) for f in sorted(p.rglob("*.py"))] if p.is_dir() else [str(p)]
    return files


def stage_threads():
    """Threads for a compute-heavy stage: every core Snakemake may use that this process may run on
    (torch reads OMP_NUM_THREADS; the affinity mask, unlike os.cpu_count, respects a SLURM allocation)."""
    return max(1, min(workflow.cores, len(os.sched_getaffinity(0))))


def gpus_for(stage):
    """GPUs a stage asks for: train uses train.nproc_per_node, others one when the config wants CUDA."""
    if config["device"] == "cpu":
        return 0
    if stage == "train":
        return int(config["train"]["nproc_per_node"])
    return 1 if config["device"] == "cuda" else 0


def output_parent(name):
    """A params function giving the directory that holds output `name` (for stages writing a whole folder)."""
    return lambda wildcards, output: str(Path(output[name]).parent)


def input_parent(name):
    """A params function giving the directory that holds input `name`."""
    return lambda wildcards, input: str(Path(input[name]).parent)
