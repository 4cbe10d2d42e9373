"""Loading and checking what training needs: target, vocab, data, and the drafter to start from."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config, ConfigError
from ..models.build import Drafter, load_drafter_weights, new_drafter, read_sglang_config
from ..models.config import DrafterConfig
from ..target.info import describe_model, read_target_info, resolve_model_dir

log = logging.getLogger(__name__)


def target_info(target: Path) -> dict[str, Any]:
    """target.json of a fetch_target dir, or the same facts read from a plain HF dir."""
    if (target / "target.json").exists():
        return read_target_info(target)
    return describe_model(resolve_model_dir(target))


def check_config_against_target(cfg: Config, info: dict[str, Any], draft_vocab: int, map_vocab: int) -> None:
    """Reject configs the target cannot support, before any work (`map_vocab` = len(t2d))."""
    if cfg.train.algorithm in ("eagle3", "eagle3.1") and draft_vocab > int(info["vocab_size"]):
        raise ConfigError(f"the draft vocab ({draft_vocab}) is bigger than the target's vocab ({info['vocab_size']})")
    if map_vocab != int(info["vocab_size"]):
        raise ConfigError(f"the vocab map covers {map_vocab} target tokens but the target has {info['vocab_size']}")
    n = int(info["num_layers"])
    aux = cfg.target.aux_layers or info["aux_layers"]
    if cfg.train.algorithm in ("eagle3", "eagle3.1") and not all(1 <= i <= n - 1 for i in aux):
        raise ConfigError(f"target.aux_layers={list(aux)}: SGLang and vLLM capture h[1]..h[{n - 1}] of a {n}-layer "
                          "target, so the export would be rejected")
    limit = int(info["max_position_embeddings"])
    if cfg.data.seq_length > limit:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds the target's max_position_embeddings={limit}")


def load_target_model(target: Path, device: torch.device, dtype: torch.dtype, attn_impl: str):
    """The target as a frozen HF causal LM with the requested attention backend."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(target), dtype=dtype,
                                                 attn_implementation=attn_impl)
    model.to(device).eval().requires_grad_(False)
    return model


def initial_drafter(cfg: Config, info: dict[str, Any], model, d2t: torch.Tensor, t2d: torch.Tensor,
                    init_from: Optional[str]) -> Drafter:
    """A new drafter (seeded), optionally initialised from our checkpoint or an SGLang EAGLE-3 export."""
    aux = cfg.target.aux_layers or info["aux_layers"]
    dcfg = DrafterConfig.from_target(info, cfg.train.algorithm, len(d2t), aux, cfg.train.intermediate_size)
    if init_from:
        src = Path(init_from)
        if (src / "drafter_config.json").exists():
            dcfg = DrafterConfig.from_json(src / "drafter_config.json")
        elif (src / "config.json").exists():
            sg = read_sglang_config(src)
            dcfg.intermediate_size = int(sg["intermediate_size"])
            dcfg.draft_vocab_size = int(sg.get("draft_vocab_size", dcfg.draft_vocab_size))
            dcfg.fc_norm = bool(sg.get("fc_norm", dcfg.fc_norm))
            dcfg.norm_output = bool(sg.get("norm_output", dcfg.norm_output))
        else:
            raise ConfigError(f"train.init_from={init_from} is neither our checkpoint nor an SGLang export dir")
        if dcfg.algorithm != cfg.train.algorithm or dcfg.hidden_size != int(info["hidden_size"]):
            raise ConfigError(f"train.init_from={init_from} is a {dcfg.algorithm} drafter of hidden size "
                              f"{dcfg.hidden_size}, not a {cfg.train.algorithm} one for this target")
    if dcfg.is_eagle3 and dcfg.draft_vocab_size != len(d2t):
        raise ConfigError(f"init_from has draft vocab {dcfg.draft_vocab_size}, the vocab stage {len(d2t)}")
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    head = model.get_output_embeddings().weight.detach().float().cpu()
    drafter = new_drafter(dcfg, emb, head, d2t, t2d, cfg.train.lm_head_init, seed=cfg.seed)
    if init_from:
        load_drafter_weights(drafter, Path(init_from) / "model.safetensors")
        log.info("initialised the drafter from %s", init_from)
    return drafter
