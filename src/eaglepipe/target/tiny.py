"""Tiny random Llama targets for unit tests (real models, random weights)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def make_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, hidden_size: int = 64, num_layers: int = 6,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    max_position_embeddings: int = 1024, seed: int = 0, tie_word_embeddings: bool = False,
                    **overrides: Any) -> Path:
    """Build a random LlamaForCausalLM with the tokenizer (and chat template) found in `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                      head_dim=hidden_size // num_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tie_word_embeddings, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # Larger-than-default init gives peaked, non-degenerate distributions, so greedy decodes differ per prompt.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def make_random_llama(out_dir: Path, *, vocab_size: int, hidden_size: int = 64, num_layers: int = 4,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                      max_position_embeddings: int = 256, std: float = 0.08, seed: int = 0,
                      lm_head_scale: float = 1.0) -> Path:
    """Save a random LlamaForCausalLM without a tokenizer (token-id-level tests). Matrices are drawn with
    `std` (larger than HF's default, for peaked, prompt-dependent distributions); `lm_head_scale` sharpens
    them further."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      head_dim=hidden_size // num_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_position_embeddings, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
        model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(out_dir)
    return out_dir
