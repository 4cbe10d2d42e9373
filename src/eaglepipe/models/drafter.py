"""The drafter modules' interfaces: `DrafterModule`, what the generic training loop, checkpoints and rounds ask of any
family's module (its fused input, logits, vocabulary and layers), and `DraftModule`, what the TTT unroll and the
sequential round call on a one-step drafter, with the cached inference step built from its layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import DrafterConfig
from .layers import Attend, DraftDecoderLayer, Rotary, cached_attention


class DrafterModule(nn.Module):
    """Any family's drafter: it fuses the target's features into its input and scores its outputs over its
    vocabulary."""

    config: DrafterConfig

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [B, T, F] (the family's `target_features`) -> the drafter's input [B, T, H]."""
        raise NotImplementedError

    def logits(self, layer_out: torch.Tensor) -> torch.Tensor:
        """Draft logits over the drafter's vocabulary."""
        raise NotImplementedError

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocab ids to target ids."""
        raise NotImplementedError

    def in_draft_vocab(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask: which target ids the drafter can propose."""
        raise NotImplementedError

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d2t, t2d) of the drafter's vocabulary, on the CPU (a checkpoint's vocab.safetensors)."""
        raise NotImplementedError

    def draft_layers(self) -> list[DraftDecoderLayer]:
        """The decoder layers (compiled together in training)."""
        raise NotImplementedError

    def compile_layers(self, dynamic: bool | None = False) -> None:
        """torch.compile each decoder layer's projections and its o_proj + MLP (`project`, `finish`): their
        elementwise work fuses and the host issues fewer launches; the attention between them stays as it is.
        `dynamic` as torch.compile takes it: False specialises to each shape (for inputs of a few fixed shapes),
        None compiles for any shape once a second one comes (torch.compile otherwise recompiles for every new
        shape up to its limit, then runs the rest eagerly)."""
        for layer in self.draft_layers():
            layer.project = torch.compile(layer.project, dynamic=dynamic)
            layer.finish = torch.compile(layer.finish, dynamic=dynamic)


class FullVocab:
    """Mixed into a drafter that drafts over the target's whole vocabulary: its vocab maps are the identity."""

    config: DrafterConfig

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids are target ids."""
        return draft_ids

    def in_draft_vocab(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Every target id."""
        return torch.ones_like(target_ids, dtype=torch.bool)

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The identity maps of the whole target vocab."""
        return (torch.zeros(self.config.vocab_size, dtype=torch.long),
                torch.ones(self.config.vocab_size, dtype=torch.bool))


class DraftModule(DrafterModule):
    """A drafter that turns one token and one state into the next state and draft logits per position."""

    rotary: Rotary

    def layer_input(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input [B, S, in_dim] for tokens `input_ids` fed the states `hidden`."""
        raise NotImplementedError

    def residual(self, layer_input: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What the decoder layer's attention output is added to: its input or the fed states."""
        raise NotImplementedError

    def attention_inputs(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer input x and its RoPE-rotated q [B, heads, S, d], k and v [B, kv_heads, S, d]."""
        x = self.layer_input(input_ids, hidden)
        cos, sin = self.rotary(x, position_ids)
        q, k, v = self.draft_layers()[0].project(x, cos, sin)
        return x, q, k, v

    def layer_forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                      attend: Attend) -> torch.Tensor:
        """The decoder layer's output [B, S, H] for tokens `input_ids` fed the states `hidden`, its attention
        computed by `attend` (the TTT mask in training, the KV cache in inference)."""
        x, q, k, v = self.attention_inputs(input_ids, hidden, position_ids)
        return self.draft_layers()[0].finish(attend(q, k, v), self.residual(x, hidden))

    def compile_layers(self, dynamic: bool | None = False) -> None:
        """torch.compile a step's work on either side of its attention: `attention_inputs` (the embedding, the
        input norms, RoPE and q/k/v) and the layer's o_proj + MLP (`finish`). Their elementwise work fuses and
        the host issues far fewer launches a step; the attention between them stays as it is. `dynamic` as in
        `DrafterModule.compile_layers`."""
        self.attention_inputs = torch.compile(self.attention_inputs, dynamic=dynamic)
        layer = self.draft_layers()[0]
        layer.finish = torch.compile(layer.finish, dynamic=dynamic)

    def next_state(self, layer_out: torch.Tensor) -> torch.Tensor:
        """What the next drafting step consumes."""
        raise NotImplementedError

    def output(self, layer_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer output -> (state for the next step, draft logits)."""
        return self.next_state(layer_out), self.logits(layer_out)

    def step(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
             past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             attn_mask: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One drafting step over S new tokens: (next state [B,S,H], logits [B,S,V_d], (k, v) incl. past)."""
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out, both = cached_attention(q, k, v, past_kv, attn_mask)
            kv.append(both)
            return out

        nxt, logits = self.output(self.layer_forward(input_ids, hidden, position_ids, attend))
        return nxt, logits, kv[0]
