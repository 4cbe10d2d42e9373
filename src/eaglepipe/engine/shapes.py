"""Architecture facts the native runner needs, read from an HF `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture feature the native runner does not implement."""


@dataclass(frozen=True)
class ModelShapes:
    """Shapes and numerics of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2)."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qk_norm: bool
    max_position_embeddings: int
    hf_config: Any  # the transformers config, kept for RoPE initialisation

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_model_shapes(model_dir: str | Path) -> ModelShapes:
    """Parse and check the config of an HF Llama-family model directory."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: not an HF model directory")
    cfg = AutoConfig.from_pretrained(model_dir)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    model_type = getattr(text, "model_type", cfg.model_type)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the native engine (supported: {SUPPORTED_MODEL_TYPES})")
    if getattr(text, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {text.hidden_act!r} is not supported (only silu)")
    if getattr(text, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if getattr(text, "use_sliding_window", model_type == "mistral") and getattr(text, "sliding_window", None):
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={text.sliding_window}) is not supported by the native engine")
    heads = int(text.num_attention_heads)
    raw = json.loads((model_dir / "config.json").read_text())
    return ModelShapes(
        model_type=model_type,
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        intermediate_size=int(text.intermediate_size),
        num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab_size=int(text.vocab_size),
        rms_norm_eps=float(text.rms_norm_eps),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False))),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 2048)),
        hf_config=text,
    )


def rope_tables(shapes: ModelShapes, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [max_len, head_dim] for positions 0..max_len-1 (default, linear, llama3, yarn...)."""
    params = dict(getattr(shapes.hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = float(params.get("rope_theta", getattr(shapes.hf_config, "rope_theta", 10000.0)))
        exponents = torch.arange(0, shapes.head_dim, 2, dtype=torch.float) / shapes.head_dim
        inv_freq, scaling = 1.0 / (theta ** exponents), 1.0
    elif rope_type == "dynamic":
        raise UnsupportedModelError("dynamic NTK RoPE depends on the sequence length and is not supported")
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise UnsupportedModelError(f"unknown rope_type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](shapes.hf_config, torch.device("cpu"))
    positions = torch.arange(max_len, dtype=torch.float)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return (angles.cos() * scaling).to(device), (angles.sin() * scaling).to(device)
