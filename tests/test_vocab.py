"""Draft vocabulary: d2t/t2d maps, ties, padding, coverage, file round-trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eaglepipe.data.vocab import (
    build_vocab_maps,
    count_supervised_tokens,
    coverage,
    coverage_curve,
    load_vocab,
    save_vocab,
    select_draft_tokens,
)


def _check_maps(d2t: torch.Tensor, t2d: torch.Tensor, draft: int, vocab: int) -> torch.Tensor:
    assert d2t.dtype == torch.int64 and d2t.shape == (draft,)
    assert t2d.dtype == torch.bool and t2d.shape == (vocab,)
    target_ids = torch.arange(draft) + d2t
    assert bool(t2d[target_ids].all()), "t2d[i + d2t[i]] must hold for every draft id"
    assert int(t2d.sum()) == draft
    assert bool((target_ids[1:] > target_ids[:-1]).all()), "draft ids must be sorted by target id"
    return target_ids


def test_top_tokens_sorted_by_target_id_and_round_trip():
    rng = np.random.default_rng(0)
    freq = torch.from_numpy(rng.integers(0, 1000, size=5000))
    d2t, t2d = build_vocab_maps(freq, 300)
    target_ids = _check_maps(d2t, t2d, 300, 5000)
    # exactly the 300 most frequent: every chosen count >= every unchosen count
    assert int(freq[target_ids].min()) >= int(freq[~t2d].max())


def test_ties_go_to_the_lower_id():
    freq = torch.tensor([0, 7, 3, 7, 3, 3, 9, 0])
    d2t, t2d = build_vocab_maps(freq, 4)
    # 6 (9), 1 and 3 (7) are in; among the 3s (ids 2, 4, 5) the lowest id 2 wins
    assert (torch.arange(4) + d2t).tolist() == [1, 2, 3, 6]
    _check_maps(d2t, t2d, 4, 8)


def test_padding_with_lowest_unused_ids():
    freq = torch.tensor([0, 0, 5, 0, 2, 0, 0, 1])
    d2t, t2d = build_vocab_maps(freq, 6)
    # the three seen tokens (2, 4, 7) plus the lowest unseen ids 0, 1, 3
    assert (torch.arange(6) + d2t).tolist() == [0, 1, 2, 3, 4, 7]
    _check_maps(d2t, t2d, 6, 8)


def test_draft_vocab_equal_to_target_vocab_is_identity():
    d2t, t2d = build_vocab_maps(torch.tensor([3, 0, 1]), 3)
    assert d2t.tolist() == [0, 0, 0] and t2d.all()


@pytest.mark.parametrize("size", [0, 9])
def test_size_out_of_range_is_rejected(size):
    with pytest.raises(ValueError, match="draft_vocab_size"):
        select_draft_tokens(torch.ones(8, dtype=torch.int64), size)


def test_coverage_and_curve():
    freq = torch.tensor([10, 0, 30, 60])
    _, t2d = build_vocab_maps(freq, 2)
    assert coverage(freq, t2d) == pytest.approx(0.9)
    assert coverage_curve(freq, [1, 2, 4]) == pytest.approx({1: 0.6, 2: 0.9, 4: 1.0})


def test_count_supervised_tokens_counts_only_masked_ids():
    samples = [{"id": "a", "input_ids": np.array([1, 2, 2, 3], np.int32), "loss_mask": np.array([0, 1, 1, 1], np.int8)},
               {"id": "b", "input_ids": np.array([3, 4], np.int32), "loss_mask": np.array([1, 0], np.int8)}]
    assert count_supervised_tokens(samples, 6).tolist() == [0, 0, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="outside the target vocab"):
        count_supervised_tokens(samples, 3)


def test_save_and_load_round_trip(tmp_path):
    freq = torch.tensor([4, 0, 2, 9, 1, 0])
    d2t, t2d = build_vocab_maps(freq, 3)
    save_vocab(tmp_path, d2t, t2d, freq)
    d2t2, t2d2 = load_vocab(tmp_path)
    assert torch.equal(d2t, d2t2) and torch.equal(t2d, t2d2)
    assert d2t2.dtype == torch.int64 and t2d2.dtype == torch.bool
    with pytest.raises(FileNotFoundError, match="vocab stage"):
        load_vocab(tmp_path / "missing")
