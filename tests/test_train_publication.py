"""Training killed with SIGKILL at named points of writing and publishing a checkpoint, then resumed, writes what an
uninterrupted run writes: checkpoints (weights, optimizer, RNG, BEST decision), LATEST, BEST, history.jsonl,
dvclive metrics and summary.json. Timings are the one exception (tokens_per_s, step_seconds, mfu, dvclive
timestamps and the summary's `this_run`)."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eaglepipe.config import to_dict

from test_train import conversations, make_cfg, sharp_target  # noqa: F401  (fixtures)

# log_every does not divide save_every: a run resumed from step 3 continues a half-filled log window
SETTINGS = dict(max_steps=7, log_every=2, save_every=3, eval_every=3, keep_checkpoints=2, lr=5e-3)
TIMINGS = {"tokens_per_s", "step_seconds", "mfu"}

# Every run is a fresh process, as a stage run is (a library imported for the first time may draw from Python's
# RNG), with one intra-op thread: two-thread CPU matmuls here differ in the last bits from one process to the
# next, which would hide what this file tests. With `points`, the runner dies by SIGKILL just before the last of
# them happens, each (audit event, path regex) matched in order: os.rename by its destination, os.remove by its
# path, relative to the experiment dir when absolute.
KILL_RUNNER = """
import json, os, re, signal, sys
from pathlib import Path
points = [(event, re.compile(pattern)) for event, pattern in json.loads(sys.argv[4])]
root = Path(sys.argv[3]).parent
def die_before(event, args):
    if points and event == points[0][0]:
        path = os.fsdecode(args[1] if event == "os.rename" else args[0])
        if points[0][1].fullmatch(os.path.relpath(path, root) if os.path.isabs(path) else path):
            points.pop(0)
            if not points:
                os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(die_before)
from eaglepipe.config import params_from_dict
from eaglepipe.train.loop import Paths, Trainer
cfg = params_from_dict(json.loads(Path({cfg!r}).read_text()))
conv, target, out = (Path(p) for p in sys.argv[1:4])
Trainer(cfg, Paths(target, conv / "tokens", conv / "vocab", conv / "hidden", out)).train()
"""

WORK = r"\.work/train/[^/]+"
FINAL = ("os.rename", WORK + r"/checkpoints/epoch_\d+_step_7")
CRASH_POINTS = {  # from writing the last checkpoint to publishing summary.json, in the order a run passes them
    # and, first, BEST moved to step 6 while LATEST still names step 3: the resume goes back to step 3's BEST
    "step-6 BEST": [("os.rename", WORK + r"/checkpoints/epoch_\d+_step_6"), ("os.rename", WORK + "/BEST")],
    "final checkpoint": [FINAL],
    "work BEST": [FINAL, ("os.rename", WORK + "/BEST")],
    "work LATEST": [FINAL, ("os.rename", WORK + "/LATEST")],
    "pruning": [FINAL, ("os.rename", WORK + r"/checkpoints/\..*\.tmp")],
    "half pruned": [FINAL, ("os.rename", WORK + r"/checkpoints/\..*\.tmp"), ("os.remove", ".*")],
    "published checkpoints": [FINAL, ("os.rename", "train/checkpoints")],
    "published BEST": [FINAL, ("os.rename", "train/BEST")],
    "published LATEST": [FINAL, ("os.rename", "train/LATEST")],
    "summary.json": [FINAL, ("os.rename", "train/summary.json")],
}


def run_training(conv: Path, target: Path, exp: Path, points: list[tuple[str, str]]) -> int:
    """Train into `exp`/train in a new process killed at `points` (none: it runs to the end); its exit code."""
    cfg, runner = exp.parent / "cfg.json", exp.parent / "runner.py"
    cfg.write_text(json.dumps(to_dict(make_cfg(**SETTINGS))))
    runner.write_text(KILL_RUNNER.format(cfg=str(cfg)))
    proc = subprocess.run([sys.executable, str(runner), str(conv), str(target), str(exp / "train"),
                           json.dumps(points)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def reference(conversations, sharp_target, tmp_path_factory) -> Path:  # noqa: F811
    """The experiment dir of an uninterrupted run."""
    exp = tmp_path_factory.mktemp("reference") / "exp"
    assert run_training(conversations, sharp_target, exp, []) == 0
    return exp


def kill_then_resume(conv: Path, target: Path, exp: Path, points: list[tuple[str, str]]) -> None:
    """Train in a process killed at `points`, then resume in another one to the end."""
    assert run_training(conv, target, exp, points) == -signal.SIGKILL
    assert run_training(conv, target, exp, []) == 0


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def same(a: Any, b: Any) -> bool:
    """Equality of loaded checkpoint objects: nested dicts, sequences, tensors and arrays."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def without_timings(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def assert_same_file(rel: str, a: Path, b: Path, exp_a: Path, exp_b: Path) -> None:
    if a.suffix == ".safetensors":
        wa, wb = load_file(str(a)), load_file(str(b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    elif a.suffix == ".pt":
        assert same(torch.load(a, weights_only=False), torch.load(b, weights_only=False)), rel
    elif a.name == "history.jsonl":
        rows = [[without_timings(json.loads(line)) for line in p.read_text().splitlines()] for p in (a, b)]
        assert rows[0] == rows[1], rel
    elif a.name == "summary.json":
        sa, sb = (json.loads(p.read_text()) for p in (a, b))
        for s, exp in ((sa, exp_a), (sb, exp_b)):
            del s["this_run"]
            assert s.pop("work_dir").startswith(str(exp.resolve()))
            s["final"] = {split: without_timings(row) for split, row in s["final"].items()}
        assert sa == sb, rel
    elif rel.startswith("train/dvclive/") and a.suffix == ".json":
        ma, mb = (json.loads(p.read_text()) for p in (a, b))
        for m in (ma, mb):
            m["train"] = without_timings(m["train"])
        assert ma == mb, rel
    elif a.suffix == ".tsv":
        ta, tb = ([{k: v for k, v in r.items() if k != "timestamp"} for r in csv.DictReader(p.open(), delimiter="\t")]
                  for p in (a, b))
        assert ta == tb, rel
    else:
        assert a.read_bytes() == b.read_bytes(), rel


def assert_writes_the_same(ref: Path, exp: Path) -> None:
    """The experiment's train output and work dir hold the reference's files with the same contents."""
    fa, fb = ({k: v for k, v in files(root).items() if Path(k).stem not in TIMINGS} for root in (ref, exp))
    for rel in sorted(fa.keys() & fb.keys()):
        assert_same_file(rel, fa[rel], fb[rel], ref, exp)
    assert sorted(fa) == sorted(fb)


def test_reference_run_moves_best_at_its_last_checkpoint(reference):
    """The crash points below matter only if the last checkpoint is a new BEST that has to replace an older one."""
    work = next((reference / ".work" / "train").iterdir())
    names = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert [re.sub(r"epoch_\d+_", "", n) for n in names] == ["step_6", "step_7"]
    states = {n: json.loads((work / "checkpoints" / n / "state.json").read_text()) for n in names}
    assert states[names[0]]["best"]["name"] != names[1] and states[names[1]]["best"]["name"] == names[1]
    summary = json.loads((reference / "train" / "summary.json").read_text())
    assert summary["best"] == (reference / "train" / "BEST").read_text().strip() == names[1]
    assert summary["best_replay_tau"] == states[names[1]]["val_replay_tau"]


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_kill_while_publishing_then_resume_publishes_the_same_best(conversations, sharp_target, reference,  # noqa: F811
                                                                   tmp_path, point):
    kill_then_resume(conversations, sharp_target, tmp_path / "exp", CRASH_POINTS[point])
    assert (tmp_path / "exp" / "train" / "BEST").read_text() == (reference / "train" / "BEST").read_text()
    assert_writes_the_same(reference, tmp_path / "exp")


def test_resumed_run_writes_what_an_uninterrupted_run_writes(conversations, sharp_target, reference,  # noqa: F811
                                                             tmp_path):
    """Killed before its step-6 checkpoint, the run resumes from step 3, between two history rows (log_every 2),
    and must still write the same step-4 row, RNG states and everything else."""
    kill_then_resume(conversations, sharp_target, tmp_path / "exp",
                     [("os.rename", WORK + r"/checkpoints/epoch_\d+_step_6")])
    history = [[without_timings(json.loads(line)) for line in next(exp.glob(".work/train/*/history.jsonl")).open()]
               for exp in (reference, tmp_path / "exp")]
    assert [r["step"] for r in history[0]] == [2, 3, 4, 6, 6, 7, 7] and history[0] == history[1]
    assert_writes_the_same(reference, tmp_path / "exp")
