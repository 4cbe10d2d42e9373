"""Metric history (resumable JSONL in the work dir), the sums of the steps since its last row, and its publication
as dvclive metrics/plots and a PNG."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


class History:
    """Append-only metric rows keyed by optimizer step; truncated to the resumed step on resume. Only the
    `writer` (the main rank) touches the file; the other ranks of a distributed run keep their rows in memory."""

    def __init__(self, path: Path, resume_step: int, writer: bool = True) -> None:
        self.path, self.writer = path, writer
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        self.rows = [r for r in _parse_rows(lines) if r["step"] <= resume_step]
        if writer:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict[str, Any]) -> None:
        """Record one row (`step`, `split` and metrics)."""
        self.rows.append(row)
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _parse_rows(lines: list[str]) -> list[dict[str, Any]]:
    """The rows of history.jsonl. A last line torn by a kill is dropped: every row is appended before the checkpoint
    of its step is written, so a torn row always lies beyond the checkpoint a run resumes from."""
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


class LogWindow:
    """Metric sums of the optimizer steps since the last history row. Each checkpoint saves it, so a run resumed
    between two rows averages the same steps into its next row as an uninterrupted run does."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.flops = 0.0

    def add(self, sums: dict[str, torch.Tensor], tokens: int, flops: float) -> None:
        """Accumulate one micro-batch's metric sums, real tokens and FLOPs."""
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.tokens += tokens
        self.flops += flops

    def state_dict(self) -> dict[str, Any]:
        """The sums on the CPU, for a checkpoint."""
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "tokens": self.tokens, "flops": self.flops}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore what `state_dict` saved, the sums on `device`."""
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.tokens, self.flops = state["tokens"], state["flops"]


def publish_metrics(rows: list[dict[str, Any]], out_dir: Path, ttt_steps: int) -> None:
    """Write out/dvclive (metrics.json, plots/metrics/**.tsv via dvclive) and a PNG of the curves."""
    dv = out_dir / "dvclive"
    try:
        from dvclive import Live
    except ImportError:  # dvclive is optional at runtime: keep a plain metrics.json
        Live = None
    if Live is not None:
        live = Live(str(dv), dvcyaml=None, save_dvc_exp=False)
        for step in sorted({r["step"] for r in rows}):
            live.step = step
            for r in (r for r in rows if r["step"] == step):
                for k, v in r.items():
                    if k not in ("step", "split") and isinstance(v, (int, float)):
                        live.log_metric(f"{r['split']}/{k}", v)
            live.make_summary()
        live.end()
    else:
        (dv / "plots").mkdir(parents=True, exist_ok=True)
        last = {}
        for r in rows:
            last.setdefault(r["split"], {}).update({k: v for k, v in r.items() if k != "split"})
        (dv / "metrics.json").write_text(json.dumps(last, indent=2))
    (dv / "plots").mkdir(parents=True, exist_ok=True)
    plot_curves(rows, dv / "plots" / "training_curves.png", ttt_steps)


def plot_curves(rows: list[dict[str, Any]], path: Path, ttt_steps: int) -> None:
    """Loss, per-step accuracy and both simulated taus against the optimizer step (skipped without matplotlib,
    which GPU images may lack: the metrics themselves are already written)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split, style in (("train", "-"), ("val", "o--")):
        sel = [r for r in rows if r["split"] == split]
        if not sel:
            continue
        steps = [r["step"] for r in sel]
        axes[0].plot(steps, [r["loss"] for r in sel], style, label=split)
        for k in range(ttt_steps):
            axes[1].plot(steps, [r[f"acc_{k}"] for r in sel], style, label=f"{split} step {k}")
        axes[2].plot(steps, [r["sim_tau"] for r in sel], style, label=f"{split} sim_tau")
        axes[2].plot(steps, [r.get("replay_tau", float("nan")) for r in sel], style, label=f"{split} replay_tau")
        axes[2].plot(steps, [r.get("replay_tau_first", float("nan")) for r in sel], style,
                     label=f"{split} replay_tau (first answers)")
    for ax, title in zip(axes, ("loss", "top-1 accuracy per TTT step", "simulated tau (per slot, replayed rounds)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
