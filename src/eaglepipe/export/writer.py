"""Writing a training checkpoint as SGLang and vLLM drafters, validated, with their launch commands."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..families.registry import family_named
from ..utils.atomic import atomic_write_json, atomic_write_text, default_file_mode
from ..utils.cli import StageError
from .checkpoint import Checkpoint
from .commands import sglang_command, vllm_command
from .layout import CONFIG_FILE, DRAFTER_CONFIG_FILE, DTYPES, WEIGHTS_FILE, shapes_from_drafter_config
from .validate import ENGINE, target_facts, validate_export
from .weights import export_state_dict

log = logging.getLogger(__name__)


@dataclass
class ExportRequest:
    """What to export and how: formats, dtype, the verifier's name, architecture and depth, and the launch config to
    print."""

    dtype: str = "bfloat16"
    formats: tuple[str, ...] = ("sglang", "vllm")
    verifier_name: str = ""
    verifier_arch: str = "LlamaForCausalLM"
    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int = 4
    # the target's decoder layers (0: read from the target dir by `export_checkpoint`)
    target_layers: int = 0


def _write_format(out: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS_FILE, default_file_mode())  # safetensors creates it 0600; servers may run as others
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def export_checkpoint(ckpt: Checkpoint, target_dir: Path, out: Path, req: ExportRequest,
                      final_out: Path | None = None) -> dict[str, Any]:
    """Write `out`/<format> for each requested format that serves the checkpoint's family, and the checkpoint's
    drafter_config.json; validate them against it and the target, write validation.json and commands.txt.

    `final_out` is where `out` will live after an atomic rename (used in the commands and validation.json).
    Raises StageError listing every validator problem. Returns a summary dict.
    """
    dc = ckpt.drafter_config
    algo = dc["algorithm"]
    family = family_named(algo)
    dtype = DTYPES[req.dtype]
    shapes = shapes_from_drafter_config(dc)
    final_out = final_out or out
    if not req.target_layers:
        req = dataclasses.replace(req, target_layers=int(target_facts(target_dir)["num_layers"]))
    num_steps, topk, num_draft_tokens = family.launch_point(dc, req.num_steps, req.topk, req.num_draft_tokens)
    req = dataclasses.replace(req, num_steps=num_steps, topk=topk, num_draft_tokens=num_draft_tokens)
    formats = [f for f in req.formats if f in family.formats]
    if not formats:
        raise StageError(f"{algo} drafters are served by {', '.join(family.formats)}, none of export.formats "
                         f"{list(req.formats)}")
    if len(formats) < len(req.formats):
        log.warning("%s drafters are served by %s only; not writing %s", algo, ", ".join(family.formats),
                    ", ".join(f for f in req.formats if f not in formats))
    for fmt in formats:
        tensors = export_state_dict(family, ckpt.state, ckpt.d2t, ckpt.t2d, shapes, fmt, dtype)
        _write_format(out / fmt, family.export_config(fmt, dc, req), tensors)
        family.write_extras(out / fmt, fmt, ckpt.d2t, shapes)
    atomic_write_json(out / DRAFTER_CONFIG_FILE, dc)
    report = validate_export(out, target_dir, expect_dtype=req.dtype).moved(out, final_out)
    atomic_write_json(out / "validation.json", report.to_json())
    if not report.ok:
        raise StageError("the exported drafter failed validation:\n  " + "\n  ".join(report.problems))
    commands: list[str] = []
    if "sglang" in formats:
        commands += ["# SGLang", sglang_command(req.verifier_name, final_out / "sglang", family, req.num_steps,
                                                req.topk, req.num_draft_tokens, req.dtype)]
    if "vllm" in formats:
        commands += ["", "# vLLM"] if commands else ["# vLLM"]
        commands.append(vllm_command(req.verifier_name, final_out / "vllm", family, req.num_steps, req.dtype))
    commands += [f"# {ENGINE[f]} does not serve {algo} drafters" for f in req.formats if f not in formats]
    atomic_write_text(out / "commands.txt", "\n".join(commands) + "\n")
    return {"checkpoint": str(ckpt.path), "algorithm": algo, "formats": formats, "commands": commands,
            "validation": report.to_json()}
