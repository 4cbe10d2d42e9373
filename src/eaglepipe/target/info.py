"""Reading a fetched target: `target.json`, its HF directory, tokenizer and model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's default aux layers as HF hidden_states indices: h[2], h[N//2], h[N-3]."""
    return [2, num_layers // 2, num_layers - 3]


def read_target_info(target_dir: str | Path) -> dict[str, Any]:
    """The `target.json` written by fetch_target."""
    path = Path(target_dir) / "target.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {target_dir} the output of fetch_target?")
    return json.loads(path.read_text())


def resolve_model_dir(path: str | Path) -> Path:
    """The HF model directory behind a fetch_target output dir, or `path` itself if it is an HF dir."""
    path = Path(path)
    if (path / "target.json").exists():
        model_path = Path(read_target_info(path)["model_path"])
        return model_path if model_path.is_absolute() else path / model_path
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"{path} is neither a fetch_target output (target.json) nor an HF model dir (config.json)")


def chat_template_sha256(template: str | None) -> str | None:
    """Hash of the chat template text; None when the tokenizer has no template."""
    return hashlib.sha256(template.encode()).hexdigest() if template else None


def describe_model(model_dir: Path) -> dict[str, Any]:
    """Architecture facts of an HF model dir, as stored in target.json."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = int(text_cfg.num_hidden_layers)
    heads = int(text_cfg.num_attention_heads)
    rope = getattr(text_cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0))
    rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or getattr(text_cfg, "rope_scaling", None)
    if rope_scaling and rope_scaling.get("rope_type") == "default":
        rope_scaling = None
    eos = getattr(text_cfg, "eos_token_id", None)
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {
        "architecture": (cfg.architectures or ["?"])[0],
        "model_type": cfg.model_type,
        "num_layers": n,
        "hidden_size": int(text_cfg.hidden_size),
        "intermediate_size": int(text_cfg.intermediate_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(text_cfg, "num_key_value_heads", heads) or heads),
        "head_dim": int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads),
        "vocab_size": int(text_cfg.vocab_size),
        "max_position_embeddings": int(getattr(text_cfg, "max_position_embeddings", 2048)),
        "rope_theta": float(rope_theta),
        "rope_scaling": rope_scaling,
        "rms_norm_eps": float(getattr(text_cfg, "rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "hidden_act": getattr(text_cfg, "hidden_act", "silu"),
        "eos_token_ids": eos_ids,
        "aux_layers": default_aux_layers(n),
    }


def load_tokenizer(path: str | Path):
    """The target's tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(path))


def load_hf_model(path: str | Path, device: Any = "cpu", dtype: Any = None):
    """The target as an HF causal LM, frozen and in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(path), dtype=dtype or torch.float32)
    model.to(device).eval()
    model.requires_grad_(False)
    return model
