"""Padded single-prompt prefill (`PrefillGraphs`, the body that CUDA graphs capture, run eagerly on CPU): the same
logits, captured hidden states and K/V as the packed eager prefill, and the same greedy decode."""
from __future__ import annotations

import pytest
import torch

from eaglepipe.engine import Engine, EngineOptions, LlamaRunner, SamplingParams
from eaglepipe.engine.prefill_graphs import PrefillGraphs, prefill_buckets


def make_runner(model_dir, max_slots: int, max_len: int, graphs: bool) -> LlamaRunner:
    """A CPU runner with (the body run eagerly) or without the padded prefill."""
    return LlamaRunner(model_dir, device="cpu", max_slots=max_slots, max_len=max_len,
                       options=EngineOptions(prefill_graphs=graphs))


def test_buckets_double_up_to_the_largest_or_max_len():
    assert prefill_buckets(256) == [32, 64, 128, 256]
    assert prefill_buckets(200) == [32, 64, 128, 200]
    assert prefill_buckets(20) == [20]
    assert prefill_buckets(4096) == [32, 64, 128, 256, 512, 1024]
    assert prefill_buckets(4096, largest=100) == [32, 64, 100]


def test_prompts_past_the_largest_bucket_stay_eager(tiny_llama_dir):
    eager = make_runner(tiny_llama_dir, 1, 96, graphs=False)
    runner = make_runner(tiny_llama_dir, 1, 96, graphs=False)
    runner.prefill_graphs = PrefillGraphs(runner.padded_prefill, runner.max_len, runner.device, largest=64)
    assert runner.prefill_graphs.fits(64) and not runner.prefill_graphs.fits(65)
    with pytest.raises(ValueError, match="largest bucket"):
        runner.prefill_graphs.bucket(65)
    prompt = list(range(3, 83))
    runner.prefill_graphs.prefill = None  # any call would fail: an 80-token prompt must not come here
    torch.testing.assert_close(runner.prefill([prompt], [0]).last_logits, eager.prefill([prompt], [0]).last_logits)
    assert runner.lengths == [80]


@pytest.mark.parametrize("size", [1, 7, 32, 33, 100, 128])
def test_padded_prefill_matches_the_eager_prefill(tiny_llama_dir, size):
    eager = make_runner(tiny_llama_dir, 2, 128, graphs=False)
    padded = make_runner(tiny_llama_dir, 2, 128, graphs=True)
    assert isinstance(padded.prefill_graphs, PrefillGraphs) and eager.prefill_graphs is None
    g = torch.Generator().manual_seed(size)
    prompt = torch.randint(3, eager.shapes.vocab_size, (size,), generator=g).tolist()
    layers = [1, 3, eager.shapes.num_layers]
    padded.k_cache.normal_()  # stale K/V in the slot must not leak into the result
    want = eager.prefill([prompt], [1], capture_layers=layers)
    got = padded.prefill([prompt], [1], capture_layers=layers)
    assert padded.lengths == eager.lengths == [0, size]
    torch.testing.assert_close(got.last_logits, want.last_logits, atol=1e-5, rtol=1e-5)
    assert got.aux_hidden[0].shape == want.aux_hidden[0].shape == (size, len(layers) * eager.shapes.hidden_size)
    torch.testing.assert_close(got.aux_hidden[0], want.aux_hidden[0], atol=1e-5, rtol=1e-5)
    for cache_got, cache_want in ((padded.k_cache, eager.k_cache), (padded.v_cache, eager.v_cache)):
        torch.testing.assert_close(cache_got[:, 1, :, :size], cache_want[:, 1, :, :size], atol=1e-5, rtol=1e-5)
    # without captured layers (the plain engine's call), the same logits
    torch.testing.assert_close(padded.prefill([prompt], [0]).last_logits, want.last_logits, atol=1e-5, rtol=1e-5)


def test_packed_and_reused_prefills_keep_the_eager_path(tiny_llama_dir):
    runner = make_runner(tiny_llama_dir, 2, 128, graphs=True)
    runner.prefill_graphs.prefill = None  # any call would fail: these prefills must not come here
    runner.prefill([[5, 6, 7], [8, 9]], [0, 1])
    runner.prefill([[5, 6, 7, 10, 11]], [0], reused=[3])
    runner.prefill([[5, 6]], [1], all_logits=True)
    assert runner.lengths == [5, 2]


def test_greedy_decode_is_the_same_with_padded_prefill(tiny_llama_dir):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (3, 30, 64, 90)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        with Engine(tiny_llama_dir, device="cpu", max_batch_size=1, max_model_len=160,
                    options=EngineOptions(prefill_graphs=graphs)) as engine:
            assert (engine.runner.prefill_graphs is not None) is graphs
            outs.append([engine.generate([p], params)[0].token_ids for p in prompts])
    assert outs[0] == outs[1]
