"""The draft-tree kernels (`tree_grow`, `tree_select`, `tree_accept`) against the PyTorch bookkeeping of the
reference path (`grow`, `select_tree`, `greedy_accept_device`), run by Triton's interpreter on CPU: the same
candidates, frontier, token rows, verify tree and accepted path, bit for bit; and the K/V compaction kernel
(`compact_kv`) against indexing."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from eaglepipe.speculative import tree  # noqa: E402
from eaglepipe.speculative.kernels import tree_grow, tree_select  # noqa: E402


def tree_rows(slots: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor,
              visible: torch.Tensor, node_start: int) -> tuple[torch.Tensor, ...]:
    """The token rows of a tree step as `tree_grow` builds them (`Frontier.rows`): frontier node f of batch row b
    is row b*F + f, stored as scratch node node_start + f, at RoPE position length + depth - 1, seeing its
    committed prefix and then its visible scratch nodes."""
    b, f, depth = visible.shape
    prefix = lengths.repeat_interleave(f)
    return (slots.repeat_interleave(f), ids.reshape(-1).clone(), hidden.reshape(b * f, -1).clone(),
            prefix + depth - 1, prefix + node_start + torch.arange(f).repeat(b), prefix,
            visible.reshape(b * f, depth).clone(), torch.full_like(prefix, depth))


def _grow_all(b: int, k: int, steps: int, h: int, vocab: int, d2t: torch.Tensor | None, seed: int):
    """Expand a random tree depth by depth with both implementations, checking each depth; returns the kernel's
    candidate buffers (tokens, scores, parents) and their depths."""
    gen = torch.Generator().manual_seed(seed)
    n_cand = k + (steps - 1) * k * k
    cand = (torch.zeros(b, n_cand, dtype=torch.long), torch.zeros(b, n_cand), torch.zeros(b, n_cand, dtype=torch.long))
    slots, lengths = torch.randperm(4, generator=gen)[:b], torch.randint(3, 20, (b,), generator=gen)

    def top(*shape):
        values = torch.randn(*shape, k, generator=gen).sort(-1, descending=True).values
        return values, torch.randint(0, vocab, (*shape, k), generator=gen)

    values, ids = top(b)
    hidden = torch.randn(b, h, generator=gen)
    front = tree_grow(torch.zeros(b, 1), values[:, None], ids[:, None], d2t, hidden[:, None],
                      torch.full((b, 1), -1), torch.zeros(b, 1, 0, dtype=torch.long), slots, lengths, *cand, 0, 0)
    want_ids, want_scores = tree.expand(torch.zeros(b, 1), values[:, None], ids[:, None])
    want_tokens = tree.target_ids(want_ids, d2t, None)
    assert torch.equal(cand[0][:, :k], want_tokens) and torch.equal(cand[1][:, :k], want_scores)
    assert (cand[2][:, :k] == -1).all() and torch.equal(front.cand, torch.arange(k).expand(b, k))
    want_rows = tree_rows(slots, lengths, want_tokens, hidden[:, None].expand(b, k, h),
                          torch.arange(k)[None, :, None].expand(b, k, 1), 0)
    for got, want in zip(front.rows(), want_rows):
        assert torch.equal(got, want)
    for depth in range(1, steps):
        values, ids = top(b, k)
        hidden = torch.randn(b, k, h, generator=gen)
        visible = front.visible.view(b, k, depth)
        first_new, next_start = (depth - 1) * k * k + k, depth * k
        want = tree.grow(front.scores, values, ids, hidden, front.cand, visible, first_new, next_start, d2t, None)
        front = tree_grow(front.scores, values, ids, d2t, hidden, front.cand, visible, slots, lengths, *cand,
                          first_new, next_start)
        new = slice(first_new, first_new + k * k)
        assert torch.equal(cand[0][:, new], want.tokens) and torch.equal(cand[1][:, new], want.scores)
        assert torch.equal(cand[2][:, new], want.parents)
        assert torch.equal(front.scores, want.next_scores) and torch.equal(front.cand, want.next_cand)
        want_rows = tree_rows(slots, lengths, want.next_tokens, want.next_hidden, want.next_visible, next_start)
        for name, got, exp in zip(front._fields[2:], front.rows(), want_rows):
            assert torch.equal(got, exp), (depth, name)
    depths = torch.tensor([1] * k + [d + 1 for d in range(1, steps) for _ in range(k * k)])
    return cand, depths


@pytest.mark.parametrize("b,k,steps,with_d2t", [(1, 2, 3, True), (2, 3, 4, True), (3, 4, 2, False)])
def test_grow_and_select_match_the_pytorch_bookkeeping(b, k, steps, with_d2t):
    vocab = 50
    d2t = torch.randint(0, 7, (vocab,)) if with_d2t else None
    cand, depths = _grow_all(b, k, steps, 8, vocab, d2t, seed=b * 10 + k)
    roots = torch.arange(b) + 100
    for keep in sorted({1, 3, k + 1, depths.numel()}):
        got = tree_select(*cand, depths, roots, keep, steps)
        want = tree.select_tree(tree.Candidates(*cand, depths.expand(b, -1)), roots, keep, steps)
        for name, x, y in zip(("tokens", "parents", "depths", "ancestors"), got,
                              (want.tokens, want.parents, want.depths, want.ancestors)):
            assert torch.equal(x, y), (keep, name)


def test_equal_scores_keep_the_lower_candidate_first():
    """Ties go to the lower candidate number, as a stable sort orders them, so a kept node's parent (numbered
    earlier, never scored lower) is always kept with it."""
    cand, depths = _grow_all(2, 3, 3, 4, 30, None, seed=5)
    flat = (cand[0], torch.zeros_like(cand[1]), cand[2])
    for keep in (2, 5, 7):
        tokens, parents, _, anc = tree_select(*flat, depths, torch.tensor([1, 2]), keep, 3)
        assert torch.equal(tokens[:, 1:], cand[0][:, :keep])
        assert (parents[:, 1:] < torch.arange(1, keep + 1)).all()  # every parent placed before its child
        assert anc[:, :, 0].all() and anc.diagonal(dim1=1, dim2=2).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accept_and_compaction_match_the_pytorch_acceptance(seed):
    """`tree_accept` gives `greedy_accept_device` + `path_nodes`'s path, count and bonus token on trees where the
    target agrees with some branches, and `compact_kv` moves the same K/V as the runner's PyTorch indexing."""
    from eaglepipe.engine.kernels import compact_kv
    from eaglepipe.speculative.accept import greedy_accept_device, path_nodes
    from eaglepipe.speculative.kernels import tree_accept

    b, k, steps, vocab = 3, 3, 4, 6  # a small vocabulary, so that random drafts are often right
    cand, depths = _grow_all(b, k, steps, 4, vocab, None, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    keep = 9
    verify = tree.select_tree(tree.Candidates(*cand, depths.expand(b, -1)), torch.arange(b), keep, steps)
    verify.tokens.remainder_(vocab)
    logits = torch.randn(b, keep + 1, vocab, generator=gen)
    # make the target agree with the first child of some nodes
    for r in range(b):
        for node in range(1, keep + 1):
            if torch.rand((), generator=gen) < 0.6:
                logits[r, verify.parents[r, node], verify.tokens[r, node]] += 10.0
    width = steps + 1
    want = greedy_accept_device(verify, logits)
    want_path = path_nodes(want, width)
    path, count, bonus = tree_accept(verify.tokens, verify.parents, verify.depths, verify.ancestors,
                                     logits.argmax(-1), width)
    assert torch.equal(path, want_path) and torch.equal(count, want.count) and torch.equal(bonus, want.bonus)
    assert (count > 1).any()  # some drafts were accepted, so the check is not only about the root

    layers, slots, heads, positions, d = 2, 4, 3, 24, 5
    k_cache = torch.randn(layers, slots, heads, positions, d, generator=gen)
    v_cache = torch.randn(layers, slots, heads, positions, d, generator=gen)
    row_slots, lengths = torch.tensor([2, 0, 3]), torch.tensor([4, 0, 9])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    src, dst = lengths[:, None] + path, lengths[:, None] + torch.arange(width)
    rows = row_slots[:, None].expand(b, width)
    for cache in (want_k, want_v):
        cache[:, rows, :, dst] = cache[:, rows, :, src]
    compact_kv(k_cache, v_cache, row_slots, lengths, path)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
