"""Stage `bench`: sweep serving parameters of a drafter and report τ, acceptance, speedup and match.

    python -m eaglepipe.stages.bench --params params.yaml --target T --export EXPORT --out BENCH

The drafter is the export stage's (--export), or any exported drafter dir named by `bench.drafter`; either is
validated, and the sweep's points checked against what its family drafts, before any work starts.
"""
from __future__ import annotations

import argparse
import logging
import shlex
from dataclasses import asdict
from pathlib import Path

from ..bench.drafter import MeasuredDrafter, check_sweep, checked_drafter
from ..bench.engines import BenchEngine, NativeEngine, ServerEngine
from ..bench.metrics import overall_metrics
from ..bench.plots import write_plots
from ..bench.prompts import load_prompts
from ..bench.report import summary_table, write_outputs
from ..bench.sglang import SglangLauncher, serve_command, sweep_commands
from ..bench.sweep import run_sweep
from ..config import Config, EngineOptions
from ..export.commands import vllm_command
from ..target.info import load_tokenizer, resolve_model_dir
from ..utils.atomic import atomic_dir
from ..utils.cli import StageError, run_stage, stage_parser
from ..utils.device import pick_device
from .export import verifier_identity

log = logging.getLogger(__name__)


def make_engine(cfg: Config, model_dir: Path, draft_dir: Path, target_name: str, work_dir: Path) -> BenchEngine:
    """The engine bench.engine names."""
    b = cfg.bench
    if b.engine == "native":
        return NativeEngine(model_dir, draft_dir, b, str(pick_device(cfg.device)), cfg.seed)
    if b.engine == "url":
        return ServerEngine(b.url, b, baseline_url=b.baseline_url)
    return ServerEngine(f"http://127.0.0.1:{b.sglang.port}", b,
                        launcher=SglangLauncher(target_name, draft_dir, cfg.export.dtype, b, work_dir))


def fast_paths(options: EngineOptions) -> str:
    """The native engine's fast paths that ran, for the README (e.g. "token_path, cuda_graphs")."""
    on = [name for name, value in asdict(options).items() if value]
    return ", ".join(on) if on else "none (the PyTorch path)"


def best_command(metrics: dict, cfg: Config, target_name: str, drafter: MeasuredDrafter) -> str | None:
    """The SGLang launch line of the best config (by speedup, else by τ); for a family SGLang does not serve, the
    vLLM one after a line that says so. None when nothing was measured."""
    best = metrics.get("best_speedup_config") or metrics.get("best_tau_config")
    point = next((p for p in cfg.bench.sweep if p.name == best), None)
    if point is None:
        return None
    if "sglang" in drafter.family.formats:
        return shlex.join(serve_command(target_name, drafter.path, point, cfg.export.dtype))
    return (f"# SGLang does not serve {drafter.config.algorithm} drafters; vLLM:\n" +
            vllm_command(target_name, drafter.path, drafter.family, point.num_steps, cfg.export.dtype))


def describe_run(cfg: Config, target_name: str, drafter: MeasuredDrafter, algorithm: str,
                 prompts: list[list[str]], options: EngineOptions | None) -> str:
    """One paragraph for the README: what was measured, where and how (`options`: the native engine's fast
    paths that ran)."""
    b = cfg.bench
    turns = sum(len(p) for p in prompts)
    where = f"native engine on {pick_device(cfg.device).type} (fast paths: {fast_paths(options)})" \
        if options is not None else ("SGLang launched per point" if b.engine == "sglang" else f"the server at {b.url}")
    source = "MT-bench" if b.prompts.source == "mtbench" else f"{b.prompts.source}:{b.prompts.path}"
    origin = "named by bench.drafter" if drafter.source == "bench.drafter" else "from the export stage"
    warned = "" if not drafter.warnings else \
        f" The validator's warnings about the drafter: {'; '.join(drafter.warnings)}."
    return (f"Target `{target_name}` with the {algorithm.upper()} drafter `{drafter.path}` ({origin}), measured on "
            f"the {where}. {len(prompts)} {source} prompts ({turns} turns; later turns build on the same config's "
            f"own answers), max_new_tokens {b.max_new_tokens}, batch size {b.batch_size}, {b.warmup_prompts} warmup "
            f"prompt(s) excluded, temperatures {', '.join(f'{t:g}' for t in b.temperatures)}.{warned}")


def measured_drafter(cfg: Config, export: str | None, target_dir: Path) -> MeasuredDrafter:
    """bench.drafter when set, else the export stage's sglang/ dir; validated (StageError when not servable)."""
    if cfg.bench.drafter is not None:
        return checked_drafter(cfg.bench.drafter, target_dir, "bench.drafter")
    if export is None:
        raise StageError("give --export (the export stage's output) or set bench.drafter")
    return checked_drafter(export, target_dir, "--export")


def run(cfg: Config, args: argparse.Namespace) -> None:
    """Run the sweep and publish --out atomically; print the summary table and the best SGLang command."""
    target_dir, out = Path(args.target), Path(args.out)
    try:
        model_dir = resolve_model_dir(target_dir)
    except FileNotFoundError as e:
        raise StageError(str(e)) from e
    drafter = measured_drafter(cfg, args.export, target_dir)
    draft_dir = drafter.path
    algorithm = drafter.family.name
    check_sweep(drafter, cfg.bench.sweep)
    if cfg.bench.engine == "sglang" and "sglang" not in drafter.family.formats:
        raise StageError(f"bench.engine=sglang: SGLang does not serve {drafter.config.algorithm} drafters (served by "
                         f"{', '.join(drafter.family.formats)}); use bench.engine=native or a url")
    target_name, _ = verifier_identity(target_dir, cfg.export.verifier_name)
    if cfg.bench.engine == "sglang" and cfg.bench.sglang.dry_run:
        print("\n".join(sweep_commands(target_name, draft_dir, cfg.export.dtype, cfg.bench)))
        return
    prompts = load_prompts(cfg.bench.prompts)
    tokenizer = load_tokenizer(model_dir)
    engine = make_engine(cfg, model_dir, draft_dir, target_name, out.parent / ".work" / "bench")
    options = engine.options if isinstance(engine, NativeEngine) else None
    try:
        rows = run_sweep(engine, tokenizer, prompts, cfg.bench)
    finally:
        engine.close()
    metrics = overall_metrics(rows)
    metrics["engine"] = cfg.bench.engine
    metrics["engine_options"] = asdict(options) if options is not None else None  # the fast paths that ran
    metrics["drafter"] = drafter.to_json()
    command = best_command(metrics, cfg, target_name, drafter)
    with atomic_dir(out) as tmp:
        write_outputs(tmp, rows, metrics, command, describe_run(cfg, target_name, drafter, algorithm, prompts,
                                                                options))
        write_plots(rows, tmp / "plots")
    print(summary_table(rows))
    print(f"\nBest SGLang command:\n{command or '(no speculative point was measured)'}")


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("Benchmark a drafter over a sweep of serving parameters.")
    p.add_argument("--target", required=True, help="fetch_target output dir")
    p.add_argument("--export", default=None,
                   help="export stage output dir (reads export/sglang); not read when bench.drafter is set")
    p.add_argument("--out", required=True, help="bench output dir")
    run_stage("bench", p, run, argv)


if __name__ == "__main__":
    main()
