"""PNG plots of a sweep (matplotlib, Agg backend): τ and speedup per config, per-position acceptance, T=0 vs T=1."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .metrics import PointSummary  # noqa: E402


def _bars(ax, rows: Sequence[PointSummary], attr: str, temps: Sequence[float]) -> None:
    """Grouped bars of `attr` per config, one bar per temperature."""
    configs = list(dict.fromkeys(r.config for r in rows if r.config != "baseline"))
    width = 0.8 / max(len(temps), 1)
    for j, t in enumerate(temps):
        vals = {r.config: getattr(r, attr) for r in rows if r.temperature == t}
        ys = [vals.get(c) or 0.0 for c in configs]
        xs = [i + (j - (len(temps) - 1) / 2) * width for i in range(len(configs))]
        bars = ax.bar(xs, ys, width, label=f"T={t:g}")
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "n/a" for y in ys], fontsize=7)
    ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right")


def plot_metric(rows: Sequence[PointSummary], attr: str, ylabel: str, title: str, path: Path,
                temps: Sequence[float], reference: float | None = None) -> None:
    """One bar chart of `attr` per config (grouped by temperature), with an optional reference line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, rows, attr, temps)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(temps) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance(rows: Sequence[PointSummary], path: Path) -> None:
    """Conditional acceptance rate per draft position, one line per config and temperature."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.accept_rate:
            ax.plot(range(1, len(r.accept_rate) + 1), r.accept_rate, marker="o",
                    label=f"{r.config} T={r.temperature:g}")
    ax.set_xlabel("draft position (depth)")
    ax.set_ylabel("acceptance rate (given earlier positions accepted)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per-position acceptance")
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "the backend reported no per-round acceptance", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: Sequence[PointSummary], out_dir: Path) -> list[Path]:
    """tau.png, speedup.png, acceptance.png, and temperature.png (τ at T=0 vs T=1) when both were measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    temps = sorted({r.temperature for r in rows})
    first = temps[:1]
    paths = [out_dir / "tau.png", out_dir / "speedup.png", out_dir / "acceptance.png"]
    plot_metric(rows, "tau", "τ (tokens per verification round)", f"Acceptance length τ (T={first[0]:g})",
                paths[0], first, reference=1.0)
    plot_metric(rows, "speedup", "speedup over baseline", f"Decode speedup (T={first[0]:g})", paths[1], first,
                reference=1.0)
    plot_acceptance(rows, paths[2])
    if 0.0 in temps and 1.0 in temps:
        paths.append(out_dir / "temperature.png")
        plot_metric(rows, "tau", "τ", "τ at temperature 0 vs 1", paths[3], [0.0, 1.0], reference=1.0)
    return paths
