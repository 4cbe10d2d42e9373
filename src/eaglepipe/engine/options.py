"""`EngineOptions` (the engine's fast paths, a config/schema.py dataclass) resolved for the device they run on."""
from __future__ import annotations

import torch

from ..config.schema import EngineOptions


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_options(options: EngineOptions | None, device: torch.device) -> EngineOptions:
    """The fast paths that run on `device` (None: the defaults, every path where it runs), every null decided."""
    cuda = device.type == "cuda"
    return (options or EngineOptions()).resolved(cuda, cuda and triton_available())
