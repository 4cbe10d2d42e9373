"""Loading an SGLang-format drafter (what users deploy, ours or another trainer's) into the native drafter modules."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..export.layout import SGLANG_EAGLE1_ARCH, SGLANG_EAGLE3_ARCH, TOKEN_MAP_FILE, WEIGHTS_FILE
from ..export.served import served_config, served_name
from ..export.weights import t2d_from_d2t
from ..models.build import Drafter, load_drafter_state
from ..models.config import DrafterConfig
from ..models.eagle1 import Eagle1Drafter
from ..models.eagle3 import Eagle3Drafter
from ..target.info import resolve_model_dir


@dataclass
class LoadedDrafter:
    """A drafter in eval mode plus the ids it may propose (None = its whole vocabulary)."""

    model: Drafter
    config: DrafterConfig
    hot_ids: torch.Tensor | None


def sglang_dir(path: str | Path) -> Path:
    """The SGLang format dir: `path` itself, or `path`/sglang for a whole export dir."""
    path = Path(path)
    return path if (path / "config.json").exists() else path / "sglang"


def drafter_config_from_sglang(cfg: dict, target_layers: int) -> DrafterConfig:
    """The DrafterConfig of the drafter SGLang builds from an SGLang-format config.json (ours or another
    trainer's: RoPE from `rope_parameters`, the default aux layers when none are named)."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in (SGLANG_EAGLE3_ARCH, SGLANG_EAGLE1_ARCH):
        raise ValueError(f"{arch!r} is not an SGLang EAGLE drafter architecture")
    if cfg.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"num_hidden_layers is {cfg['num_hidden_layers']}: an EAGLE drafter has one decoder layer")
    return DrafterConfig(**served_config(cfg, "sglang", target_layers))


def _target_tensor(model_dir: Path, names: tuple[str, ...]) -> torch.Tensor:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    for name in names:
        for file in files:
            with safe_open(str(model_dir / file), framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
    raise KeyError(f"{model_dir} has none of {names}")


def _cast_keeping_rope_fp32(model: Drafter, device: torch.device, dtype: torch.dtype) -> Drafter:
    """`model.to(device, dtype)` except the RoPE inverse frequencies, which stay fp32 (as in training, where the
    drafter is fp32 under autocast, and in HF `from_pretrained`); bf16 ones would skew every rotation angle.
    Integer buffers (d2t/t2d) keep their dtypes anyway."""
    freqs = {name: buf for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model = model.to(device=device, dtype=dtype)
    for name, buf in freqs.items():
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, buf.to(device=device, dtype=torch.float32))
    return model


def _drafter_state(d: Path, dc: DrafterConfig, target_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The export's tensors under our names, as SGLang loads them: a shipped embedding the same shape as the
    target's is dropped (SGLang shares the target's when hidden sizes match), a missing t2d follows from d2t."""
    raw = load_file(str(d / WEIGHTS_FILE))
    state = {served_name(k, "sglang", dc.is_eagle3): v for k, v in raw.items()}
    embed = state.get("embed_tokens.weight")
    if embed is not None and dc.hidden_size == dc.target_hidden_size:
        if tuple(embed.shape) != tuple(target_embed.shape):
            raise ValueError(f"{d}: the shipped embed_tokens has shape {tuple(embed.shape)}, the target's "
                             f"{tuple(target_embed.shape)}")
        del state["embed_tokens.weight"]
    if dc.is_eagle3 and "t2d" not in state and "d2t" in state:
        state["t2d"] = t2d_from_d2t(state["d2t"], dc.vocab_size)
    return state


def load_exported_drafter(export_sglang_dir: str | Path, target_dir: str | Path, device: str | torch.device,
                          dtype: torch.dtype, target_embed: torch.Tensor | None = None,
                          target_lm_head: torch.Tensor | None = None) -> LoadedDrafter:
    """config.json + model.safetensors of an SGLang-format drafter -> drafter module on `device` in `dtype`.

    Any SGLang-format EAGLE drafter loads: ours, or another trainer's with `layers.0.*`/`model.*` weight names
    and a shipped embedding. The embedding (and EAGLE-1's lm_head) come from the target, as in SGLang; pass
    `target_embed`/`target_lm_head` to reuse tensors already in memory. An EAGLE-1/2 export's
    speculative_token_map.pt restricts its proposals to those ids, as SGLang's --speculative-token-map does.
    """
    d = sglang_dir(export_sglang_dir)
    cfg_json = json.loads((d / "config.json").read_text())
    model_dir = resolve_model_dir(target_dir)
    target_cfg = json.loads((model_dir / "config.json").read_text())
    layers = int(target_cfg.get("num_hidden_layers") or target_cfg["text_config"]["num_hidden_layers"])
    dc = drafter_config_from_sglang(cfg_json, layers)
    if target_embed is None:
        target_embed = _target_tensor(model_dir, ("model.embed_tokens.weight", "embed_tokens.weight"))
    if dc.is_eagle3:
        model: Drafter = Eagle3Drafter(dc)
    else:
        if target_lm_head is None:
            target_lm_head = _target_tensor(model_dir, ("lm_head.weight", "model.embed_tokens.weight"))
        model = Eagle1Drafter(dc, target_lm_head.float())
    with torch.no_grad():
        model.embed_tokens.weight.copy_(target_embed.to(model.embed_tokens.weight.dtype))
    load_drafter_state(model, _drafter_state(d, dc, target_embed), d / WEIGHTS_FILE)
    model = _cast_keeping_rope_fp32(model, torch.device(device), dtype).eval().requires_grad_(False)
    hot = None
    if (d / TOKEN_MAP_FILE).exists() and not dc.is_eagle3:
        hot = torch.as_tensor(torch.load(d / TOKEN_MAP_FILE, weights_only=True), dtype=torch.long, device=device)
    return LoadedDrafter(model, dc, hot)
