"""The static greedy round (`RoundGraph`, run eagerly on CPU: the body that CUDA captures), for chains and EAGLE-2
trees, against the eager round (`SpeculativeGenerator.round`) and the target's plain greedy decode: same tokens, same
acceptance statistics and verify counts, for EAGLE-3, EAGLE-3.1 and EAGLE-1 drafters, batch 1 and batches whose
rows stop at different rounds, across context buckets and up to the end of the cache. Tree rounds accept paths that
skip verify nodes (their K/V are compacted on the device) and children that are not their parent's first."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eaglepipe.engine import EngineOptions

from test_export import export_to, make_checkpoint
from test_spec_decode import fit_drafter, greedy_reference

PROMPTS = [[1, 2, 3, 4, 5, 6], [100, 200, 300, 400], [7, 7, 7, 9, 11, 13, 15, 17, 19, 21]]
NEW_TOKENS = 40
ALGOS = ["eagle3", "eagle3.1", "eagle1"]
SPECS = [dict(num_steps=3, topk=1, num_draft_tokens=4), dict(num_steps=5, topk=1, num_draft_tokens=6),
         dict(num_steps=3, topk=2, num_draft_tokens=5), dict(num_steps=4, topk=3, num_draft_tokens=8)]
MIN_CTX = 16  # small buckets, so that the decodes below cross several of them
EAGER, GRAPH = EngineOptions(graph_rounds=False), EngineOptions(graph_rounds=True)  # on CPU: the PyTorch path


def spec_id(spec: dict) -> str:
    return f"s{spec['num_steps']}_k{spec['topk']}_n{spec['num_draft_tokens']}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama over a 512-token vocabulary (peaked weights: greedy decodes differ per prompt)."""
    from eaglepipe.target.tiny import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("round_graph") / "target", vocab_size=512)


def make_runner(target_dir: Path, max_len: int):
    from eaglepipe.engine.model import LlamaRunner

    return LlamaRunner(target_dir, device="cpu", dtype=torch.float32, max_slots=4, max_len=max_len)


@pytest.fixture(scope="module")
def runner(target_dir: Path):
    return make_runner(target_dir, 128)


@pytest.fixture(scope="module")
def references(runner) -> list[list[int]]:
    return [greedy_reference(runner, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def exported(target_dir: Path, runner, references, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Drafters of every family fitted to the target's greedy continuations (so that they are often accepted),
    exported in the SGLang format."""
    seqs = [p + r for p, r in zip(PROMPTS, references)]
    return fit_and_export(target_dir, runner, seqs, ALGOS, tmp_path_factory.mktemp("round_graph_drafters"))


def fit_and_export(target_dir: Path, runner, seqs: list[list[int]], algos: list[str], root: Path) -> dict[str, Path]:
    """Drafters of the given families fitted to `seqs`, exported for SGLang: {algo: export/sglang dir}."""
    vocab = sorted({t for s in seqs for t in s})
    out = {}
    for algo in algos:
        ckpt = make_checkpoint(target_dir, root / algo / "ckpt", algo, draft_vocab=128, include_ids=vocab)
        fit_drafter(ckpt, runner, seqs, steps=40)
        export_to(target_dir, ckpt, root / algo / "export")
        out[algo] = root / algo / "export" / "sglang"
    return out


def generators(runner, export: Path, spec: dict):
    """(eager, graph): the same drafter decoded by the eager round alone and by the static round. Trees score with
    `noisy_logprobs`, so that the target also accepts children that are not their parent's first."""
    from eaglepipe.speculative import SpeculativeGenerator
    from eaglepipe.speculative.round_graph import RoundGraph

    eager = SpeculativeGenerator(runner, export, spec, options=EAGER)
    graph = SpeculativeGenerator(runner, export, spec, drafter=eager.loaded, options=GRAPH)
    graph.round_graph = RoundGraph(graph, min_ctx=MIN_CTX)
    assert eager.round_graph is None and not eager.steps.fast and not graph.steps.fast
    if spec["topk"] > 1:
        for gen in (eager, graph):
            gen.steps.draft_logprobs = noisy_logprobs(gen.steps.draft_logprobs)
    return eager, graph


def noisy_logprobs(logprobs):
    """The drafter's log-probs with a fixed per-token bias, renormalised (a child never outscores its parent): the
    fitted drafters' first choice is sometimes wrong where a sibling is right."""
    bias: list[torch.Tensor] = []

    def noisy(logits: torch.Tensor) -> torch.Tensor:
        lp = logprobs(logits)
        if not bias:
            bias.append(torch.randn(lp.shape[-1], generator=torch.Generator().manual_seed(1)))
        return torch.log_softmax(lp + bias[0], dim=-1)
    return noisy


def record_paths(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tree parents, accepted path mask) of every later greedy tree round."""
    from eaglepipe.speculative import steps

    paths, inner = [], steps.greedy_accept_device

    def recorded(tree, logits):
        acc = inner(tree, logits)
        paths.append((tree.parents.clone(), acc.path_mask.clone()))
        return acc
    monkeypatch.setattr(steps, "greedy_accept_device", recorded)
    return paths


def path_kinds(paths: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """How many accepted paths skip verify nodes (K/V to compact), and how many take a child that has an
    earlier sibling (not its parent's first child)."""
    skipping = later_child = 0
    for parents, mask in paths:
        for par, m in zip(parents.tolist(), mask.tolist()):
            nodes = [i for i, on in enumerate(m) if on]
            skipping += nodes != list(range(len(nodes)))
            later_child += any(par.index(par[i], 1) < i for i in nodes[1:])
    return skipping, later_child


def decode(gen, prompts: list[list[int]], limits: list[int], slots: list[int],
           params: list | None = None) -> tuple[list[list[int]], list[int]]:
    """Speculative decode (greedy by default); row i stops once it has `limits[i]` tokens. Returns (tokens,
    spec_verify_ct)."""
    from eaglepipe.engine.sampling import SamplingParams

    outs: list[list[int]] = [[] for _ in prompts]

    def callback(i: int):
        def on_tokens(tokens: list[int]) -> bool:
            outs[i].extend(tokens)
            return len(outs[i]) >= limits[i]
        return on_tokens
    cts = gen.generate_batch(prompts, params or [SamplingParams()] * len(prompts), slots,
                             [callback(i) for i in range(len(prompts))])
    for s in slots:
        gen.runner.release(s)
    return [o[:n] for o, n in zip(outs, limits)], cts


def record_calls(monkeypatch: pytest.MonkeyPatch, obj, name: str) -> list[tuple]:
    """The positional arguments of every later call of obj.<name>."""
    calls, inner = [], getattr(obj, name)

    def recorded(*args):
        calls.append(args)
        return inner(*args)
    monkeypatch.setattr(obj, name, recorded)
    return calls


def assert_same_decode(eager, graph, prompts, limits, slots) -> list[list[int]]:
    """Both generators give the same tokens, verify counts and acceptance statistics; returns the tokens."""
    eager.reset_stats()
    graph.reset_stats()
    out_e, ct_e = decode(eager, prompts, limits, slots)
    out_g, ct_g = decode(graph, prompts, limits, slots)
    assert out_g == out_e
    assert ct_g == ct_e
    assert graph.stats == eager.stats
    return out_g


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_static_round_matches_eager_and_plain_greedy(runner, references, exported, monkeypatch, algo: str,
                                                     spec: dict) -> None:
    eager, graph = generators(runner, exported[algo], spec)
    eager_rounds = record_calls(monkeypatch, graph, "round")  # far from the cache's end: never needed
    bodies = record_calls(monkeypatch, graph.round_graph, "body")
    paths = record_paths(monkeypatch)
    # batch 1
    for prompt, ref in zip(PROMPTS, references):
        assert assert_same_decode(eager, graph, [prompt], [NEW_TOKENS], [0]) == [ref]
        stats = graph.stats
        assert stats.tau > 1.5, stats  # the fitted drafter is accepted often ...
        assert stats.accepted_at[-1] < stats.rounds  # ... but not always
    # rows stopping at different rounds: non-consecutive slots (gathered cache rows), then consecutive (views)
    for limits, slots in (([40, 17, 29], [3, 1, 2]), ([12, 40, 33], [0, 1, 2])):
        out = assert_same_decode(eager, graph, PROMPTS, limits, slots)
        assert out == [ref[:n] for ref, n in zip(references, limits)]
    assert not eager_rounds
    assert {ctx for _, ctx, _ in bodies} == {16, 32, 64}  # rounds re-bucket as the rows grow
    assert {span is None for *_, span in bodies} == {True, False}  # gathered and sliced cache rows
    if spec["topk"] > 1:
        skipping, later_child = path_kinds(paths)
        assert skipping and later_child, (skipping, later_child, len(paths))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_cache_end_falls_back_to_the_eager_round(target_dir, exported, monkeypatch, spec: dict) -> None:
    runner = make_runner(target_dir, 40)  # buckets 16, 32, 40
    eager, graph = generators(runner, exported["eagle3"], spec)
    eager_rounds = record_calls(monkeypatch, graph, "round")
    bodies = record_calls(monkeypatch, graph.round_graph, "body")
    unlimited = 10 ** 6
    for prompt in PROMPTS[:2]:  # decodes until the cache is full
        ref = greedy_reference(runner, prompt, runner.max_len - len(prompt) + 1)
        out = assert_same_decode(eager, graph, [prompt], [unlimited], [0])
        assert out == [ref]
    # a batch stops when its longest row fills the cache; one row stops earlier
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    out = assert_same_decode(eager, graph, prompts, [unlimited, 9, unlimited], [2, 0, 1])
    refs = [greedy_reference(runner, p, len(o)) for p, o in zip(prompts, out)]
    assert out == refs and len(out[0]) == runner.max_len - len(prompts[0]) + 1
    assert {ctx for _, ctx, _ in bodies} == {16, 32, 40} and eager_rounds


def test_chain_accept_stops_at_the_first_mismatch() -> None:
    from eaglepipe.speculative.accept import chain_accept

    tokens = torch.tensor([[9, 1, 2, 3], [9, 1, 5, 3], [9, 4, 2, 3], [9, 1, 2, 7]])
    targets = torch.tensor([1, 2, 3, 6])  # the target's argmax after the root and after each draft
    logits = torch.nn.functional.one_hot(targets, 10).float().expand(4, 4, 10)
    accepted, bonus = chain_accept(tokens, logits)
    assert accepted.tolist() == [3, 1, 0, 2]
    assert bonus.tolist() == [6, 2, 1, 3]


def test_device_acceptance_and_path_nodes() -> None:
    """The device-only greedy decision: the longest matching path as a mask, its deepest node, the bonus token and
    the path's length, and the path's nodes root first, padded with the deepest."""
    from eaglepipe.speculative.accept import greedy_accept, greedy_accept_device, path_nodes
    from eaglepipe.speculative.tree import VerifyTree, ancestor_matrix

    # row 0: root 5 -> 7 (node 2, the root's second child) -> 9 (node 4), bonus 3; row 1: no draft accepted
    parents = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 0, 1, 2]])
    tree = VerifyTree(torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]), parents,
                      torch.tensor([[0, 1, 1, 2, 2]] * 2), ancestor_matrix(parents, 2))
    logits = torch.zeros(2, 5, 20)
    logits[0, 0, 7] = logits[0, 2, 9] = logits[0, 4, 3] = 1.0
    logits[0, 1, 1] = logits[0, 3, 1] = 1.0
    logits[1, :, 4] = 1.0
    acc = greedy_accept_device(tree, logits)
    assert acc.path_mask.tolist() == [[True, False, True, False, True], [True, False, False, False, False]]
    assert acc.deepest.tolist() == [4, 0] and acc.bonus.tolist() == [3, 4] and acc.count.tolist() == [3, 1]
    assert path_nodes(acc, 3).tolist() == [[0, 2, 4], [0, 0, 0]]
    assert greedy_accept(tree, logits).paths == [[0, 2, 4], [0]]


def test_kv_compaction_moves_the_path_to_consecutive_positions(runner) -> None:
    """`LlamaRunner.compact`: row r's path node i lands at position lengths[r] + i; the committed prefix stays as
    it was."""
    before = [c.clone() for c in (runner.k_cache, runner.v_cache)]
    for c in (runner.k_cache, runner.v_cache):
        c.copy_(torch.randn_like(c))
    try:
        saved = [c.clone() for c in (runner.k_cache, runner.v_cache)]
        slots, lengths = [2, 0], [3, 5]
        path = torch.tensor([[0, 2, 3, 3], [0, 1, 4, 4]])  # row 0: 3 nodes (the deepest repeated), row 1: 3
        runner.compact(torch.tensor(slots), torch.tensor(lengths), path)
        for cache, old in zip((runner.k_cache, runner.v_cache), saved):
            for slot, length, nodes in zip(slots, lengths, path.tolist()):
                assert torch.equal(cache[:, slot, :, :length], old[:, slot, :, :length])
                for i, node in enumerate(nodes):
                    assert torch.equal(cache[:, slot, :, length + i], old[:, slot, :, length + node])
            assert torch.equal(cache[:, 1], old[:, 1]) and torch.equal(cache[:, 3], old[:, 3])
    finally:
        for c, b in zip((runner.k_cache, runner.v_cache), before):
            c.copy_(b)


def test_graph_rounds_only_for_greedy_rows(runner, exported, monkeypatch) -> None:
    from eaglepipe.engine.sampling import SamplingParams
    from eaglepipe.speculative import SpeculativeGenerator

    assert SpeculativeGenerator(runner, exported["eagle3"], SPECS[0]).round_graph is None  # default off on CPU
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=0)]  # one sampled row: the eager round
    for spec in (SPECS[0], SPECS[2]):
        gen = SpeculativeGenerator(runner, exported["eagle3"], spec, options=GRAPH)
        bodies = record_calls(monkeypatch, gen.round_graph, "body")
        _, cts = decode(gen, PROMPTS[:2], [20, 20], [0, 1], params)
        assert not bodies and min(cts) > 0


def test_prepare_refuses_slots_holding_sequences(runner, exported) -> None:
    from eaglepipe.speculative import SpeculativeGenerator

    gen = SpeculativeGenerator(runner, exported["eagle3"], SPECS[0], options=GRAPH)
    runner.prefill([PROMPTS[0]], [0])
    try:
        with pytest.raises(RuntimeError, match="live sequences"):
            gen.round_graph.prepare(1)
    finally:
        runner.release(0)
    gen.round_graph.prepare(1)  # nothing live: fine (a no-op off CUDA)


def test_rounds_are_pipelined_and_the_round_in_flight_is_dropped_for_stopped_rows(runner, references, exported,
                                                                                  monkeypatch) -> None:
    """Round k+1 starts before round k's tokens are emitted. When rows stop, the round in flight is dropped for
    them (not counted as their verification) and its tokens go to the rows that go on; after the last stop it
    is wasted whole."""
    _, graph = generators(runner, exported["eagle3"], SPECS[0])
    bodies = record_calls(monkeypatch, graph.round_graph, "body")
    emitted = record_calls(monkeypatch, graph.round_graph, "emit")
    out, cts = decode(graph, [PROMPTS[0]], [NEW_TOKENS], [0])
    assert out == [references[0]]
    assert len(bodies) == cts[0] + 1  # the last round's successor ran and was dropped
    bodies.clear()
    emitted.clear()
    limits = [NEW_TOKENS, 9, 23]
    out, cts = decode(graph, PROMPTS, limits, [0, 1, 2])
    assert out == [ref[:n] for ref, n in zip(references, limits)]
    assert len(bodies) == max(cts) + 1  # the early stops lost no round: the rows left used the one in flight
    assert [len(rows.slots) for rows, _ in emitted] == sorted([len(rows.slots) for rows, _ in emitted],
                                                                reverse=True)


def test_no_round_is_wasted_when_max_new_tokens_ends_the_request(runner, references, exported, monkeypatch) -> None:
    """Once a row's max_new_tokens could be reached by the round in flight, that round is waited for before the
    next is launched: a request that ends on its length runs exactly its verification rounds."""
    from eaglepipe.engine.sampling import SamplingParams

    _, graph = generators(runner, exported["eagle3"], SPECS[0])
    bodies = record_calls(monkeypatch, graph.round_graph, "body")
    limits = [NEW_TOKENS, 9, 23]
    params = [SamplingParams(max_new_tokens=n) for n in limits]
    out, cts = decode(graph, [PROMPTS[0]], limits[:1], [0], params[:1])
    assert out == [references[0]] and len(bodies) == cts[0]
    bodies.clear()
    out, cts = decode(graph, PROMPTS, limits, [0, 1, 2], params)
    assert out == [ref[:n] for ref, n in zip(references, limits)]
    assert len(bodies) == max(cts)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=spec_id)
def test_graph_rounds_run_until_a_tree_no_longer_fits(target_dir, exported, monkeypatch, spec: dict) -> None:
    """The round in flight makes the host's lengths lag, but the hand-over to the eager round near the cache's
    end waits until the host has caught up: it happens only when the next tree truly does not fit."""
    runner = make_runner(target_dir, 40)
    _, graph = generators(runner, exported["eagle3"], spec)
    handed_over = []
    inner = graph.round

    def eager_round(rows):
        handed_over.append(max(runner.lengths[s] for s in rows.slots))
        return inner(rows)
    monkeypatch.setattr(graph, "round", eager_round)
    decode(graph, [PROMPTS[0]], [10 ** 6], [0])
    assert handed_over and handed_over[0] + spec["num_draft_tokens"] > runner.max_len
