"""DataSchedule: the step -> micro-batches map is a pure function of the step, and a run packs each epoch once."""
from __future__ import annotations

import numpy as np
import pytest

from eaglepipe.train import schedule_data
from eaglepipe.train.schedule_data import DataSchedule


def schedule(lengths: list[int]) -> DataSchedule:
    return DataSchedule(lengths, seq_length=64, pack=True, micro_batch=2, accum=1, world=1, seed=3)


@pytest.fixture
def lengths() -> list[int]:
    return np.random.default_rng(0).integers(5, 60, size=80).tolist()


def test_each_step_is_what_a_fresh_schedule_gives(lengths):
    run = schedule(lengths)
    total = run.total_steps(epochs=3, max_steps=None)
    for step in range(total):
        assert run.step_batches(step) == schedule(lengths).step_batches(step), step
    assert run.locate(total - 1)[0] == 2


def test_an_epoch_holds_each_sample_at_most_once_and_epochs_differ(lengths):
    run = schedule(lengths)
    per_epoch: dict[int, list[int]] = {}
    for step in range(run.total_steps(epochs=2, max_steps=None)):
        epoch, _ = run.locate(step)
        per_epoch.setdefault(epoch, []).extend(i for mb in run.step_batches(step) for row in mb for i in row)
    for ids in per_epoch.values():
        assert len(ids) == len(set(ids))
    assert per_epoch[0] != per_epoch[1]


def test_stepping_through_a_run_packs_each_epoch_once(lengths, monkeypatch):
    packed: list[int] = []
    real = schedule_data.pack_rows

    def counting(lens, order, seq_length, pack):
        packed.append(len(order))
        return real(lens, order, seq_length, pack)

    monkeypatch.setattr(schedule_data, "pack_rows", counting)
    run = schedule(lengths)
    total = run.total_steps(epochs=4, max_steps=None)
    packed.clear()
    for step in range(total):
        run.step_batches(step)
        run.locate(step)
    assert len(packed) == 4
