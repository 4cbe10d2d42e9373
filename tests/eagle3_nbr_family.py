"""A drafter family that lives outside the package, to show what a new family is: this module and a conf file.

EAGLE-3 as speculators trains it by default: `norm_before_residual: true`, so the decoder layer's residual is
hidden_norm(h) rather than h. vLLM serves it (it reads the flag); SGLang does not (it would build the other
layout), so it is exported for vLLM only. Its step has no Triton form, so the speculative rounds run it on the
PyTorch path.
"""
from __future__ import annotations

from typing import Any

import torch

from eaglepipe.export.validate import DirCheck
from eaglepipe.export.writer import ExportRequest
from eaglepipe.families.eagle3 import VLLM_ARCH, Eagle3Family, vllm_config
from eaglepipe.models.config import DrafterConfig
from eaglepipe.models.eagle3 import Eagle3Drafter
from eaglepipe.models.layers import Attend

ALGORITHM = "eagle3-nbr"


class NormBeforeResidualDrafter(Eagle3Drafter):
    """Eagle3Drafter whose layer takes hidden_norm(h) as its residual."""

    def layer_forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                      attend: Attend) -> torch.Tensor:
        x = self.layer_input(input_ids, hidden)
        cos, sin = self.rotary(x, position_ids)
        q, k, v = self.midlayer.project(x, cos, sin)
        return self.midlayer.finish(attend(q, k, v), self.midlayer.hidden_norm(hidden))


class Eagle3NbrFamily(Eagle3Family):
    """The EAGLE-3 family with the residual after hidden_norm, served by vLLM only."""

    name = "eagle3_nbr"
    algorithms = (ALGORITHM,)
    architectures = {VLLM_ARCH: "vllm"}
    formats = ("vllm",)
    sglang_algorithm = ""
    init_fields = ("intermediate_size", "draft_vocab_size")

    def new_module(self, cfg: DrafterConfig, target_lm_head: torch.Tensor | None) -> torch.nn.Module:
        return NormBeforeResidualDrafter(cfg)

    def export_config(self, fmt: str, dc: dict[str, Any], req: ExportRequest) -> dict[str, Any]:
        cfg = vllm_config(dc, req.dtype, req.verifier_name, req.verifier_arch, req.num_steps)
        cfg["norm_before_residual"] = True
        return cfg

    def served_algorithm(self, cfg: dict[str, Any]) -> str:
        return ALGORITHM

    def check_layout(self, check: DirCheck, cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        if cfg.get("norm_before_residual") is not True:
            check.bad(f"norm_before_residual must be true for {ALGORITHM}, got {cfg.get('norm_before_residual')!r}")

    def has_fast_step(self, cfg: DrafterConfig) -> bool:
        return False


FAMILY = Eagle3NbrFamily()
