"""Ablation sweep through the pipeline's own stages: one arm = the base composition plus a few overrides.

    python benchmarks/ablation.py benchmarks/ablation_smollm2.yaml --work /tmp/arms --jobs 2
    python benchmarks/ablation.py benchmarks/ablation_smollm2.yaml --print-dvc   # the same sweep as DVC commands
    python benchmarks/ablation.py benchmarks/levers_smollm2.yaml --only sampled_x2 --alone   # without the base arm
    python benchmarks/ablation.py benchmarks/levers_smollm2.yaml benchmarks/family_compare.yaml \
        --only base,steps2000,dflash --alone   # two files' arms in one sitting, on one data build

Each arm runs in its own copy of this checkout (code copied, results/ hard-linked: stages publish by rename, so
no file is changed in place), with params.yaml composed from `base` + the arm's overrides. Snakemake then reruns
only the stages whose params, code or inputs the overrides change. Arms train and export `--jobs` at a time (the
GPU is shared, which changes no figure the table reports): the arms that make their own data (the first arm, and
those whose overrides change regeneration or what comes before it) run their data stages one after another, and
each then trains beside the arms that start from its data (those that regenerate the same) while the next one
makes its own. They then benchmark one at a time, so that their speedups are measured on an otherwise idle GPU.
Where the checkout is a git repository with DVC, `--print-dvc` gives the equivalent `dvc exp run --queue`
commands.

The arms file (YAML): `base` (compose overrides shared by every arm), `arms` (name -> list of overrides) and
optionally `points` (the sweep points the table reports; default all), `name` (the rows' name; default
`ablation`) and `extends` (another arms file whose base and points this one builds on). Several arms files run as
one sitting: their arms (names unique across them) share data builds where they regenerate the same, train side
by side and benchmark one at a time, and each keeps its own file's base, points, rows' name and baseline. Prints
one Markdown table per file and appends one row per arm to benchmarks/RESULTS.md and results.jsonl, with its
file's base arm's figures as its baseline (with `--alone`, for a GPU sitting too short for the base arm beside
the others: the base arm's latest row in results.jsonl on the same setup, named as another run's). Each point's
figures include its round cost in plain decode steps (τ ÷ speedup: what one verify round, drafting included,
costs against one non-speculative step), and each arm's training tokens/s and peak GPU memory (arms that train
side by side share the GPU, which lowers the former).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import yaml

from eaglepipe.compose import compose_dict
from eaglepipe.workflow.pipeline import STAGES, params_values

from decode import REPO, append_result_row
from peer_h2h import bench_points

# what an arm's copy of the checkout leaves out: outputs, environments, lease carry folders and caches
SKIPPED = shutil.ignore_patterns(".git", "results", "logs", ".venv", "__pycache__", ".pytest_cache", ".whl",
                                 ".gguf_*", ".peer", ".gpu", ".device", ".dvc_remote", ".arms")


def skip_in_copy(work: Path):
    """copytree's ignore for an arm's copy: SKIPPED, and the arms' work folder where it lies inside the checkout."""
    work = work.resolve()

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(SKIPPED(folder, names)) | {n for n in names if (Path(folder) / n).resolve() == work}
    return ignore


def load_arms(path: Path) -> dict:
    """The arms file, checked: base and arms present, arm names plain. With `extends: <arms file>` (a path beside
    it), that file's base and points come first (the same fixed setup, other arms)."""
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("arms"), dict) or not spec["arms"]:
        raise SystemExit(f"{path}: needs `arms:` mapping arm names to lists of overrides")
    if "extends" in spec:
        parent = load_arms(path.parent / spec.pop("extends"))
        spec["base"] = [*parent["base"], *spec.get("base", [])]
        if "points" in parent:
            spec.setdefault("points", parent["points"])
    for name, overrides in spec["arms"].items():
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"{path}: arm name {name!r} must be letters, digits, '_' or '-'")
        if not isinstance(overrides, list):
            raise SystemExit(f"{path}: arm {name} must list its overrides (an empty list for the base)")
    spec.setdefault("base", [])
    spec.setdefault("name", "ablation")
    return spec


def arm_order(specs: list[dict], only: str | None, alone: bool = False) -> list[str]:
    """The arms to run from one or more arms files (arm names unique across them): every arm, file by file, or
    those `only` names (comma-separated) in its order, which is the order they are benchmarked and their rows land
    in (the ones that matter most first, where the GPU sitting may end early). Each file's base arm (its first),
    where named, comes before the others: it is its file's rows' baseline. `alone` runs the named arms in the order
    given, without the base arms they leave out."""
    arms = [name for spec in specs for name in spec["arms"]]
    repeated = sorted({name for name in arms if arms.count(name) > 1})
    if repeated:
        raise SystemExit(f"arms {repeated} are in more than one arms file; an arm's name must say which it is")
    if only is None:
        if alone:
            raise SystemExit("--alone needs --only: the arms to run without the base arm")
        return arms
    names = list(dict.fromkeys(n for n in only.split(",") if n))
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; the arms files have {arms}")
    if alone:
        return names
    bases = {next(iter(spec["arms"])) for spec in specs}
    return [n for n in names if n in bases] + [n for n in names if n not in bases]


def data_leaders(overrides: dict[str, list[str]]) -> dict[str, str]:
    """Each arm (name -> its whole list of compose overrides, in run order) -> the arm whose data it reuses: the
    earliest whose stages up to regeneration (the target, the conversations and their regenerated answers) read
    the same params; itself where none does, so that it makes its own data."""
    upstream = STAGES[:[s.name for s in STAGES].index("regenerate") + 1]
    reads = {}
    for name, arm_overrides in overrides.items():
        composed = compose_dict(arm_overrides)
        reads[name] = (composed["experiment"], [params_values(s, composed) for s in upstream])
    return {name: next(n for n in overrides if reads[n] == reads[name]) for name in overrides}


def recorded_base(results_log: Path, spec: dict) -> tuple[dict | None, str]:
    """The figures of the base arm's latest row in `results_log` (results.jsonl) with this setup (the same base
    overrides, the base arm's own), and the baseline's description; (None, why) where there is none."""
    base_arm = next(iter(spec["arms"]))
    rows = [json.loads(line) for line in results_log.read_text().splitlines()] if results_log.exists() else []
    same = [r for r in rows if r.get("config", {}).get("base") == spec["base"]
            and r.get("config", {}).get("overrides") == spec["arms"][base_arm]]
    if not same:
        return None, f"none: {results_log.name} has no row of the base arm on this setup"
    row = same[-1]
    return row["figures"], (f"the base arm's latest recorded row ({row['benchmark']}, {row['date'][:16]}, "
                            f"{row['hardware']}, {row['commit']}): the same setup in another run")


def prepare_arm(work: Path, name: str, overrides: list[str], source: Path) -> Path:
    """A copy of this checkout for the arm, with its params.yaml composed and the results of `source` (a
    checkout that already ran) hard-linked, with Snakemake's records, so that unchanged stages do not rerun."""
    arm = work / name
    if not arm.exists():
        shutil.copytree(REPO, arm, ignore=skip_in_copy(work), symlinks=True)
        for shared in ("results", "logs"):
            if (source / shared).exists():
                subprocess.run(["cp", "-al", str(source / shared), str(arm / shared)], check=True)
        if (source / ".snakemake").exists():
            shutil.copytree(source / ".snakemake", arm / ".snakemake", dirs_exist_ok=True, symlinks=True,
                            ignore=shutil.ignore_patterns("locks", "incomplete", "log"))
    run([sys.executable, "-m", "eaglepipe.compose", *overrides, "--out", str(arm / "params.yaml")], arm)
    return arm


def run(cmd: list[str], cwd: Path, log: Path | None = None) -> float:
    """Run `cmd` in `cwd` with PYTHONPATH=src (appending its output to `log`); wall seconds; raises on failure."""
    env = {**os.environ, "PYTHONPATH": "src"}
    start = time.perf_counter()
    if log is None:
        subprocess.run(cmd, cwd=cwd, env=env, check=True)
    else:
        with log.open("a") as out:
            subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def experiment_of(arm: Path) -> str:
    return yaml.safe_load((arm / "params.yaml").read_text())["experiment"]


def arm_figures(arm: Path, points: list[str] | None) -> dict:
    """Validation and bench figures of one finished arm."""
    exp = experiment_of(arm)
    summary = json.loads((arm / "results" / exp / "train" / "summary.json").read_text())
    val = summary.get("final", {}).get("val", {})
    bench = bench_points(arm / "results" / exp / "bench")
    for point in bench.values():
        point["round_cost_steps"] = point["tau"] / point["speedup"] if point["speedup"] else None
    run = summary.get("this_run", {})
    metrics = json.loads((arm / "results" / exp / "bench" / "metrics.json").read_text())
    shown = {p: v for p, v in bench.items() if points is None or p in points}
    return {"val_replay_tau": val.get("replay_tau"), "val_replay_tau_first": val.get("replay_tau_first"),
            "val_acc_0": val.get("acc_0"), "bench": shown, "best_speedup": metrics.get("best_speedup"),
            "best_speedup_config": metrics.get("best_speedup_config"),
            "all_outputs_match": metrics.get("all_outputs_match"), "train_steps": summary.get("steps"),
            "train_tokens_per_s": run.get("tokens_per_s"), "train_peak_gpu_mem_gib": run.get("peak_gpu_mem_gib")}


def table(figures: dict[str, dict], points: list[str]) -> str:
    """One Markdown row per arm: val replay τ, MT-bench τ at each point, best speedup, match, training tokens/s and
    memory."""
    head = ["arm", "val replay τ", *[f"τ {p}" for p in points], "best speedup", "all match", "train tok/s",
            "train GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, f in figures.items():
        val = f"{f['val_replay_tau']:.2f}" if f["val_replay_tau"] is not None else "–"
        taus = [f"{f['bench'][p]['tau']:.2f}" if p in f["bench"] else "–" for p in points]
        best = f"{f['best_speedup']:.2f}× ({f['best_speedup_config']})" if f["best_speedup"] else "–"
        speed = f"{f['train_tokens_per_s']:,.0f}" if f.get("train_tokens_per_s") else "–"
        mem = f"{f['train_peak_gpu_mem_gib']:.1f}" if f.get("train_peak_gpu_mem_gib") else "–"
        lines.append("| " + " | ".join([name, val, *taus, best, "yes" if f["all_outputs_match"] else "no", speed,
                                        mem]) + " |")
    return "\n".join(lines)


def arm_baseline(spec: dict, names: list[str], done: dict[str, dict], work: Path, results_log: Path,
                 alone: bool) -> tuple[dict | None, str]:
    """The baseline of the arms of `spec`'s file and its description: their base arm's figures from this sitting
    (`done`, or measured earlier in `work`), or with `alone` where the base arm is not among `names`, its latest
    row in `results_log`."""
    base_arm = next(iter(spec["arms"]))
    if alone and base_arm not in names:
        return recorded_base(results_log, spec)
    base_dir = work / base_arm
    measured = (base_dir / "params.yaml").exists() and \
        (base_dir / "results" / experiment_of(base_dir) / "bench" / "metrics.json").exists()
    base = done.get(base_arm) or (arm_figures(base_dir, spec.get("points")) if measured else None)
    return base, f"arm {base_arm}, same setup and GPU"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", type=Path, nargs="+",
                    help="the arms file(s) (YAML); the arms of several files share the sitting's data and GPU")
    ap.add_argument("--work", type=Path, default=REPO / ".arms", help="where the arms' checkouts go")
    ap.add_argument("--only", default=None, help="comma-separated arm names, benchmarked in this order (default: all)")
    ap.add_argument("--base", nargs="*", default=[], help="overrides added to each file's base (e.g. a local path)")
    ap.add_argument("--alone", action="store_true",
                    help="run the --only arms without their file's base arm (a GPU sitting too short for both); "
                         "their rows' baseline is the base arm's latest row in results.jsonl with the same setup")
    ap.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    ap.add_argument("--hardware", default="unknown", help="the GPU, for the results rows")
    ap.add_argument("--print-dvc", action="store_true", help="print the equivalent DVC queue commands and stop")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    specs = [load_arms(path) | {"path": path} for path in args.arms]
    for spec in specs:
        spec["base"] = [*spec["base"], *args.base]
    names = arm_order(specs, args.only, args.alone)
    spec_of = {name: spec for spec in specs for name in spec["arms"]}
    overrides_of = {name: [*spec_of[name]["base"], *spec_of[name]["arms"][name]] for name in names}
    if args.print_dvc:
        for name in names:
            print(f"dvc exp run --queue -n {name} {' '.join(f'-S {shlex.quote(o)}' for o in overrides_of[name])}")
        print("dvc queue start -j 1")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    leaders = data_leaders(overrides_of)

    def build(name: str, upto: str) -> None:
        """The arm's stages up to `upto` (a results/<experiment> folder), in its checkout (made on first use)."""
        arm = prepare_arm(args.work, name, overrides_of[name],
                          REPO if leaders[name] == name else args.work / leaders[name])
        run(["snakemake", "--cores", "all", f"results/{experiment_of(arm)}/{upto}"], arm, arm / "ablation.log")

    failures = build_arms(names, leaders, _capture(build), args.jobs)
    done: dict[str, dict] = {}
    for name in names:  # one at a time on the GPU; each arm's row is written as soon as it is measured
        arm, spec = args.work / name, spec_of[name]
        if failures[name] is None:
            failures[name] = _capture(lambda n: run(["snakemake", "--cores", "all"], arm, arm / "ablation.log"))(name)
        if failures[name] is not None:
            print(f"arm {name} failed: {failures[name]} (log: {arm / 'ablation.log'})", file=sys.stderr)
            continue
        done[name] = f = arm_figures(arm, spec.get("points"))
        base, base_text = arm_baseline(spec, names, done, args.work, args.results.with_name("results.jsonl"),
                                        args.alone)
        overrides = spec["arms"][name]
        taus = ", ".join(f"{p} {v['tau']:.2f}" for p, v in f["bench"].items())
        append_result_row(args.results, f"{spec['name']} arm {name} ({' '.join(overrides) or 'base'})", args.hardware,
                          f"python benchmarks/ablation.py {spec['path']} --only {name}{' --alone' * args.alone}",
                          f"val replay τ {f['val_replay_tau']}; MT-bench τ {taus}; best speedup "
                          f"{f['best_speedup']} ({f['best_speedup_config']}); all match {f['all_outputs_match']}",
                          base_text, figures=f, baseline_figures=base,
                          config={"base": spec["base"], "overrides": overrides}, name=spec["name"])
        print(table({name: f}, spec.get("points") or list(f["bench"])), flush=True)
    for spec in specs:
        measured = {name: f for name, f in done.items() if spec_of[name] is spec}
        if measured:
            points = spec.get("points") or sorted({p for f in measured.values() for p in f["bench"]})
            print(table(measured, points))
    if any(e is not None for e in failures.values()):
        raise SystemExit(1)


def build_arms(names: list[str], leaders: dict[str, str], build: Callable[[str, str], Exception | None],
               jobs: int) -> dict[str, Exception | None]:
    """Each arm built up to its export by `build(name, upto)` (None, or the exception that stopped it): the arms
    that make their own data (their own leaders) run their data stages, up to `vocab`, one after another, since
    regeneration serves the target with a KV cache sized for the whole GPU and two at once run out of its memory.
    As each one's data is ready, it trains and exports beside the arms that reuse its data, `jobs` at a time,
    while the next one makes its own. An arm whose leader's data failed fails with the same error, unbuilt."""
    failures: dict[str, Exception | None] = {}
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        started = {}
        for leader in [n for n in names if leaders[n] == n]:
            error = build(leader, "vocab")
            for name in (n for n in names if leaders[n] == leader):
                if error is None:
                    started[name] = pool.submit(build, name, "export")
                else:
                    failures[name] = error
        failures |= {n: future.result() for n, future in started.items()}
    return {n: failures[n] for n in names}


def _capture(fn):
    """fn wrapped to return None on success and the exception on failure (arms fail independently)."""
    def wrapped(name: str, *args):
        try:
            fn(name, *args)
        except (subprocess.CalledProcessError, OSError) as e:
            return e
        return None
    return wrapped


if __name__ == "__main__":
    main()
