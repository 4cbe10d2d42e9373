"""P-EAGLE (arXiv 2602.01469), parallel drafting: EAGLE-3's drafter plus a learned `mask_hidden` [1, n_aux*H_t]
drafts all K tokens of a round in one forward. Position 0 takes the last real token and the fused target
features; positions 1..K-1 take the mask token's embedding and fc(mask_hidden). It trains with COD sampling of
the depths and a depth-aware mask (the `cod` objective, train/cod.py) and drafts through the `parallel` round
(speculative/parallel_round.py) with the `masks` block drafter (speculative/mask_block.py).

vLLM serves it from the speculators format (`speculators_model_type: peagle`, which it serves as
`{"method": "eagle3", "parallel_drafting": true}` with `pard_token` = `mask_token_id`; vllm/transformers_utils/
configs/speculators/algos.py `update_peagle`) and refuses a checkpoint without `mask_hidden` (llama_eagle3.py
`load_weights`). SGLang does not serve it. The embedding stays the target's, frozen and not shipped, as EAGLE-3's:
at the mask positions the learned mask_hidden (through fc, hidden_norm and the residual) is the trained input.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..config import ConfigError
from ..export.layout import Shapes
from ..models.config import DrafterConfig
from ..models.eagle3 import Eagle3Drafter
from .eagle3 import COMPARED_FIELDS, Eagle3Family, vllm_config

if TYPE_CHECKING:
    from ..config.schema import TrainCfg
    from ..export.validate import DirCheck
    from ..export.writer import ExportRequest

ALGORITHM = "peagle"
VLLM_ARCH = "PEagleSpeculator"
# vLLM's mask_hidden buffer holds this many hidden states (llama_eagle3.py: 3 with aux hidden states)
VLLM_MASK_STATES = 3


class PEagleDrafter(Eagle3Drafter):
    """Eagle3Drafter with `mask_hidden`, the aux features every mask position is fed (through fc)."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__(cfg)
        if cfg.mask_token_id is None:
            raise ValueError("a P-EAGLE drafter needs its mask_token_id")
        self.mask_hidden = nn.Parameter(torch.zeros(1, len(cfg.aux_layers) * cfg.target_hidden_size))

    def mask_state(self) -> torch.Tensor:
        """fc(mask_hidden) [1, H]: the state of every mask position (vLLM projects it the same way at load)."""
        return self.fuse(self.mask_hidden)


class PEagleFamily(Eagle3Family):
    """P-EAGLE (`peagle`): the plain EAGLE-3 layout (no fc_norm/norm_output, which vLLM's P-EAGLE loader does not
    read), vLLM only."""

    name = "peagle"
    algorithms = (ALGORITHM,)
    architectures = {VLLM_ARCH: "vllm"}
    formats = ("vllm",)
    sglang_algorithm = ""
    init_fields = ("intermediate_size", "draft_vocab_size", "mask_token_id")
    speculators_type = ALGORITHM
    compared_fields = COMPARED_FIELDS + ("mask_token_id",)
    objective = "cod"
    draft_round = "parallel"
    block_drafting = "masks"

    # ------------------------------------------------------------------ model
    def config_fields(self, algorithm: str, info: dict[str, Any], draft_vocab_size: int,
                      aux_layers: Optional[list[int]]) -> dict[str, Any]:
        """EAGLE-3's fields, and the mask token: the last row of the target's embedding (an unused or reserved
        token on most vocabularies; any row serves, since mask_hidden marks the mask positions)."""
        return {**super().config_fields("eagle3", info, draft_vocab_size, aux_layers),
                "mask_token_id": int(info["vocab_size"]) - 1}

    def train_fields(self, train: "TrainCfg", target_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        """The depths the training supervises (`train.ttt_steps`: a round of more drafts is past them) and the
        configured mask token (`train.mask_token_id`), when there is one."""
        fields: dict[str, Any] = {"trained_depth": train.ttt_steps}
        if train.mask_token_id is None:
            return fields
        if not 0 <= train.mask_token_id < int(info["vocab_size"]):
            raise ConfigError(f"train.mask_token_id={train.mask_token_id} is not a row of the target's embedding "
                              f"(0..{int(info['vocab_size']) - 1})")
        return {**fields, "mask_token_id": train.mask_token_id}

    def new_module(self, cfg: DrafterConfig, target_lm_head: Optional[torch.Tensor]) -> torch.nn.Module:
        return PEagleDrafter(cfg)

    def check_target(self, info: dict[str, Any], draft_vocab: int, aux_layers: list[int]) -> None:
        super().check_target(info, draft_vocab, aux_layers)
        if len(aux_layers) != VLLM_MASK_STATES:
            raise ConfigError(f"target.aux_layers={list(aux_layers)}: vLLM's P-EAGLE loader holds mask_hidden for "
                              f"{VLLM_MASK_STATES} aux hidden states")

    # ------------------------------------------------------------------ export
    def export_tensors(self, shapes: Shapes, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """EAGLE-3's vLLM tensors and mask_hidden [1, n_aux * H_t] (vLLM reads it as a flat row)."""
        return {**super().export_tensors(shapes, fmt),
                "mask_hidden": ((1, shapes.num_aux * shapes.target_hidden_size), "float")}

    def export_config(self, fmt: str, dc: dict[str, Any], req: "ExportRequest") -> dict[str, Any]:
        """The speculators format of EAGLE-3 with P-EAGLE's type, algorithm and mask token."""
        cfg = vllm_config(dc, req.dtype, req.verifier_name, req.verifier_arch, req.num_steps)
        cfg["architectures"] = [VLLM_ARCH]
        cfg["speculators_model_type"] = ALGORITHM
        cfg["speculators_config"]["algorithm"] = ALGORITHM
        cfg["mask_token_id"] = int(dc["mask_token_id"])
        return cfg

    def launch_point(self, dc: dict[str, Any], num_steps: int, topk: int, num_draft_tokens: int
                     ) -> tuple[int, int, int]:
        """A chain of export.num_steps drafts (K) from one forward, at most the depths the drafter was trained on."""
        check_depth(dc.get("trained_depth"), num_steps, "export.num_steps")
        return num_steps, 1, num_steps + 1

    def vllm_speculative_config(self, draft_dir: Path, num_steps: int) -> dict[str, Any]:
        return {"method": "eagle3", "model": str(draft_dir), "num_speculative_tokens": num_steps,
                "parallel_drafting": True, "draft_tensor_parallel_size": 1}

    # ------------------------------------------------------------------ validation and loading
    def served_config(self, cfg: dict[str, Any], fmt: str, target_layers: int) -> dict[str, Any]:
        """EAGLE-3's drafter without fc_norm/norm_output (vLLM's `update_peagle` passes neither on), and the mask
        token vLLM takes as pard_token."""
        return {**super().served_config(cfg, fmt, target_layers), "fc_norm": False, "norm_output": False,
                "mask_token_id": cfg.get("mask_token_id")}

    def served_algorithm(self, cfg: dict[str, Any]) -> str:
        return ALGORITHM

    def check_round(self, cfg: DrafterConfig, num_steps: int, topk: int, num_draft_tokens: int) -> None:
        """A chain (topk 1) of at most the depths the training supervised, where the drafter records them."""
        super().check_round(cfg, num_steps, topk, num_draft_tokens)
        check_depth(cfg.trained_depth, num_steps, f"the round s{num_steps}_k{topk}_n{num_draft_tokens}")

    def check_export(self, check: "DirCheck", cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        """EAGLE-3's checks with P-EAGLE's speculators type (vLLM turns it into parallel_drafting) and its tensors
        (mask_hidden among them), then the mask token and the size of vLLM's mask_hidden buffer."""
        super().check_export(check, cfg, layer)
        mask, vocab = cfg.get("mask_token_id"), check.target["vocab_size"]
        if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask < vocab:
            check.bad(f"mask_token_id must be a token id in 0..{vocab - 1} (vLLM reads it as pard_token, the token "
                      f"of the parallel-drafting slots), got {mask!r}")
        hidden, target_hidden = layer.get("hidden_size"), cfg.get("target_hidden_size") or layer.get("hidden_size")
        aux = cfg.get("eagle_aux_hidden_state_layer_ids") or []
        if isinstance(hidden, int) and isinstance(target_hidden, int) and \
                len(aux) * target_hidden != VLLM_MASK_STATES * hidden:
            check.bad(f"mask_hidden holds {len(aux)} x {target_hidden} values but vLLM's buffer holds "
                      f"{VLLM_MASK_STATES} x hidden_size ({VLLM_MASK_STATES * hidden})")


def check_depth(trained_depth: Optional[int], num_steps: int, what: str) -> None:
    """Raise ValueError where `what` drafts more tokens a round (`num_steps`) than the `trained_depth` the training
    supervised: the mask positions past it were never trained, so their drafts are noise that costs verify work."""
    if trained_depth is not None and num_steps > trained_depth:
        raise ValueError(f"{what} drafts {num_steps} tokens a round, but the P-EAGLE drafter was trained on depths "
                         f"1..{trained_depth} (train.ttt_steps); train with train.ttt_steps >= {num_steps}")


FAMILY = PEagleFamily()
