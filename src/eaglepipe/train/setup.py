"""Loading and checking what training needs: target, vocab, data, and the drafter to start from."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from ..config import Config, ConfigError
from ..models.build import Drafter, canonical_state, load_drafter_state, new_drafter, read_sglang_config
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
    if dcfg.is_eagle3:
        dcfg.draft_vocab_size = len(d2t)  # the vocab stage's draft vocab; a different one is carried over below
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    head = model.get_output_embeddings().weight.detach().float().cpu()
    drafter = new_drafter(dcfg, emb, head, d2t, t2d, cfg.train.lm_head_init, seed=cfg.seed)
    if init_from:
        weights = Path(init_from) / "model.safetensors"
        state = canonical_state(load_file(str(weights)), dcfg.is_eagle3)
        if dcfg.is_eagle3:
            state = adopt_draft_vocab(drafter, state)
        load_drafter_state(drafter, state, weights)
        log.info("initialised the drafter from %s", init_from)
    return drafter


def adopt_draft_vocab(drafter: Drafter, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (an EAGLE-3 drafter's weights) re-expressed in `drafter`'s draft vocab, the vocab stage's.

    A drafter trained on other data usually has another draft vocab (d2t). Loading its d2t would silently
    override the vocab stage's, which the offline cache's labels and the vocab report were made with. Instead,
    its lm_head rows move to where the same target tokens sit in this vocab; tokens it did not have keep their
    fresh rows (see `train.lm_head_init`).
    """
    key = "lm_head.weight"
    if key not in state:
        return state
    old_d2t = state.get("d2t", torch.zeros(len(state[key]), dtype=torch.long)).long()  # none: the full vocab
    if torch.equal(old_d2t, drafter.d2t.cpu()):
        return state
    old_ids = torch.arange(len(old_d2t)) + old_d2t
    row_of = torch.full((drafter.config.vocab_size,), -1, dtype=torch.long)
    row_of[old_ids] = torch.arange(len(old_ids))
    new_ids = torch.arange(len(drafter.d2t)) + drafter.d2t.cpu()
    rows = row_of[new_ids]
    kept = rows >= 0
    head = drafter.lm_head.weight.detach().cpu().clone()
    head[kept] = state[key][rows[kept]].to(head.dtype)
    log.info("init_from has another draft vocab: %d of its %d lm_head rows carried over to this vocab of %d, "
             "%d rows start fresh", int(kept.sum()), len(old_ids), len(new_ids), int((~kept).sum()))
    return {**state, key: head, "d2t": drafter.d2t.cpu().clone(), "t2d": drafter.t2d.cpu().clone()}
