"""Loading HF safetensors weights of a Llama-family decoder into fused per-layer tensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .shapes import ModelShapes


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused into single matrices."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelWeights:
    """All weights of the decoder: embedding, layers, final norm and LM head."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


class _TensorSource:
    """Reads tensors by name from one or several safetensors files (a sharded checkpoint has an index)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: model_dir / f for name, f in weight_map.items()}
        else:
            single = model_dir / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"weight {name!r} is missing from the checkpoint")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)


def _prefix(source: _TensorSource) -> str:
    for prefix in ("model.", "model.language_model.", ""):
        if f"{prefix}embed_tokens.weight" in source:
            return prefix
    raise KeyError("no embed_tokens.weight found: is this a Llama-family checkpoint?")


def load_weights(model_dir: str | Path, shapes: ModelShapes, device: torch.device, dtype: torch.dtype) -> ModelWeights:
    """Read the checkpoint in `model_dir` and return fused weights on `device` in `dtype`."""
    source = _TensorSource(Path(model_dir))
    p = _prefix(source)

    def get(name: str) -> torch.Tensor:
        return source.get(name).to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return get(name) if name in source else None

    def cat_maybe(names: list[str]) -> torch.Tensor | None:
        parts = [maybe(n) for n in names]
        if all(t is None for t in parts):
            return None
        if any(t is None for t in parts):
            raise KeyError(f"only some of {names} are present in the checkpoint")
        return torch.cat(parts)

    layers = []
    for i in range(shapes.num_layers):
        a, m = f"{p}layers.{i}.self_attn.", f"{p}layers.{i}.mlp."
        layers.append(LayerWeights(
            input_norm=get(f"{p}layers.{i}.input_layernorm.weight"),
            qkv=torch.cat([get(f"{a}q_proj.weight"), get(f"{a}k_proj.weight"), get(f"{a}v_proj.weight")]),
            qkv_bias=cat_maybe([f"{a}q_proj.bias", f"{a}k_proj.bias", f"{a}v_proj.bias"]),
            q_norm=get(f"{a}q_norm.weight") if shapes.qk_norm else None,
            k_norm=get(f"{a}k_norm.weight") if shapes.qk_norm else None,
            o=get(f"{a}o_proj.weight"),
            o_bias=maybe(f"{a}o_proj.bias"),
            post_norm=get(f"{p}layers.{i}.post_attention_layernorm.weight"),
            gate_up=torch.cat([get(f"{m}gate_proj.weight"), get(f"{m}up_proj.weight")]),
            gate_up_bias=cat_maybe([f"{m}gate_proj.bias", f"{m}up_proj.bias"]),
            down=get(f"{m}down_proj.weight"),
            down_bias=maybe(f"{m}down_proj.bias"),
        ))
    embed = get(f"{p}embed_tokens.weight")
    lm_head = embed if shapes.tie_word_embeddings else get("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, norm=get(f"{p}norm.weight"), lm_head=lm_head)
