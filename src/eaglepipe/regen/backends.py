"""The endpoint regeneration talks to: our server, SGLang, an existing URL, or none."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..utils.cli import StageError
from .launch import LOCALHOST, ServerProcess, format_command, free_port, native_command, sglang_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """Where requests go, and the server process behind it when we launched one."""

    url: str
    command: str | None = None
    server: ServerProcess | None = None


def launch_command(regen: Any, model_dir: Path, device: str, port: int) -> list[str]:
    """The server command line for the `native` or `sglang` backend."""
    if regen.backend == "native":
        return native_command(model_dir, port, max_batch_size=regen.max_batch_size,
                              max_model_len=regen.max_model_len, device=device, prefix_reuse=regen.prefix_reuse,
                              engine_options=regen.engine_options)
    if regen.backend == "sglang":
        return sglang_command(model_dir, regen.sglang)
    raise ValueError(f"backend {regen.backend!r} launches no server")


@contextlib.contextmanager
def open_endpoint(regen: Any, model_dir: Path, device: str, log_dir: Path) -> Iterator[Endpoint | None]:
    """Start (and finally stop) the server for `native`/`sglang`; yield the URL for `url`; None for `none`."""
    if regen.backend == "none":
        yield None
        return
    if regen.backend == "url":
        yield Endpoint(url=regen.url.rstrip("/"))
        return
    attempts = 3 if regen.backend == "native" else 1
    timeout = regen.startup_timeout_s if regen.backend == "native" else regen.sglang.startup_timeout_s
    for attempt in range(attempts):
        port = free_port() if regen.backend == "native" else regen.sglang.port
        cmd = launch_command(regen, model_dir, device, port)
        log.info("starting %s server: %s", regen.backend, format_command(cmd))
        server = ServerProcess(cmd, f"http://{LOCALHOST}:{port}", log_dir / f"{regen.backend}-server.log")
        server.start()
        try:
            server.wait_healthy(timeout)
        except StageError:
            server.stop()
            if attempt + 1 < attempts and "address already in use" in server.log_tail().lower():
                log.warning("port %d was taken meanwhile; retrying on another port", port)
                continue
            raise
        break
    log.info("%s server healthy at %s (log: %s)", regen.backend, server.base_url, server.log_path)
    try:
        yield Endpoint(url=server.base_url, command=format_command(cmd), server=server)
    finally:
        server.stop()
        log.info("%s server stopped", regen.backend)
