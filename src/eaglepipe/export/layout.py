"""What SGLang and vLLM expect of an exported drafter: config fields, weight names, shapes and dtypes.

One table serves both the exporter (which builds to it) and the validator (which checks against it), so the
two cannot disagree silently; the validator additionally checks the written files against the *target*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

EAGLE3_ALGOS = ("eagle3", "eagle3.1")
EAGLE1_ALGOS = ("eagle1", "eagle2")
SGLANG_EAGLE3_ARCH = "LlamaForCausalLMEagle3"
SGLANG_EAGLE1_ARCH = "LlamaForCausalLMEagle"
VLLM_EAGLE3_ARCH = "Eagle3Speculator"
TOKEN_MAP_FILE = "speculative_token_map.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# the training checkpoint's DrafterConfig, written beside sglang/ and vllm/ so the exported configs can be checked
DRAFTER_CONFIG_FILE = "drafter_config.json"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Shapes:
    """The dimensions an exported drafter's tensors are built from."""

    algorithm: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    num_aux: int
    fc_norm: bool

    @property
    def is_eagle3(self) -> bool:
        return self.algorithm in EAGLE3_ALGOS

    @property
    def ships_embedding(self) -> bool:
        """Both engines share the target's embedding unless the drafter's hidden size differs from it."""
        return self.hidden_size != self.target_hidden_size


def decoder_layer_shapes(s: Shapes, prefix: str, attn_in: int, input_norm: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of one Llama decoder layer under `prefix` (e.g. `midlayer.` or `layers.0.`)."""
    h, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    out = {
        f"{prefix}self_attn.q_proj.weight": (q, attn_in),
        f"{prefix}self_attn.k_proj.weight": (kv, attn_in),
        f"{prefix}self_attn.v_proj.weight": (kv, attn_in),
        f"{prefix}self_attn.o_proj.weight": (h, q),
        f"{prefix}mlp.gate_proj.weight": (s.intermediate_size, h),
        f"{prefix}mlp.up_proj.weight": (s.intermediate_size, h),
        f"{prefix}mlp.down_proj.weight": (h, s.intermediate_size),
        f"{prefix}post_attention_layernorm.weight": (h,),
    }
    if input_norm:
        out[f"{prefix}input_layernorm.weight"] = (h,)
    return out


def eagle3_float_shapes(s: Shapes, layer_prefix: str) -> dict[str, tuple[int, ...]]:
    """Float tensors of an EAGLE-3/3.1 export (`midlayer.` for SGLang, `layers.0.` for vLLM)."""
    h = s.hidden_size
    out = decoder_layer_shapes(s, layer_prefix, 2 * h, input_norm=True)
    out[f"{layer_prefix}hidden_norm.weight"] = (h,)
    out["fc.weight"] = (h, s.num_aux * s.target_hidden_size)
    out["norm.weight"] = (h,)
    out["lm_head.weight"] = (s.draft_vocab_size, h)
    if s.fc_norm:
        out.update({f"fc_norm.{i}.weight": (s.target_hidden_size,) for i in range(s.num_aux)})
    if s.ships_embedding:
        out["embed_tokens.weight"] = (s.vocab_size, h)
    return out


def eagle1_float_shapes(s: Shapes) -> dict[str, tuple[int, ...]]:
    """Float tensors of an EAGLE-1/2 export for SGLang's LlamaForCausalLMEagle."""
    h = s.hidden_size
    out = decoder_layer_shapes(s, "layers.0.", h, input_norm=False)
    out["fc.weight"] = (h, 2 * h)
    out["fc.bias"] = (h,)
    if s.ships_embedding:
        out["embed_tokens.weight"] = (s.vocab_size, h)
    return out


def vocab_map_shapes(s: Shapes, vllm: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """d2t/t2d entries (shape, dtype). vLLM builds `draft_id_to_target_id` only for a reduced vocab."""
    if vllm and s.draft_vocab_size == s.vocab_size:
        return {}
    return {"d2t": ((s.draft_vocab_size,), torch.int64), "t2d": ((s.vocab_size,), torch.bool)}


def expected_tensors(s: Shapes, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor name -> (shape, kind) for format `sglang` or `vllm`; kind is `float`, `int64` or `bool`."""
    if not s.is_eagle3:
        if fmt != "sglang":
            raise ValueError(f"{s.algorithm} drafters are exported for SGLang only")
        return {k: (v, "float") for k, v in eagle1_float_shapes(s).items()}
    prefix = "midlayer." if fmt == "sglang" else "layers.0."
    out = {k: (v, "float") for k, v in eagle3_float_shapes(s, prefix).items()}
    for k, (shape, dt) in vocab_map_shapes(s, vllm=fmt == "vllm").items():
        out[k] = (shape, "int64" if dt == torch.int64 else "bool")
    return out


def sglang_aux_ids(h_indices: list[int]) -> list[int]:
    """SGLang's nested `eagle_config` ids: SGLang adds 1 to each, so it stores h-index - 1."""
    return [int(i) - 1 for i in h_indices]


def shapes_from_drafter_config(dc: dict[str, Any]) -> Shapes:
    """Shapes from a DrafterConfig JSON dict (the training checkpoint's drafter_config.json)."""
    algo = dc["algorithm"]
    aux = dc.get("aux_layers") or []
    return Shapes(algorithm=algo, hidden_size=int(dc["hidden_size"]), intermediate_size=int(dc["intermediate_size"]),
                  num_heads=int(dc["num_attention_heads"]), num_kv_heads=int(dc["num_key_value_heads"]),
                  head_dim=int(dc["head_dim"]), vocab_size=int(dc["vocab_size"]),
                  draft_vocab_size=int(dc.get("draft_vocab_size") or dc["vocab_size"]),
                  target_hidden_size=int(dc.get("target_hidden_size") or dc["hidden_size"]),
                  num_aux=len(aux) if algo in EAGLE3_ALGOS else 1, fc_norm=bool(dc.get("fc_norm", False)))
