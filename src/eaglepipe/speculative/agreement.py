"""Training and serving, compared on the same answers.

The training module's unroll (the TTT steps, or P-EAGLE's depths) says, for every answer slot, how many leading
drafts it gets right; a greedy chain round of the serving engine that starts at that slot accepts exactly that
many (on the target's own greedy answers, in fp32). These helpers measure both sides on the same samples, so that
a mismatch between what training optimises and what serving does shows up as rounds that differ, and they split
the training replay by assistant turn, since a drafter's τ depends on where in a conversation it drafts.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..train.batches import Batch
from ..train.objective import Labels, replay_rounds

if TYPE_CHECKING:
    from ..train.loop import Trainer
    from .generator import SpeculativeGenerator


class Unroll(NamedTuple):
    """The training module's unroll over one sample: its batch and labels, the draft logits of each step (each
    depth, for P-EAGLE's objective) at that step's supervised slots, as the loss computes them, and the loss's
    metric sums."""

    batch: Batch
    labels: Labels
    logits: list[torch.Tensor]
    sums: dict[str, torch.Tensor]


def training_unroll(trainer: Trainer, sample: dict, ttt_steps: int) -> Unroll:
    """Run the training module (no gradients) over one sample, recording `drafter.logits` as it is called: the
    drafter family's own objective (the TTT unroll, or P-EAGLE's depths, every one kept as in validation), with
    `ttt_steps` steps."""
    from ..train.module import TTTModule

    drafter, kind = trainer.drafter, trainer.kind
    if trainer.family.objective == "block":
        raise ValueError(f"a {drafter.config.algorithm} drafter is trained on blocks at sampled anchors, not on a "
                         f"round's drafts from every slot: no per-slot replay to compare")
    objective = dataclasses.replace(trainer.objective, ttt_steps=ttt_steps)
    batch = kind.collate([[sample]], objective, None, None)
    recorded: list[torch.Tensor] = []
    plain = drafter.logits
    drafter.logits = lambda x: recorded.append(plain(x)) or recorded[-1]
    try:
        with torch.no_grad():
            feats, labels = trainer.features(batch, "val")
            attention = kind.attention(batch, objective, drafter.config.num_attention_heads, False)
            _, sums = TTTModule(drafter, objective)(batch, feats, labels, attention, [1.0] * ttt_steps)
    finally:
        del drafter.logits
    return Unroll(batch, labels, recorded, sums)


def training_accepted(trainer: Trainer, sample: dict, ttt_steps: int) -> tuple[torch.Tensor, Batch]:
    """Per slot: how many leading TTT steps the training module gets right (what a round there accepts), and
    the sample's batch."""
    batch, labels, logits, _ = training_unroll(trainer, sample, ttt_steps)
    drafter = trainer.drafter
    t = batch.input_ids.shape[1]
    correct = torch.zeros(ttt_steps, t, dtype=torch.bool)
    for k, lg in enumerate(logits):
        want = labels.argmax[batch.step_rows[k]]
        correct[k, batch.step_slots[k].cpu()] = ((drafter.to_target_ids(lg.argmax(-1)) == want)
                                                 & drafter.t2d[want]).cpu()
    return torch.cumprod(correct.long(), 0).sum(0), batch


def served_rounds(generator: SpeculativeGenerator, sample: dict) -> list[tuple[int, int]]:
    """(start slot, accepted drafts) of every engine round that starts inside the answer, accepted drafts
    clipped to the answer's end (as the training data supervises nothing beyond it). The engine's greedy
    output must reproduce the sample's answer."""
    from ..engine.sampling import SamplingParams

    ids = sample["input_ids"].tolist()
    start = int(np.argmax(sample["loss_mask"]))
    answer = len(ids) - start
    emitted: list[list[int]] = []

    def on_tokens(new: list[int]) -> bool:  # called with the prefill's token, then once per round
        emitted.append(list(new))
        return sum(map(len, emitted)) > answer
    generator.generate(ids[:start], SamplingParams(), 0, on_tokens)
    out = [t for e in emitted for t in e]
    if out[:answer] != ids[start:]:
        raise AssertionError("the engine's greedy output differs from the target's greedy answer")
    last, slot, rounds = len(ids) - 2, start - 1, []
    for e in emitted[1:]:
        if slot > last:
            break
        rounds.append((slot, min(len(e) - 1, last - slot + 1)))
        slot += len(e)
    return rounds


def compare(trainer: Trainer, generator: SpeculativeGenerator, samples: list[dict], ttt_steps: int) -> dict:
    """Engine rounds vs rounds replayed from the training module's per-slot acceptance, over `samples`
    (each one prompt and the target's greedy answer, loss mask on the answer)."""
    engine, replayed = [], []
    for s in samples:
        rounds = served_rounds(generator, s)
        accepted, _ = training_accepted(trainer, s, ttt_steps)
        engine += [a for _, a in rounds]
        replayed += [int(accepted[p]) for p, _ in rounds]
    e, r = np.array(engine), np.array(replayed)
    return {"engine_tau": round(1 + float(e.mean()), 6), "replayed_tau": round(1 + float(r.mean()), 6),
            "rounds": len(e), "rounds_differing": int((e != r).sum()),
            "engine_rates": [round(float((e > i).mean()), 4) for i in range(ttt_steps)],
            "replayed_rates": [round(float((r > i).mean()), 4) for i in range(ttt_steps)]}


def first_slots_of_runs(mask: torch.Tensor, cap: Optional[int]) -> torch.Tensor:
    """`mask` [T] bool restricted to the first `cap` slots of each maximal run of True (all of it for None)."""
    if cap is None:
        return mask
    idx = torch.arange(mask.numel())
    starts = mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])
    run_start = torch.cummax(torch.where(starts, idx, 0), 0).values
    return mask & (idx - run_start < cap)


def replay_by_turn(trainer: Trainer, samples: list[dict], ttt_steps: int,
                   caps: Sequence[Optional[int]] = (None,)) -> list[dict[str, Any]]:
    """The training replay τ of `samples` (`replay_rounds`, as the training metrics compute it), overall and
    split into first answers (`Batch.first_answer`) and later ones, once per entry of `caps`: None replays whole
    answers, an int only lets the first `cap` slots of every answer start rounds (a benchmark's max_new_tokens)."""
    totals = [{"first": [0, 0, 0], "later": [0, 0, 0]} for _ in caps]  # rounds, tokens, slots
    for s in samples:
        accepted, batch = training_accepted(trainer, s, ttt_steps)
        t = batch.input_ids.shape[1]
        supervised = torch.zeros(t, dtype=torch.bool)
        supervised[batch.step_slots[0].cpu()] = True
        first = supervised & batch.first_answer.cpu()
        for cap, total in zip(caps, totals):
            for name, turns in (("first", first), ("later", supervised & ~first)):
                mask = first_slots_of_runs(turns, cap)
                rounds, tokens = replay_rounds(accepted, mask, t)
                acc = total[name]
                acc[0] += int(rounds)
                acc[1] += int(tokens)
                acc[2] += int(mask.sum())
    out = []
    for cap, total in zip(caps, totals):
        rounds = sum(v[0] for v in total.values())
        summary: dict[str, Any] = {"cap": cap, "samples": len(samples),
                                   "replay_tau": round(sum(v[1] for v in total.values()) / max(rounds, 1), 4)}
        for name, (r, t, n) in total.items():
            summary[name] = {"replay_tau": round(t / max(r, 1), 4), "rounds": r, "slots": n}
        out.append(summary)
    return out
