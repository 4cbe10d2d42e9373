"""Deterministic data order: per-epoch shuffles (seeded), packing into rows, rows grouped per optimizer step."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .batches import pack_rows


class DataSchedule:
    """Maps a global optimizer step to its micro-batches (lists of rows of sample indices).

    Epoch e shuffles with seed + e, packs (first-fit in order) and drops the incomplete last step. With
    `max_steps` beyond the epochs' steps, further epochs follow the same rule. The rows of the epoch last asked
    for are kept, and every packed epoch's step count, so that stepping through a run packs each epoch once.
    """

    def __init__(self, lengths: list[int], seq_length: int, pack: bool, micro_batch: int, accum: int,
                 world: int, seed: int) -> None:
        self.lengths, self.seq_length, self.pack = lengths, seq_length, pack
        self.micro, self.accum, self.world, self.seed = micro_batch, accum, world, seed
        self.rows_per_step = micro_batch * accum * world
        self._rows: tuple[int, list[list[int]]] = (-1, [])
        self._steps: dict[int, int] = {}
        if self.steps_in_epoch(0) == 0:
            raise ValueError(f"{len(lengths)} samples make {len(self.rows(0))} rows, fewer than one optimizer "
                             f"step needs ({self.rows_per_step} = micro_batch x grad_accum x world size)")

    def rows(self, epoch: int) -> list[list[int]]:
        """Rows of epoch `epoch`."""
        if self._rows[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self.lengths))
            self._rows = (epoch, pack_rows(self.lengths, order.tolist(), self.seq_length, self.pack))
            self._steps[epoch] = len(self._rows[1]) // self.rows_per_step
        return self._rows[1]

    def steps_in_epoch(self, epoch: int) -> int:
        """Complete optimizer steps in epoch `epoch`."""
        if epoch not in self._steps:
            self.rows(epoch)
        return self._steps[epoch]

    def total_steps(self, epochs: int, max_steps: Optional[int]) -> int:
        """max_steps when given, else the steps of `epochs` epochs."""
        return max_steps if max_steps is not None else sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """Global step (0-based) -> (epoch, step within epoch)."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def step_batches(self, step: int) -> list[list[list[int]]]:
        """All micro-batches of global step `step` (every rank's), in order: rank r gets [r*accum:(r+1)*accum]."""
        epoch, i = self.locate(step)
        rows = self.rows(epoch)[i * self.rows_per_step:(i + 1) * self.rows_per_step]
        return [rows[j:j + self.micro] for j in range(0, len(rows), self.micro)]
