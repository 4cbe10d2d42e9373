"""EAGLE-1 and EAGLE-2: one decoder layer fed fc(cat(embed(token), h)) with the target's last hidden state h,
logits through the target's lm_head over the whole vocabulary; training regresses the next hidden state besides
the token loss. EAGLE-2 trains the same drafter (its dynamic tree is inference's). SGLang serves it as
LlamaForCausalLMEagle (with an optional speculative token map); vLLM's speculators format holds no such drafter.
The module is models/eagle1.py."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..export.configs import llama_fields
from ..export.layout import TOKEN_MAP_FILE, Shapes, decoder_layer_shapes
from ..export.served import served_llama_fields
from ..models.config import DrafterConfig
from ..models.eagle1 import Eagle1Drafter
from .base import DrafterFamily

if TYPE_CHECKING:
    from ..export.validate import DirCheck
    from ..export.writer import ExportRequest
    from ..train.objective import Labels, Objective

SGLANG_ARCH = "LlamaForCausalLMEagle"


class Eagle1Family(DrafterFamily):
    """EAGLE-1 (`eagle1`) and EAGLE-2 (`eagle2`)."""

    name = "eagle1"
    algorithms = ("eagle1", "eagle2")
    architectures = {SGLANG_ARCH: "sglang"}
    formats = ("sglang",)
    sglang_algorithm = "EAGLE"
    uses_target_head = True

    # ------------------------------------------------------------------ model
    def target_layers(self, configured: Optional[list[int]], info: dict[str, Any]) -> list[int]:
        """The last layer h[N]: the drafter is fed the target's final post-norm hidden state."""
        return [int(info["num_layers"])]

    def config_fields(self, algorithm: str, info: dict[str, Any], draft_vocab_size: int,
                      aux_layers: Optional[list[int]]) -> dict[str, Any]:
        return {"draft_vocab_size": int(info["vocab_size"]), "aux_layers": self.target_layers(aux_layers, info),
                "fc_norm": False, "norm_output": False}

    def new_module(self, cfg: DrafterConfig, target_lm_head: Optional[torch.Tensor]) -> torch.nn.Module:
        if target_lm_head is None:
            raise ValueError("an EAGLE-1/2 drafter computes its logits with the target's lm_head")
        return Eagle1Drafter(cfg, target_lm_head.float())

    # ------------------------------------------------------------------ training
    def target_features(self, aux: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The final post-norm hidden state: what the target's lm_head consumes and SGLang hands the drafter."""
        return final

    def regression_targets(self, features: torch.Tensor, label_pos: torch.Tensor) -> Optional[torch.Tensor]:
        """The target's next hidden state, which the drafter regresses."""
        return features.reshape(-1, features.shape[-1]).index_select(0, label_pos)

    def step_loss(self, objective: "Objective", token_loss: torch.Tensor, drafted: torch.Tensor,
                  labels: "Labels", rows: torch.Tensor) -> torch.Tensor:
        """w_t * token loss + w_h * the hidden regression (SmoothL1 or squared error, mean over features)."""
        diff = drafted.float() - labels.features.index_select(0, rows).float()
        reg = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none") \
            if objective.hidden_loss == "smooth_l1" else diff.pow(2)
        return objective.token_loss_weight * token_loss + objective.hidden_loss_weight * reg.mean(-1).sum()

    def has_fast_step(self, cfg: DrafterConfig) -> bool:
        return True

    # ------------------------------------------------------------------ export
    def export_tensors(self, shapes: Shapes, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """SGLang's LlamaForCausalLMEagle: fc with a bias and `layers.0.` without an input norm."""
        h = shapes.hidden_size
        out = decoder_layer_shapes(shapes, "layers.0.", h, input_norm=False)
        out["fc.weight"] = (h, 2 * h)
        out["fc.bias"] = (h,)
        if shapes.ships_embedding:
            out["embed_tokens.weight"] = (shapes.vocab_size, h)
        return {k: (v, "float") for k, v in out.items()}

    def export_config(self, fmt: str, dc: dict[str, Any], req: "ExportRequest") -> dict[str, Any]:
        cfg = llama_fields(dc, req.dtype)
        cfg["architectures"] = [SGLANG_ARCH]
        return cfg

    def write_extras(self, fmt_dir: Path, fmt: str, d2t: Optional[torch.Tensor], shapes: Shapes) -> None:
        """A vocab stage's reduced vocabulary becomes SGLang's speculative token map (the target ids it may draft)."""
        if d2t is not None and shapes.draft_vocab_size < shapes.vocab_size:
            torch.save(draft_vocab_ids(d2t).tolist(), fmt_dir / TOKEN_MAP_FILE)

    def sglang_extra_args(self, draft_dir: Path) -> list[str]:
        """The speculative token map, when the export has one."""
        path = draft_dir / TOKEN_MAP_FILE
        return ["--speculative-token-map", str(path)] if path.exists() else []

    # ------------------------------------------------------------------ validation and loading
    def served_config(self, cfg: dict[str, Any], fmt: str, target_layers: int) -> dict[str, Any]:
        out = served_llama_fields(cfg)
        out.update(algorithm="eagle1", draft_vocab_size=cfg["vocab_size"], target_hidden_size=cfg["hidden_size"],
                   aux_layers=[target_layers], fc_norm=False, norm_output=bool(cfg.get("norm_output", False)))
        return out

    def hot_token_ids(self, fmt_dir: Path) -> Optional[torch.Tensor]:
        """SGLang's --speculative-token-map restricts the proposals to the ids in speculative_token_map.pt."""
        path = fmt_dir / TOKEN_MAP_FILE
        return torch.as_tensor(torch.load(path, weights_only=True), dtype=torch.long) if path.exists() else None

    def check_export(self, check: "DirCheck", cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        check.check_one_layer(layer)
        served = self.served_config(cfg, check.fmt, check.target["num_layers"])
        check.compare(served, (), target_fields=())
        h = served["hidden_size"]
        if h != check.target["hidden_size"]:
            check.bad(f"an EAGLE-1/2 drafter must have the target's hidden size {check.target['hidden_size']}, "
                      f"got {h}")
        check.check_weights(Shapes(algorithm="eagle1", hidden_size=h, intermediate_size=served["intermediate_size"],
                                   num_heads=served["num_attention_heads"], num_kv_heads=served["num_key_value_heads"],
                                   head_dim=served["head_dim"], vocab_size=served["vocab_size"],
                                   draft_vocab_size=served["vocab_size"], target_hidden_size=h, num_aux=1,
                                   fc_norm=False),
                            layer.get("torch_dtype") or cfg.get("torch_dtype"))
        _check_token_map(check, layer)

    # ------------------------------------------------------------------ inference
    def draft_input(self, drafter: torch.nn.Module, captured: torch.Tensor,
                    final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The last layer's output through the target's final norm (as its lm_head consumes it)."""
        return final_norm(captured)


def draft_vocab_ids(d2t: torch.Tensor) -> torch.Tensor:
    """Target ids of the draft vocabulary (`i + d2t[i]`), i.e. SGLang's speculative token map for EAGLE-1/2."""
    return torch.arange(d2t.numel(), dtype=torch.int64) + d2t.to(torch.int64)


def _check_token_map(check: "DirCheck", layer: dict[str, Any]) -> None:
    path = check.path / TOKEN_MAP_FILE
    if not path.exists():
        return
    try:
        ids = torch.as_tensor(torch.load(path, weights_only=True))
    except Exception as e:  # noqa: BLE001 - report, do not crash
        return check.bad(f"{path} cannot be loaded with torch.load(weights_only=True) ({e})")
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.numel() == 0:
        return check.bad(f"{TOKEN_MAP_FILE} must be a non-empty 1-D list of token ids")
    if int(ids.min()) < 0 or int(ids.max()) >= layer["vocab_size"]:
        check.bad(f"{TOKEN_MAP_FILE} holds ids outside 0..{layer['vocab_size'] - 1}")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        check.bad(f"{TOKEN_MAP_FILE} ids must be strictly increasing")


FAMILY = Eagle1Family()
