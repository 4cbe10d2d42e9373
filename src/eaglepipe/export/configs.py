"""config.json contents of the SGLang and vLLM (speculators) drafter exports."""
from __future__ import annotations

from typing import Any

from .layout import (EAGLE3_ALGOS, SGLANG_EAGLE1_ARCH, SGLANG_EAGLE3_ARCH, VLLM_EAGLE3_ARCH,
                     sglang_aux_ids)


def _llama_fields(dc: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The LlamaConfig fields both engines build the drafter's single decoder layer from."""
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


def sglang_config(dc: dict[str, Any], dtype: str) -> dict[str, Any]:
    """SGLang's config.json: LlamaForCausalLMEagle3 (EAGLE-3/3.1) or LlamaForCausalLMEagle (EAGLE-1/2).

    `dc` is the DrafterConfig JSON dict of the training checkpoint. Aux ids are written in both conventions:
    nested `eagle_config` = h-index - 1 (SGLang adds 1), top-level = h-index (vLLM reads it as is).
    """
    cfg = _llama_fields(dc, dtype)
    if dc["algorithm"] not in EAGLE3_ALGOS:
        cfg["architectures"] = [SGLANG_EAGLE1_ARCH]
        return cfg
    aux = [int(i) for i in dc["aux_layers"]]
    cfg.update({
        "architectures": [SGLANG_EAGLE3_ARCH],
        "draft_vocab_size": int(dc.get("draft_vocab_size") or dc["vocab_size"]),
        "target_hidden_size": int(dc.get("target_hidden_size") or dc["hidden_size"]),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": sglang_aux_ids(aux), "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": aux,
        "num_aux_hidden_states": len(aux),
        "norm_before_residual": False,
        "fc_norm": bool(dc.get("fc_norm", False)),
        "norm_output": bool(dc.get("norm_output", False)),
    })
    return cfg


def vllm_config(dc: dict[str, Any], dtype: str, verifier_name: str, verifier_arch: str,
                speculative_tokens: int) -> dict[str, Any]:
    """vLLM's speculators-format config.json (`Eagle3Speculator`) for an EAGLE-3/3.1 drafter."""
    if dc["algorithm"] not in EAGLE3_ALGOS:
        raise ValueError(f"the speculators format holds EAGLE-3 drafters, not {dc['algorithm']}")
    layer = _llama_fields(dc, dtype)
    layer["architectures"] = ["LlamaForCausalLM"]
    # vLLM builds the drafter from this part and sizes fc from it (else from 3 aux states): the top level is not read
    layer["num_aux_hidden_states"] = len(dc["aux_layers"])
    return {
        "architectures": [VLLM_EAGLE3_ARCH],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier_name, "architectures": [verifier_arch]},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": int(dc.get("draft_vocab_size") or dc["vocab_size"]),
        "target_hidden_size": int(dc.get("target_hidden_size") or dc["hidden_size"]),
        "norm_before_residual": False,
        "fc_norm": bool(dc.get("fc_norm", False)),
        "norm_output": bool(dc.get("norm_output", False)),
        "eagle_aux_hidden_state_layer_ids": [int(i) for i in dc["aux_layers"]],
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
