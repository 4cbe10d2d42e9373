"""Training checkpoints `checkpoints/epoch_E_step_S/`, written atomically, with LATEST/BEST pointers.

Each checkpoint's state.json records which checkpoint is BEST as of its step. The pointers and the pruning follow
from that one atomically written record, so a resume after a kill at any point of their publication redoes them
(`commit_checkpoint`)."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from ..models.build import Drafter, load_drafter_weights, save_drafter
from ..utils.atomic import atomic_dir, atomic_rmtree, atomic_write_text, remove_stale_temps

NAME = re.compile(r"^epoch_(\d+)_step_(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    """Directory name of the checkpoint after optimizer step `step` (in epoch `epoch`)."""
    return f"epoch_{epoch}_step_{step}"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, name: str, drafter: Drafter, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], log_windows: list[dict[str, Any]], keep: int) -> Path:
    """Write one complete checkpoint atomically, then commit it."""
    final = root / "checkpoints" / name
    with atomic_dir(final) as tmp:
        save_drafter(drafter, tmp)
        d2t, t2d = drafter.vocab_maps()
        save_file({"d2t": d2t, "t2d": t2d}, str(tmp / "vocab.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        torch.save(log_windows, tmp / "log_windows.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    commit_checkpoint(root, name, state, keep)
    return final


def commit_checkpoint(root: Path, name: str, state: dict[str, Any], keep: int) -> None:
    """Point BEST at the best checkpoint recorded in `name`'s state (no BEST before any validation), then LATEST
    at `name`, then prune to the newest `keep`. BEST moves first, so LATEST never names a checkpoint whose BEST
    decision is not yet published."""
    best = state["best"]
    if best is None:
        (root / "BEST").unlink(missing_ok=True)
    else:
        atomic_write_text(root / "BEST", best["name"] + "\n")
    atomic_write_text(root / "LATEST", name + "\n")
    prune_checkpoints(root, keep)


def read_pointer(root: Path, pointer: str) -> Optional[str]:
    """The checkpoint name LATEST/BEST points to (None when absent)."""
    path = root / pointer
    return path.read_text().strip() if path.exists() else None


def resolve_checkpoint(root: Path, spec: Optional[str]) -> Optional[Path]:
    """`LATEST`, `BEST` or a checkpoint name -> its directory; None when nothing to resume from."""
    if spec is None:
        return None
    name = read_pointer(root, spec) if spec in ("LATEST", "BEST") else spec
    if name is None:
        return None
    path = root / "checkpoints" / name
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is incomplete")
    return path


def load_checkpoint(path: Path, drafter: Drafter, optimizer: torch.optim.Optimizer, scheduler: Any
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore weights, optimizer, scheduler and RNG states; returns state.json and the log windows of the ranks."""
    state = json.loads((path / "state.json").read_text())
    if "best" not in state:
        raise ValueError(f"{path} was written by an older eaglepipe (its state.json records no BEST decision): "
                         "set train.resume=null or delete its work dir")
    load_drafter_weights(drafter, path / "model.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state, torch.load(path / "log_windows.pt", weights_only=False)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, never the one BEST points to."""
    ckpts = sorted((p for p in (root / "checkpoints").iterdir() if NAME.match(p.name)),
                   key=lambda p: int(NAME.match(p.name).group(2)))
    protect = {read_pointer(root, "BEST"), read_pointer(root, "LATEST")}
    for p in ckpts[:-keep] if keep > 0 else ckpts:
        if p.name not in protect:
            atomic_rmtree(p)


def publish(work: Path, out: Path) -> None:
    """Copy the finished run to the declared output dir: the complete checkpoints (hardlinked when possible),
    BEST (= LATEST when no validation ran), then LATEST. Temp files of a publication killed earlier are removed."""
    remove_stale_temps(out)
    dest = out / "checkpoints"
    if dest.exists():
        shutil.rmtree(dest)
    tmp = out / ".checkpoints.tmp"
    tmp.mkdir()
    for ckpt in (work / "checkpoints").iterdir():
        if NAME.match(ckpt.name):
            shutil.copytree(ckpt, tmp / ckpt.name, copy_function=_link_or_copy)
    os.replace(tmp, dest)
    latest = read_pointer(work, "LATEST")
    atomic_write_text(out / "BEST", f"{read_pointer(work, 'BEST') or latest}\n")
    atomic_write_text(out / "LATEST", f"{latest}\n")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
