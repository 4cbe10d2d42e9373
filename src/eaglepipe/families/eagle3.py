"""EAGLE-3 and EAGLE-3.1: fc fuses the target's aux hidden states, one decoder layer drafts over a reduced draft
vocabulary (d2t/t2d); EAGLE-3.1 adds fc_norm and norm_output. SGLang serves it as LlamaForCausalLMEagle3, vLLM
as the speculators format's Eagle3Speculator. The module is models/eagle3.py."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from safetensors import safe_open

from ..config import ConfigError
from ..export.configs import llama_fields
from ..export.layout import TOKEN_MAP_FILE, WEIGHTS_FILE, Shapes, decoder_layer_shapes, sglang_aux_ids, vocab_map_shapes
from ..export.served import (
    AUX_IDS_KEY,
    default_aux_layers,
    layer_config,
    nested_aux_ids,
    served_aux_layers,
    served_llama_fields,
    served_num_aux,
)
from ..export.values import int_list, is_int
from ..models.config import DrafterConfig
from ..models.eagle3 import Eagle3Drafter
from .base import DrafterFamily

if TYPE_CHECKING:
    from ..export.validate import DirCheck
    from ..export.writer import ExportRequest

SGLANG_ARCH = "LlamaForCausalLMEagle3"
VLLM_ARCH = "Eagle3Speculator"
# compared with the training checkpoint's drafter config besides the Llama fields
COMPARED_FIELDS = ("draft_vocab_size", "target_hidden_size", "aux_layers", "fc_norm", "norm_output")
# layouts SGLang 0.5.23 can build but eaglepipe's drafter cannot
UNSUPPORTED_FLAGS = ("norm_before_fc", "bias")


class Eagle3Family(DrafterFamily):
    """EAGLE-3 (`eagle3`) and EAGLE-3.1 (`eagle3.1`: fc_norm and norm_output)."""

    name = "eagle3"
    algorithms = ("eagle3", "eagle3.1")
    architectures = {SGLANG_ARCH: "sglang", VLLM_ARCH: "vllm"}
    # NeMo AutoModel's own save (its kit rewrites it for SGLang)
    foreign_architectures = {"LlamaEagle3DraftModel": "sglang"}
    formats = ("sglang", "vllm")
    sglang_algorithm = "EAGLE3"
    uses_draft_vocab = True
    init_fields = ("intermediate_size", "draft_vocab_size", "fc_norm", "norm_output")
    # the speculators format's `speculators_model_type` and `speculators_config.algorithm` of its vLLM exports
    speculators_type = "eagle3"
    # compared with the training checkpoint's drafter config besides the Llama fields
    compared_fields = COMPARED_FIELDS

    # ------------------------------------------------------------------ model
    def target_layers(self, configured: Optional[list[int]], info: dict[str, Any]) -> list[int]:
        return list(configured or info["aux_layers"])

    def config_fields(self, algorithm: str, info: dict[str, Any], draft_vocab_size: int,
                      aux_layers: Optional[list[int]]) -> dict[str, Any]:
        return {"draft_vocab_size": int(draft_vocab_size), "aux_layers": self.target_layers(aux_layers, info),
                "fc_norm": algorithm == "eagle3.1", "norm_output": algorithm == "eagle3.1"}

    def new_module(self, cfg: DrafterConfig, target_lm_head: Optional[torch.Tensor]) -> torch.nn.Module:
        return Eagle3Drafter(cfg)

    def init_head(self, model: torch.nn.Module, d2t: Optional[torch.Tensor], t2d: Optional[torch.Tensor],
                  target_lm_head: torch.Tensor, lm_head_init: str) -> None:
        """d2t/t2d from the vocab stage; lm_head rows from the target's at the draft vocab's ids (or random)."""
        if d2t is None or t2d is None:
            raise ValueError("an EAGLE-3 drafter needs the d2t/t2d vocab map")
        model.d2t.copy_(d2t)
        model.t2d.copy_(t2d)
        if lm_head_init == "target":
            target_ids = torch.arange(model.config.draft_vocab_size) + d2t.cpu()
            model.lm_head.weight.copy_(target_lm_head[target_ids.to(target_lm_head.device)])

    def canonical_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SGLang's `layers.0.` is our `midlayer.`."""
        state = {("midlayer." + k.removeprefix("layers.0.") if k.startswith("layers.0.") else k): v
                 for k, v in state.items()}
        return super().canonical_state(state)

    def check_target(self, info: dict[str, Any], draft_vocab: int, aux_layers: list[int]) -> None:
        if draft_vocab > int(info["vocab_size"]):
            raise ConfigError(f"the draft vocab ({draft_vocab}) is bigger than the target's vocab "
                              f"({info['vocab_size']})")
        n = int(info["num_layers"])
        if not all(1 <= i <= n - 1 for i in aux_layers):
            raise ConfigError(f"target.aux_layers={list(aux_layers)}: SGLang and vLLM capture h[1]..h[{n - 1}] of a "
                              f"{n}-layer target, so the export would be rejected")

    # ------------------------------------------------------------------ training
    def target_features(self, aux: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The aux hidden states, fused by the drafter's fc inside the trained module."""
        return aux

    def label_ids(self, d2t: torch.Tensor) -> Optional[torch.Tensor]:
        """The draft vocabulary's target ids: the label logits are the target's over the draft vocab."""
        return torch.arange(len(d2t)) + d2t

    def fuse_flops(self, cfg: DrafterConfig) -> int:
        return 2 * len(cfg.aux_layers) * cfg.target_hidden_size * cfg.hidden_size

    # ------------------------------------------------------------------ export
    def export_tensors(self, shapes: Shapes, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """The float tensors under `midlayer.` (SGLang) or `layers.0.` (vLLM), then the vocab maps."""
        out = {k: (v, "float") for k, v in float_shapes(shapes, layer_prefix(fmt)).items()}
        for k, (shape, dt) in vocab_map_shapes(shapes, vllm=fmt == "vllm").items():
            out[k] = (shape, "int64" if dt == torch.int64 else "bool")
        return out

    def export_name(self, name: str, fmt: str) -> str:
        return layer_prefix(fmt) + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name

    def export_config(self, fmt: str, dc: dict[str, Any], req: "ExportRequest") -> dict[str, Any]:
        if fmt == "sglang":
            return sglang_config(dc, req.dtype)
        return vllm_config(dc, req.dtype, req.verifier_name, req.verifier_arch, req.num_steps)

    def vllm_speculative_config(self, draft_dir: Path, num_steps: int) -> dict[str, Any]:
        return {"method": "eagle3", "model": str(draft_dir), "num_speculative_tokens": num_steps,
                "draft_tensor_parallel_size": 1}

    # ------------------------------------------------------------------ validation and loading
    def served_config(self, cfg: dict[str, Any], fmt: str, target_layers: int) -> dict[str, Any]:
        layer = layer_config(cfg, fmt)
        fc_norm = bool(cfg.get("fc_norm", False))
        out = served_llama_fields(layer)
        out.update(algorithm=self.served_algorithm(cfg), draft_vocab_size=cfg.get("draft_vocab_size"),
                   target_hidden_size=cfg.get("target_hidden_size") or layer["hidden_size"],
                   aux_layers=served_aux_layers(cfg, fmt, target_layers), fc_norm=fc_norm,
                   norm_output=bool(cfg.get("norm_output", False)))
        return out

    def served_algorithm(self, cfg: dict[str, Any]) -> str:
        """The algorithm an exported config.json holds: EAGLE-3.1 has fc_norm."""
        return "eagle3.1" if cfg.get("fc_norm", False) else "eagle3"

    def served_name(self, name: str, fmt: str) -> str:
        """SGLang 0.5.23 and vLLM treat `midlayer.*` and `layers.0.*` as the same layer."""
        name = super().served_name(name, fmt)
        other = "layers.0." if fmt == "sglang" else "midlayer."
        return layer_prefix(fmt) + name.removeprefix(other) if name.startswith(other) else name

    def check_export(self, check: "DirCheck", cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        check.check_one_layer(layer)
        if check.fmt == "vllm":
            _check_speculators(check, cfg, self.speculators_type)
        self.check_layout(check, cfg, layer)
        if not _check_aux_ids(check, cfg):
            return
        served = self.served_config(cfg, check.fmt, check.target["num_layers"])
        check.compare(served, self.compared_fields, target_fields=("aux_layers",))
        shapes = _served_shapes(check, cfg, served)
        if shapes is not None:
            check.check_weights(shapes, layer.get("torch_dtype") or cfg.get("torch_dtype"))
        _check_num_aux(check, layer, served["aux_layers"])
        if (check.path / TOKEN_MAP_FILE).exists():
            check.warn(f"{TOKEN_MAP_FILE} is ignored for EAGLE-3 drafters (d2t sets the draft vocabulary)")

    def check_layout(self, check: "DirCheck", cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        """The layout flags: the norm after the residual (SGLang's only layout), and no extras we cannot build."""
        nbr = cfg.get("norm_before_residual")
        if nbr is None and (check.strict or check.fmt == "vllm"):
            default = "speculators defaults it to true" if check.fmt == "vllm" else \
                "the export states the layout the drafter was trained with"
            check.bad(f"norm_before_residual must be false explicitly ({default})")
        elif nbr is not None and nbr is not False:
            check.bad(f"norm_before_residual must be false, got {nbr!r}: SGLang and eaglepipe apply hidden_norm "
                      "after taking the residual, so a drafter trained the other way would accept nothing")
        for k in UNSUPPORTED_FLAGS:
            if any(isinstance(c, dict) and c.get(k) for c in (cfg, layer, cfg.get("eagle_config"))):
                check.bad(f"{k} is set: eaglepipe's drafter has no such layer (the plain EAGLE-3/3.1 layout only)")
        if (cfg.get("eagle_config") or {}).get("use_aux_hidden_state") is False:
            check.bad("eagle_config.use_aux_hidden_state is false: SGLang would not feed aux hidden states")

    # ------------------------------------------------------------------ inference
    def draft_input(self, drafter: torch.nn.Module, captured: torch.Tensor,
                    final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The aux hidden states fused by the drafter's fc (fc_norm first for EAGLE-3.1)."""
        return drafter.fuse(captured)

    def has_fast_step(self, cfg: DrafterConfig) -> bool:
        return True


def layer_prefix(fmt: str) -> str:
    """The decoder layer's weight prefix: always `midlayer.` for SGLang (old builds silently drop `layers.0.*`),
    `layers.0.` for vLLM."""
    return "midlayer." if fmt == "sglang" else "layers.0."


def float_shapes(s: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    """Float tensors of an EAGLE-3/3.1 export with the decoder layer under `prefix`."""
    h = s.hidden_size
    out = decoder_layer_shapes(s, prefix, 2 * h, input_norm=True)
    out[f"{prefix}hidden_norm.weight"] = (h,)
    out["fc.weight"] = (h, s.num_aux * s.target_hidden_size)
    out["norm.weight"] = (h,)
    out["lm_head.weight"] = (s.draft_vocab_size, h)
    if s.fc_norm:
        out.update({f"fc_norm.{i}.weight": (s.target_hidden_size,) for i in range(s.num_aux)})
    if s.ships_embedding:
        out["embed_tokens.weight"] = (s.vocab_size, h)
    return out


def sglang_config(dc: dict[str, Any], dtype: str) -> dict[str, Any]:
    """SGLang's config.json (LlamaForCausalLMEagle3). `dc` is the training checkpoint's DrafterConfig dict. Aux ids
    are written in both conventions: nested `eagle_config` = h-index - 1 (SGLang adds 1), top-level = h-index
    (vLLM reads it as is)."""
    cfg = llama_fields(dc, dtype)
    aux = [int(i) for i in dc["aux_layers"]]
    cfg.update({
        "architectures": [SGLANG_ARCH],
        "draft_vocab_size": int(dc.get("draft_vocab_size") or dc["vocab_size"]),
        "target_hidden_size": int(dc.get("target_hidden_size") or dc["hidden_size"]),
        "eagle_config": {AUX_IDS_KEY: sglang_aux_ids(aux), "use_aux_hidden_state": True},
        AUX_IDS_KEY: aux,
        "num_aux_hidden_states": len(aux),
        "norm_before_residual": False,
        "fc_norm": bool(dc.get("fc_norm", False)),
        "norm_output": bool(dc.get("norm_output", False)),
    })
    return cfg


def vllm_config(dc: dict[str, Any], dtype: str, verifier_name: str, verifier_arch: str,
                speculative_tokens: int) -> dict[str, Any]:
    """vLLM's speculators-format config.json (`Eagle3Speculator`)."""
    layer = llama_fields(dc, dtype)
    layer["architectures"] = ["LlamaForCausalLM"]
    # vLLM builds the drafter from this part and sizes fc from it (else from 3 aux states): the top level is not read
    layer["num_aux_hidden_states"] = len(dc["aux_layers"])
    return {
        "architectures": [VLLM_ARCH],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier_name, "architectures": [verifier_arch]},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": int(dc.get("draft_vocab_size") or dc["vocab_size"]),
        "target_hidden_size": int(dc.get("target_hidden_size") or dc["hidden_size"]),
        "norm_before_residual": False,
        "fc_norm": bool(dc.get("fc_norm", False)),
        "norm_output": bool(dc.get("norm_output", False)),
        AUX_IDS_KEY: [int(i) for i in dc["aux_layers"]],
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


# ---------------------------------------------------------------------- the validator's EAGLE-3 checks
def _check_speculators(check: "DirCheck", cfg: dict[str, Any], kind: str) -> None:
    if cfg.get("speculators_model_type") != kind:
        check.bad(f"speculators_model_type must be {kind}, got {cfg.get('speculators_model_type')!r}")
    sc = cfg.get("speculators_config")
    try:
        tokens = sc["proposal_methods"][0]["speculative_tokens"]
        verifier = sc["verifier"]
        name = verifier["name_or_path"]
    except (KeyError, IndexError, TypeError):
        return check.bad("speculators_config needs proposal_methods[0].speculative_tokens and verifier.name_or_path")
    if sc.get("algorithm") != kind:
        check.bad(f"speculators_config.algorithm must be {kind}, got {sc.get('algorithm')!r}")
    if not is_int(tokens) or tokens < 1:
        check.bad(f"speculative_tokens must be a positive int, got {tokens!r}")
    if not isinstance(name, str) or not name:
        check.bad("speculators_config.verifier.name_or_path is empty")
    if not isinstance(verifier.get("architectures"), list) or not verifier["architectures"]:
        check.bad("speculators_config.verifier.architectures must list the target's architecture")


def _check_aux_ids(check: "DirCheck", cfg: dict[str, Any]) -> bool:
    """Both conventions are well-formed and agree; the engine's capture layers exist. False when unusable."""
    n = check.target["num_layers"]
    top, nested = cfg.get(AUX_IDS_KEY), nested_aux_ids(cfg)
    for name, ids in ((f"top-level {AUX_IDS_KEY} (vLLM, h-indices)", top),
                      (f"eagle_config.{AUX_IDS_KEY} (SGLang reads only this, h-index - 1)", nested)):
        if ids is not None and not int_list(ids):
            check.bad(f"{name} must be a non-empty list of ints, got {ids!r}")
            return False
    if top is None and (check.strict or nested is not None):
        check.not_portable(f"top-level {AUX_IDS_KEY} (vLLM, h-indices) is missing"
                           + (": vLLM would read the nested ids without SGLang's +1" if nested else ""))
    if check.fmt == "sglang":
        if nested is None and check.strict:
            check.bad(f"eagle_config.{AUX_IDS_KEY} (SGLang reads only this) must be a list of ints")
        elif nested is None and top is not None and top != default_aux_layers(n):
            check.bad(f"only the top-level aux ids {top} are given: SGLang reads only eagle_config's and would "
                      f"capture the default {default_aux_layers(n)}")
        elif nested is not None and top is not None and [i + 1 for i in nested] != top:
            check.bad(f"aux ids disagree: nested eagle_config {nested} must equal top-level {top} minus 1 "
                      "(SGLang adds 1 to the nested ids; vLLM uses the top-level ids as they are)")
    aux = served_aux_layers(cfg, check.fmt, n)
    out_of_range = [i for i in aux if not 1 <= i <= n - 1]
    if out_of_range:
        check.bad(f"aux h-indices {out_of_range} are outside 1..{n - 1} for a {n}-layer target")
    if aux != sorted(aux):
        check.warn(f"aux h-indices {aux} are not ascending (the convention is low, mid, high)")
    return True


def _check_num_aux(check: "DirCheck", layer: dict[str, Any], aux: list[int]) -> None:
    declared = layer.get("num_aux_hidden_states")
    if declared is None and check.strict:
        check.bad(f"num_aux_hidden_states must be written ({len(aux)}): without it vLLM sizes fc from the "
                  "nested eagle_config ids, else for 3 aux hidden states")
    elif declared is not None and not is_int(declared):
        check.bad(f"num_aux_hidden_states must be an int, got {declared!r}")
    elif served_num_aux(layer) != len(aux):
        check.bad(f"fc is sized for {served_num_aux(layer)} aux hidden states (num_aux_hidden_states, else the "
                  f"nested eagle_config ids, else 3) but the engine captures {len(aux)} layers {aux}")


def _served_shapes(check: "DirCheck", cfg: dict[str, Any], served: dict[str, Any]) -> Optional[Shapes]:
    dv, th = cfg.get("draft_vocab_size"), cfg.get("target_hidden_size")
    ok = True
    if not is_int(dv) or not 1 <= dv <= served["vocab_size"]:
        check.bad(f"draft_vocab_size must be present and in 1..vocab_size (SGLang fails without it), got {dv!r}")
        dv = _lm_head_rows(check.path)  # keep checking the other tensors against the shipped lm_head
        ok = dv is not None
    if th is None and not check.strict:
        th = served["hidden_size"]  # what both engines assume
    if not is_int(th):
        check.bad(f"target_hidden_size must be present, got {th!r}")
        ok = False
    elif th != check.target["hidden_size"]:
        check.bad(f"target_hidden_size {th} != the target's hidden size {check.target['hidden_size']}")
    if not ok:
        return None
    return Shapes(algorithm=served["algorithm"], hidden_size=served["hidden_size"],
                  intermediate_size=served["intermediate_size"], num_heads=served["num_attention_heads"],
                  num_kv_heads=served["num_key_value_heads"], head_dim=served["head_dim"],
                  vocab_size=served["vocab_size"], draft_vocab_size=dv, target_hidden_size=th,
                  num_aux=len(served["aux_layers"]), fc_norm=served["fc_norm"])


def _lm_head_rows(fmt_dir: Path) -> Optional[int]:
    try:
        with safe_open(str(fmt_dir / WEIGHTS_FILE), framework="pt") as f:
            return int(f.get_slice("lm_head.weight").get_shape()[0]) if "lm_head.weight" in f.keys() else None
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the weights check
        return None


FAMILY = Eagle3Family()
