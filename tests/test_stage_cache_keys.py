"""Every cache key is true: a real run of the tiny pipeline in a temporary git checkout shows that

- every params.yaml key a stage's code reads is a declared param of that stage (and every declared one is read);
- every eaglepipe module a stage process (or a server it starts) loads is in the stage's closure;
- editing one module reruns exactly the stages whose closure holds it (and, in Snakemake, those downstream),
  and changing one param reruns exactly the stages that declare it, in Snakemake and in DVC.

The checkout's `src/sitecustomize.py` (tests/stage_trace/) records what each process started there reads and
loads. Snakemake runs the pipeline; `dvc commit` then records the same outputs in dvc.lock.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from eaglepipe.workflow.pipeline import STAGES, Stage, code_deps, downstream

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRACER = REPO / "tests" / "stage_trace" / "sitecustomize.py"
EXPERIMENT = "tiny"
# Offline training, so hidden_states runs its real path; the native regen backend starts a server subprocess.
OVERRIDES = ["experiment=tiny", "train.mode=offline", "data.max_samples=12", "train.max_steps=2",
             "bench.prompts.num_prompts=1"]


def _env(pythonpath: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _tool(root: Path, *argv: str, timeout: int = 300, own_code: bool = False) -> str:
    """Run a command in the checkout `root`; `own_code`: its Python imports eaglepipe from the checkout's src/."""
    r = subprocess.run(list(argv), cwd=root, env=_env(root / "src" if own_code else None), capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted(root.glob("logs/*/*.log")))
        pytest.fail(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}{logs}")
    return r.stdout


def _checkout(dest: Path, target_dir: Path, *overrides: str) -> Path:
    """A git repository holding this checkout's tracked and unignored files, with the tiny params composed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if rel.split("/", 1)[0] not in ("results", "logs") and (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    _tool(dest, sys.executable, "-m", "eaglepipe.compose", *OVERRIDES, "target.source=local",
          f"target.name_or_path={target_dir}", *overrides, "--out", str(dest / "params.yaml"), own_code=True)
    shutil.copy2(TRACER, dest / "src" / "sitecustomize.py")
    git = ["git", "-c", "user.name=eaglepipe-test", "-c", "user.email=test@eaglepipe.invalid"]
    _tool(dest, *git, "init", "-q")
    _tool(dest, *git, "add", "-A")
    _tool(dest, *git, "commit", "-q", "-m", "test checkout")
    return dest


def _snakemake_pending(root: Path) -> set[str]:
    """Rules Snakemake would run now (its --summary plan)."""
    out = _tool(root, "snakemake", "--workflow-profile", "none", "--summary", "--cores", "1")
    return {row["rule"] for row in csv.DictReader(io.StringIO(out), delimiter="\t") if row["plan"] != "no update"}


def _dvc_changed(root: Path) -> set[str]:
    """Stages whose deps or params changed since dvc.lock (dvc status)."""
    return set(json.loads(_tool(root, "dvc", "status", "--json") or "{}"))


@contextmanager
def _edited(path: Path, change: Callable[[str], str]) -> Iterator[None]:
    """`path` changed for the duration, then its text and times restored."""
    text, st = path.read_text(), path.stat()
    path.write_text(change(text))
    try:
        yield
    finally:
        path.write_text(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@dataclass
class Traced:
    """One traced process: the stage it belongs to, what it read and which modules it loaded."""

    stage: Stage
    module: str
    reads: set[str]
    modules: set[str]


@dataclass
class Run:
    root: Path
    processes: list[Traced]
    closures: dict[str, set[str]]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir) -> Run:
    root = _checkout(tmp_path_factory.mktemp("checkout"), tiny_llama_dir)
    _tool(root, "snakemake", "--workflow-profile", "none", "--cores", "2", timeout=900)
    _tool(root, "dvc", "commit", "--force", "--quiet")
    records = [json.loads(p.read_text()) for p in sorted((root / "stage_trace").glob("*.json"))]
    by_module = {s.module: s for s in STAGES}
    stage_of_pid = {r["pid"]: by_module[r["module"]] for r in records if r["module"] in by_module}
    processes = []
    for r in records:
        s = stage_of_pid.get(r["pid"]) or stage_of_pid.get(r["ppid"])
        assert s is not None, f"{r['module']} (pid {r['pid']}) was started by no stage"
        processes.append(Traced(s, r["module"], set(r["reads"]), set(r["modules"])))
    return Run(root, processes, {s.name: set(code_deps(s, root)) for s in STAGES})


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_every_stage_ran_and_was_traced(run):
    assert {p.stage.name for p in run.processes if p.module == p.stage.module} == {s.name for s in STAGES}
    # regenerate's native backend starts the server as `python -m eaglepipe...`: traced as its child
    assert any(p.module != p.stage.module for p in run.processes)


def test_every_param_a_stage_reads_is_declared_and_every_declared_one_is_read(run):
    for s in STAGES:
        reads = set().union(*(p.reads for p in run.processes if p.stage is s))
        undeclared = sorted(k for k in reads if not _covered(k, s.params))
        assert not undeclared, f"{s.name} reads {undeclared}, not among its params {s.params} (workflow/pipeline.py)"
        unread = [d for d in s.params if not any(_covered(k, (d,)) for k in reads)]
        assert not unread, f"{s.name} declares {unread} but never read them: changing them reruns it for nothing"


def test_every_module_a_stage_runs_is_in_its_closure(run):
    for p in run.processes:
        missing = sorted(p.modules - run.closures[p.stage.name])
        assert not missing, f"{p.module} (stage {p.stage.name}) loaded {missing}, which its closure lacks"


def test_after_the_run_both_tools_have_nothing_to_do(run):
    assert _snakemake_pending(run.root) == set()
    assert _dvc_changed(run.root) == set()


def _module_to_edit(run: Run, kind: str) -> tuple[str, set[str]]:
    """A module of the given kind and the stages that must hold it, chosen from the closures and the trace
    (no module names are written here)."""
    anywhere = set().union(*run.closures.values())
    if kind == "bench only":
        others = set().union(*(c for name, c in run.closures.items() if name != "bench"))
        return min(run.closures["bench"] - others), {"bench"}
    if kind == "run only by a started server":
        child = next(p for p in run.processes if p.module != p.stage.module)
        parent = next(p for p in run.processes if p.stage is child.stage and p.module == p.stage.module)
        return min(m for m in child.modules - parent.modules if not m.endswith("__init__.py")), {child.stage.name}
    if kind == "every stage":
        every = set.intersection(*run.closures.values())
        return min(m for m in every if not m.endswith("__init__.py")), set(run.closures)
    package = {p.relative_to(run.root).as_posix() for p in (run.root / "src" / "eaglepipe").rglob("*.py")}
    return min(package - anywhere), set()


@pytest.mark.parametrize("kind", ["bench only", "run only by a started server", "every stage", "no stage"])
def test_editing_a_module_reruns_the_stages_whose_closure_holds_it(run, kind):
    module, must_hold = _module_to_edit(run, kind)
    holders = {name for name, closure in run.closures.items() if module in closure}
    assert must_hold <= holders and (holders == must_hold or kind == "run only by a started server"), holders
    with _edited(run.root / module, lambda text: text + "\n# edited by test_stage_cache_keys\n"):
        assert _snakemake_pending(run.root) == downstream(holders), module
        assert _dvc_changed(run.root) == holders, module
    assert _snakemake_pending(run.root) == set() and _dvc_changed(run.root) == set()


@pytest.mark.parametrize("key", ["seed", "export.num_steps", "data.seq_length"])
def test_changing_a_param_reruns_the_stages_that_declare_it(run, key):
    readers = {s.name for s in STAGES if any(key == d or key.startswith(d + ".") for d in s.params)}
    assert readers

    def change(text: str) -> str:
        params = yaml.safe_load(text)
        *parents, leaf = key.split(".")
        section = params
        for part in parents:
            section = section[part]
        section[leaf] += 1
        return yaml.safe_dump(params, sort_keys=False)

    with _edited(run.root / "params.yaml", change):
        assert _snakemake_pending(run.root) == downstream(readers), key
        assert _dvc_changed(run.root) == readers, key


@pytest.mark.slow
def test_dvc_repro_and_exp_run_use_the_generated_stages(tmp_path, tiny_llama_dir):
    root = _checkout(tmp_path, tiny_llama_dir)
    _tool(root, "dvc", "repro", timeout=900)
    assert _dvc_changed(root) == set()
    assert "Nothing to be done" in _tool(root, "snakemake", "--workflow-profile", "none", "-n", "--cores", "1")
    # An experiment composes conf/ with -S overrides; the same overrides give the same params, so only
    # train.lr differs, and only train and the stages after it run again.
    overrides = [arg for o in [*OVERRIDES, "target.source=local", f"target.name_or_path={tiny_llama_dir}"]
                 for arg in ("-S", o)]
    out = _tool(root, "dvc", "exp", "run", *overrides, "-S", "train.lr=2e-4", timeout=900, own_code=True)
    ran = {s.name for s in STAGES if f"Running stage '{s.name}'" in out}
    assert ran == downstream({"train"}), out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    ["train=peagle", "train.ttt_steps=3", "bench=peagle", "bench.prompts.num_prompts=1", "bench.max_new_tokens=16"],
    ["train=dflash", "train.draft_layers=2", "train.block_size=8", "bench=dflash", "bench.prompts.num_prompts=1",
     "bench.max_new_tokens=16", "bench.sweep=[{num_steps: 7, topk: 1, num_draft_tokens: 8}]"],
], ids=["peagle", "dflash"])
def test_a_new_family_runs_every_stage_through_snakemake(tmp_path, tiny_llama_dir, family):
    root = _checkout(tmp_path, tiny_llama_dir, *family)
    _tool(root, "snakemake", "--workflow-profile", "none", "--cores", "2", timeout=1500)
    metrics = json.loads((root / "results" / "tiny" / "bench" / "metrics.json").read_text())
    assert metrics["all_outputs_match"] is True and metrics["num_points"] >= 1
    assert _snakemake_pending(root) == set()
