"""Multi-process helpers: FSDP2 sharding of a target too large for one GPU, and the torchrun re-exec."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from torch import nn

from ..models.target import decoder_layers


def shard_target(model: nn.Module) -> None:
    """FSDP2 (`fully_shard`) each decoder layer; its parameters are gathered only for its own (no-grad) forward,
    so each rank holds 1/world of the layers. Embeddings, final norm and lm_head stay whole on every rank:
    the training code calls them directly (the lm_head in chunked label logits), outside any FSDP forward."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)


def torchrun_argv(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """The command that re-runs `python -m module args` under torchrun with `nproc` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def needs_torchrun(nproc: int) -> bool:
    """True when more than one process is configured and we are not already under torchrun."""
    return nproc > 1 and "LOCAL_RANK" not in os.environ
