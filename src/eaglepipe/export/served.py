"""How the engines read a drafter's config.json: the parts every family shares (the LlamaConfig fields, RoPE,
the aux-layer ids and their conventions). Each family's `served_config` builds on them: the drafter SGLang
(0.5.23) or vLLM would build.

The validator compares these values with the training checkpoint and the target, and the drafter loader builds
our modules from them, so what the bench measures is what the engines would serve.
"""
from __future__ import annotations

from typing import Any

# LlamaConfig's defaults, which both engines use when a config leaves the field out
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MAX_POSITIONS = 2048
# fc's input is sized for this many aux hidden states when a config declares no count and no nested ids
DEFAULT_NUM_AUX = 3
AUX_IDS_KEY = "eagle_aux_hidden_state_layer_ids"


def layer_config(cfg: dict[str, Any], fmt: str) -> Any:
    """The LlamaConfig part: the whole config for SGLang, `transformer_layer_config` for vLLM's speculators format."""
    return cfg.get("transformer_layer_config") if fmt == "vllm" else cfg


def nested_aux_ids(cfg: dict[str, Any]) -> Any:
    """`eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang's key, h-index - 1), None when absent."""
    nested = cfg.get("eagle_config")
    return nested.get(AUX_IDS_KEY) if isinstance(nested, dict) else None


def default_aux_layers(num_layers: int) -> list[int]:
    """The layers both engines capture when a config names none: h[2], h[N//2], h[N-3]."""
    return [2, num_layers // 2, num_layers - 3]


def served_aux_layers(cfg: dict[str, Any], fmt: str, target_layers: int) -> list[int]:
    """The target layers the engine captures, as HF hidden_states indices.

    SGLang reads only the nested ids and adds 1. vLLM reads the top-level ids as they are and, without them,
    falls back to the nested ids without adding 1.
    """
    nested, top = nested_aux_ids(cfg), cfg.get(AUX_IDS_KEY)
    if fmt == "sglang":
        return [int(i) + 1 for i in nested] if nested else default_aux_layers(target_layers)
    ids = top or nested
    return [int(i) for i in ids] if ids else default_aux_layers(target_layers)


def served_num_aux(layer: dict[str, Any]) -> Any:
    """How many aux hidden states fc's input is sized for: `num_aux_hidden_states`, else the number of nested
    ids, else 3 (vLLM; SGLang 0.5.23 reads the same keys)."""
    if layer.get("num_aux_hidden_states") is not None:
        return layer["num_aux_hidden_states"]
    nested = nested_aux_ids(layer)
    return len(nested) if isinstance(nested, list) and nested else DEFAULT_NUM_AUX


def rope_settings(layer: dict[str, Any]) -> tuple[Any, Any]:
    """(rope_theta, rope_scaling): the top-level fields, else transformers 5's `rope_parameters`; plain RoPE
    has scaling None."""
    params = layer.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = layer["rope_theta"] if "rope_theta" in layer else params.get("rope_theta", DEFAULT_ROPE_THETA)
    scaling = layer["rope_scaling"] if "rope_scaling" in layer else \
        {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict) and set(scaling) <= {"rope_type", "type"} and \
            scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def served_llama_fields(layer: dict[str, Any]) -> dict[str, Any]:
    """The DrafterConfig fields the engine builds from the LlamaConfig part `layer` (which must hold valid ints);
    the family adds its own (`served_config`)."""
    hidden, heads = layer["hidden_size"], layer["num_attention_heads"]
    theta, scaling = rope_settings(layer)
    return {
        "hidden_size": hidden,
        "intermediate_size": layer["intermediate_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": layer.get("num_key_value_heads") or heads,
        "head_dim": layer.get("head_dim") or hidden // heads,
        "rms_norm_eps": layer["rms_norm_eps"],
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": layer.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS,
        "vocab_size": layer["vocab_size"],
        "hidden_act": layer.get("hidden_act", "silu"),
    }
