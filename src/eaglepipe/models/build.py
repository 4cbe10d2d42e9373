"""Building drafters from a target, and saving/loading their weights (our checkpoints and SGLang exports)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..families.registry import family_of
from .config import DrafterConfig
from .drafter import DrafterModule

# any family's drafter module
Drafter = DrafterModule


def new_drafter(cfg: DrafterConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                d2t: Optional[torch.Tensor] = None, t2d: Optional[torch.Tensor] = None,
                lm_head_init: str = "target", seed: int = 0) -> Drafter:
    """A fresh drafter of `cfg`'s family: random layer weights (seeded), the target's embedding (frozen), and the
    family's vocab maps and output head (e.g. EAGLE-3's lm_head rows taken from the target's lm_head at the draft
    vocab's target ids, or random)."""
    family = family_of(cfg)
    torch.manual_seed(seed)
    model = family.new_module(cfg, lm_head_weight)
    _init_weights(model, seed)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(embed_weight)
        family.init_head(model, d2t, t2d, lm_head_weight, lm_head_init)
    return model


def _init_weights(model: Drafter, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".fc_norm." in name or name.startswith("fc_norm"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 2 and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def save_drafter(model: Drafter, out_dir: Path) -> None:
    """model.safetensors (SGLang names, d2t/t2d included for EAGLE-3) and drafter_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "drafter_config.json").write_text(model.config.to_json())


def load_drafter_weights(model: Drafter, weights_path: Path) -> None:
    """Load our checkpoint or an export's weights into `model`; missing embed_tokens keeps the target's.

    Names are read as the family's module spells them (e.g. EAGLE-3's `layers.0.*` as `midlayer.*`, as SGLang
    loads both). Shape mismatches and unknown names are errors, not silently skipped.
    """
    load_drafter_state(model, load_file(str(weights_path)), weights_path)


def load_drafter_state(model: Drafter, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_drafter_weights` for a state dict already in memory (`source` names it in errors)."""
    state = family_of(model.config).canonical_state(state)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{source}: unknown drafter weights {unknown[:8]}")
    missing = sorted(set(own) - set(state) - {"embed_tokens.weight"})
    if missing:
        raise ValueError(f"{source}: missing drafter weights {missing[:8]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the drafter expects "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
