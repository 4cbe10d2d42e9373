"""Stage `hidden_states`: in offline mode cache the target's aux hidden states and label logits (resumable,
disk checked first); in online mode only write manifest.json {"mode": "online"}."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Config
from ..utils.atomic import atomic_dir, atomic_write_json
from ..utils.cli import StageError, run_stage, stage_parser

log = logging.getLogger("hidden_states")


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Online: a manifest only. Offline: build the cache in the work dir, then publish it."""
    out = Path(args.out)
    if cfg.train.mode == "online":
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "manifest.json", {"mode": "online"})
        log.info("online mode: the target runs inside training; wrote %s/manifest.json", out)
        return
    from ..train.offline import build_cache

    try:
        build_cache(cfg, Path(args.target), Path(args.tokens), Path(args.vocab), out)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise StageError(str(e)) from e


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser(__doc__)
    for name in ("target", "tokens", "vocab", "out"):
        p.add_argument(f"--{name}", required=True)
    run_stage("hidden_states", p, body, argv)


if __name__ == "__main__":
    main()
