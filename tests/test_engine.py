"""The native engine: exactness against HF, batching, tree verification, stop rules, streaming, errors."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from eaglepipe.engine import (
    Engine,
    LlamaRunner,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    UnsupportedModelError,
)
from eaglepipe.engine.sampling import filtered_probs


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def random_prompts(n: int, seed: int, max_len: int = 40, vocab: int = 49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=4, max_model_len=256) as engine:
        yield engine


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama_dir):
    return hf_model(tiny_llama_dir)


def tiny_variant(out: Path, model_type: str, **extra) -> Path:
    """A random 3-layer model of another Llama-family architecture (vocab 512), saved as safetensors."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[model_type]
    cfg = config_cls(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     rms_norm_eps=1e-6, eos_token_id=None, **extra)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- runner
def test_prefill_logits_and_hidden_states_match_hf(tiny_llama_dir, tiny_hf):
    runner = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=3, max_len=128)
    prompts = random_prompts(3, seed=1)
    out = runner.prefill(prompts, [2, 0, 1], capture_layers=[0, 2, 6], all_logits=True)
    for i, prompt in enumerate(prompts):
        ref = tiny_hf(torch.tensor([prompt]), output_hidden_states=True)
        torch.testing.assert_close(out.logits[i], ref.logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.last_logits[i], ref.logits[0, -1], atol=1e-4, rtol=1e-4)
        expected_aux = torch.cat([ref.hidden_states[0][0], ref.hidden_states[2][0]], dim=-1)
        torch.testing.assert_close(out.aux_hidden[i][:, :128], expected_aux, atol=1e-5, rtol=1e-5)
        # h[6] is the last layer's output before the final norm (HF's hidden_states[-1] is after it)
        final_normed = ref.hidden_states[6][0]
        assert not torch.allclose(out.aux_hidden[i][:, 128:], final_normed, atol=1e-3)
    assert [runner.lengths[s] for s in (2, 0, 1)] == [len(p) for p in prompts]


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),
    ("qwen3", {"attention_bias": False}),
    ("mistral", {"sliding_window": None}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
])
def test_other_architectures_match_hf(tmp_path, model_type, extra):
    model_dir = tiny_variant(tmp_path / model_type, model_type, **extra)
    ref_model = hf_model(model_dir)
    runner = LlamaRunner(model_dir, device="cpu", max_slots=2, max_len=256)
    prompts = random_prompts(2, seed=2, max_len=120, vocab=512)
    out = runner.prefill(prompts, [0, 1], all_logits=True)
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(out.logits[i], ref_model(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)
    # then a few batched decode steps against HF greedy
    expected = [hf_greedy(ref_model, p, 6) for p in prompts]
    last = out.last_logits.argmax(-1).tolist()
    got = [[t] for t in last]
    for _ in range(5):
        last = runner.decode(last, [0, 1]).argmax(-1).tolist()
        for row, tok in zip(got, last):
            row.append(tok)
    assert got == expected


def test_sliding_window_model_is_refused(tmp_path):
    model_dir = tiny_variant(tmp_path / "mistral", "mistral", sliding_window=32)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        LlamaRunner(model_dir, device="cpu")


def _tree() -> tuple[list[int], list[int]]:
    """A draft tree: parent index per node (-1 = child of the committed prefix) and its tokens."""
    parents = [-1, 0, 0, 1, 1, 2, 5, -1]
    tokens = [101, 202, 303, 404, 505, 606, 707, 808]
    return parents, tokens


def tree_paths(parents: list[int]) -> list[list[int]]:
    """Each node's path from the root of its tree (parents[i] = -1 for a root), root first."""
    paths = []
    for node in range(len(parents)):
        path, cur = [], node
        while cur >= 0:
            path.insert(0, cur)
            cur = parents[cur]
        paths.append(path)
    return paths


def test_tree_verify_matches_plain_paths_and_rollback_is_exact(tiny_llama_dir):
    runner = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=3, max_len=128)
    plain = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=1, max_len=128)
    prompts = random_prompts(2, seed=3)
    parents, tokens = _tree()
    paths = tree_paths(parents)
    mask = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
    for node, path in enumerate(paths):
        mask[node, path] = True
    # batched: two sequences of different lengths (slots 2 and 0), each verifying the same tree shape
    runner.prefill(prompts, [2, 0])
    lens = [len(p) for p in prompts]
    positions = torch.tensor([[n + len(path) - 1 for path in paths] for n in lens])
    logits, aux = runner.forward(torch.tensor([tokens, tokens]), [2, 0], positions=positions,
                                 tree_mask=mask.expand(2, -1, -1), capture_layers=[3])
    for row, prompt in enumerate(prompts):
        for node, path in enumerate(paths):
            ref = plain.prefill([prompt + [tokens[j] for j in path]], [0], capture_layers=[3], all_logits=True)
            torch.testing.assert_close(logits[row, node], ref.logits[0][-1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(aux[row, node], ref.aux_hidden[0][-1], atol=1e-5, rtol=1e-5)
    # keep the path 0 -> 2 -> 5 -> 6 in slot 2, only node 7 (a root) in slot 0; then decode greedily
    accepted = {2: [0, 2, 5, 6], 0: [7]}
    for slot, path in accepted.items():
        runner.commit(slot, path)
    for slot, prompt in zip([2, 0], prompts):
        seq = prompt + [tokens[j] for j in accepted[slot]]
        assert runner.lengths[slot] == len(seq)
        ref_first = plain.prefill([seq], [0]).last_logits.argmax(-1).tolist()
        got, ref = ref_first, ref_first
        got_all, ref_all = [], []
        for _ in range(8):
            got = runner.decode(got, [slot]).argmax(-1).tolist()
            ref = plain.decode(ref, [0]).argmax(-1).tolist()
            got_all += got
            ref_all += ref
        assert got_all == ref_all


def test_truncate_rolls_back_committed_tokens(tiny_llama_dir):
    runner = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=1, max_len=64)
    prompt = random_prompts(1, seed=4)[0]
    first = runner.prefill([prompt], [0]).last_logits
    runner.decode([5, 6, 7][:1], [0])
    runner.truncate(0, len(prompt) - 1)
    again = runner.decode([prompt[-1]], [0])
    torch.testing.assert_close(again[0], first[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        runner.truncate(0, 1000)


def test_runner_rejects_bad_calls(tiny_llama_dir):
    runner = LlamaRunner(tiny_llama_dir, device="cpu", max_slots=2, max_len=16)
    with pytest.raises(ValueError, match="distinct"):
        runner.prefill([[1], [2]], [0, 0])
    with pytest.raises(ValueError, match="max_len"):
        runner.prefill([list(range(3, 20))], [0])
    with pytest.raises(ValueError, match="capture_layers"):
        runner.prefill([[5]], [0], capture_layers=[7])
    runner.prefill([[5, 6]], [0])
    with pytest.raises(ValueError, match="diagonal"):
        runner.forward(torch.tensor([[1, 2]]), [0], tree_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ascending"):
        runner.commit(0, [1, 0])


# ---------------------------------------------------------------------------------------------- engine
def test_greedy_equals_hf_generate_on_many_prompts(tiny_engine, tiny_hf):
    prompts = random_prompts(14, seed=5)
    results = tiny_engine.generate(prompts, SamplingParams(max_new_tokens=24))
    for prompt, res in zip(prompts, results):
        assert res.token_ids == hf_greedy(tiny_hf, prompt, 24)
        assert res.prompt_tokens == len(prompt) and res.completion_tokens == len(res.token_ids)
        assert res.finish_reason == ("stop" if res.token_ids[-1] in tiny_engine.eos_token_ids else "length")


def test_same_tokens_alone_in_a_batch_and_joining_mid_way(tiny_engine):
    params = SamplingParams(max_new_tokens=30)
    target = random_prompts(1, seed=6)[0]
    alone = tiny_engine.generate([target], params)[0].token_ids
    mixed = random_prompts(5, seed=7)
    in_batch = tiny_engine.generate(mixed[:2] + [target] + mixed[2:], params)[2].token_ids
    assert in_batch == alone
    # continuous batching: `target` is submitted while two others are half-way through their decode
    joined = threading.Event()
    futures = []

    def on_delta(delta):
        if not joined.is_set() and len(delta.token_ids) and len(futures) == 2:
            joined.set()
            futures.append(tiny_engine.submit(target, params))

    futures.append(tiny_engine.submit(mixed[0], SamplingParams(max_new_tokens=60), on_delta=on_delta))
    futures.append(tiny_engine.submit(mixed[1], SamplingParams(max_new_tokens=60)))
    futures[0].result()
    assert joined.is_set() and futures[2].result().token_ids == alone


def test_smollm2_greedy_equals_hf_and_stops_on_eos(smollm2_dir):
    ref_model = hf_model(smollm2_dir)
    with Engine(smollm2_dir, device="cpu", max_batch_size=2, max_model_len=512) as engine:
        tok = engine.tokenizer
        questions = ["What is the capital of France?", "Name three primary colors."]
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for q in questions]
        results = engine.generate(prompts, SamplingParams(max_new_tokens=24))
        for prompt, res in zip(prompts, results):
            assert res.token_ids == hf_greedy(ref_model, prompt, 24)
        capital = results[0]
        assert capital.finish_reason == "stop" and capital.token_ids[-1] in engine.eos_token_ids
        assert "Paris" in capital.text and "<|im_end|>" not in capital.text
        more = engine.generate([prompts[0]], SamplingParams(max_new_tokens=len(capital.token_ids) + 3,
                                                           ignore_eos=True))[0]
        assert more.finish_reason == "length" and len(more.token_ids) == len(capital.token_ids) + 3
        assert more.token_ids[:len(capital.token_ids)] == capital.token_ids


def test_stop_token_ids_stop_strings_and_length(tiny_engine):
    prompt = random_prompts(1, seed=8)[0]
    full = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    stop_tok = full.token_ids[6]
    by_id = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=40, stop_token_ids=[stop_tok]))[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(stop_tok) + 1]
    needle = full.text[len(full.text) // 2:len(full.text) // 2 + 4]
    cut = full.text.index(needle)
    by_text = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=[needle, "\x00never"],
                                                            ignore_eos=True))[0]
    assert by_text.finish_reason == "stop" and by_text.text == full.text[:cut]
    assert by_text.token_ids == full.token_ids[:len(by_text.token_ids)] and len(by_text.token_ids) < 40


def test_streaming_deltas_add_up_to_the_result(tiny_engine):
    prompt = random_prompts(1, seed=9)[0]
    full = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    needle = full.text[-8:-4]
    for params in (SamplingParams(max_new_tokens=30, ignore_eos=True),
                   SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[needle])):
        deltas = []
        result = tiny_engine.submit(prompt, params, on_delta=deltas.append).result()
        assert deltas[-1].finished and deltas[-1].result == result
        assert not any(d.finished for d in deltas[:-1]) and len(deltas) > 2
        assert "".join(d.text for d in deltas) == result.text
        assert sum((d.token_ids for d in deltas), []) == result.token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    prompts = random_prompts(3, seed=10)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=20, seed=1234, ignore_eos=True)
    alone = tiny_engine.generate([prompts[0]], params)[0].token_ids
    batch = tiny_engine.generate(prompts, [params, SamplingParams(max_new_tokens=20),
                                           SamplingParams(temperature=1.0, max_new_tokens=20)])
    assert batch[0].token_ids == alone
    other_seed = tiny_engine.generate([prompts[0]], SamplingParams(temperature=0.8, max_new_tokens=20, seed=99,
                                                                   ignore_eos=True))[0].token_ids
    assert other_seed != alone
    greedy = tiny_engine.generate([prompts[0]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0].token_ids
    top1 = tiny_engine.generate([prompts[0]], SamplingParams(temperature=1.5, top_k=1, max_new_tokens=20,
                                                             ignore_eos=True))[0].token_ids
    assert top1 == greedy


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0, 0, 0, 0]))


def test_rows_are_filtered_each_by_its_own_params_in_one_pass():
    """A batch's sampled rows are filtered together, each by its own temperature, top-k and top-p, exactly as
    one row alone would be."""
    from eaglepipe.engine.sampling import filtered_probs_rows

    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.5, top_k=9, top_p=0.8),
              SamplingParams(temperature=2.0, top_k=64)]
    together = filtered_probs_rows(logits, params)
    for row, p in enumerate(params):
        torch.testing.assert_close(together[row], filtered_probs(logits[row], p))
    assert [int((together[row] > 0).sum()) for row in (1, 4)] == [5, 64]


def test_draws_follow_the_distribution_and_never_pick_a_zero():
    """Inverse-CDF draws at uniform u: each row's tokens come at its probabilities (chi-square), never where it
    is zero, even at the extremes of u."""
    import random

    from eaglepipe.engine.sampling import draw

    from test_spec_decode import chi2_pvalue

    probs = torch.tensor([[0.1, 0.0, 0.4, 0.2, 0.3, 0.0], [0.0, 0.5, 0.0, 0.0, 0.25, 0.25]])
    rng = random.Random(0)
    counts = torch.zeros_like(probs)
    for _ in range(4000):
        tokens = draw(probs, torch.tensor([rng.random(), rng.random()], dtype=torch.float64))
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
    assert not counts[probs == 0].any()
    for row in range(2):
        keep = probs[row] > 0
        assert chi2_pvalue(counts[row][keep], probs[row][keep]) > 1e-4
    # the extremes of u: the last nonzero token, not the zero after it; the first nonzero, not the zero before it
    assert draw(probs, torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64)).tolist() == [4, 1]


def test_bad_requests_get_clear_errors(tiny_engine):
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        tiny_engine.submit(list(range(3, 300)))
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.submit([])
    with pytest.raises(ValueError, match="token ids"):
        tiny_engine.submit([5, 10**6])
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"stop": [""]}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    ok = tiny_engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert len(ok.token_ids) == 3


def test_queue_full_is_reported_and_loses_nothing(tiny_llama_dir):
    started, release = threading.Event(), threading.Event()

    def hold_the_worker(delta) -> None:
        started.set()
        release.wait(timeout=120)

    with Engine(tiny_llama_dir, device="cpu", max_batch_size=1, max_model_len=64, max_queue=2) as engine:
        blocker = engine.submit([5, 6], SamplingParams(max_new_tokens=4, ignore_eos=True), on_delta=hold_the_worker)
        assert started.wait(timeout=120)  # the worker is busy inside the callback: nothing leaves the queue
        queued = [engine.submit([7, 8, 9], SamplingParams(max_new_tokens=3, ignore_eos=True)) for _ in range(2)]
        with pytest.raises(QueueFullError, match="queue is full"):
            engine.submit([1, 2, 3])
        release.set()
        assert len(blocker.result().token_ids) == 4
        assert [len(f.result().token_ids) for f in queued] == [3, 3]


def test_prompt_near_max_model_len_is_cut_at_length(tiny_engine):
    prompt = random_prompts(1, seed=11, max_len=2)[0] * 250
    res = tiny_engine.generate([prompt[:250]], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 256 - 250


def test_prefill_groups_bound_each_forward():
    from eaglepipe.engine.engine import prefill_groups

    assert prefill_groups([3, 4, 2, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert prefill_groups([], 8) == []


def test_every_free_slot_is_filled_and_prefilled_in_bounded_forwards(tiny_llama_dir):
    prompts = random_prompts(6, seed=21)
    params = SamplingParams(max_new_tokens=6)
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=8, max_model_len=128) as engine:
        wide = [r.token_ids for r in engine.generate(prompts, params)]
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=8, max_model_len=128, max_prefill_tokens=40) as engine:
        calls = []
        prefill = engine.runner.prefill
        engine.runner.prefill = lambda ps, slots, **kw: calls.append(sum(map(len, ps))) or prefill(ps, slots, **kw)
        narrow = [r.token_ids for r in engine.generate(prompts, params)]
    assert narrow == wide
    assert len(calls) > 1 and all(n <= 40 or n == max(map(len, prompts)) for n in calls)


def test_stats_count_prompts_decode_rows_and_finished_requests(tiny_llama_dir):
    """EngineStats: every prompt token prefilled once, one decode row per generated token after the first, one
    finished request each; the phase shares add up to the worker's time."""
    prompts = random_prompts(5, seed=33)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=2, max_model_len=128) as engine:
        engine.generate(prompts, params)
        stats = engine.stats.snapshot()
    assert stats["prefill_tokens"] == sum(map(len, prompts)) and stats["requests_finished"] == len(prompts)
    assert stats["decode_row_steps"] == 3 * len(prompts)
    assert 1 <= stats["mean_decode_batch"] <= 2 and stats["prefill_forwards"] >= len(prompts) / 2
    shares = [stats[f"{p}_share"] for p in ("prefill", "decode", "host", "speculative", "idle")]
    assert abs(sum(shares) - 1) < 0.01 and stats["decode_share"] > 0
