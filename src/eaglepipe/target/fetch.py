"""fetch_target's logic: materialise the target as an HF directory and describe it in `target.json`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import TargetCfg
from .info import chat_template_sha256, default_aux_layers, describe_model

log = logging.getLogger("eaglepipe.target")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tiktoken.model")
# weights and metadata a transformers checkpoint needs; skips original/ consolidated .pth, GGUF, ONNX, etc.
HUB_ALLOW = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.jinja", "*.txt", "*.py"]
HUB_IGNORE = ["original/*", "*.pth", "*.bin", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.pt"]


def check_hf_dir(path: Path) -> None:
    """Raise FileNotFoundError unless `path` holds config.json and tokenizer files."""
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: it is not an HF model directory")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")


def fetch_packaged(model_dir: Path, dtype: str) -> None:
    """De-quantise the packaged SmolLM2 GGUF into `model_dir`."""
    from .packaged import convert_gguf_to_hf, packaged_gguf_path

    convert_gguf_to_hf(packaged_gguf_path(), model_dir, dtype=dtype)


def cast_safetensors(model_dir: Path, dtype: str) -> int:
    """Cast every floating tensor of the dir's safetensors files to `dtype`, file by file; returns files changed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    want = getattr(torch, dtype)
    changed = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if all(not t.is_floating_point() or t.dtype == want for t in tensors.values()):
            continue
        tensors = {k: t.to(want) if t.is_floating_point() else t for k, t in tensors.items()}
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        changed += 1
    if changed:
        cfg_path = model_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return changed


def fetch_hub(repo_id: str, revision: str | None, model_dir: Path, dtype: str) -> str:
    """Snapshot-download a hub model (safetensors + tokenizer) into `model_dir`, stored in `dtype`.

    Authentication, cache and offline mode follow huggingface_hub (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE).
    Returns the commit hash that was downloaded.
    """
    from huggingface_hub import HfApi, snapshot_download

    commit = HfApi().model_info(repo_id, revision=revision).sha
    snapshot_download(repo_id=repo_id, revision=commit, local_dir=str(model_dir),
                      allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE)
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{repo_id}@{commit} has no .safetensors weights; "
                                "convert it or use target.source=local")
    check_hf_dir(model_dir)
    n = cast_safetensors(model_dir, dtype)
    if n:
        log.info("cast %d weight files to %s", n, dtype)
    return commit


def resolve_aux_layers(configured: list[int] | None, num_layers: int) -> list[int]:
    """The configured aux layers (validated against the model depth) or the EAGLE-3 default."""
    if configured is None:
        return default_aux_layers(num_layers)
    bad = [i for i in configured if not 0 <= i <= num_layers]
    if bad:
        raise ValueError(f"target.aux_layers {configured} holds {bad}, outside the model's hidden_states "
                         f"indices 0..{num_layers} ({num_layers} layers)")
    return list(configured)


def target_info(cfg: TargetCfg, model_dir: Path, model_path: str, commit: str | None = None) -> dict[str, Any]:
    """The contents of target.json for a fetched model."""
    from transformers import AutoTokenizer

    facts = describe_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template is None:
        log.warning("%s has no chat template: tokenize will fail", model_dir)
    facts["aux_layers"] = resolve_aux_layers(cfg.aux_layers, facts["num_layers"])
    return {"model_path": model_path, "source": cfg.source, "name_or_path": cfg.name_or_path,
            "revision": cfg.revision, "commit": commit, **facts,
            "chat_template_sha256": chat_template_sha256(template), "tokenizer_size": len(tokenizer),
            "dtype": cfg.dtype}


def fetch_target(cfg: TargetCfg, out_dir: Path) -> dict[str, Any]:
    """Materialise the target under `out_dir` (model/ for packaged and hub) and return its target.json dict."""
    if cfg.source == "local":
        model_dir = Path(cfg.name_or_path).expanduser().resolve()
        check_hf_dir(model_dir)
        return target_info(cfg, model_dir, str(model_dir))
    model_dir = out_dir / "model"
    commit = None
    if cfg.source == "packaged_smollm2":
        fetch_packaged(model_dir, cfg.dtype)
    elif cfg.source == "hub":
        commit = fetch_hub(cfg.name_or_path, cfg.revision, model_dir, cfg.dtype)
    else:
        raise ValueError(f"unknown target.source {cfg.source!r}")
    return target_info(cfg, model_dir, "model", commit)
