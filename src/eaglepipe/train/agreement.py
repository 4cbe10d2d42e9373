"""Training and serving, compared on the same answers.

The training module's TTT unroll says, for every answer slot, how many leading draft steps it gets right; a
greedy chain round of the serving engine that starts at that slot accepts exactly that many (on the target's
own greedy answers, in fp32). These helpers measure both sides on the same samples, so that a mismatch between
what training optimises and what serving does shows up as rounds that differ, and they split the training
replay by assistant turn, since a drafter's τ depends on where in a conversation it drafts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from ..spec import SpeculativeGenerator
    from .batches import Batch
    from .loop import Trainer
    from .objective import Labels


def training_logits(trainer: Trainer, sample: dict, ttt_steps: int
                    ) -> tuple[Batch, Labels, list[torch.Tensor]]:
    """The training module's TTT unroll over one sample: (batch, labels, draft logits of each step at its
    supervised slots), the logits recorded from `drafter.logits` as `ttt_loss` calls it."""
    from .batches import collate
    from .module import TTTModule
    from .ttt_attention import document_causal_mask, math_step0

    drafter = trainer.drafter
    batch = collate([[sample]], ttt_steps)
    recorded: list[torch.Tensor] = []
    plain = drafter.logits
    drafter.logits = lambda x: recorded.append(plain(x)) or recorded[-1]
    try:
        with torch.no_grad():
            feats, labels = trainer.features(batch, "val")
            TTTModule(drafter, trainer.objective)(batch, feats, labels, math_step0(document_causal_mask(batch.doc_ids)),
                                                  [1.0] * ttt_steps)
    finally:
        del drafter.logits
    return batch, labels, recorded


def training_accepted(trainer: Trainer, sample: dict, ttt_steps: int) -> tuple[torch.Tensor, list[int]]:
    """Per slot: how many leading TTT steps the training module gets right (what a round there accepts), and
    the step-0 supervised slots in order."""
    batch, labels, logits = training_logits(trainer, sample, ttt_steps)
    drafter = trainer.drafter
    t = batch.input_ids.shape[1]
    correct = torch.zeros(ttt_steps, t, dtype=torch.bool)
    for k, lg in enumerate(logits):
        want = labels.argmax[batch.step_rows[k]]
        correct[k, batch.step_slots[k].cpu()] = ((drafter.to_target_ids(lg.argmax(-1)) == want)
                                                 & drafter.t2d[want]).cpu()
    return torch.cumprod(correct.long(), 0).sum(0), sorted(batch.step_slots[0].tolist())


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


def supervised_runs(slots: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive slots (the answers of a sample), as inclusive (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def replay_by_turn(trainer: Trainer, samples: list[dict], ttt_steps: int,
                   caps: Sequence[Optional[int]] = (None,)) -> list[dict[str, Any]]:
    """The training replay τ of `samples`, overall and split into first assistant turns and later ones, once
    per entry of `caps`: None replays whole answers, an int only lets the first `cap` slots of every answer
    start rounds (a benchmark's max_new_tokens)."""
    totals = [{"first": [0, 0, 0], "later": [0, 0, 0]} for _ in caps]  # rounds, tokens, slots
    for s in samples:
        accepted, slots = training_accepted(trainer, s, ttt_steps)
        for turn, (first, last) in enumerate(supervised_runs(slots)):
            for cap, total in zip(caps, totals):
                end = last if cap is None else min(last, first + cap - 1)
                acc = total["first" if turn == 0 else "later"]
                p = first
                while p <= end:
                    acc[0] += 1
                    acc[1] += int(accepted[p]) + 1
                    p += int(accepted[p]) + 1
                acc[2] += end - first + 1
    out = []
    for cap, total in zip(caps, totals):
        rounds = sum(v[0] for v in total.values())
        summary: dict[str, Any] = {"cap": cap, "samples": len(samples),
                                   "replay_tau": round(sum(v[1] for v in total.values()) / max(rounds, 1), 4)}
        for name, (r, t, n) in total.items():
            summary[name] = {"replay_tau": round(t / max(r, 1), 4), "rounds": r, "slots": n}
        out.append(summary)
    return out
