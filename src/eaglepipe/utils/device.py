"""Device and dtype choice shared by all stages."""
from __future__ import annotations

import torch


def pick_device(pref: str = "auto") -> torch.device:
    """`auto` gives cuda when a GPU is visible, else cpu; `cuda` without a GPU is an error."""
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was requested but no CUDA GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (exactness tests rely on fp32 there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
