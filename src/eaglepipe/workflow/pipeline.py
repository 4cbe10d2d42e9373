"""Every stage of the pipeline, declared once.

A stage is the CLI `python -m eaglepipe.stages.<name>`, the paths it takes, the outputs of other stages it reads,
what it writes, the `params.yaml` keys it reads, its GPU and thread needs. `dvc.yaml` is generated from this
(`python -m eaglepipe.workflow.dvcgen`) and the Snakemake rules are built from it when the Snakefile is parsed
(`workflow/rules/stages.smk`). A stage's code dependencies are not declared: they are the import closure of
its module (`imports.closure`), the same file list for both tools.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .imports import closure

# Every command runs the code of the checkout it is started in, also in queued DVC experiments.
PYTHON = "PYTHONPATH=src python -m"
PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Report:
    """How Snakemake's HTML report shows an output: a caption file under workflow/report/ and a category."""

    caption: str
    category: str
    patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Out:
    """One output, relative to results/<experiment>."""

    path: str
    directory: bool = False
    # the dvc.yaml section it goes in: outs | metrics | plots
    kind: str = "outs"
    report: Report | None = None


@dataclass(frozen=True)
class Stage:
    """One stage: its CLI, data in and out, the params it reads and the resources it needs."""

    name: str
    # CLI flag -> path under results/<experiment>, in command-line order (inputs, then --out)
    args: Mapping[str, str]
    # outputs of earlier stages that it reads, under results/<experiment>
    deps: tuple[str, ...]
    outs: tuple[Out, ...]
    # params.yaml keys it reads: a section ("bench") or one key in it ("data.seq_length")
    params: tuple[str, ...]
    # GPUs it asks the scheduler for: an int counts with device: cuda only; a params key gives the count
    # with any device but cpu
    gpus: int | str = 0
    # compute-heavy: it gets every core the scheduler may give (Snakemake threads)
    threads: bool = False

    @property
    def module(self) -> str:
        return f"eaglepipe.stages.{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("fetch_target", args={"out": "target"}, deps=(), outs=(Out("target", directory=True),),
          params=("target",)),
    Stage("download", args={"out": "data/raw"}, deps=(), outs=(Out("data/raw", directory=True),),
          params=("data.sources", "data.max_samples", "data.seed")),
    Stage("normalize", args={"raw": "data/raw", "out": "data/chat"}, deps=("data/raw",),
          outs=(Out("data/chat", directory=True),),
          params=("data.system_prompt", "data.exclude_benchmark", "bench.prompts")),
    Stage("regenerate", args={"target": "target", "chat": "data/chat", "out": "data/regen"},
          deps=("target", "data/chat"), outs=(Out("data/regen", directory=True),),
          params=("regen", "seed", "device"), gpus=1, threads=True),
    Stage("tokenize", args={"target": "target", "chat": "data/regen", "out": "data/tokens"},
          deps=("target", "data/regen"), outs=(Out("data/tokens", directory=True),),
          params=("data.seq_length", "data.val_fraction", "seed")),
    Stage("vocab", args={"tokens": "data/tokens", "out": "vocab"}, deps=("data/tokens",),
          outs=(Out("vocab", directory=True),), params=("vocab",)),
    Stage("hidden_states", args={"target": "target", "tokens": "data/tokens", "vocab": "vocab", "out": "hidden"},
          deps=("target", "data/tokens", "vocab"), outs=(Out("hidden", directory=True),),
          params=("train.mode", "train.algorithm", "train.offline_topk", "train.attn_impl", "train.micro_batch_size",
                  "target.aux_layers", "data.seq_length", "device"), gpus=1, threads=True),
    Stage("train", args={"target": "target", "tokens": "data/tokens", "vocab": "vocab", "hidden": "hidden",
                         "out": "train"},
          deps=("target", "data/tokens", "vocab", "hidden"),
          outs=(Out("train/checkpoints", directory=True), Out("train/LATEST"), Out("train/BEST"),
                Out("train/summary.json"), Out("train/dvclive/metrics.json", kind="metrics"),
                Out("train/dvclive/plots", directory=True, kind="plots")),
          params=("train", "seed", "device", "target.aux_layers", "data.seq_length"), gpus="train.nproc_per_node",
          threads=True),
    Stage("export", args={"target": "target", "train": "train", "out": "export"},
          deps=("target", "train/checkpoints", "train/LATEST", "train/BEST"),
          outs=(Out("export", directory=True),), params=("export",)),
    Stage("bench", args={"target": "target", "export": "export", "out": "bench"}, deps=("target", "export"),
          outs=(Out("bench/points", directory=True),
                Out("bench/sweep.csv", report=Report("sweep.rst", "Benchmark")),
                Out("bench/best_command.txt"), Out("bench/README.md"),
                Out("bench/metrics.json", kind="metrics"),
                Out("bench/plots", directory=True, kind="plots",
                    report=Report("plots.rst", "Benchmark", patterns=("{name}.png",)))),
          params=("bench", "export", "seed", "device"), gpus=1, threads=True),
)


def stage(name: str) -> Stage:
    """The stage called `name`."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in STAGES]}")


def results_dir(experiment: str) -> str:
    """Where an experiment's outputs go (`experiment` may be a template such as DVC's "${experiment}")."""
    return f"results/{experiment}"


def command(s: Stage, results: str) -> str:
    """The stage's one shell line, with its paths under `results` (a `results_dir`)."""
    paths = " ".join(f"--{flag} {results}/{path}" for flag, path in s.args.items())
    return f"{PYTHON} {s.module} --params {PARAMS_FILE} {paths}"


def code_deps(s: Stage, root: Path) -> list[str]:
    """The stage's code dependencies: its module's import closure, as paths relative to the repository `root`."""
    root = Path(root).absolute()
    return [p.relative_to(root).as_posix() for p in closure(root / "src", s.module)]


def lookup(params: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted params key ("data.seq_length") in the composed params."""
    value: Any = params
    for part in key.split("."):
        value = value[part]
    return value


def params_values(s: Stage, params: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's declared params keys with their values: what must rerun the stage when it changes."""
    return {key: lookup(params, key) for key in s.params}


def gpu_count(s: Stage, params: Mapping[str, Any]) -> int:
    """GPUs the stage asks the scheduler for under these params (none with device: cpu)."""
    if params["device"] == "cpu" or not s.gpus:
        return 0
    if isinstance(s.gpus, str):
        return int(lookup(params, s.gpus))
    return s.gpus if params["device"] == "cuda" else 0


def downstream(names: set[str]) -> set[str]:
    """The stages that read, directly or through others, an output of the stages in `names`, and those stages."""
    found = set(names)
    for s in STAGES:  # declared in dependency order
        made_upstream = {o.path for u in STAGES if u.name in found for o in u.outs}
        if made_upstream & set(s.deps):
            found.add(s.name)
    return found
