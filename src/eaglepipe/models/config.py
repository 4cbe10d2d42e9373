"""`DrafterConfig`: the shape and conventions of one drafter, stored as drafter_config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..families.names import ALGORITHMS


@dataclass
class DrafterConfig:
    """Everything needed to rebuild a drafter; `aux_layers` are HF hidden_states indices (h[i])."""

    algorithm: str = "eagle3"
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 8192
    vocab_size: int = 49152
    draft_vocab_size: int = 8192
    target_hidden_size: int = 576
    aux_layers: list = field(default_factory=lambda: [2, 15, 27])
    fc_norm: bool = False
    norm_output: bool = False
    hidden_act: str = "silu"
    # decoder layers of the drafter (EAGLE families: 1)
    num_hidden_layers: int = 1
    # tokens a block-drafting family's forward covers, its anchor included (0: it drafts one token a step)
    block_size: int = 0
    # the token a block-drafting family feeds at the positions it has not seen yet (None: the family has none)
    mask_token_id: Optional[int] = None
    # the drafts per round the training supervised, where a family's rounds can ask for more than it was trained
    # on (P-EAGLE: train.ttt_steps, its COD depths); None: not recorded or not limited
    trained_depth: Optional[int] = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown drafter algorithm {self.algorithm!r} (known: {'|'.join(ALGORITHMS)})")
        if self.hidden_act != "silu":
            raise ValueError(f"only silu MLPs are supported, got hidden_act={self.hidden_act!r}")

    def to_json(self) -> str:
        """JSON text (sorted keys)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "DrafterConfig":
        """Parse JSON text, or read it from a path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"drafter config has unknown keys {unknown}")
        return cls(**data)

    @classmethod
    def from_target(cls, info: dict[str, Any], algorithm: str, draft_vocab_size: int,
                    aux_layers: Optional[list] = None, intermediate_size: Optional[int] = None) -> "DrafterConfig":
        """A drafter of `algorithm` shaped like one layer of the target described by `info` (a target.json dict):
        the family decides its own fields from the vocab stage's `draft_vocab_size` and the configured
        `aux_layers` (None: the target's)."""
        from ..families.registry import family_named

        return cls(
            algorithm=algorithm,
            hidden_size=int(info["hidden_size"]),
            intermediate_size=int(intermediate_size or info["intermediate_size"]),
            num_attention_heads=int(info["num_attention_heads"]),
            num_key_value_heads=int(info["num_key_value_heads"]),
            head_dim=int(info["head_dim"]),
            rms_norm_eps=float(info["rms_norm_eps"]),
            rope_theta=float(info["rope_theta"]),
            rope_scaling=info.get("rope_scaling"),
            max_position_embeddings=int(info["max_position_embeddings"]),
            vocab_size=int(info["vocab_size"]),
            target_hidden_size=int(info["hidden_size"]),
            hidden_act=info.get("hidden_act", "silu"),
            **family_named(algorithm).config_fields(algorithm, info, draft_vocab_size, aux_layers),
        )

    def llama_config(self):
        """An HF LlamaConfig with this drafter's attention/RoPE fields (used for the rotary embedding)."""
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
            rope["rope_theta"] = self.rope_theta
        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                           rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                           vocab_size=self.vocab_size, num_hidden_layers=1, rope_parameters=rope)
