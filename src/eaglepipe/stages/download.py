"""Stage `download`: the configured dataset sources, subsampled and mixed, as raw parquet parts.

python -m eaglepipe.stages.download --params params.yaml --out DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..config import Config
from ..data.download import download
from ..utils.atomic import atomic_dir, atomic_write_json
from ..utils.cli import StageError, run_stage, stage_parser


def body(cfg: Config, args: argparse.Namespace) -> None:
    """Write `part-*.parquet` and `manifest.json` into --out."""
    with atomic_dir(args.out) as tmp:
        try:
            manifest = download(cfg.data, tmp)
        except (FileNotFoundError, ValueError) as e:
            raise StageError(str(e)) from e
        atomic_write_json(Path(tmp) / "manifest.json", manifest)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = stage_parser("Download, subsample and mix the dataset sources into raw parquet parts.")
    p.add_argument("--out", required=True, help="output directory (data/raw)")
    run_stage("download", p, body, argv)


if __name__ == "__main__":
    main()
