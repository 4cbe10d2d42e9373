"""The train stage's own loop, timed, and where its host time goes: seconds a step of `Trainer.train` (the loop the
pipeline runs: each step's rows collated inside the loop, the LR schedule, metric windows, history rows) on a run's
target, tokens and vocab, with the host's time in Python's garbage collector; optionally a cProfile of the host
side and torch.profiler tables (with the GPU's busy time a step) of a few more steps.

    python benchmarks/train_loop.py --params params.yaml --run results/h2h_nemo --warmup 20 --steps 100 \
        --cprofile logs/loop_cprofile.txt --profile logs/loop_profile.txt

--run is an experiment's results folder (its target/, data/tokens/ and vocab/); the train.* switches come from
--params. The loop keeps its checkpoints in a temporary work folder, so the run's own training is left alone. One
run of the loop holds the warm-up, the timed steps and the profiled ones, in that order, and saves its checkpoint
after them (or where train.save_every falls). The seconds a step are wall seconds of the timed steps, the device
synchronised at both ends. Appends a row to benchmarks/RESULTS.md (or --results).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from eaglepipe.config import load_params
from eaglepipe.train.loop import Paths, Trainer

from decode import append_result_row, hardware_name, sync
from train import step_profiler, write_host_profile, write_profile

REPO = Path(__file__).resolve().parents[1]


class GcClock:
    """Seconds the host spends in Python's garbage collector, and its collections by generation, while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.collections[info["generation"]] += 1

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


class StepWindows:
    """Consecutive windows of optimizer steps, driven by `Trainer.train`'s on_step hook: the warm-up, the timed
    steps (wall seconds with the device synchronised at both ends, and the garbage collector's time), then a cProfile
    window and a torch.profiler window of `profile_steps` each where asked. The checkpoint a run saves at its last
    step comes after the last window."""

    def __init__(self, device: torch.device, warmup: int, steps: int, profile_steps: int, cprofile: bool,
                 profile: bool) -> None:
        self.device = device
        windows = [("warmup", warmup), ("timed", steps)] + [(name, profile_steps) for name, on in
                                                            (("cprofile", cprofile), ("profile", profile)) if on]
        self.ends: dict[int, str] = {}
        last = 0
        for name, n in windows:
            last += n
            self.ends[last] = name
        self.total = last
        self.following = dict(zip([name for name, _ in windows], [name for name, _ in windows[1:]]))
        self.seconds: dict[str, float] = {}
        self.gc_clock = GcClock()
        self.host = cProfile.Profile()
        self.profiler = step_profiler(device)
        self._began = time.perf_counter()

    def __call__(self, step: int) -> None:
        name = self.ends.get(step)
        if name is None:
            return
        sync(self.device)
        self.seconds[name] = time.perf_counter() - self._began
        self._switch(name, on=False)
        if name in self.following:
            self._switch(self.following[name], on=True)
        self._began = time.perf_counter()

    def _switch(self, name: str, on: bool) -> None:
        """Start (`on`) or stop the tool of window `name` (the warm-up has none)."""
        if name == "timed":
            self.gc_clock.__enter__() if on else self.gc_clock.__exit__()
        elif name == "cprofile":
            self.host.enable() if on else self.host.disable()
        elif name == "profile":
            self.profiler.__enter__() if on else self.profiler.__exit__(None, None, None)


def device_busy_seconds(profiler: torch.profiler.profile) -> float:
    """The GPU's kernel and copy time in a profile, in seconds: the device-side events' own time (the ops that
    launched them carry the same time again, and user annotations span others), as the profiler's table sums it."""
    return sum(e.self_device_time_total for e in profiler.key_averages()
               if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation) / 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, required=True, help="composed params file (its train.* recipe)")
    ap.add_argument("--run", type=Path, required=True, help="results/<exp>: its target/, data/tokens/, vocab/")
    ap.add_argument("--warmup", type=int, default=20, help="steps before the timed ones (compilation, caches)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="append a cProfile of --profile-steps more steps (host side) to this file")
    ap.add_argument("--profile", type=Path, default=None,
                    help="append torch.profiler tables of --profile-steps more steps to this file")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default benchmarks/)")
    args = ap.parse_args(argv)
    cfg = load_params(args.params)
    tc = cfg.train
    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        paths = Paths(target=args.run / "target", tokens=args.run / "data" / "tokens", vocab=args.run / "vocab",
                      hidden=args.run / "hidden", out=Path(tmp) / "out")
        trainer = Trainer(cfg, paths, work=Path(tmp) / "work")
        windows = StepWindows(trainer.device, args.warmup, args.steps, args.profile_steps, args.cprofile is not None,
                              args.profile is not None)
        if trainer.total_steps < windows.total:
            raise SystemExit(f"the recipe trains {trainer.total_steps} steps, fewer than the {windows.total} asked for")
        trainer.train(stop_after=windows.total, on_step=windows)
        rows = [r for r in trainer.history.rows if r["split"] == "train" and args.warmup < r["step"]
                <= args.warmup + args.steps]
    title = f"train stage loop: {cfg.experiment}, loss {tc.loss}, mb {tc.micro_batch_size}, {args.profile_steps} steps"
    if args.cprofile is not None:
        write_host_profile(windows.host, args.cprofile, title)
    busy = None
    if args.profile is not None:
        write_profile(windows.profiler, trainer.device, args.profile, f"{title} (profiled)")
        if trainer.device.type == "cuda":
            busy = device_busy_seconds(windows.profiler) / args.profile_steps
    seconds, gc_clock = windows.seconds["timed"], windows.gc_clock
    figures = {
        "benchmark": "train_loop", "experiment": cfg.experiment, "algorithm": tc.algorithm, "loss": tc.loss,
        "micro_batch": tc.micro_batch_size, "seq": cfg.data.seq_length, "ttt_steps": tc.ttt_steps,
        "compile": tc.compile, "compile_target": tc.compile_target, "target_graphs": tc.target_graphs,
        "metrics_every": tc.metrics_every, "steps": args.steps, "warmup_steps": args.warmup,
        "seconds_per_step": round(seconds / args.steps, 5),
        "history_step_seconds": [round(r["step_seconds"], 5) for r in rows],
        "real_tokens_per_s": round(sum(r["tokens_per_s"] * r["step_seconds"] for r in rows) /
                                   max(sum(r["step_seconds"] for r in rows), 1e-9), 1) if rows else None,
        "warmup_seconds": round(windows.seconds["warmup"], 2),
        "gc_seconds_per_step": round(gc_clock.seconds / args.steps, 5),
        "gc_collections": gc_clock.collections,
        "gpu_busy_seconds_per_step": None if busy is None else round(busy, 5),
    }
    print(json.dumps(figures), flush=True)
    results = args.results or REPO / "benchmarks" / "RESULTS.md"
    switches = [k for k in ("compile", "compile_target", "target_graphs") if figures[k]]
    append_result_row(
        results, f"train loop ({cfg.experiment}, {tc.algorithm})", hardware_name(trainer.device),
        "python benchmarks/train_loop.py " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv]),
        f"{figures['seconds_per_step'] * 1e3:.1f} ms a step over {args.steps} steps after {args.warmup}, "
        f"{figures['real_tokens_per_s']} real tok/s, loss {tc.loss}, mb {tc.micro_batch_size}x{cfg.data.seq_length}, "
        f"metrics every {tc.metrics_every}, switches: {', '.join(switches) or 'none'}; "
        f"garbage collector {figures['gc_seconds_per_step'] * 1e3:.1f} ms a step"
        + (f"; GPU busy {busy * 1e3:.1f} ms a step (profiled)" if busy is not None else ""),
        "benchmarks/train.py on the same rows (its row beside this one)", figures=figures, name="train_loop",
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
