"""The runner's token path (Triton kernels under the CPU interpreter): exact greedy decoding against HF, and the
bit-identity that makes speculative verification exact: a token's logits are the same decoded alone, in a
batch, or as a node of a draft tree, and after the tree's accepted path is committed."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from eaglepipe.engine import EngineOptions  # noqa: E402
from eaglepipe.engine.model import LlamaRunner  # noqa: E402

from test_engine import hf_greedy, hf_model, random_prompts, tiny_variant, tree_paths  # noqa: E402
from test_round_graph import PROMPTS, decode, exported, references, runner, target_dir  # noqa: E402,F401
from test_spec_decode import greedy_reference  # noqa: E402

ON, OFF = EngineOptions(token_path=True), EngineOptions(token_path=False)
LLAMA3_ROPE = {"tie_word_embeddings": True,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("qwen2", {}), ("qwen3", {}),
                                              ("mistral", {"sliding_window": None}), ("llama", LLAMA3_ROPE)])
def test_token_path_greedy_equals_hf_and_the_torch_path(tmp_path, model_type, extra):
    model_dir = tiny_variant(tmp_path / model_type, model_type, **extra)
    fast = LlamaRunner(model_dir, device="cpu", max_slots=2, max_len=128, options=ON)
    slow = LlamaRunner(model_dir, device="cpu", max_slots=2, max_len=128, options=OFF)
    prompts = random_prompts(2, seed=5, max_len=50, vocab=512)
    expected = [hf_greedy(hf_model(model_dir), p, 8) for p in prompts]
    last = fast.prefill(prompts, [0, 1]).last_logits.argmax(-1).tolist()
    slow.prefill(prompts, [0, 1])
    got = [[t] for t in last]
    for _ in range(7):
        logits = fast.decode(last, [0, 1])
        torch.testing.assert_close(logits, slow.decode(last, [0, 1]), atol=1e-4, rtol=1e-4)
        last = logits.argmax(-1).tolist()
        for row, tok in zip(got, last):
            row.append(tok)
    assert got == expected


def _prefill_alone(runner: LlamaRunner, prompts: list[list[int]], slots: list[int]) -> None:
    """Prefill each prompt in its own call, so equal prompts get bit-equal K/V in any slot."""
    for prompt, slot in zip(prompts, slots):
        runner.prefill([prompt], [slot])


def test_logits_are_bit_identical_alone_batched_in_a_tree_and_after_commit(tmp_path):
    model_dir = tiny_variant(tmp_path / "llama", "llama")
    runner = LlamaRunner(model_dir, device="cpu", max_slots=4, max_len=160, options=ON)
    prompt, other = random_prompts(2, seed=7, max_len=70, vocab=512)
    parents = [-1, 0, 0, 1, 1, 2, 5, -1]
    tokens = [11, 22, 33, 44, 55, 66, 77, 88]
    paths = tree_paths(parents)
    mask = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
    for node, path in enumerate(paths):
        mask[node, path] = True
    n = len(prompt)
    _prefill_alone(runner, [prompt, other, prompt], [2, 0, 1])
    positions = torch.tensor([[n + len(p) - 1 for p in paths], [len(other) + len(p) - 1 for p in paths]])
    tree_logits, _ = runner.forward(torch.tensor([tokens, tokens]), [2, 0], positions=positions,
                                    tree_mask=mask.expand(2, -1, -1))
    for node, path in enumerate(paths):
        runner.truncate(1, n)
        for j in path:  # the same tokens decoded one by one in slot 1, alone...
            alone = runner.decode([tokens[j]], [1])[0]
        assert torch.equal(alone, tree_logits[0, node]), f"node {node} differs alone vs in the tree"
        runner.truncate(1, n + len(path) - 1)
        runner.lengths[3] = 0  # ...and batched with an unrelated sequence
        runner.prefill([other[:5]], [3])
        batched = runner.decode([tokens[path[-1]], 7], [1, 3])[0]
        assert torch.equal(batched, tree_logits[0, node]), f"node {node} differs batched vs in the tree"
    # commit the path 0 -> 2 -> 5 -> 6 in slot 2 (K/V compacted), then keep decoding: same bits as slot 1
    kept = [0, 2, 5, 6]
    runner.commit(2, kept)
    runner.truncate(1, n)
    for j in kept:
        runner.decode([tokens[j]], [1])
    nxt = [int(tree_logits[0, 6].argmax())] * 2
    for _ in range(4):
        a, b = runner.decode([nxt[0]], [2])[0], runner.decode([nxt[1]], [1])[0]
        assert torch.equal(a, b)
        nxt = [int(a.argmax())] * 2


def test_decode_logits_step_matches_forward_bits(tmp_path):
    model_dir = tiny_variant(tmp_path / "qwen3", "qwen3")
    runner = LlamaRunner(model_dir, device="cpu", max_slots=2, max_len=128, options=ON)
    prompts = random_prompts(2, seed=9, max_len=40, vocab=512)
    _prefill_alone(runner, prompts, [0, 1])
    lens = [len(p) for p in prompts]
    step = runner.decode_logits(torch.tensor([5, 6]), torch.tensor(lens), ctx=128)  # the CUDA-graph body
    assert torch.equal(step, runner.forward(torch.tensor([[5], [6]]), [0, 1])[0][:, 0])
    # one sequence verifying a two-token chain (B = 1: the per-row tensors must not become stride-0 views)
    chain, _ = runner.forward(torch.tensor([[5, 9]]), [1])
    runner.decode([5], [1])
    assert torch.equal(chain[0, 1], runner.decode([9], [1])[0])


def test_large_batches_attend_with_the_chunked_kernel(tmp_path):
    """Past MAX_ROWS the step keeps PyTorch GEMMs but reads only each row's own length of cache."""
    from eaglepipe.engine.token_path import MAX_ROWS

    model_dir = tiny_variant(tmp_path / "llama", "llama")
    b = MAX_ROWS + 3
    fast = LlamaRunner(model_dir, device="cpu", max_slots=b, max_len=64, options=ON)
    slow = LlamaRunner(model_dir, device="cpu", max_slots=b, max_len=64, options=OFF)
    prompts = random_prompts(b, seed=11, max_len=30, vocab=512)
    for runner in (fast, slow):
        runner.prefill(prompts, list(range(b)))
    tokens, lens = torch.randint(3, 512, (b,)), torch.tensor([len(p) for p in prompts])
    torch.testing.assert_close(fast.decode_logits(tokens, lens, ctx=64), slow.decode_logits(tokens, lens, ctx=64),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [dict(num_steps=3, topk=1, num_draft_tokens=4),
                                  dict(num_steps=3, topk=2, num_draft_tokens=5)], ids=["chain", "tree"])
def test_speculative_greedy_equals_plain_greedy_on_the_token_path(target_dir, exported, spec):
    """The static round body (chain and tree) verifying through the token path: the output is
    the token path's own plain greedy decode, with drafts accepted."""
    from eaglepipe.speculative import SpeculativeGenerator

    fast = LlamaRunner(target_dir, device="cpu", dtype=torch.float32, max_slots=4, max_len=128, options=ON)
    gen = SpeculativeGenerator(fast, exported["eagle3"], spec,
                               options=EngineOptions(token_path=True, graph_rounds=True))
    assert gen.steps.fast and gen.round_graph is not None  # the drafter's kernels too
    prompt = PROMPTS[0]
    plain = greedy_reference(fast, prompt, 16)
    out, _ = decode(gen, [prompt], [16], [1])
    assert out == [plain]
    assert gen.stats.tau > 1.3, gen.stats
