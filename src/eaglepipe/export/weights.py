"""Turning a drafter state dict into the tensors SGLang and vLLM load (names, dtypes, vocab maps)."""
from __future__ import annotations

import torch

from ..families.base import DrafterFamily
from ..utils.cli import StageError
from .layout import Shapes

# checkpoint tensors that are deliberately left out of an export
_DROPPABLE = ("embed_tokens.weight", "lm_head.weight")


def export_state_dict(family: DrafterFamily, state: dict[str, torch.Tensor], d2t: torch.Tensor | None,
                      t2d: torch.Tensor | None, shapes: Shapes, fmt: str,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The `family`'s tensors for format `fmt` (`sglang` or `vllm`), cast to `dtype` (d2t int64, t2d bool).

    Fails on a checkpoint tensor the format has no place for, instead of dropping it silently.
    """
    expected = family.export_tensors(shapes, fmt)
    renamed = {family.export_name(k, fmt): v for k, v in state.items()}
    unknown = sorted(k for k in renamed if k not in expected and k not in _DROPPABLE)
    if unknown:
        raise StageError(f"checkpoint tensors {unknown} have no place in the {fmt} {shapes.algorithm} format")
    out: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in expected.items():
        if kind == "float":
            if name not in renamed:
                raise StageError(f"checkpoint lacks {name}, which the {fmt} format needs")
            out[name] = renamed[name].detach().to(dtype).contiguous()
        elif name == "d2t":
            if d2t is None:
                raise StageError("checkpoint has no d2t map (neither in model.safetensors nor vocab.safetensors)")
            out[name] = d2t.to(torch.int64).contiguous()
        else:
            out[name] = (t2d if t2d is not None else t2d_from_d2t(d2t, shapes.vocab_size)).to(torch.bool).contiguous()
        if tuple(out[name].shape) != tuple(shape):
            raise StageError(f"checkpoint tensor {name} has shape {list(out[name].shape)}, expected {list(shape)}")
    return out


def t2d_from_d2t(d2t: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """The bool map over the target vocab that marks the draft vocabulary's target ids."""
    if d2t is None:
        raise StageError("checkpoint has neither t2d nor d2t")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[torch.arange(d2t.numel()) + d2t.long()] = True
    return t2d
