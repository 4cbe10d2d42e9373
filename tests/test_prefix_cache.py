"""SlotPrefixCache: finished sequences found again by token prefix, and the engine reusing their K/V."""
from __future__ import annotations

import pytest
import torch

from eaglepipe.engine import Engine, LlamaRunner, SamplingParams
from eaglepipe.engine.prefix_cache import SlotPrefixCache, block_hashes, common_prefix


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_block_hashes_chain_whole_blocks_only():
    a, b = seq(0, 10), seq(0, 8) + [99, 98]
    assert len(block_hashes(a, 4)) == 2 and block_hashes(a, 4) == block_hashes(b, 4)  # the last 2 are no block
    assert block_hashes(a, 4)[0] == block_hashes(seq(0, 4) + [7, 7, 7, 7], 4)[0]
    assert block_hashes(a, 4)[1] != block_hashes(seq(0, 4) + [7, 7, 7, 7], 4)[1]
    assert common_prefix(a, b) == 8 and common_prefix(a, a[:3]) == 3 and common_prefix(a, b, start=8) == 8


def test_match_finds_the_longest_prefix_past_the_last_block():
    cache = SlotPrefixCache(block=4, min_tokens=4)
    cache.put(3, seq(0, 10))
    cache.put(5, seq(0, 6) + [50, 51, 52, 53])
    hit = cache.match(seq(0, 9) + [77, 78])
    assert (hit.slot, hit.length) == (3, 9)
    hit = cache.match(seq(0, 6) + [50, 51, 52])
    assert (hit.slot, hit.length) == (5, 9)
    assert cache.match(seq(1, 12)) is None  # no shared first block
    assert cache.match(seq(0, 3)) is None  # shorter than one block and than min_tokens


def test_a_hit_must_cover_half_of_the_cached_sequence_and_min_tokens():
    cache = SlotPrefixCache(block=4, min_tokens=6)
    cache.put(1, seq(0, 40))
    assert cache.match(seq(0, 8) + [999] * 30) is None  # shares 8 of 40: leave that slot to its own next turn
    assert cache.match(seq(0, 20) + [999]).length == 20
    cache.put(2, seq(100, 4) + [7, 7])
    assert cache.match(seq(100, 4) + [1, 1, 1]) is None  # 4 shared tokens < min_tokens
    cache.put(0, [1, 2, 3])  # shorter than min_tokens: not kept
    assert 0 not in cache and len(cache) == 2


def test_drop_put_and_oldest_keep_the_index_consistent():
    cache = SlotPrefixCache(block=4, min_tokens=4)
    cache.put(1, seq(0, 8))
    cache.put(2, seq(0, 8))
    assert cache.oldest() == 1 and cache.match(seq(0, 8)).slot == 2  # the most recent of equal matches
    cache.drop(2)
    assert cache.match(seq(0, 8)).slot == 1
    cache.put(1, seq(50, 8))  # the slot was reused for another sequence
    assert cache.match(seq(0, 8)) is None and cache.match(seq(50, 8)).slot == 1
    cache.drop(1)
    cache.drop(1)
    assert len(cache) == 0 and cache.oldest() is None and cache.match(seq(50, 8)) is None
    with pytest.raises(ValueError):
        SlotPrefixCache(block=0)


def test_runner_prefill_after_reused_tokens_equals_a_full_prefill(tiny_llama_dir):
    runner = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=4, max_len=256)
    prompt = torch.randint(3, runner.shapes.vocab_size, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    full = runner.prefill([prompt], [0]).last_logits
    runner.prefill([prompt[:70], prompt[:20]], [1, 2])
    part = runner.prefill([prompt, prompt[:45]], [1, 2], reused=[70, 20]).last_logits
    assert torch.allclose(part[0], full[0], atol=1e-4)
    assert torch.allclose(part[1], runner.prefill([prompt[:45]], [3]).last_logits[0], atol=1e-4)
    assert runner.lengths[:3] == [90, 90, 45]
    assert torch.allclose(runner.decode([7], [1]), runner.decode([7], [0]), atol=1e-4)  # the cache agrees too
    with pytest.raises(ValueError, match="at least one token"):
        runner.prefill([prompt[:10]], [0], reused=[10])
    with pytest.raises(ValueError, match="every prompt token computed"):
        runner.prefill([prompt], [0], reused=[5], all_logits=True)


def test_engine_reuses_a_finished_turn_and_decodes_the_same_tokens(tiny_llama_dir):
    """The next turn of a conversation (its history + the answer + a new message) prefills only the new tokens,
    and greedy decoding gives what an engine without reuse gives."""
    g = torch.Generator().manual_seed(9)
    first = torch.randint(3, 49152, (150,), generator=g).tolist()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outputs = {}
    for reuse in (False, True):
        with Engine(tiny_llama_dir, device="cpu", max_batch_size=2, max_model_len=256, prefix_reuse=reuse) as eng:
            answer = eng.generate([first], params)[0].token_ids
            message = torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(1)).tolist()
            second = first + answer + message
            other = torch.randint(3, 49152, (100,), generator=torch.Generator().manual_seed(2)).tolist()
            outputs[reuse] = [r.token_ids for r in eng.generate([second, other], params)]
            stats = eng.stats.snapshot()
        if reuse:
            # all of turn 1 but its last answer token (never fed) came from the cache
            assert stats["prefill_reused_tokens"] == len(first) + len(answer) - 1
            assert stats["prefill_tokens"] == len(first) + 1 + 20 + len(other)
        else:
            assert stats["prefill_reused_tokens"] == 0
    assert outputs[True] == outputs[False]


def test_engine_gives_cached_slots_back_when_it_needs_them(tiny_llama_dir):
    """With every slot holding a finished sequence, new unrelated prompts take the oldest cached slot."""
    prompts = [torch.randint(3, 49152, (80,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(5)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=2, max_model_len=128) as eng:
        alone = [eng.generate([p], params)[0].token_ids for p in prompts]
        assert len(eng.prefix_cache) == 2
        again = [r.token_ids for r in eng.generate(prompts[::-1], params)]
        stats = eng.stats.snapshot()
    assert again == alone[::-1]
    assert stats["prefill_reused_tokens"] == 2 * 79  # the two prompts still cached when they came back


def test_copy_and_restore_positions_put_back_exactly_what_was_there(tiny_llama_dir):
    runner = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=3, max_len=32)
    runner.k_cache.normal_()
    runner.v_cache.normal_()
    before = runner.k_cache.clone(), runner.v_cache.clone()
    saved = runner.copy_positions([0, 2], 4)
    runner.k_cache[:, :, :, :6] = 0
    runner.v_cache[:, :, :, :6] = 0
    runner.restore_positions([0, 2], saved)
    for cache, old in zip((runner.k_cache, runner.v_cache), before):
        assert torch.equal(cache[:, [0, 2], :, :4], old[:, [0, 2], :, :4])
        assert not cache[:, 1, :, :6].any() and not cache[:, [0, 2], :, 4:6].any()  # only what was saved


def test_attaching_a_speculator_empties_the_cache(tiny_llama_dir):
    prompt = list(range(3, 103))
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=2, max_model_len=160) as eng:
        eng.generate([prompt], SamplingParams(max_new_tokens=2))
        assert len(eng.prefix_cache) == 1
        eng.speculator = None  # (re)attaching anything: speculative requests write slots behind its back
        assert len(eng.prefix_cache) == 0
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=2, max_model_len=160, prefix_reuse=False) as eng:
        eng.generate([prompt, prompt], SamplingParams(max_new_tokens=2))
        assert eng.prefix_cache is None and eng.stats.snapshot()["prefill_reused_tokens"] == 0
