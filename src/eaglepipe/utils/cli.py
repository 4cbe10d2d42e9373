"""Plumbing shared by every `python -m eaglepipe.stages.<stage>` CLI."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, Sequence

from ..config import Config, ConfigError, load_params


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the `--params` option every stage takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="composed params file (default: params.yaml)")
    return p


def run_stage(name: str, parser: argparse.ArgumentParser, body: Callable[[Config, argparse.Namespace], None],
              argv: Sequence[str] | None = None) -> None:
    """Parse args, load and validate params, run `body`; config errors exit 2 with one clear line."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    args = parser.parse_args(argv)
    # SIGTERM (Snakemake/SLURM cancelling a job) unwinds like Ctrl-C, so servers started by the stage are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cfg = load_params(args.params)
    except ConfigError as e:
        print(f"[{name}] config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    try:
        body(cfg, args)
    except (ConfigError, StageError) as e:
        print(f"[{name}] error: {e}", file=sys.stderr)
        raise SystemExit(2)


class StageError(RuntimeError):
    """A stage cannot proceed for a reason the user must fix (bad data, missing input, no disk)."""
