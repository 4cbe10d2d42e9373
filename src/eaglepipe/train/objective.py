"""The TTT unroll and its loss and metrics.

Step k (0..K-1) feeds the drafter's step-(k-1) state (step 0: the fused target features), tokens shifted
left by k and RoPE positions t+k; attention is step-0 keys (causal, same document) plus the diagonal keys
of steps 1..k (see ttt_attention). Loss = sum_k decay^k * sum_{supervised slots} CE_k / denominator_k, where
CE is `loss` (draft_losses: soft cross-entropy or an LK loss) against softmax(target logits over the family's
label columns: EAGLE-3's draft vocab, EAGLE-1's whole vocab); the drafter family may add a term to each step's loss
(`step_loss`: EAGLE-1's w_h * hidden regression + w_t * that loss). `denominator_k` is the number of
supervised slots of step k in the whole optimizer step (all micro-batches and ranks), so gradient
accumulation and data parallelism give exactly the gradient of one big batch. Slots whose target argmax is
outside the draft vocab contribute no loss with out_of_vocab=drop (they still count in the denominator,
which is known before the target runs).

Two acceptance-length estimates come out of the same unroll. `sim_tau` = 1 + sum_k P(steps 0..k all correct)
averages the accepted length over *every* supervised slot. A serving engine instead starts a verification
round only where the previous one ended, and rounds that start in hard stretches are short, so over the
same answer it runs more of them: where acceptance varies along a sequence, the engine measures less than
`sim_tau`. `replay_tau` replays those rounds on each answer (first round at its first supervised slot, the
next one accepted+1 slots later) and divides tokens by rounds: on the target's own greedy answers it is
exactly the tau a chain of `ttt_steps` drafts measures at temperature 0 (tests/test_tau_consistency.py).
`replay_tau_first` replays only each sample's first answer. In multi-turn data later answers can be far
easier (a small target repeats itself and copies from its context), so it is the closer guide to a benchmark
of first turns such as MT-bench's.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch

from ..config.schema import TrainCfg
from ..families.registry import family_of
from ..models.config import DrafterConfig
from .batches import Batch, collate
from .draft_losses import draft_loss
from .flops import attention_pairs, drafter_flops
from .ttt_attention import Step0Fn, document_causal_mask, flex_step0, math_step0, ttt_attention


@dataclass
class Objective:
    """The loss settings of a TrainCfg (the fields of the same names; their meanings and defaults are TrainCfg's)."""

    ttt_steps: int
    step_weight_decay: float
    out_of_vocab: str
    # EAGLE-1's hidden-state regression
    hidden_loss_weight: float
    token_loss_weight: float
    hidden_loss: str
    # draft_losses.DRAFT_LOSSES: soft_ce | lk_alpha | lk_lambda
    loss: str
    lk_eta: float
    # the block objective (train/block_objective.py)
    block_size: int
    num_anchors: int
    position_weighting: str
    loss_decay_gamma: float
    dpace_alpha: float
    # P-EAGLE's COD sampling (train/cod.py)
    cod_ratio: float
    cod_ratio_min: float
    # the loss's per-row work through torch.compile on CUDA (CPU stays eager)
    compile_loss: bool

    @classmethod
    def from_train(cls, train: TrainCfg) -> "Objective":
        """The objective a TrainCfg sets: each field from its namesake."""
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})

    @classmethod
    def of(cls, **changes: Any) -> "Objective":
        """The objective of the default TrainCfg with `changes` (e.g. `Objective.of(ttt_steps=5)`)."""
        return cls.from_train(TrainCfg(**changes))

    def draft_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row `loss` of draft logits against target logits, and the acceptance rate (draft_losses)."""
        return draft_loss(logits, target, self.loss, self.lk_eta, compiled=self.compile_loss and logits.is_cuda)


@dataclass
class Labels:
    """Target outputs at `batch.label_pos`: logits over the family's label columns [N, V_d], full-vocab argmax
    [N], and the family's `regression_targets` (EAGLE-1: the target's final post-norm feature [N, H])."""

    logits: torch.Tensor
    argmax: torch.Tensor
    features: Optional[torch.Tensor] = None


def replay_rounds(accepted: torch.Tensor, supervised: torch.Tensor, row_length: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification rounds and emitted tokens of greedy chain decoding replayed along each answer.

    accepted [N] long: drafts accepted by a round that starts at flat slot p; supervised [N] bool: the step-0
    supervised slots, whose maximal runs of consecutive slots are the answers. Each run starts a round at its
    first slot; a round at p emits accepted[p] + 1 tokens and the next one starts at p + accepted[p] + 1 while
    that lies in the same run. Rounds along each run are counted by pointer doubling (log2(row_length)
    gathers, no host sync). Returns (rounds, tokens) as 0-d tensors.
    """
    n, dev = accepted.numel(), accepted.device
    idx = torch.arange(n, device=dev)
    starts = supervised & ~torch.cat([supervised.new_zeros(1), supervised[:-1]])
    run = torch.cumsum(starts.long(), 0)
    nxt = (idx + accepted + 1).clamp(max=n - 1)
    same_run = supervised[nxt] & (run[nxt] == run) & (idx + accepted + 1 < n)
    sentinel = torch.full((1,), n, device=dev)
    ptr = torch.cat([torch.where(supervised & same_run, nxt, sentinel), sentinel])
    rounds = torch.cat([supervised.long(), accepted.new_zeros(1)])
    tokens = torch.cat([torch.where(supervised, accepted + 1, 0), accepted.new_zeros(1)])
    for _ in range(max(row_length - 1, 1).bit_length()):
        rounds = rounds + rounds[ptr]
        tokens = tokens + tokens[ptr]
        ptr = ptr[ptr]
    first = torch.cat([starts, starts.new_zeros(1)])
    return rounds[first].sum(), tokens[first].sum()


class UnrollMetrics:
    """The metric sums of an unroll of draft steps, step by step, with no GPU sync: loss_k, count_k, correct_k,
    prefix_k (slots whose drafts of steps 0..k are all correct), alpha_k, `slots` (supervised slots at step 0),
    and `rounds`/`round_tokens` of the replayed verification rounds (see `replay_rounds`), over all answers and
    (`_first`) first answers. A slot a step does not train counts as a wrong draft there. Not `enabled`: no sums,
    and no work."""

    def __init__(self, drafter: torch.nn.Module, labels: Labels, in_vocab: torch.Tensor, slots: int,
                 device: torch.device, enabled: bool = True) -> None:
        self.drafter, self.labels, self.in_vocab, self.device = drafter, labels, in_vocab, device
        self.enabled = enabled
        self.sums: dict[str, torch.Tensor] = {}
        if enabled:
            self.prefix = torch.ones(slots, dtype=torch.bool, device=device)
            self.accepted = torch.zeros(slots, dtype=torch.long, device=device)  # drafts a round at slot t accepts

    @torch.no_grad()
    def add(self, k: int, slots: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor, step_loss: torch.Tensor,
            alpha: torch.Tensor, row_keep: torch.Tensor) -> None:
        """Step k's drafts `logits` at the flat `slots` (label rows `rows`), its loss sum and acceptance rates."""
        if not self.enabled:
            return
        correct = (self.drafter.to_target_ids(logits.argmax(-1)) == self.labels.argmax.index_select(0, rows)) & \
            row_keep
        dense = torch.zeros(self.prefix.numel(), dtype=torch.bool, device=self.device)
        dense[slots] = correct & self.in_vocab.index_select(0, rows)
        self.prefix = self.prefix & dense
        self.accepted += self.prefix
        self.sums[f"loss_{k}"] = step_loss.detach().float()
        self.sums[f"count_{k}"] = row_keep.sum().float()
        self.sums[f"correct_{k}"] = correct.sum().float()
        self.sums[f"prefix_{k}"] = self.prefix.sum().float()
        self.sums[f"alpha_{k}"] = (alpha * row_keep).sum().float()
        if k == 0:
            self.sums["slots"] = torch.full((), float(slots.numel()), device=self.device)  # a fill, no copy

    @torch.no_grad()
    def finish(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The sums, with the replayed rounds of the answers (step 0's supervised slots)."""
        if not self.enabled:
            return self.sums
        supervised = torch.zeros(self.prefix.numel(), dtype=torch.bool, device=self.device)
        supervised[batch.step_slots[0]] = True
        t = batch.input_ids.shape[1]
        rounds, tokens = replay_rounds(self.accepted, supervised, t)
        self.sums["rounds"], self.sums["round_tokens"] = rounds.float(), tokens.float()
        rounds, tokens = replay_rounds(self.accepted, supervised & batch.first_answer, t)
        self.sums["rounds_first"], self.sums["round_tokens_first"] = rounds.float(), tokens.float()
        return self.sums


def ttt_loss(drafter: torch.nn.Module, batch: Batch, features: torch.Tensor, labels: Labels,
             objective: Objective, step0: Step0Fn, denominators: list[float], metrics: bool = True
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unroll the drafter over `objective.ttt_steps` steps; returns (loss, metric sums as tensors: `UnrollMetrics`;
    none without `metrics`).

    `features`: the step-0 state [B, T, H] (drafter.fuse of the family's target features).
    """
    family = family_of(drafter.config)
    b, t = batch.input_ids.shape
    in_vocab = drafter.in_draft_vocab(labels.argmax)
    keep = in_vocab if objective.out_of_vocab == "drop" else torch.ones_like(in_vocab)
    sums = UnrollMetrics(drafter, labels, in_vocab, b * t, features.device, metrics)
    hidden = features
    keys, values = [], []
    total = features.new_zeros((), dtype=torch.promote_types(features.dtype, torch.float32))
    attend = partial(_ttt_attend, keys, values, step0)
    for k in range(objective.ttt_steps):
        out = drafter.layer_forward(batch.step_ids[k], hidden, batch.position_ids + k, attend)
        slots, rows = batch.step_slots[k], batch.step_rows[k]
        picked = out.reshape(b * t, -1).index_select(0, slots)
        logits = drafter.logits(picked)
        row_keep = keep.index_select(0, rows)
        ce, alpha = objective.draft_loss(logits, labels.logits.index_select(0, rows))
        step_loss = family.step_loss(objective, (ce * row_keep).sum(), picked, labels, rows)
        if denominators[k] > 0:
            total = total + (objective.step_weight_decay ** k) * step_loss / denominators[k]
        sums.add(k, slots, rows, logits, step_loss, alpha, row_keep)
        if k + 1 < objective.ttt_steps:
            hidden = drafter.next_state(out)
    return total, sums.finish(batch)


def _ttt_attend(keys: list[torch.Tensor], values: list[torch.Tensor], step0: Step0Fn, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A TTT step's attention: its keys and values join those of the earlier steps (see ttt_attention)."""
    keys.append(k)
    values.append(v)
    return ttt_attention(q, keys, values, step0)


def metric_keys(ttt_steps: int) -> list[str]:
    """Names of the metric sums `ttt_loss` returns (every rank reduces the same list)."""
    per_step = [f"{m}_{k}" for k in range(ttt_steps) for m in ("loss", "count", "correct", "prefix", "alpha")]
    return ["slots", "rounds", "round_tokens", "rounds_first", "round_tokens_first"] + per_step


def summarize(sums: dict[str, torch.Tensor], ttt_steps: int, decay: float) -> dict[str, float]:
    """Turn accumulated metric sums into loss (sum_k decay^k loss_k), loss_k, acc_k, cond_acc_k, alpha_k (the
    mean acceptance rate sum_v min(p_v, q_v) of step k's drafts), the simulated acceptance length
    sim_tau = 1 + sum_k P(steps 0..k all correct) over step-0 supervised slots,
    replay_tau = tokens / rounds of the replayed verification rounds (1.0 without any), and replay_tau_first,
    the same over each sample's first answer only."""
    v = {k: float(x) for k, x in sums.items()}
    out: dict[str, float] = {}
    slots = max(v.get("slots", 0.0), 1.0)
    tau, prev = 1.0, slots
    weighted = 0.0
    for k in range(ttt_steps):
        cnt = max(v.get(f"count_{k}", 0.0), 1.0)
        out[f"loss_{k}"] = v.get(f"loss_{k}", 0.0) / cnt
        out[f"acc_{k}"] = v.get(f"correct_{k}", 0.0) / cnt
        out[f"alpha_{k}"] = v.get(f"alpha_{k}", 0.0) / cnt
        pre = v.get(f"prefix_{k}", 0.0)
        out[f"cond_acc_{k}"] = pre / prev if prev > 0 else 0.0
        prev = pre
        tau += pre / slots
        weighted += decay ** k * out[f"loss_{k}"]
    out["loss"] = weighted
    out["sim_tau"] = tau
    for suffix in ("", "_first"):
        rounds = v.get(f"rounds{suffix}", 0.0)
        out[f"replay_tau{suffix}"] = v.get(f"round_tokens{suffix}", 0.0) / rounds if rounds > 0 else 1.0
    return out


@dataclass(frozen=True)
class TrainingObjective:
    """What the training loop asks of an objective (a family's `objective` names one: train/module.py's
    OBJECTIVES): how many per-step metric groups it reports and the weight ratio of consecutive ones in the
    reported loss, the micro-batch of sample rows (`collate(rows, objective, pad_to, seed)`, seed None for
    validation: nothing drawn at random), the attention its loss takes (`attention(batch, objective, heads, flex)`),
    the loss (`loss(drafter, batch, fused features, labels, objective, attention, denominators, metrics=True)`: the
    loss and, with `metrics`, the metric sums) and the drafter's forward + backward FLOPs on a batch;
    `fixed_shapes`: whether the drafter layer sees the same shapes every micro-batch of padded rows (train.compile
    then compiles it for those shapes alone) or shapes that vary with what is drawn (then for any shape)."""

    steps: Callable[[Objective], int]
    decay: Callable[[Objective], float]
    collate: Callable[[Sequence[Sequence[dict]], Objective, Optional[int], Optional[int]], Batch]
    attention: Callable[[Batch, Objective, int, bool], Any]
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    flops: Callable[[DrafterConfig, Batch, Objective], float]
    fixed_shapes: bool = True


def ttt_attention_of(batch: Batch, objective: Objective, heads: int, flex: bool) -> Step0Fn:
    """The TTT unroll's step-0 attention: FlexAttention (CUDA) or explicit scores, causal within each document."""
    return flex_step0(batch.doc_ids, heads) if flex else math_step0(document_causal_mask(batch.doc_ids))


def ttt_flops(cfg: DrafterConfig, batch: Batch, objective: Objective) -> float:
    """The drafter's FLOPs over the unroll's steps."""
    return drafter_flops(cfg, batch.num_tokens, attention_pairs(batch), sum(batch.supervised_counts()),
                         objective.ttt_steps)


# the test-time-training unroll of one-step drafts
TTT = TrainingObjective(steps=lambda o: o.ttt_steps, decay=lambda o: o.step_weight_decay,
                        collate=lambda rows, o, pad_to, seed: collate(rows, o.ttt_steps, pad_to),
                        attention=ttt_attention_of, loss=ttt_loss, flops=ttt_flops)
