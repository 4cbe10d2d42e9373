"""The EAGLE-3 / EAGLE-3.1 drafter with SGLang parameter names (midlayer.*, fc, fc_norm.i, norm, lm_head)."""
from __future__ import annotations

import torch
from torch import nn

from .config import DrafterConfig
from .drafter import DraftModule
from .layers import DraftDecoderLayer, RMSNorm, Rotary


class Eagle3Drafter(DraftModule):
    """fc fuses the aux hidden states; one decoder layer over cat(input_layernorm(embed), hidden_norm(h)) with
    residual h; final norm and lm_head over the draft vocab. EAGLE-3.1: fc_norm per aux chunk, and the
    post-norm state is fed to the next step (norm_output)."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.config = cfg
        h, ht, n_aux = cfg.hidden_size, cfg.target_hidden_size, len(cfg.aux_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        if cfg.fc_norm:
            self.fc_norm = nn.ModuleList(RMSNorm(ht, cfg.rms_norm_eps) for _ in range(n_aux))
        self.fc = nn.Linear(n_aux * ht, h, bias=False)
        self.midlayer = DraftDecoderLayer(cfg, 2 * h, input_norms=True)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """aux [B, T, n_aux*H_t] (low->high) -> [B, T, H]."""
        if self.config.fc_norm:
            chunks = aux_hidden.split(self.config.target_hidden_size, dim=-1)
            aux_hidden = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux_hidden)

    def layer_input(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """cat([input_layernorm(embed(tok)), hidden_norm(h)]): embeddings first, [B, S, 2H]."""
        emb = self.embed_tokens(input_ids).to(hidden.dtype)
        return torch.cat([self.midlayer.input_layernorm(emb), self.midlayer.hidden_norm(hidden)], dim=-1)

    def residual(self, layer_input: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The fed states h."""
        return hidden

    def next_state(self, layer_out: torch.Tensor) -> torch.Tensor:
        """What the next drafting step consumes: pre-norm (EAGLE-3) or post-norm (norm_output)."""
        return self.norm(layer_out) if self.config.norm_output else layer_out

    def logits(self, layer_out: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits lm_head(norm(layer_out))."""
        return self.lm_head(self.norm(layer_out))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocab ids to target ids (target_id = i + d2t[i])."""
        return draft_ids + self.d2t[draft_ids]

    def in_draft_vocab(self, target_ids: torch.Tensor) -> torch.Tensor:
        """t2d at the target ids."""
        return self.t2d[target_ids]

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d2t.cpu(), self.t2d.cpu()

    def draft_layers(self) -> list[DraftDecoderLayer]:
        return [self.midlayer]
