"""The drafter a benchmark measures: the pipeline's own export, or any exported drafter directory (ours, NeMo
AutoModel's, SpecForge's, a published one), validated as its engine would load it before any work starts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import SweepPoint
from ..export.layout import CONFIG_FILE
from ..export.validate import target_facts, validate_export
from ..families.base import DrafterFamily
from ..models.config import DrafterConfig
from ..speculative.drafter_loader import drafter_dir, format_dir_config
from ..utils.cli import StageError

log = logging.getLogger(__name__)


@dataclass
class MeasuredDrafter:
    """The format dir to measure, where it came from, what the validator warned about, its family and the drafter
    its engine builds from it."""

    path: Path
    source: str
    warnings: list[str]
    family: DrafterFamily
    config: DrafterConfig

    def to_json(self) -> dict:
        return {"path": str(self.path), "source": self.source, "warnings": self.warnings}


def checked_drafter(path: str | Path, target: str | Path, source: str) -> MeasuredDrafter:
    """Resolve `path` (a drafter dir, or an export dir: its first format, SGLang's before vLLM's, as the native
    engine loads it) and validate it against the target.

    `source` names where the path came from (e.g. `bench.drafter`) in messages. The check is the validator's
    external level: the engine's view (SGLang 0.5.23's for an SGLang dir), compared with the training
    checkpoint's drafter config when the export holds one and with the target otherwise. Raises StageError listing
    every problem.
    """
    d = drafter_dir(path).resolve()
    if not (d / CONFIG_FILE).exists():
        raise StageError(f"{source} {path}: {d / CONFIG_FILE} not found (expected a drafter dir or an export dir "
                         "holding sglang/ or vllm/)")
    report = validate_export(d, target, strict=False)
    if not report.ok:
        raise StageError(f"{source} {d} is not a servable drafter:\n  " + "\n  ".join(report.problems))
    for w in report.warnings:
        log.warning("drafter %s: %s", d, w)
    layers = int(target_facts(target)["num_layers"])
    family, config = format_dir_config(d, layers)
    return MeasuredDrafter(d, source, report.warnings, family, config)


def check_sweep(drafter: MeasuredDrafter, sweep: Sequence[SweepPoint]) -> None:
    """Raise StageError naming every sweep point the drafter cannot draft (a tree for a drafter that drafts a chain
    in one forward, a chain longer than a DFlash block), before any work."""
    problems = []
    for p in sweep:
        try:
            drafter.family.check_round(drafter.config, p.num_steps, p.topk, p.num_draft_tokens)
        except ValueError as e:
            problems.append(f"{p.name}: {e}")
    if problems:
        raise StageError(f"bench.sweep holds points the {drafter.config.algorithm} drafter {drafter.path} cannot "
                         "draft:\n  " + "\n  ".join(problems))
