"""Stage `train`: train an EAGLE drafter; resumable; publishes checkpoints, LATEST/BEST, metrics."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..config import Config
from ..utils.cli import StageError, run_stage, stage_parser

log = logging.getLogger("train")


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Re-exec under torchrun when several processes are configured, else train here."""
    from ..train.distributed import needs_torchrun, torchrun_argv

    if needs_torchrun(cfg.train.nproc_per_node):
        argv = torchrun_argv(cfg.train.nproc_per_node, "eaglepipe.stages.train", sys.argv[1:])
        log.info("re-executing under torchrun: %s", " ".join(argv))
        os.execv(argv[0], argv)
    from ..train.loop import Paths, Trainer

    hidden = Path(args.hidden)
    manifest = hidden / "manifest.json"
    if not manifest.exists():
        raise StageError(f"{manifest} is missing: run the hidden_states stage first")
    mode = json.loads(manifest.read_text()).get("mode")
    if mode != cfg.train.mode:
        raise StageError(f"{hidden} was made for train.mode={mode}, but train.mode={cfg.train.mode}")
    paths = Paths(target=Path(args.target), tokens=Path(args.tokens), vocab=Path(args.vocab), hidden=hidden,
                  out=Path(args.out))
    try:
        summary = Trainer(cfg, paths).train()
    except (ValueError, FileNotFoundError) as e:
        raise StageError(str(e)) from e
    val = (summary.get("final") or {}).get("val") or {}
    log.info("done: %s", json.dumps({**{k: summary.get(k) for k in ("steps", "latest", "best", "best_replay_tau")},
                                     **{f"final_val_{k}": val.get(k) for k in ("replay_tau", "replay_tau_first")}}))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser(__doc__)
    for name in ("target", "tokens", "vocab", "hidden", "out"):
        p.add_argument(f"--{name}", required=True)
    run_stage("train", p, body, argv)


if __name__ == "__main__":
    main()
