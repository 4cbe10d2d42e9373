"""Loading an exported SGLang-format drafter (what users deploy) into the native drafter modules."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..export.layout import SGLANG_EAGLE1_ARCH, SGLANG_EAGLE3_ARCH, TOKEN_MAP_FILE, WEIGHTS_FILE
from ..models.build import Drafter, load_drafter_weights
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
    """Rebuild a DrafterConfig from an exported SGLang config.json."""
    arch = (cfg.get("architectures") or ["?"])[0]
    common = dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                  num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
                  head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                  rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg.get("rope_theta", 10000.0),
                  rope_scaling=cfg.get("rope_scaling"), max_position_embeddings=cfg["max_position_embeddings"],
                  vocab_size=cfg["vocab_size"], hidden_act=cfg.get("hidden_act", "silu"))
    if arch == SGLANG_EAGLE3_ARCH:
        nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = [i + 1 for i in nested] if nested is not None else cfg.get("eagle_aux_hidden_state_layer_ids")
        if aux is None:  # SGLang's default when both keys are omitted
            aux = [2, target_layers // 2, target_layers - 3]
        fc_norm = bool(cfg.get("fc_norm", False))
        return DrafterConfig(algorithm="eagle3.1" if fc_norm else "eagle3", draft_vocab_size=cfg["draft_vocab_size"],
                             target_hidden_size=cfg.get("target_hidden_size") or cfg["hidden_size"],
                             aux_layers=list(aux), fc_norm=fc_norm, norm_output=bool(cfg.get("norm_output", False)),
                             **common)
    if arch == SGLANG_EAGLE1_ARCH:
        return DrafterConfig(algorithm="eagle1", draft_vocab_size=cfg["vocab_size"],
                             target_hidden_size=cfg["hidden_size"], aux_layers=[target_layers], **common)
    raise ValueError(f"{arch!r} is not an SGLang EAGLE drafter architecture")


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


def load_exported_drafter(export_sglang_dir: str | Path, target_dir: str | Path, device: str | torch.device,
                          dtype: torch.dtype, target_embed: torch.Tensor | None = None,
                          target_lm_head: torch.Tensor | None = None) -> LoadedDrafter:
    """config.json + model.safetensors of an SGLang export -> drafter module on `device` in `dtype`.

    The embedding (and EAGLE-1's lm_head) come from the target when the export omits them, as in SGLang;
    pass `target_embed`/`target_lm_head` to reuse tensors already in memory. An EAGLE-1/2 export's
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
    load_drafter_weights(model, d / WEIGHTS_FILE)
    model = _cast_keeping_rope_fp32(model, torch.device(device), dtype).eval().requires_grad_(False)
    hot = None
    if (d / TOKEN_MAP_FILE).exists() and not dc.is_eagle3:
        hot = torch.as_tensor(torch.load(d / TOKEN_MAP_FILE, weights_only=True), dtype=torch.long, device=device)
    return LoadedDrafter(model, dc, hot)
