# Shared by the rules: where results and logs go, and the stage declarations with their code dependencies.
import os
import sys
from pathlib import Path

# The declarations come from this checkout's own src/, not from an installed copy of the package.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from eaglepipe.workflow.pipeline import STAGES, code_deps, command, gpu_count, params_values, results_dir

R = results_dir(config["experiment"])
LOGS = f"logs/{config['experiment']}"


def stage_threads():
    """Threads for a compute-heavy stage: every core Snakemake may use that this process may run on
    (torch reads OMP_NUM_THREADS; the affinity mask, unlike os.cpu_count, respects a SLURM allocation)."""
    return max(1, min(workflow.cores, len(os.sched_getaffinity(0))))


def rule_output(out):
    """A declared output as a Snakemake output: flagged directory() and report() as declared."""
    path = f"{R}/{out.path}"
    if out.directory:
        path = directory(path)
    if out.report is not None:
        path = report(path, caption=f"../report/{out.report.caption}", category=out.report.category,
                      patterns=list(out.report.patterns))
    return path
