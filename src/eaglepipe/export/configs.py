"""The config.json fields every exported drafter shares: the LlamaConfig part both engines build its decoder layer
from. Each family adds its own (families/*.py `export_config`)."""
from __future__ import annotations

from typing import Any


def llama_fields(dc: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The LlamaConfig fields of the drafter whose DrafterConfig dict is `dc`, weights in `dtype`."""
    return {
        "model_type": "llama",
        "hidden_size": int(dc["hidden_size"]),
        "intermediate_size": int(dc["intermediate_size"]),
        "num_attention_heads": int(dc["num_attention_heads"]),
        "num_key_value_heads": int(dc["num_key_value_heads"]),
        "head_dim": int(dc["head_dim"]),
        "num_hidden_layers": 1,
        "hidden_act": dc.get("hidden_act", "silu"),
        "rms_norm_eps": float(dc["rms_norm_eps"]),
        "vocab_size": int(dc["vocab_size"]),
        "max_position_embeddings": int(dc["max_position_embeddings"]),
        "rope_theta": float(dc["rope_theta"]),
        "rope_scaling": dc.get("rope_scaling"),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
