"""The drafter a benchmark measures: the pipeline's own export, or any SGLang-format EAGLE drafter directory (ours,
NeMo AutoModel's, SpecForge's, a published one), validated as SGLang would load it before any work starts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..export.layout import CONFIG_FILE
from ..export.validate import validate_export
from ..speculative.drafter_loader import sglang_dir
from ..utils.cli import StageError

log = logging.getLogger(__name__)


@dataclass
class MeasuredDrafter:
    """The SGLang-format dir to measure, where it came from, and what the validator warned about."""

    path: Path
    source: str
    warnings: list[str]

    def to_json(self) -> dict:
        return {"path": str(self.path), "source": self.source, "warnings": self.warnings}


def checked_drafter(path: str | Path, target: str | Path, source: str) -> MeasuredDrafter:
    """Resolve `path` (a drafter dir, or an export dir holding sglang/) and validate it against the target.

    `source` names where the path came from (e.g. `bench.drafter`) in messages. The check is the validator's
    external level: SGLang 0.5.23's view, compared with the training checkpoint's drafter config when the
    export holds one and with the target otherwise. Raises StageError listing every problem.
    """
    d = sglang_dir(path).resolve()
    if not (d / CONFIG_FILE).exists():
        raise StageError(f"{source} {path}: {d / CONFIG_FILE} not found (expected an SGLang-format drafter dir "
                         "or an export dir holding sglang/)")
    report = validate_export(d, target, strict=False)
    if not report.ok:
        raise StageError(f"{source} {d} is not a servable drafter:\n  " + "\n  ".join(report.problems))
    for w in report.warnings:
        log.warning("drafter %s: %s", d, w)
    return MeasuredDrafter(d, source, report.warnings)
