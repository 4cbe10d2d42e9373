"""Starting, health-checking and stopping an inference server subprocess (ours or SGLang)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from ..config.schema import EngineOptions
from ..utils.cli import StageError
from ..utils.engine_flags import engine_flags

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def native_command(model_dir: str | Path, port: int, *, max_batch_size: int, max_model_len: int,
                   device: str = "auto", host: str = LOCALHOST, prefix_reuse: bool = True,
                   engine_options: EngineOptions | None = None) -> list[str]:
    """`python -m eaglepipe.server.serve ...` for our own server."""
    return [sys.executable, "-m", "eaglepipe.server.serve", "--model", str(model_dir), "--host", host,
            "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-model-len", str(max_model_len),
            "--device", device, *([] if prefix_reuse else ["--no-prefix-reuse"]),
            *engine_flags(engine_options or EngineOptions())]


def sglang_command(model_dir: str | Path, cfg: Any, host: str = LOCALHOST) -> list[str]:
    """The exact `python -m sglang.launch_server ...` line for a SglangLaunchCfg."""
    return [cfg.python, "-m", "sglang.launch_server", "--model-path", str(model_dir),
            "--dp-size", str(cfg.dp_size), "--tp-size", str(cfg.tp_size), "--port", str(cfg.port),
            "--mem-fraction-static", str(cfg.mem_fraction_static), "--host", host, *cfg.extra_args]


def format_command(cmd: Sequence[str]) -> str:
    """A shell-quoted command line, for logs."""
    return shlex.join([str(c) for c in cmd])


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies (Linux), so a SIGKILLed stage leaves no server behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A server subprocess in its own process group, its output in `log_path`."""

    def __init__(self, cmd: Sequence[str], base_url: str, log_path: str | Path, env: dict[str, str] | None = None):
        self.cmd = [str(c) for c in cmd]
        self.base_url = base_url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Launch the command (output appended to the log file)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        with open(self.log_path, "ab") as log:
            log.write(f"$ {format_command(self.cmd)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            except OSError as e:
                raise StageError(f"cannot start the server `{format_command(self.cmd)}`: {e}") from None

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Block until GET /health answers 200; StageError with the log tail if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise StageError(f"server exited with code {code} before it became healthy; "
                                 f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(poll_s)
        self.stop()
        raise StageError(f"server not healthy after {timeout_s:.0f}s at {self.base_url}/health; "
                         f"last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `grace_s`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers the leader left behind

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
