"""What SGLang and vLLM expect of any exported drafter: file names, dtypes, the dimensions its tensors are built
from, a Llama decoder layer's tensors and the vocab maps.

Each family's tables (families/*.py `export_tensors`) are built from these, and one table serves both the
exporter (which builds to it) and the validator (which checks against it), so the two cannot disagree
silently; the validator additionally checks the written files against the *target*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
    # decoder layers (several for DFlash)
    num_layers: int = 1

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


def vocab_map_shapes(s: Shapes, vllm: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """d2t/t2d entries (shape, dtype). vLLM builds `draft_id_to_target_id` only for a reduced vocab."""
    if vllm and s.draft_vocab_size == s.vocab_size:
        return {}
    return {"d2t": ((s.draft_vocab_size,), torch.int64), "t2d": ((s.vocab_size,), torch.bool)}


def sglang_aux_ids(h_indices: list[int]) -> list[int]:
    """SGLang's nested `eagle_config` ids: SGLang adds 1 to each, so it stores h-index - 1."""
    return [int(i) - 1 for i in h_indices]


def shapes_from_drafter_config(dc: dict[str, Any]) -> Shapes:
    """Shapes from a DrafterConfig JSON dict (the training checkpoint's drafter_config.json)."""
    aux = dc.get("aux_layers") or []
    return Shapes(algorithm=dc["algorithm"], hidden_size=int(dc["hidden_size"]),
                  intermediate_size=int(dc["intermediate_size"]),
                  num_heads=int(dc["num_attention_heads"]), num_kv_heads=int(dc["num_key_value_heads"]),
                  head_dim=int(dc["head_dim"]), vocab_size=int(dc["vocab_size"]),
                  draft_vocab_size=int(dc.get("draft_vocab_size") or dc["vocab_size"]),
                  target_hidden_size=int(dc.get("target_hidden_size") or dc["hidden_size"]),
                  num_aux=len(aux), fc_norm=bool(dc.get("fc_norm", False)),
                  num_layers=int(dc.get("num_hidden_layers", 1)))
