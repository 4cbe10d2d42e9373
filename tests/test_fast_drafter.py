"""The drafter's token path (`FastDrafter`, Triton kernels under the CPU interpreter) against the PyTorch
`DraftRunner`: the same (hidden, logits) and the same K/V written to the cache for `extend`, `chain_step` and
`tree_step`, for EAGLE-3 and EAGLE-3.1; and speculative greedy decoding with it equals plain greedy decoding,
reaching the PyTorch drafter's tau."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from test_round_graph import decode, fit_and_export, runner, target_dir  # noqa: E402,F401
from test_spec_decode import greedy_reference  # noqa: E402

ALGOS = ["eagle3", "eagle3.1"]
PROMPTS = [[1, 2, 3, 4, 5, 6], [100, 200, 300, 400]]
NEW_TOKENS = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def refs(runner) -> list[list[int]]:
    return [greedy_reference(runner, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def drafters(target_dir: Path, runner, refs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """EAGLE-3 and EAGLE-3.1 drafters fitted to the target's greedy continuations, exported for SGLang."""
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    return fit_and_export(target_dir, runner, seqs, ALGOS, tmp_path_factory.mktemp("fast_drafters"))


def _load(runner, export: Path):
    from eaglepipe.speculative.drafter_loader import load_exported_drafter

    return load_exported_drafter(export, runner.model_dir, runner.device, runner.dtype,
                                 target_embed=runner.weights.embed, target_lm_head=runner.weights.lm_head).model


@pytest.mark.parametrize("algo", ALGOS)
def test_fast_steps_match_the_torch_path(runner, drafters, algo):
    from eaglepipe.speculative.draft_runner import DraftRunner

    drafter = _load(runner, drafters[algo])
    slow = DraftRunner(drafter, 3, 40, runner.device, torch.float32, fast=False)
    fast = DraftRunner(drafter, 3, 40, runner.device, torch.float32, fast=True)
    assert slow.fast is None and fast.fast is not None
    gen = torch.Generator().manual_seed(3)
    for r in (slow, fast):  # the same stale cache contents, so that any wrongly visible key shows
        r.k.copy_(torch.randn(r.k.shape, generator=gen.manual_seed(4)))
        r.v.copy_(torch.randn(r.v.shape, generator=gen.manual_seed(5)))
    h = drafter.config.hidden_size
    vocab = drafter.config.vocab_size

    def both(method: str, *args, **kw):
        a, b = getattr(slow, method)(*args, **kw), getattr(fast, method)(*args, **kw)
        assert b[1].dtype == torch.float32
        for x, y in zip(a, b):
            assert x.shape == y.shape
            torch.testing.assert_close(y, x.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.k, slow.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.v, slow.v, atol=1e-5, rtol=1e-5)
        return b

    def rand_ids(*shape):
        return torch.randint(0, vocab, shape, generator=gen)

    def rand_hidden(*shape):
        return torch.randn(*shape, h, generator=gen)

    slots = torch.tensor([2, 0])
    # extend: a first prompt (from 0, right-padded row), then tokens after unequal committed lengths
    both("extend", slots, torch.tensor([0, 0]), 0, rand_ids(2, 5), rand_hidden(2, 5))
    lengths = torch.tensor([5, 3])
    both("extend", slots, lengths, 5, rand_ids(2, 3), rand_hidden(2, 3))
    # consecutive slots read as a span on the PyTorch path
    both("extend", torch.tensor([0, 1]), torch.tensor([3, 0]), 3, rand_ids(2, 2), rand_hidden(2, 2),
         span=slice(0, 2))
    lengths = torch.tensor([8, 6])
    # a chain of three drafting steps
    for depth in (1, 2, 3):
        both("chain_step", slots, lengths, 8, rand_ids(2, 1), rand_hidden(2, 1), depth)
    # a tree: two children of the root (nodes 0, 1), then three grandchildren (nodes 2, 3, 4) of 0, 0 and 1; each
    # frontier node sees its ancestors' scratch nodes, then itself
    visible1 = torch.arange(2)[None, :, None].expand(2, 2, 1)
    both("tree_step", slots, lengths, 8, rand_ids(2, 2), rand_hidden(2, 2), 1, 0, visible1)
    visible2 = torch.tensor([[[0, 2], [0, 3], [1, 4]], [[0, 2], [0, 3], [0, 4]]])  # row 1: the third is 0's too
    both("tree_step", slots, lengths, 8, rand_ids(2, 3), rand_hidden(2, 3), 2, 2, visible2)


@pytest.mark.parametrize("algo,spec", [("eagle3.1", dict(num_steps=3, topk=1, num_draft_tokens=4)),
                                       ("eagle3", dict(num_steps=2, topk=2, num_draft_tokens=4))],
                         ids=["chain-eagle3.1", "tree-eagle3"])
def test_speculative_greedy_with_the_fast_drafter(runner, refs, drafters, algo, spec):
    from eaglepipe.speculative import SpeculativeGenerator
    from eaglepipe.speculative.draft_runner import DraftRunner

    slow = SpeculativeGenerator(runner, drafters[algo], spec, graph_rounds=True)
    fast = SpeculativeGenerator(runner, drafters[algo], spec, drafter=slow.loaded, graph_rounds=True)
    assert slow.draft.fast is None  # the CPU default
    fast.draft = DraftRunner(fast.drafter, runner.max_slots, slow.draft.capacity, runner.device, runner.dtype,
                             fast=True)
    for gen in (slow, fast):
        gen.reset_stats()
        out, _ = decode(gen, PROMPTS, [NEW_TOKENS] * len(PROMPTS), [0, 1])
        assert out == refs
    print(algo, spec, slow.stats.tau, fast.stats.tau)
    assert fast.stats.tau > 1.2, fast.stats
    assert fast.stats.tau == pytest.approx(slow.stats.tau)


def test_tree_rows_are_contiguous_for_one_row() -> None:
    """A batch of one makes [1, F] views whose plain reshape has stride 0: `tree_rows` must hand the kernels
    real per-row tensors (a stride-0 slot or prefix list read past its one element on the GPU)."""
    from eaglepipe.speculative.draft_runner import tree_rows

    visible = torch.tensor([[[0, 3], [1, 4], [0, 5]]])
    rows = tree_rows(torch.tensor([2]), torch.tensor([7]), torch.tensor([[5, 6, 9]]), torch.randn(1, 1, 4)
                     .expand(1, 3, 4), visible, 3)
    slots, ids, hidden, positions, write, prefix, pending, count = rows
    for x in (slots, ids, positions, write, prefix, count):
        assert x.stride() == (1,) and x.shape == (3,)
    assert slots.tolist() == [2, 2, 2] and prefix.tolist() == [7, 7, 7] and positions.tolist() == [8, 8, 8]
    assert write.tolist() == [10, 11, 12] and count.tolist() == [2, 2, 2] and ids.tolist() == [5, 6, 9]
    assert hidden.shape == (3, 4) and hidden.is_contiguous() and pending.tolist() == visible[0].tolist()
