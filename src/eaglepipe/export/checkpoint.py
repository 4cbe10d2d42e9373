"""Reading a training checkpoint (train/checkpoints/<name>/) for export."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..utils.cli import StageError

REQUIRED_DRAFTER_FIELDS = ("algorithm", "hidden_size", "intermediate_size", "num_attention_heads",
                           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                           "max_position_embeddings", "vocab_size")


@dataclass
class Checkpoint:
    """A drafter checkpoint: its DrafterConfig dict, weights, and the draft-vocab maps."""

    path: Path
    drafter_config: dict[str, Any]
    state: dict[str, torch.Tensor]
    d2t: torch.Tensor | None
    t2d: torch.Tensor | None


def resolve_checkpoint(train_dir: str | Path, which: str) -> Path:
    """`which` = LATEST | BEST (pointer files in train/) or a checkpoint directory name."""
    train_dir = Path(train_dir)
    if which in ("LATEST", "BEST"):
        pointer = train_dir / which
        if not pointer.exists():
            raise StageError(f"{pointer} does not exist: has the train stage finished?")
        name = pointer.read_text().strip()
        if not name:
            raise StageError(f"{pointer} is empty: no checkpoint was recorded as {which}")
    else:
        name = which
    path = train_dir / "checkpoints" / name
    if not (path / "model.safetensors").exists():
        raise StageError(f"checkpoint {path} has no model.safetensors")
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load drafter_config.json, model.safetensors and (if present) vocab.safetensors of one checkpoint."""
    path = Path(path)
    cfg_path = path / "drafter_config.json"
    if not cfg_path.exists():
        raise StageError(f"checkpoint {path} has no drafter_config.json")
    dc = json.loads(cfg_path.read_text())
    missing = [k for k in REQUIRED_DRAFTER_FIELDS if k not in dc]
    if missing:
        raise StageError(f"{cfg_path} lacks the fields {missing}")
    state = load_file(str(path / "model.safetensors"))
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    vocab_path = path / "vocab.safetensors"
    if vocab_path.exists():
        vocab = load_file(str(vocab_path))
        d2t, t2d = vocab.get("d2t", d2t), vocab.get("t2d", t2d)
    return Checkpoint(path, dc, state, d2t, t2d)
