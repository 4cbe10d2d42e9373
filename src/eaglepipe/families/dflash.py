"""DFlash (arXiv 2602.06036): a block-diffusion drafter. Several Qwen3-style layers denoise [last token, MASK x
(B-1)] in one forward, attending to the target's fused layers as extra K/V in every layer, with the target's
embedding and lm_head. It trains on random anchors (the `block` objective, train/block_objective.py) and drafts a
chain of B-1 tokens per round (the `parallel` round, its cache in speculative/context_cache.py). The module is
models/dflash.py.

SGLang (`--speculative-algorithm DFLASH`) and vLLM (`"method": "dflash"`) load the same config.json
(`DFlashDraftModel`, z-lab's layout) and weights; the exporter writes it for both. They read the target layers
differently: `dflash_config.target_layer_ids` are 0-based layer ids, the output of layer l being h[l + 1] (SGLang
captures before layer l + 1); vLLM takes the top-level `eagle_aux_hidden_state_layer_ids` as h-indices when present
(builds before 0.20 read nothing else), else `target_layer_ids` + 1. The export writes both.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ..config import ConfigError
from ..export.configs import llama_fields
from ..export.layout import Shapes, decoder_layer_shapes
from ..export.served import AUX_IDS_KEY, default_aux_layers, served_llama_fields
from ..export.values import int_list, is_int
from ..models.config import DrafterConfig
from ..models.dflash import DFlashDrafter
from .base import DrafterFamily

if TYPE_CHECKING:
    from ..config.schema import TrainCfg
    from ..export.validate import DirCheck
    from ..export.writer import ExportRequest

ARCH = "DFlashDraftModel"
# target layers the drafter is fed when none are configured: as many as z-lab's 8B drafters take (5)
DEFAULT_TARGET_FEATURES = 5
FULL_ATTENTION = "full_attention"
# compared with the training checkpoint's drafter config besides the Llama fields
COMPARED_FIELDS = ("aux_layers", "num_hidden_layers", "block_size", "mask_token_id", "target_hidden_size")
# dflash_config keys of layouts (Domino, grouped convolutions, selectors, sinks) eaglepipe's drafter does not have
UNSUPPORTED_KEYS = ("projector_type", "conv_kernel_size", "selector_rank", "attention_sink_bias", "use_swa")


def build_target_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """z-lab's default target layers (0-based layer ids): the middle one for a single feature, else `count` ids
    spread evenly (rounded) from layer 1 to layer num_target_layers - 3."""
    if count == 1:
        return [num_target_layers // 2]
    first, last = 1, num_target_layers - 3
    return [int(round(first + i * (last - first) / (count - 1))) for i in range(count)]


def dflash_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config's `dflash_config` mapping (empty when absent or not a mapping)."""
    nested = cfg.get("dflash_config")
    return nested if isinstance(nested, dict) else {}


def nested_or_top(cfg: dict[str, Any], key: str) -> Any:
    """`dflash_config[key]`, else the top-level `key` (where both engines look)."""
    return dflash_config(cfg).get(key, cfg.get(key))


class DFlashFamily(DrafterFamily):
    """DFlash (`dflash`)."""

    name = "dflash"
    algorithms = ("dflash",)
    architectures = {ARCH: "sglang"}
    formats = ("sglang", "vllm")
    decoder_layers = None
    sglang_algorithm = "DFLASH"
    uses_target_head = True
    init_fields = ("intermediate_size", "num_hidden_layers", "block_size", "mask_token_id")
    objective = "block"
    draft_round = "parallel"
    block_drafting = "context"

    # ------------------------------------------------------------------ model
    def target_layers(self, configured: Optional[list[int]], info: dict[str, Any]) -> list[int]:
        """`configured`, else z-lab's spacing of DEFAULT_TARGET_FEATURES layers, as h-indices."""
        if configured:
            return list(configured)
        return [i + 1 for i in build_target_layer_ids(int(info["num_layers"]), DEFAULT_TARGET_FEATURES)]

    def config_fields(self, algorithm: str, info: dict[str, Any], draft_vocab_size: int,
                      aux_layers: Optional[list[int]]) -> dict[str, Any]:
        return {"draft_vocab_size": int(info["vocab_size"]), "aux_layers": self.target_layers(aux_layers, info),
                "fc_norm": False, "norm_output": False}

    def train_fields(self, train: "TrainCfg", target_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        """The layers and block size the config asks for, and the mask token resolved from the target's
        tokenizer (target/mask_token.py)."""
        from ..target.info import load_tokenizer
        from ..target.mask_token import resolve_mask_token_id

        mask = resolve_mask_token_id(train.mask_token_id, load_tokenizer(target_dir), int(info["vocab_size"]))
        return {"num_hidden_layers": train.draft_layers, "block_size": train.block_size, "mask_token_id": mask}

    def new_module(self, cfg: DrafterConfig, target_lm_head: Optional[torch.Tensor]) -> torch.nn.Module:
        if target_lm_head is None:
            raise ValueError("a DFlash drafter computes its logits with the target's lm_head")
        return DFlashDrafter(cfg, target_lm_head.float())

    def check_target(self, info: dict[str, Any], draft_vocab: int, aux_layers: list[int]) -> None:
        n = int(info["num_layers"])
        if not all(1 <= i <= n - 1 for i in aux_layers):
            raise ConfigError(f"target layers {list(aux_layers)}: DFlash's target_layer_ids name layers 0..{n - 2} "
                              f"(h[1]..h[{n - 1}]) of a {n}-layer target")

    # ------------------------------------------------------------------ training
    def target_features(self, aux: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The captured layers, fused by the drafter's fc and hidden_norm inside the trained module."""
        return aux

    def fuse_flops(self, cfg: DrafterConfig) -> int:
        return 2 * len(cfg.aux_layers) * cfg.target_hidden_size * cfg.hidden_size

    # ------------------------------------------------------------------ export
    def export_tensors(self, shapes: Shapes, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """layers.{i}.* (Qwen3 layers with q_norm/k_norm), fc, hidden_norm and norm: no embedding, no lm_head."""
        h, d = shapes.hidden_size, shapes.head_dim
        out: dict[str, tuple[int, ...]] = {}
        for i in range(shapes.num_layers):
            prefix = f"layers.{i}."
            out.update(decoder_layer_shapes(shapes, prefix, h, input_norm=True))
            out[f"{prefix}self_attn.q_norm.weight"] = (d,)
            out[f"{prefix}self_attn.k_norm.weight"] = (d,)
        out["fc.weight"] = (h, shapes.num_aux * shapes.target_hidden_size)
        out["hidden_norm.weight"] = (h,)
        out["norm.weight"] = (h,)
        return {k: (v, "float") for k, v in out.items()}

    def export_config(self, fmt: str, dc: dict[str, Any], req: "ExportRequest") -> dict[str, Any]:
        """z-lab's config.json (model_type qwen3), which both engines read: the same for both formats."""
        cfg = llama_fields(dc, req.dtype)
        layers = int(dc["num_hidden_layers"])
        aux = [int(i) for i in dc["aux_layers"]]
        cfg.update({
            "architectures": [ARCH],
            "model_type": "qwen3",
            "num_hidden_layers": layers,
            "layer_types": [FULL_ATTENTION] * layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "block_size": int(dc["block_size"]),
            "num_target_layers": int(req.target_layers),
            "dflash_config": {"mask_token_id": int(dc["mask_token_id"]), "target_layer_ids": [i - 1 for i in aux]},
            AUX_IDS_KEY: aux,
            "target_hidden_size": int(dc.get("target_hidden_size") or dc["hidden_size"]),
        })
        return cfg

    def launch_point(self, dc: dict[str, Any], num_steps: int, topk: int, num_draft_tokens: int
                     ) -> tuple[int, int, int]:
        """Blocks of the trained size: B - 1 drafts a round."""
        block = int(dc["block_size"])
        return block - 1, 1, block

    def sglang_spec_args(self, draft_dir: Path, num_steps: int, topk: int, num_draft_tokens: int) -> list[str]:
        """SGLang's DFLASH takes the block (root and drafts) as the tokens verified per round; it forces 1 step and
        topk 1."""
        return ["--speculative-num-draft-tokens", str(num_draft_tokens)]

    def vllm_speculative_config(self, draft_dir: Path, num_steps: int) -> dict[str, Any]:
        return {"method": "dflash", "model": str(draft_dir), "num_speculative_tokens": num_steps,
                "draft_tensor_parallel_size": 1}

    # ------------------------------------------------------------------ validation and loading
    def served_format(self, cfg: dict[str, Any], dir_name: str) -> str:
        """Both engines read the one layout: the export dir's name says which engine it is for (SGLang's
        elsewhere)."""
        return dir_name if dir_name in self.formats else "sglang"

    def layer_config(self, cfg: dict[str, Any], fmt: str) -> Any:
        """The whole config, for both engines."""
        return cfg

    def served_config(self, cfg: dict[str, Any], fmt: str, target_layers: int) -> dict[str, Any]:
        out = served_llama_fields(cfg)
        dfc = dflash_config(cfg)
        out.update(algorithm="dflash", draft_vocab_size=cfg["vocab_size"],
                   target_hidden_size=cfg.get("target_hidden_size") or cfg["hidden_size"],
                   aux_layers=served_aux_layers(cfg, fmt, target_layers), fc_norm=False, norm_output=False,
                   num_hidden_layers=cfg.get("num_hidden_layers", 1),
                   block_size=nested_or_top(cfg, "block_size") or 16,
                   mask_token_id=dfc.get("mask_token_id", cfg.get("mask_token_id")))
        return out

    def check_round(self, cfg: DrafterConfig, num_steps: int, topk: int, num_draft_tokens: int) -> None:
        """A chain of at most block_size - 1 drafts: the block positions the drafter was trained on."""
        super().check_round(cfg, num_steps, topk, num_draft_tokens)
        if num_steps + 1 > cfg.block_size:
            raise ValueError(f"the DFlash drafter was trained on blocks of {cfg.block_size}: a round drafts at most "
                             f"{cfg.block_size - 1} tokens, got num_steps {num_steps}")

    def check_loadable(self, cfg: dict[str, Any]) -> None:
        """eaglepipe's drafter has bidirectional full-attention layers only, in z-lab's plain layout."""
        unsupported = [t for t in cfg.get("layer_types") or [] if t != FULL_ATTENTION]
        if unsupported:
            raise ValueError(f"layer_types holds {sorted(set(unsupported))}: eaglepipe's DFlash drafter has "
                             "full-attention layers only")
        extras = [k for k in UNSUPPORTED_KEYS if dflash_config(cfg).get(k)]
        if extras or cfg.get("is_causal") or dflash_config(cfg).get("causal"):
            raise ValueError(f"the config sets {extras or ['causal']}: a layout eaglepipe's DFlash drafter does not "
                             "have")

    def check_export(self, check: "DirCheck", cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        try:
            self.check_loadable(cfg)
        except ValueError as e:
            check.bad(str(e))
        layers = cfg.get("num_hidden_layers")
        if not is_int(layers) or layers < 1:
            return check.bad(f"num_hidden_layers must be a positive int, got {layers!r}")
        _check_layout(check, cfg, layers)
        if not _check_target_layers(check, cfg, layers):
            return
        served = self.served_config(cfg, check.fmt, check.target["num_layers"])
        if served["hidden_size"] != check.target["hidden_size"] or served["target_hidden_size"] != \
                check.target["hidden_size"]:
            return check.bad(f"hidden_size {served['hidden_size']} and target_hidden_size "
                             f"{served['target_hidden_size']} must be the target's {check.target['hidden_size']}: "
                             "the drafter shares its embedding and lm_head")
        check.compare(served, COMPARED_FIELDS, target_fields=())
        check.check_weights(Shapes(algorithm="dflash", hidden_size=served["hidden_size"],
                                   intermediate_size=served["intermediate_size"],
                                   num_heads=served["num_attention_heads"], num_kv_heads=served["num_key_value_heads"],
                                   head_dim=served["head_dim"], vocab_size=served["vocab_size"],
                                   draft_vocab_size=served["vocab_size"], target_hidden_size=served["hidden_size"],
                                   num_aux=len(served["aux_layers"]), fc_norm=False, num_layers=layers),
                            cfg.get("torch_dtype"))

    # ------------------------------------------------------------------ inference
    def draft_input(self, drafter: torch.nn.Module, captured: torch.Tensor,
                    final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The context features hidden_norm(fc(captured layers))."""
        return drafter.fuse(captured)


def served_aux_layers(cfg: dict[str, Any], fmt: str, target_layers: int) -> list[int]:
    """The target layers the engine feeds the drafter, as h-indices (see the module doc)."""
    ids = nested_or_top(cfg, "target_layer_ids")
    if fmt == "vllm":
        top = cfg.get(AUX_IDS_KEY)
        if top:
            return [int(i) for i in top]
        ids = dflash_config(cfg).get("target_layer_ids")
        return [int(i) + 1 for i in ids] if ids else default_aux_layers(target_layers)
    if not ids:
        layers = int(cfg.get("num_hidden_layers") or 1)
        ids = build_target_layer_ids(int(nested_or_top(cfg, "num_target_layers") or layers), layers)
    return [int(i) + 1 for i in ids]


# ---------------------------------------------------------------------- the validator's DFlash checks
def _check_layout(check: "DirCheck", cfg: dict[str, Any], layers: int) -> None:
    """Block size, mask token, attention layout."""
    block, mask = nested_or_top(cfg, "block_size"), nested_or_top(cfg, "mask_token_id")
    if block is None and check.strict:
        check.bad("block_size must be written (SGLang and vLLM default to 16 blocks otherwise)")
    elif block is not None and (not is_int(block) or block < 2):
        check.bad(f"block_size must be an int >= 2, got {block!r}")
    if not is_int(mask) or not 0 <= mask < check.target["vocab_size"]:
        check.bad(f"dflash_config.mask_token_id must be a row of the target's embedding (0..."
                  f"{check.target['vocab_size'] - 1}), got {mask!r}")
    types = cfg.get("layer_types")
    if types is None and check.strict:
        check.bad(f"layer_types must list {layers} attention types (SGLang and vLLM read them per layer)")
    elif types is not None and (not isinstance(types, list) or len(types) != layers):
        check.bad(f"layer_types must list one type per layer ({layers}), got {types!r}")
    if cfg.get("attention_bias"):
        check.bad("attention_bias is set: eaglepipe's drafter has no biases")


def _check_target_layers(check: "DirCheck", cfg: dict[str, Any], layers: int) -> bool:
    """Both conventions are well-formed, agree and name layers of this target; False when unusable."""
    n = check.target["num_layers"]
    ids, top = nested_or_top(cfg, "target_layer_ids"), cfg.get(AUX_IDS_KEY)
    for name, value in (("dflash_config.target_layer_ids (0-based layer ids)", ids),
                        (f"top-level {AUX_IDS_KEY} (h-indices)", top)):
        if value is not None and not int_list(value):
            check.bad(f"{name} must be a non-empty list of ints, got {value!r}")
            return False
    if ids is None:
        check.not_portable("dflash_config.target_layer_ids is missing: the engines fall back to defaults")
    declared = nested_or_top(cfg, "num_target_layers")
    if declared is None and (check.strict or (ids and max(ids) >= layers)):
        check.bad("num_target_layers must be written: without it SGLang range-checks target_layer_ids against the "
                  "drafter's own depth")
    elif declared is not None and declared != n:
        check.bad(f"num_target_layers is {declared!r}, the target has {n} layers")
    if top is None and check.fmt == "vllm":
        check.not_portable(f"top-level {AUX_IDS_KEY} is missing: vLLM builds before 0.20 ignore target_layer_ids "
                           "and feed the drafter the EAGLE-3 default layers")
    elif top is not None and ids is not None and [int(i) + 1 for i in ids] != [int(i) for i in top]:
        check.bad(f"target layers disagree: {AUX_IDS_KEY} {top} must be dflash_config.target_layer_ids {ids} plus 1 "
                  "(vLLM reads the first, SGLang the second)")
    aux = served_aux_layers(cfg, check.fmt, n)
    outside = [i for i in aux if not 1 <= i <= n - 1]
    if outside:
        check.bad(f"target h-indices {outside} are outside 1..{n - 1} for a {n}-layer target")
    return not outside


FAMILY = DFlashFamily()
