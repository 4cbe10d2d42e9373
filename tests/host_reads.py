"""A dispatch spy for the ops that read a device value on the host (a GPU sync, and a CUDA graph capture error)."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

READS_ON_HOST = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2"}


class HostReads(TorchDispatchMode):
    """Records, in `seen`, every dispatched op of READS_ON_HOST (CPU tensors dispatch them as a GPU's would)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in READS_ON_HOST:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
