"""The EAGLE-1/2 drafter in SGLang's LlamaForCausalLMEagle layout (fc with bias, layers.0 without
input_layernorm, no final norm, the target's lm_head over the full vocab)."""
from __future__ import annotations

import torch
from torch import nn

from .config import DrafterConfig
from .drafter import DraftModule, FullVocab
from .layers import DraftDecoderLayer, Rotary


class Eagle1Drafter(FullVocab, DraftModule):
    """x = fc(cat(embed(tok), h)); one decoder layer without input norm; logits = target lm_head(out).

    `h` is the target's last hidden state *after* its final norm (what its lm_head consumes, and what
    SGLang hands an EAGLE/EAGLE-2 drafter); the drafter regresses the next one.
    """

    def __init__(self, cfg: DrafterConfig, target_lm_head: torch.Tensor) -> None:
        super().__init__()
        if tuple(target_lm_head.shape) != (cfg.vocab_size, cfg.target_hidden_size):
            raise ValueError(f"target lm_head must be [{cfg.vocab_size}, {cfg.target_hidden_size}], "
                             f"got {tuple(target_lm_head.shape)}")
        self.config = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([DraftDecoderLayer(cfg, h, input_norms=False)])
        self.rotary = Rotary(cfg)
        self.register_buffer("lm_head_weight", target_lm_head.detach().clone(), persistent=False)

    def fuse(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """EAGLE-1 takes the target's last hidden state as it is."""
        return last_hidden

    def layer_input(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """fc(cat(embed(tok), h)), [B, S, H]; it is also the layer's residual."""
        emb = self.embed_tokens(input_ids).to(hidden.dtype)
        return self.fc(torch.cat([emb, hidden], dim=-1))

    def residual(self, layer_input: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's own input fc(cat(embed, h))."""
        return layer_input

    def next_state(self, layer_out: torch.Tensor) -> torch.Tensor:
        """The predicted next feature is fed on as it is."""
        return layer_out

    def logits(self, layer_out: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits through the target's lm_head (no final norm)."""
        return layer_out @ self.lm_head_weight.to(layer_out.dtype).t()

    def draft_layers(self) -> list[DraftDecoderLayer]:
        return [self.layers[0]]
