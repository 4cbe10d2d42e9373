"""Write `dvc.yaml` from the stage declarations (`pipeline.STAGES`) and the stages' import closures.

    python -m eaglepipe.workflow.dvcgen            # rewrites dvc.yaml
    python -m eaglepipe.workflow.dvcgen --check    # exits 1 when dvc.yaml is not what it would write

Run it after adding, moving or deleting a module, or changing an import: the closures are the DVC deps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .pipeline import STAGES, Stage, code_deps, command, results_dir

ROOT = Path(__file__).resolve().parents[3]
RESULTS = results_dir("${experiment}")
HEADER = ("# Generated from src/eaglepipe/workflow/pipeline.py by `python -m eaglepipe.workflow.dvcgen`: edit the\n"
          "# declaration there, not this file. deps = the stage's data inputs and its module's import closure.\n")


def dvc_stage(s: Stage, root: Path) -> dict:
    """One stage of dvc.yaml."""
    entry: dict = {
        "cmd": command(s, RESULTS),
        "deps": [f"{RESULTS}/{d}" for d in s.deps] + code_deps(s, root),
        "params": list(s.params),
    }
    for kind in ("outs", "metrics", "plots"):
        paths = [f"{RESULTS}/{o.path}" for o in s.outs if o.kind == kind]
        if paths:
            entry[kind] = paths
    return entry


def render(root: Path = ROOT) -> str:
    """The text of dvc.yaml for the repository at `root`."""
    stages = {s.name: dvc_stage(s, root) for s in STAGES}
    return HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate dvc.yaml from the stage declarations.")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    p.add_argument("--check", action="store_true", help="only check that dvc.yaml is current")
    args = p.parse_args(argv)
    path, text = args.root / "dvc.yaml", render(args.root)
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run `PYTHONPATH=src python -m eaglepipe.workflow.dvcgen`", file=sys.stderr)
            raise SystemExit(1)
        return
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
