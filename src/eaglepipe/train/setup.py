"""Loading and checking what training needs: target, vocab, data, and the drafter to start from."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from ..config import Config, ConfigError
from ..export.layout import CONFIG_FILE, DRAFTER_CONFIG_FILE, WEIGHTS_FILE
from ..families.registry import export_family, family_named
from ..models.build import Drafter, load_drafter_state, new_drafter
from ..models.config import DrafterConfig
from ..target.info import describe_model, read_target_info, resolve_model_dir

log = logging.getLogger(__name__)


def target_info(target: Path) -> dict[str, Any]:
    """target.json of a fetch_target dir, or the same facts read from a plain HF dir."""
    if (target / "target.json").exists():
        return read_target_info(target)
    return describe_model(resolve_model_dir(target))


def check_config_against_target(cfg: Config, info: dict[str, Any], draft_vocab: int, map_vocab: int) -> None:
    """Reject configs the target cannot support, before any work (`map_vocab` = len(t2d)); the drafter family
    checks its own needs."""
    family = family_named(cfg.train.algorithm)
    family.check_target(info, draft_vocab, family.target_layers(cfg.target.aux_layers, info))
    if map_vocab != int(info["vocab_size"]):
        raise ConfigError(f"the vocab map covers {map_vocab} target tokens but the target has {info['vocab_size']}")
    limit = int(info["max_position_embeddings"])
    if cfg.data.seq_length > limit:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds the target's max_position_embeddings={limit}")


def check_drafter_depth(cfg: Config) -> None:
    """Reject a `train.draft_layers` the family's drafter cannot have (the EAGLE families have one layer)."""
    family = family_named(cfg.train.algorithm)
    if family.decoder_layers is not None and cfg.train.draft_layers != family.decoder_layers:
        raise ConfigError(f"train.draft_layers={cfg.train.draft_layers}: a {cfg.train.algorithm} drafter has "
                          f"{family.decoder_layers} decoder layer(s)")


def load_target_model(target: Path, device: torch.device, dtype: torch.dtype, attn_impl: str):
    """The target as a frozen HF causal LM with the requested attention backend."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(target), dtype=dtype,
                                                 attn_implementation=attn_impl)
    model.to(device).eval().requires_grad_(False)
    return model


def initial_drafter(cfg: Config, info: dict[str, Any], model, d2t: torch.Tensor, t2d: torch.Tensor,
                    init_from: Optional[str], target_dir: Path) -> Drafter:
    """A new drafter (seeded) for the target in `target_dir`, optionally initialised from our checkpoint or an export
    dir of the same family."""
    family = family_named(cfg.train.algorithm)
    dcfg = DrafterConfig.from_target(info, cfg.train.algorithm, len(d2t), cfg.target.aux_layers,
                                     cfg.train.intermediate_size)
    dcfg = dataclasses.replace(dcfg, **family.train_fields(cfg.train, target_dir, info))
    if init_from:
        dcfg = init_config(Path(init_from), dcfg, int(info["num_layers"]))
        if dcfg.algorithm != cfg.train.algorithm or dcfg.hidden_size != int(info["hidden_size"]):
            raise ConfigError(f"train.init_from={init_from} is a {dcfg.algorithm} drafter of hidden size "
                              f"{dcfg.hidden_size}, not a {cfg.train.algorithm} one for this target")
    if family.uses_draft_vocab:
        dcfg.draft_vocab_size = len(d2t)  # the vocab stage's draft vocab; a different one is carried over below
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    head = model.get_output_embeddings().weight.detach().float().cpu()
    drafter = new_drafter(dcfg, emb, head, d2t, t2d, cfg.train.lm_head_init, seed=cfg.training_seed())
    if init_from:
        weights = Path(init_from) / WEIGHTS_FILE
        state = family.canonical_state(load_file(str(weights)))
        if family.uses_draft_vocab:
            state = adopt_draft_vocab(drafter, state)
        load_drafter_state(drafter, state, weights)
        log.info("initialised the drafter from %s", init_from)
    return drafter


def init_config(src: Path, dcfg: DrafterConfig, target_layers: int) -> DrafterConfig:
    """The config of the drafter to start from: our checkpoint's drafter_config.json, or `dcfg` with the fields
    the family's `init_fields` names read from an export's config.json as its engine reads them."""
    if (src / DRAFTER_CONFIG_FILE).exists():
        return DrafterConfig.from_json(src / DRAFTER_CONFIG_FILE)
    if not (src / CONFIG_FILE).exists():
        raise ConfigError(f"train.init_from={src} is neither our checkpoint nor an export dir")
    exported = json.loads((src / CONFIG_FILE).read_text())
    family = family_named(dcfg.algorithm)
    if export_family(exported, dcfg.algorithm) is not family:
        raise ConfigError(f"train.init_from={src}: architectures {exported.get('architectures')} is not a "
                          f"{dcfg.algorithm} drafter's (those are {sorted(family.architectures)})")
    served = family.served_config(exported, family.served_format(exported, src.name), target_layers)
    for k in family.init_fields:
        if served[k] is not None:
            setattr(dcfg, k, served[k])
    return dcfg


def adopt_draft_vocab(drafter: Drafter, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the weights of a drafter with its own draft vocab) re-expressed in `drafter`'s draft vocab, the
    vocab stage's.

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
