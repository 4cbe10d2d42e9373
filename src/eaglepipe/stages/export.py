"""Stage `export`: the trained drafter as SGLang and vLLM checkpoints, validated, with launch commands.

    python -m eaglepipe.stages.export --params params.yaml --target T --train TRAIN --out EXPORT
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..config import Config
from ..export.checkpoint import read_checkpoint, resolve_checkpoint
from ..export.writer import ExportRequest, export_checkpoint
from ..target.info import read_target_info, resolve_model_dir
from ..utils.atomic import atomic_dir
from ..utils.cli import run_stage, stage_parser

log = logging.getLogger(__name__)


def verifier_identity(target_dir: Path, override: str | None) -> tuple[str, str]:
    """(name_or_path, architecture) of the target as serving engines should be told: a hub id or a local path."""
    model_dir = resolve_model_dir(target_dir).resolve()
    arch = (json.loads((model_dir / "config.json").read_text()).get("architectures") or ["LlamaForCausalLM"])[0]
    if override:
        return override, arch
    if (target_dir / "target.json").exists():
        info = read_target_info(target_dir)
        if info.get("source") == "hub" and info.get("name_or_path"):
            return str(info["name_or_path"]), arch
    return str(model_dir), arch


def run(cfg: Config, args: argparse.Namespace) -> None:
    """Export train/<export.checkpoint> into --out (atomically) and print the launch commands."""
    target_dir, out = Path(args.target), Path(args.out)
    ckpt = read_checkpoint(resolve_checkpoint(args.train, cfg.export.checkpoint))
    name, arch = verifier_identity(target_dir, cfg.export.verifier_name)
    req = ExportRequest(dtype=cfg.export.dtype, formats=tuple(cfg.export.formats), verifier_name=name,
                        verifier_arch=arch, num_steps=cfg.export.num_steps, topk=cfg.export.topk,
                        num_draft_tokens=cfg.export.num_draft_tokens)
    log.info("exporting %s (%s) as %s", ckpt.path, ckpt.drafter_config["algorithm"], ", ".join(req.formats))
    with atomic_dir(out) as tmp:
        summary = export_checkpoint(ckpt, target_dir, tmp, req, final_out=out.resolve())
    for w in summary["validation"]["warnings"]:
        log.warning("validation: %s", w)
    print("\n".join(summary["commands"]))


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("Export the trained drafter for SGLang and vLLM.")
    p.add_argument("--target", required=True, help="fetch_target output dir")
    p.add_argument("--train", required=True, help="train stage output dir")
    p.add_argument("--out", required=True, help="export output dir")
    run_stage("export", p, run, argv)


if __name__ == "__main__":
    main()
