"""`ParallelRoundSteps`: the device side of a round for a drafter that drafts a whole block of K tokens in one
forward (P-EAGLE, DFlash), shared by the eager round of `SpeculativeGenerator` and the captured round of
`RoundGraph` through the same public methods as `RoundSteps`.

A round drafts a chain: the root (the last committed token) and the K drafts of the block the drafter proposed
after it, cut to the room left; the target verifies root + drafts in one forward, greedy acceptance takes the
longest matching prefix plus the bonus token, and the drafter commits the emitted tokens (fed the verify forward's
captured layers at their path nodes). Everything the drafter itself does is the `BlockDrafter` its family's
`block_drafting` names (BLOCK_DRAFTERS): `commit` after the verification and `propose` before the next one, so a family
may run its one drafter forward in either (P-EAGLE drafts while it commits, since its first draft needs the
target's features at the last accepted token; DFlash proposes from the root and its committed context). Shapes
are fixed by the number of rows and the bounds passed in and nothing waits on the device, so a CUDA graph can
capture the round.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..engine.model import LlamaRunner, rms_norm
from ..families.registry import family_of
from .accept import chain_accept
from .config import SpecConfig
from .context_cache import ContextCacheDrafter
from .drafter_loader import LoadedDrafter
from .mask_block import MaskBlockDrafter
from .tree import VerifyTree, target_ids


class BlockDrafter(Protocol):
    """A block-drafting family's drafter over its own per-slot cache (BLOCK_DRAFTERS builds it).

    Its state between rounds is a pair of tensors per row (`state_shapes`, in the runner's dtype): what `commit`
    returns and `propose` reads, kept by the round's rows (`Rows.draft_hidden`/`draft_logits`)."""

    # whether its forward runs on the token path's kernels
    fast: bool

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one row's two state tensors."""

    def commit(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
               features: torch.Tensor, count: torch.Tensor, span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit `count` [B] emitted tokens `ids` [B, W] (later columns are padding) after each row's committed
        `lengths` (`max_length` >= all of them), each fed `features` [B, W, F] (the family's `draft_input` of the
        target's captured layers at the token before it). Returns the rows' state [B, *state_shapes]."""

    def propose(self, roots: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                lengths: torch.Tensor, max_length: int, span: slice | None) -> torch.Tensor:
        """The drafter's logits [B, K, V_d] of the K tokens after each row's root `roots` [B]."""


# each family's `block_drafting` -> its block drafter for (drafter, runner, spec, fast: whether its forward may run on
# the token path's kernels)
BLOCK_DRAFTERS: dict[str, Callable[[torch.nn.Module, LlamaRunner, SpecConfig, bool], BlockDrafter]] = {
    "masks": MaskBlockDrafter,
    "context": lambda drafter, runner, spec, fast: ContextCacheDrafter(drafter, runner, spec),
}


class ParallelRoundSteps:
    """The steps of a chain round of `spec` (topk 1: K = num_steps drafts a round) with the block drafter of
    `loaded`'s family; `fast` lets the block drafter use the token path's kernels."""

    def __init__(self, runner: LlamaRunner, loaded: LoadedDrafter, spec: SpecConfig, fast: bool):
        self.runner, self.loaded, self.spec = runner, loaded, spec
        self.drafter = loaded.model
        self.family = family_of(loaded.config)
        self.family.check_round(loaded.config, spec.num_steps, spec.topk, spec.num_draft_tokens)
        self.capture = runner.check_capture_layers(list(loaded.config.aux_layers))
        if self.family.block_drafting not in BLOCK_DRAFTERS:
            raise ValueError(f"no block drafter {self.family.block_drafting!r} (a {loaded.config.algorithm} drafter); "
                             f"the block drafters are {sorted(BLOCK_DRAFTERS)}")
        self.block: BlockDrafter = BLOCK_DRAFTERS[self.family.block_drafting](self.drafter, runner, spec, fast)
        n = spec.num_draft_tokens
        self._cols = torch.arange(n, device=runner.device)
        self._parents = (self._cols - 1).clamp(min=0)
        self._ancestors = torch.ones(n, n, dtype=torch.bool, device=runner.device).tril()
        self._d2t = getattr(self.drafter, "d2t", None)  # None: the drafter drafts target ids

    @property
    def fast(self) -> bool:
        """Whether the drafter's forward runs on the token path's kernels."""
        return self.block.fast

    def draft_input(self, aux: torch.Tensor) -> torch.Tensor:
        """What the drafter is fed from the target's captured layers, as its family says."""
        return self.family.draft_input(self.drafter, aux, self._final_norm)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.runner.weights.norm, self.runner.shapes.rms_norm_eps)

    def start(self, slot: torch.Tensor, ids: torch.Tensor, features: torch.Tensor,
              span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit a prefilled prompt's tokens `ids` [1, S] (one ahead of the target's) fed `features` [1, S, F] in
        the cache slot `slot` [1]; returns that row's state."""
        zero = torch.zeros(1, dtype=torch.long, device=ids.device)
        count = torch.full((1,), ids.shape[1], dtype=torch.long, device=ids.device)
        hidden, logits = self.block.commit(slot, zero, 0, ids, features, count, span)
        return hidden[0], logits[0]

    def state_buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed state of `rows` rows (`RoundGraph`'s buffers)."""
        dev, dtype = self.runner.device, self.runner.dtype
        return tuple(torch.zeros(rows, *shape, dtype=dtype, device=dev) for shape in self.block.state_shapes())

    def draft_tree(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                   slots: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
                   span: slice | None) -> VerifyTree:
        """The root and the first `keep` drafts of the block the drafter proposes after it, as a chain."""
        drafted = [roots[:, None]]
        if keep:
            logits = self.block.propose(roots, (draft_hidden, draft_logits), slots, lengths, max_length, span)
            drafted.append(self._argmax(logits[:, :keep]))
        tokens = torch.cat(drafted, dim=1)
        b, s = tokens.shape
        return VerifyTree(tokens, self._parents[:s].expand(b, s), self._cols[:s].expand(b, s),
                          self._ancestors[:s, :s].expand(b, s, s))

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The drafter's top-1 proposals as target ids."""
        if self.loaded.hot_ids is not None:
            logits = logits[..., self.loaded.hot_ids]
        return target_ids(logits.argmax(dim=-1), self._d2t, self.loaded.hot_ids)

    def verify(self, tree: VerifyTree, lengths: torch.Tensor, ctx: int, slots: torch.Tensor,
               span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's forward over the chain after each row's committed `lengths`; `ctx` >= lengths.max() + S
        bounds the attended positions. Returns (logits [B, S, V], the captured layers [B, S, ...])."""
        return self.runner.tree_forward(tree.tokens, lengths[:, None] + tree.depths, lengths, tree.ancestors, slots,
                                        ctx, self.capture, span)

    def accept(self, tree: VerifyTree, logits: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        """Greedy acceptance of the chain: (path nodes [B, width], root first, padded with the deepest; the path's
        length [B], the root included; the bonus token [B])."""
        accepted, bonus = chain_accept(tree.tokens, logits)
        return torch.minimum(self._cols[:width], accepted[:, None]), accepted + 1, bonus

    def compact(self, slots: torch.Tensor, lengths: torch.Tensor, path: torch.Tensor) -> None:
        """A chain's accepted K/V are in place already."""

    def extend(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
               aux: torch.Tensor, path: torch.Tensor, count: torch.Tensor,
               span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit the emitted tokens `ids` [B, W] (`count` [B] of them real), each fed the verify forward's
        captured layers `aux` at its path node (`path` [B, W]); returns the rows' new state."""
        features = self.draft_input(aux.gather(1, path[..., None].expand(-1, -1, aux.shape[-1])))
        return self.block.commit(slots, lengths, max_length, ids, features, count, span)
