"""Loading an exported drafter (what users deploy, ours or another trainer's) into the native drafter modules, as the
engine of its format builds it: SGLang's when the family is served by SGLang."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..export.layout import CONFIG_FILE, DRAFTER_CONFIG_FILE, WEIGHTS_FILE
from ..export.weights import t2d_from_d2t
from ..families.base import DrafterFamily
from ..families.registry import architectures, export_family
from ..models.build import Drafter, load_drafter_state
from ..models.config import DrafterConfig
from ..target.info import resolve_model_dir

FORMATS = ("sglang", "vllm")


@dataclass
class LoadedDrafter:
    """A drafter in eval mode plus the ids it may propose (None = its whole vocabulary)."""

    model: Drafter
    config: DrafterConfig
    hot_ids: torch.Tensor | None


def sglang_dir(path: str | Path) -> Path:
    """The SGLang format dir: `path` itself, or `path`/sglang for a whole export dir."""
    path = Path(path)
    return path if (path / "config.json").exists() else path / "sglang"


def drafter_dir(path: str | Path) -> Path:
    """The format dir to load: `path` itself, or the first of sglang/ and vllm/ in an export dir."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    return next((path / f for f in FORMATS if (path / f / CONFIG_FILE).exists()), path / FORMATS[0])


def trained_record(fmt_dir: Path) -> dict:
    """The export stage's drafter_config.json beside the format dir `fmt_dir` ({} for a drafter from elsewhere)."""
    ref = fmt_dir.parent / DRAFTER_CONFIG_FILE
    return json.loads(ref.read_text()) if fmt_dir.name in FORMATS and ref.exists() else {}


def exported_config(cfg: dict, target_layers: int, trained_as: str | None = None, dir_name: str = ""
                    ) -> tuple[DrafterFamily, DrafterConfig]:
    """The family and the DrafterConfig of the drafter the engine builds from an exported config.json (ours or
    another trainer's: RoPE from `rope_parameters`, the default aux layers when none are named). `trained_as`:
    the algorithm of the export's drafter_config.json, when there is one; `dir_name`: the name of the dir holding
    the config (the engine it is for, where the family's engines read one layout)."""
    family = export_family(cfg, trained_as)
    if family is None:
        raise ValueError(f"{(cfg.get('architectures') or ['?'])[0]!r} is none of the drafter architectures "
                         f"{architectures()}")
    family.check_loadable(cfg)
    fmt = family.served_format(cfg, dir_name)
    return family, DrafterConfig(**family.served_config(cfg, fmt, target_layers))


def format_dir_config(fmt_dir: Path, target_layers: int, cfg: dict | None = None
                      ) -> tuple[DrafterFamily, DrafterConfig]:
    """`exported_config` of the format dir `fmt_dir`'s config.json (`cfg`, when already read), with what the
    export's drafter_config.json records of the training that no engine's config holds (the depths it
    supervised)."""
    trained = trained_record(fmt_dir)
    cfg = json.loads((fmt_dir / CONFIG_FILE).read_text()) if cfg is None else cfg
    family, dc = exported_config(cfg, target_layers, trained.get("algorithm"), fmt_dir.name)
    return family, dataclasses.replace(dc, trained_depth=trained.get("trained_depth"))


def _target_tensor(model_dir: Path, names: tuple[str, ...]) -> torch.Tensor:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    for name in names:
        for file in files:
            with safe_open(str(model_dir / file), framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
    raise KeyError(f"{model_dir} has none of {names}")


def _cast_keeping_rope_fp32(model: Drafter, device: torch.device, dtype: torch.dtype) -> Drafter:
    """`model.to(device, dtype)` except the RoPE inverse frequencies, which stay fp32 (as in training, where the
    drafter is fp32 under autocast, and in HF `from_pretrained`); bf16 ones would skew every rotation angle.
    Integer buffers (d2t/t2d) keep their dtypes anyway."""
    freqs = {name: buf for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model = model.to(device=device, dtype=dtype)
    for name, buf in freqs.items():
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, buf.to(device=device, dtype=torch.float32))
    return model


def _drafter_state(d: Path, fmt: str, family: DrafterFamily, dc: DrafterConfig,
                   target_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The export's tensors under our names, as the `fmt` engine loads them: a shipped embedding the same shape as
    the target's is dropped (the engines share the target's when hidden sizes match), a missing t2d follows from
    d2t."""
    raw = load_file(str(d / WEIGHTS_FILE))
    state = {family.served_name(k, fmt): v for k, v in raw.items()}
    embed = state.get("embed_tokens.weight")
    if embed is not None and dc.hidden_size == dc.target_hidden_size:
        if tuple(embed.shape) != tuple(target_embed.shape):
            raise ValueError(f"{d}: the shipped embed_tokens has shape {tuple(embed.shape)}, the target's "
                             f"{tuple(target_embed.shape)}")
        del state["embed_tokens.weight"]
    if "t2d" not in state and "d2t" in state:
        state["t2d"] = t2d_from_d2t(state["d2t"], dc.vocab_size)
    return state


def load_exported_drafter(export_dir: str | Path, target_dir: str | Path, device: str | torch.device,
                          dtype: torch.dtype, target_embed: torch.Tensor | None = None,
                          target_lm_head: torch.Tensor | None = None) -> LoadedDrafter:
    """config.json + model.safetensors of an exported drafter (a format dir, or an export dir: its first format
    present, SGLang's before vLLM's) -> drafter module on `device` in `dtype`.

    Any drafter of a registered family loads: ours, or another trainer's with `layers.0.*`/`model.*` weight names
    and a shipped embedding. The embedding (and the lm_head of a family that uses the target's) come from the
    target, as in the engines; pass `target_embed`/`target_lm_head` to reuse tensors already in memory. The
    family's `hot_token_ids` (EAGLE-1/2's speculative_token_map.pt) restrict its proposals, as SGLang's
    --speculative-token-map does.
    """
    d = drafter_dir(export_dir)
    cfg_json = json.loads((d / CONFIG_FILE).read_text())
    model_dir = resolve_model_dir(target_dir)
    target_cfg = json.loads((model_dir / "config.json").read_text())
    layers = int(target_cfg.get("num_hidden_layers") or target_cfg["text_config"]["num_hidden_layers"])
    family, dc = format_dir_config(d, layers, cfg_json)
    if target_embed is None:
        target_embed = _target_tensor(model_dir, ("model.embed_tokens.weight", "embed_tokens.weight"))
    if family.uses_target_head and target_lm_head is None:
        target_lm_head = _target_tensor(model_dir, ("lm_head.weight", "model.embed_tokens.weight"))
    model: Drafter = family.new_module(dc, target_lm_head)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(target_embed.to(model.embed_tokens.weight.dtype))
    fmt = family.served_format(cfg_json, d.name)
    load_drafter_state(model, _drafter_state(d, fmt, family, dc, target_embed), d / WEIGHTS_FILE)
    model = _cast_keeping_rope_fp32(model, torch.device(device), dtype).eval().requires_grad_(False)
    hot = family.hot_token_ids(d)
    return LoadedDrafter(model, dc, None if hot is None else hot.to(device))
