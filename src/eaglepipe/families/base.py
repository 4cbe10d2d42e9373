"""`DrafterFamily`: everything about one kind of drafter that the generic pipeline asks for.

The stages, the training loop, the exporter, the validator, the drafter loader and the speculative generator never
look at an algorithm's name: they take the family the registry gives for `train.algorithm` (or for an exported
config.json) and call these methods. A new family is one module that subclasses this plus its
`conf/train/<name>.yaml`; it is registered by a line in `registry.py` (which imports it, so that the stages that
look families up depend on its code) and its algorithm names in `names.py` (which the torch-free config checks),
or at run time by `registry.register` (a plug-in: tests/eagle3_nbr_family.py).

What each part covers:
- model: the family's fields of `DrafterConfig`, building the module, the names its weights go by.
- training: the target layers it is fed, the per-position features a target forward gives it (what the offline
  cache stores), the label columns, and its extra loss term.
- export: which engines serve it (formats), each engine's config.json, tensor names and shapes, launch flags.
- validation and loading: which config.json architectures are its own, the drafter an engine builds from one, and
  the family's checks of an export dir.
- inference: what the drafter is fed from the target's captured layers at each step, whether its step has the
  token path's Triton form, and how a round drafts (`draft_round`).

The drafter module a family builds is a `DraftModule` (models/drafter.py: `layer_forward`, `step`, `fuse`,
`logits`, `next_state`, `to_target_ids`, `in_draft_vocab`, `vocab_maps`, `draft_layers`), which the `ttt`
objective and the `sequential` round drive. A family that drafts a whole block in one forward (DFlash: several
layers, the target's embedding and lm_head, a mask token; P-EAGLE: K drafts from a learned mask_hidden) names its
own `objective` (train/module.py's OBJECTIVES) and `draft_round` (speculative/generator.py's ROUNDS), which the
training and speculative packages implement with their kernels and metrics. The `parallel` round is generic over
the block drafter the family's `block_drafting` names (speculative/parallel_round.py's BLOCK_DRAFTERS: the drafter's
forward over its own cache), and an objective that trains a subset of the supervised slots (P-EAGLE's COD
sampling) draws them when it collates a micro-batch. Everything else it answers here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ..export.layout import Shapes
from ..export.served import layer_config
from ..models.config import DrafterConfig

if TYPE_CHECKING:
    from ..config.schema import TrainCfg
    from ..export.validate import DirCheck
    from ..export.writer import ExportRequest
    from ..train.objective import Labels, Objective


class DrafterFamily(ABC):
    """The protocol: the abstract methods are what a family must provide, the others are defaults most share;
    subclasses set the class attributes."""

    # the family's name: the offline cache's `algorithm_family` and the registry's key
    name: str = ""
    # the train.algorithm values it implements; `name` and this are literals (or module-level string constants):
    # names.py reads them from the source
    algorithms: tuple[str, ...] = ()
    # decoder layers of its drafter as exported (None: any depth; check_loadable refuses others)
    decoder_layers: int | None = 1
    # config.json `architectures[0]` of its exports -> the export format (engine) that reads it
    architectures: Mapping[str, str] = {}
    # architectures other trainers save this family's drafters under, which no engine serves -> the format whose
    # layout their config otherwise follows; the validator reports the name and checks the rest as that format
    foreign_architectures: Mapping[str, str] = {}
    # the formats its exports are written in, in order; the native loader reads the first one present
    formats: tuple[str, ...] = ()
    # whether the drafter has its own reduced vocabulary (d2t/t2d, an lm_head over it) or the target's whole one
    uses_draft_vocab: bool = False
    # whether the drafter's logits come from the target's lm_head (then `new_module` needs it)
    uses_target_head: bool = False
    # DrafterConfig fields a drafter given by `train.init_from` (an export dir) decides
    init_fields: tuple[str, ...] = ("intermediate_size",)
    # SGLang's --speculative-algorithm for it (when "sglang" is among its formats)
    sglang_algorithm: str = ""
    # how it trains: `ttt` = the test-time-training unroll of one-step drafts (train/objective.py)
    objective: str = "ttt"
    # how a speculative round drafts: `sequential` = one drafter step per draft depth (a chain, or an EAGLE-2 tree);
    # `parallel` = one forward of its block drafter drafts a chain of num_steps tokens (a literal: names.py reads it
    # so that the config refuses a bench sweep of trees for it)
    draft_round: str = "sequential"
    # the `parallel` round's block drafter (speculative/parallel_round.py's BLOCK_DRAFTERS): `masks` = the emitted
    # tokens and K-1 mask positions as one causal extend of the drafter's cache (P-EAGLE); `context` = a block
    # [root, MASK x K] over a cache of the layers' context K/V (DFlash)
    block_drafting: str = ""

    # ------------------------------------------------------------------ model
    @abstractmethod
    def target_layers(self, configured: Optional[list[int]], info: dict[str, Any]) -> list[int]:
        """The target's hidden states the drafter is fed (HF hidden_states indices): `configured`
        (target.aux_layers) or the target's defaults."""

    @abstractmethod
    def config_fields(self, algorithm: str, info: dict[str, Any], draft_vocab_size: int,
                      aux_layers: Optional[list[int]]) -> dict[str, Any]:
        """The family's DrafterConfig fields for `algorithm` on the target `info`, with the vocab stage's draft
        vocab size and the configured aux layers (None: the target's); the other fields copy the target."""

    @abstractmethod
    def new_module(self, cfg: DrafterConfig, target_lm_head: Optional[torch.Tensor]) -> torch.nn.Module:
        """The drafter module, its weights not yet initialised; `target_lm_head` [V, H] when `uses_target_head`."""

    def init_head(self, model: torch.nn.Module, d2t: Optional[torch.Tensor], t2d: Optional[torch.Tensor],
                  target_lm_head: torch.Tensor, lm_head_init: str) -> None:
        """Set a fresh drafter's vocab maps and output head (after its layers' random init)."""

    def canonical_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weight names as the family's module uses them (both engines accept a `model.` prefix)."""
        return {k.removeprefix("model."): v for k, v in state.items()}

    def check_target(self, info: dict[str, Any], draft_vocab: int, aux_layers: list[int]) -> None:
        """Raise ConfigError for a target this family's drafter cannot be trained for or served with."""

    def train_fields(self, train: "TrainCfg", target_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        """DrafterConfig fields a new drafter takes from the training config and the target's files (DFlash: its
        layers, block size and the mask token of the target's tokenizer); by default none."""
        return {}

    # ------------------------------------------------------------------ training
    @abstractmethod
    def target_features(self, aux: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The drafter's per-position input from one target forward (what the offline cache stores):
        from the captured `target_layers` [B, T, n*H] or the final post-norm hidden state [B, T, H]."""

    def label_ids(self, d2t: torch.Tensor) -> Optional[torch.Tensor]:
        """The target ids of the label logits' columns (None: the whole target vocab)."""
        return None

    def regression_targets(self, features: torch.Tensor, label_pos: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-label targets of the extra loss term, from `target_features` [B, T, F] at the flat label
        positions (None: no such term)."""
        return None

    def step_loss(self, objective: "Objective", token_loss: torch.Tensor, drafted: torch.Tensor,
                  labels: "Labels", rows: torch.Tensor) -> torch.Tensor:
        """One TTT step's loss sum from its draft-token loss sum, the drafter's outputs at the supervised slots
        (`drafted` [N, H]) and the labels' rows `rows` of those slots."""
        return token_loss

    def fuse_flops(self, cfg: DrafterConfig) -> int:
        """Forward FLOPs per token of turning the target features into the drafter's step-0 state."""
        return 0

    # ------------------------------------------------------------------ export
    @abstractmethod
    def export_tensors(self, shapes: Shapes, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every tensor of a `fmt` export -> (shape, kind); kind is `float`, `int64` or `bool`."""

    def export_name(self, name: str, fmt: str) -> str:
        """A checkpoint tensor's name in a `fmt` export."""
        return name

    @abstractmethod
    def export_config(self, fmt: str, dc: dict[str, Any], req: "ExportRequest") -> dict[str, Any]:
        """config.json of a `fmt` export of the checkpoint whose DrafterConfig dict is `dc`."""

    def write_extras(self, fmt_dir: Path, fmt: str, d2t: Optional[torch.Tensor], shapes: Shapes) -> None:
        """Files beside a `fmt` export's config.json and weights that its engine reads."""

    def launch_point(self, dc: dict[str, Any], num_steps: int, topk: int, num_draft_tokens: int
                     ) -> tuple[int, int, int]:
        """The rounds (num_steps, topk, num_draft_tokens) an export of the checkpoint whose DrafterConfig dict is `dc`
        is launched with (its commands.txt, the vLLM config's speculative tokens), from export's: by default those."""
        return num_steps, topk, num_draft_tokens

    def sglang_spec_args(self, draft_dir: Path, num_steps: int, topk: int, num_draft_tokens: int) -> list[str]:
        """SGLang's flags for rounds of (num_steps, topk, num_draft_tokens) with the drafter in `draft_dir`."""
        return ["--speculative-num-steps", str(num_steps), "--speculative-eagle-topk", str(topk),
                "--speculative-num-draft-tokens", str(num_draft_tokens)]

    def sglang_extra_args(self, draft_dir: Path) -> list[str]:
        """SGLang launch flags the drafter in `draft_dir` needs besides the algorithm and the draft tree's."""
        return []

    def vllm_speculative_config(self, draft_dir: Path, num_steps: int) -> dict[str, Any]:
        """vLLM's --speculative-config for the drafter in `draft_dir` drafting chains of `num_steps` (when "vllm" is
        among its formats)."""
        raise ValueError(f"{self.name} drafters have no vLLM export")

    # ------------------------------------------------------------------ validation and loading
    def served_format(self, cfg: dict[str, Any], dir_name: str) -> str:
        """The engine (format) that reads `cfg`, one of this family's config.json, found in a dir named `dir_name`:
        the one its architecture names (a family whose engines read one layout goes by the dir)."""
        return self.architectures[cfg["architectures"][0]]

    def layer_config(self, cfg: dict[str, Any], fmt: str) -> Any:
        """The LlamaConfig part of a `fmt` config.json (vLLM's speculators format nests it)."""
        return layer_config(cfg, fmt)

    @abstractmethod
    def served_config(self, cfg: dict[str, Any], fmt: str, target_layers: int) -> dict[str, Any]:
        """The drafter the `fmt` engine builds from `cfg` (one of this family's config.json), as DrafterConfig
        fields; `target_layers` is the target's depth. The config must hold valid ints."""

    def served_name(self, name: str, fmt: str) -> str:
        """A weight name as the `fmt` engine's loader resolves it, spelt as our `fmt` export spells it."""
        return name.removeprefix("model.")

    def hot_token_ids(self, fmt_dir: Path) -> Optional[torch.Tensor]:
        """The target ids the drafter in `fmt_dir` may propose, as its engine restricts them (None: all)."""
        return None

    def check_loadable(self, cfg: dict[str, Any]) -> None:
        """Raise ValueError when the native drafter modules cannot be built from `cfg` (by default: an exported
        config.json whose depth is not the family's `decoder_layers`)."""
        if self.decoder_layers is not None and cfg.get("num_hidden_layers", 1) != self.decoder_layers:
            raise ValueError(f"num_hidden_layers is {cfg['num_hidden_layers']}: a {self.name} drafter has "
                             f"{self.decoder_layers} decoder layer(s)")

    @abstractmethod
    def check_export(self, check: "DirCheck", cfg: dict[str, Any], layer: dict[str, Any]) -> None:
        """The family's checks of one export format dir (`check.fmt`), after the generic Llama fields of `layer`;
        problems and warnings go to `check`."""

    # ------------------------------------------------------------------ inference
    @abstractmethod
    def draft_input(self, drafter: torch.nn.Module, captured: torch.Tensor,
                    final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What the drafter's step is fed from the target's captured `target_layers` (`final_norm` applies the
        target's final norm)."""

    def check_round(self, cfg: DrafterConfig, num_steps: int, topk: int, num_draft_tokens: int) -> None:
        """Raise ValueError for rounds of (num_steps, topk, num_draft_tokens) the drafter `cfg` cannot draft: a
        `parallel` round drafts a chain (topk 1)."""
        if self.draft_round == "parallel" and topk != 1:
            raise ValueError(f"a {cfg.algorithm} drafter drafts a chain of num_steps tokens from one forward: topk "
                             f"must be 1, got s{num_steps}_k{topk}_n{num_draft_tokens}")

    def has_fast_step(self, cfg: DrafterConfig) -> bool:
        """Whether the drafter's step has the token path's Triton form (speculative/fast_drafter.py)."""
        return False
