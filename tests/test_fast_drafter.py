"""The drafter's token path (`fast_drafter.py`, Triton kernels under the CPU interpreter) against the PyTorch
`DraftRunner`: the same (hidden, logits) and the same K/V written to the cache for `extend`, `chain_step` and a
tree step (`tree_step_rows` on the token rows the draft-tree kernels build, against `tree_step`), for EAGLE-3,
EAGLE-3.1 and EAGLE-1; and speculative greedy decoding with the fast drafter, its top-k and tree kernels equals
plain greedy decoding, reaching the PyTorch drafter's tau; P-EAGLE's parallel round on the fast drafter too."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from eaglepipe.engine import EngineOptions  # noqa: E402

from test_draft_tree_kernels import tree_rows  # noqa: E402
from test_round_graph import decode, fit_and_export, make_runner, runner, target_dir  # noqa: E402,F401
from test_spec_decode import greedy_reference  # noqa: E402

ALGOS = ["eagle3", "eagle3.1", "eagle1"]
PROMPTS = [[1, 2, 3, 4, 5, 6], [100, 200, 300, 400]]
NEW_TOKENS = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def refs(runner) -> list[list[int]]:
    return [greedy_reference(runner, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def drafters(target_dir: Path, runner, refs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """EAGLE-3, EAGLE-3.1 and EAGLE-1 drafters fitted to the target's greedy continuations, exported for SGLang."""
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
    tree_both(slow, fast, slots, lengths, 8, rand_ids(2, 2), rand_hidden(2, 2), 1, 0, visible1)
    visible2 = torch.tensor([[[0, 2], [0, 3], [1, 4]], [[0, 2], [0, 3], [0, 4]]])  # row 1: the third is 0's too
    tree_both(slow, fast, slots, lengths, 8, rand_ids(2, 3), rand_hidden(2, 3), 2, 2, visible2)


@pytest.mark.parametrize("algo", ALGOS)
def test_fast_draft_input_is_the_familys(runner, drafters, algo):
    """A round's draft input on the token path is its family's: the fusion of the captured layers (EAGLE-3.1: its
    fc_norm over all chunks at once), or EAGLE-1's target-normed last hidden state."""
    from eaglepipe.engine.model import rms_norm
    from eaglepipe.families.registry import family_of
    from eaglepipe.speculative import SpeculativeGenerator

    gen = SpeculativeGenerator(runner, drafters[algo], dict(num_steps=3, topk=1, num_draft_tokens=4),
                               options=EngineOptions(token_path=True))
    steps = gen.steps
    assert steps.draft.fast is not None
    cfg = steps.drafter.config
    aux = torch.randn(2, 5, len(cfg.aux_layers) * cfg.target_hidden_size,
                      generator=torch.Generator().manual_seed(6)) * 3
    def final_norm(h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, runner.weights.norm, runner.shapes.rms_norm_eps)

    want = family_of(cfg).draft_input(steps.drafter, aux, final_norm)
    torch.testing.assert_close(steps.draft_input(aux), want, atol=1e-6, rtol=1e-6)
    if algo == "eagle3.1":
        assert steps.draft.fast.fc_norm is not None


def tree_both(slow, fast, slots, lengths, max_length, ids, hidden, depth, node_start, visible) -> None:
    """A tree step on the PyTorch path (`tree_step`) and through the fast drafter on the kernels' token rows
    (`tree_step_rows`): the same outputs and the same K/V written."""
    b, f = ids.shape
    want = slow.tree_step(slots, lengths, max_length, ids, hidden, depth, node_start, visible)
    got = fast.tree_step_rows(tree_rows(slots, lengths, ids, hidden, visible, node_start), max_length, node_start, f)
    assert got[1].dtype == torch.float32
    for x, y in zip(want, got):
        torch.testing.assert_close(y.view(b, f, -1), x.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.k, slow.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.v, slow.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo,spec", [("eagle3.1", dict(num_steps=3, topk=1, num_draft_tokens=4)),
                                       ("eagle3", dict(num_steps=2, topk=2, num_draft_tokens=4)),
                                       ("eagle1", dict(num_steps=2, topk=2, num_draft_tokens=4))],
                         ids=["chain-eagle3.1", "tree-eagle3", "tree-eagle1"])
def test_speculative_greedy_with_the_fast_drafter(runner, refs, drafters, algo, spec):
    from eaglepipe.speculative import SpeculativeGenerator

    slow = SpeculativeGenerator(runner, drafters[algo], spec, options=EngineOptions(graph_rounds=True))
    fast = SpeculativeGenerator(runner, drafters[algo], spec, drafter=slow.loaded,
                                options=EngineOptions(token_path=True, graph_rounds=True))
    assert not slow.steps.fast and slow.steps.draft.fast is None  # the CPU default
    assert fast.steps.fast and fast.steps.draft.fast is not None  # (the target stays on its PyTorch path)
    for gen in (slow, fast):
        gen.reset_stats()
        out, _ = decode(gen, PROMPTS, [NEW_TOKENS] * len(PROMPTS), [0, 1])
        assert out == refs
    print(algo, spec, slow.stats.tau, fast.stats.tau)
    assert fast.stats.tau > 1.2, fast.stats
    assert fast.stats.tau == pytest.approx(slow.stats.tau)
    assert fast.stats.acceptance_rates() == pytest.approx(slow.stats.acceptance_rates())


def test_fast_trees_decode_up_to_the_end_of_the_cache(target_dir, drafters):
    """Near the cache's end the eager round drafts smaller trees, down to the root alone: with the fast drafter and
    its kernels too, the output is the plain greedy decode to the last position."""
    from eaglepipe.speculative import SpeculativeGenerator

    runner = make_runner(target_dir, 40)
    gen = SpeculativeGenerator(runner, drafters["eagle3"], dict(num_steps=3, topk=2, num_draft_tokens=5),
                               options=EngineOptions(token_path=True, graph_rounds=True))
    assert gen.steps.fast
    for prompt in PROMPTS:
        want = greedy_reference(runner, prompt, runner.max_len - len(prompt) + 1)
        out, _ = decode(gen, [prompt], [10 ** 6], [0])
        assert out == [want]
    # a batch stops when its longest row fills the cache
    out, _ = decode(gen, PROMPTS, [10 ** 6] * len(PROMPTS), [1, 0])
    assert out == [greedy_reference(runner, p, len(o)) for p, o in zip(PROMPTS, out)]
    assert max(len(p) + len(o) for p, o in zip(PROMPTS, out)) == runner.max_len + 1


@pytest.fixture(scope="module")
def peagle_drafter(target_dir: Path, runner, refs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A P-EAGLE drafter fitted to the target's greedy continuations at every depth, exported (for vLLM)."""
    from test_export import export_to, make_checkpoint
    from test_peagle import fit_peagle

    root = tmp_path_factory.mktemp("fast_peagle")
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    ckpt = make_checkpoint(target_dir, root / "ckpt", "peagle", draft_vocab=128,
                           include_ids=sorted({t for s in seqs for t in s}))
    fit_peagle(ckpt, runner, seqs, [len(p) for p in PROMPTS])
    assert export_to(target_dir, ckpt, root / "export")["validation"]["ok"]
    return root / "export"


@pytest.mark.parametrize("k", [3, 5])
def test_p_eagle_blocks_on_the_fast_drafter(runner, refs, peagle_drafter, k):
    """P-EAGLE's parallel round extends the drafter cache with the emitted tokens and its mask positions in one
    call: through the fast drafter it decodes the plain greedy output with the PyTorch drafter's tau and
    acceptance at every depth."""
    from eaglepipe.speculative import SpeculativeGenerator

    spec = dict(num_steps=k, topk=1, num_draft_tokens=k + 1)
    slow = SpeculativeGenerator(runner, peagle_drafter, spec, options=EngineOptions(graph_rounds=True))
    fast = SpeculativeGenerator(runner, peagle_drafter, spec, drafter=slow.loaded,
                                options=EngineOptions(token_path=True, graph_rounds=True))
    assert not slow.steps.fast and fast.steps.fast
    for gen in (slow, fast):
        gen.reset_stats()
        out, _ = decode(gen, PROMPTS, [NEW_TOKENS] * len(PROMPTS), [0, 1])
        assert out == refs
    assert fast.stats.tau > 1.2, fast.stats
    assert fast.stats.tau == pytest.approx(slow.stats.tau)
    assert fast.stats.acceptance_rates() == pytest.approx(slow.stats.acceptance_rates())
