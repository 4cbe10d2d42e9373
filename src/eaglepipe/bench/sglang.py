"""SGLang launch lines for the sweep (one server per point, restarted because its counters are cumulative)."""
from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path
from typing import Iterator

from ..config import BenchCfg, SweepPoint
from ..export.commands import sglang_command
from ..export.layout import CONFIG_FILE
from ..families.base import DrafterFamily
from ..families.registry import export_family, families
from ..utils.cli import StageError


def drafter_family(draft_dir: Path) -> DrafterFamily:
    """The family SGLang serves the exported drafter in `draft_dir` as, read from its config.json `architectures`."""
    path = draft_dir / CONFIG_FILE
    if not path.exists():
        raise StageError(f"{path} not found: is {draft_dir.parent} the output of the export stage?")
    cfg = json.loads(path.read_text())
    family = export_family(cfg)
    if family is None or family.served_format(cfg, draft_dir.name) != "sglang":
        known = sorted(a for f in families() for a, fmt in f.architectures.items() if fmt == "sglang")
        raise StageError(f"{path}: architectures {cfg.get('architectures')} name no drafter SGLang serves "
                         f"({' or '.join(known)})")
    return family


def serve_command(target: str, draft_dir: Path, point: SweepPoint | None, dtype: str) -> list[str]:
    """`python -m sglang.launch_server` serving `target` with `point`'s flags (no speculation for None)."""
    if point is None:
        return ["python", "-m", "sglang.launch_server", "--model-path", target, "--dtype", dtype]
    line = sglang_command(target, draft_dir, drafter_family(draft_dir), point.num_steps, point.topk,
                          point.num_draft_tokens, dtype)
    return shlex.split(line)


def launch_command(target: str, draft_dir: Path, point: SweepPoint | None, dtype: str, cfg: BenchCfg) -> list[str]:
    """The full launch line the sweep runs: serve_command plus the bench.sglang settings."""
    s = cfg.sglang
    cmd = serve_command(target, draft_dir, point, dtype)
    return [s.python, *cmd[1:], "--host", "127.0.0.1", "--port", str(s.port), "--tp-size", str(s.tp_size),
            "--dp-size", str(s.dp_size), "--mem-fraction-static", str(s.mem_fraction_static),
            "--cuda-graph-max-bs", str(cfg.batch_size), "--max-running-requests", str(cfg.batch_size),
            *s.extra_args]


def sweep_commands(target: str, draft_dir: Path, dtype: str, cfg: BenchCfg) -> list[str]:
    """Every launch line of the sweep (the baseline first), shell-quoted: what dry_run prints."""
    points: list[SweepPoint | None] = [None, *cfg.sweep]
    return [shlex.join(launch_command(target, draft_dir, p, dtype, cfg)) for p in points]


class SglangLauncher:
    """`launcher(point)` starts SGLang for the point, waits for /health and yields its URL; stops it after."""

    def __init__(self, target: str, draft_dir: Path, dtype: str, cfg: BenchCfg, log_dir: Path):
        self.target, self.draft_dir, self.dtype, self.cfg, self.log_dir = target, draft_dir, dtype, cfg, log_dir

    @contextlib.contextmanager
    def __call__(self, point: SweepPoint | None) -> Iterator[str]:
        from ..regen.launch import ServerProcess

        url = f"http://127.0.0.1:{self.cfg.sglang.port}"
        name = "baseline" if point is None else point.name
        cmd = launch_command(self.target, self.draft_dir, point, self.dtype, self.cfg)
        with ServerProcess(cmd, url, self.log_dir / f"sglang_{name}.log") as server:
            server.wait_healthy(self.cfg.sglang.startup_timeout_s)
            yield url
