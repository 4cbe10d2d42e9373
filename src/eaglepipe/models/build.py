"""Building drafters from a target, and saving/loading their weights (our checkpoints and SGLang exports)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .config import DrafterConfig
from .eagle1 import Eagle1Drafter
from .eagle3 import Eagle3Drafter

Drafter = Union[Eagle3Drafter, Eagle1Drafter]


def new_drafter(cfg: DrafterConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                d2t: Optional[torch.Tensor] = None, t2d: Optional[torch.Tensor] = None,
                lm_head_init: str = "target", seed: int = 0) -> Drafter:
    """A fresh drafter: random layer weights (seeded), the target's embedding (frozen) and, for EAGLE-3,
    lm_head rows taken from the target's lm_head at the draft vocab's target ids (or random)."""
    torch.manual_seed(seed)
    if cfg.is_eagle3:
        if d2t is None or t2d is None:
            raise ValueError("an EAGLE-3 drafter needs the d2t/t2d vocab map")
        model: Drafter = Eagle3Drafter(cfg)
    else:
        model = Eagle1Drafter(cfg, lm_head_weight.float())
    _init_weights(model, seed)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(embed_weight)
        if cfg.is_eagle3:
            model.d2t.copy_(d2t)
            model.t2d.copy_(t2d)
            if lm_head_init == "target":
                target_ids = torch.arange(cfg.draft_vocab_size) + d2t.cpu()
                model.lm_head.weight.copy_(lm_head_weight[target_ids.to(lm_head_weight.device)])
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
    """Load our checkpoint or an SGLang-format export into `model`; missing embed_tokens keeps the target's.

    Accepts `midlayer.*` or `layers.0.*` names for EAGLE-3 (SGLang loads both). Shape mismatches and
    unknown names are errors, not silently skipped.
    """
    load_drafter_state(model, load_file(str(weights_path)), weights_path)


def canonical_state(state: dict[str, torch.Tensor], eagle3: bool) -> dict[str, torch.Tensor]:
    """Drafter weight names as our modules use them: no `model.` prefix, EAGLE-3's `layers.0.` as `midlayer.`."""
    if eagle3:
        state = {k.replace("layers.0.", "midlayer.", 1) if k.startswith("layers.0.") else k: v
                 for k, v in state.items()}
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


def load_drafter_state(model: Drafter, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_drafter_weights` for a state dict already in memory (`source` names it in errors)."""
    state = canonical_state(state, model.config.is_eagle3)
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


def read_sglang_config(export_dir: Path) -> dict:
    """config.json of an SGLang EAGLE-3 export, checked to be a one-layer LlamaForCausalLMEagle3."""
    cfg = json.loads((export_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLMEagle3":
        raise ValueError(f"{export_dir}: init_from supports LlamaForCausalLMEagle3 exports, got {arch}")
    return cfg
