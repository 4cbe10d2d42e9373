"""`MaskBlockDrafter`: the `parallel` round's block drafter (speculative/parallel_round.py) for a drafter that
drafts K tokens from one causal forward over mask positions (P-EAGLE: families/peagle.py, its `mask_state` the
state every mask position is fed)."""
from __future__ import annotations

import torch

from ..engine.model import LlamaRunner
from .config import SpecConfig
from .draft_runner import DraftRunner


class MaskBlockDrafter:
    """P-EAGLE's drafting in a `parallel` round: the emitted tokens, then K-1 mask positions (the mask token, fed
    fc(mask_hidden)), as one causal extend of the drafter's cache. The K drafts are its outputs at the last
    emitted token and at the masks, which is vLLM's P-EAGLE proposer's layout. The masks' K/V land past the
    committed entries, where the next commit overwrites them; no committed query ever sees them."""

    def __init__(self, drafter: torch.nn.Module, runner: LlamaRunner, spec: SpecConfig, fast: bool):
        cfg, self.k = drafter.config, spec.num_steps
        # a commit writes up to num_steps + 1 emitted tokens and K - 1 masks after a committed length <= max_len
        capacity = runner.max_len + 2 * self.k + 1
        self.draft = DraftRunner(drafter, runner.max_slots, capacity, runner.device, runner.dtype, fast=fast)
        self.fast = self.draft.fast is not None
        self.mask_id = int(cfg.mask_token_id)
        with torch.no_grad():
            self.mask_state = drafter.mask_state()[0].to(runner.dtype)
        self.vocab = cfg.draft_vocab_size
        self._cols = torch.arange(capacity, device=runner.device)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """No hidden state; the logits of the K drafts after the root."""
        return (0,), (self.k, self.vocab)

    def commit(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
               features: torch.Tensor, count: torch.Tensor, span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend with each row's `count` emitted tokens, then K-1 masks at the next columns (where padding was)."""
        b, w = ids.shape
        cols = self._cols[:w + self.k - 1]
        real = cols[None, :] < count[:, None]
        src = cols.clamp(max=w - 1)[None, :].expand(b, -1)
        block_ids = torch.where(real, ids.gather(1, src), self.mask_id)
        gathered = features.gather(1, src[..., None].expand(-1, -1, features.shape[-1]))
        block_hidden = torch.where(real[..., None], gathered, self.mask_state)
        _, logits = self.draft.extend(slots, lengths, max_length, block_ids, block_hidden, span)
        pick = (count - 1)[:, None] + cols[None, :self.k]
        block = logits.gather(1, pick[..., None].expand(-1, -1, logits.shape[-1]))
        return block.new_zeros(b, 0), block

    def propose(self, roots: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                lengths: torch.Tensor, max_length: int, span: slice | None) -> torch.Tensor:
        """The block the last commit drafted."""
        return state[1]
