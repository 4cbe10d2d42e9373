"""Speculative decoding with exported drafters: greedy output equals the target's greedy decode for EAGLE-3,
EAGLE-3.1 and EAGLE-1 chains and trees (batch 1 and batched), tree logic, and distribution-preserving sampling."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from test_export import export_to, make_checkpoint

PROMPTS = [[1, 2, 3, 4, 5, 6], [100, 200, 300, 400], [7, 7, 7, 9, 11, 13, 15, 17]]
NEW_TOKENS = 24
CONFIGS = [dict(num_steps=3, topk=1, num_draft_tokens=4), dict(num_steps=4, topk=3, num_draft_tokens=8)]


def greedy_reference(runner, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy decode (plain runner steps, no speculation)."""
    out = runner.prefill([prompt], [0])
    tok = int(out.last_logits[0].argmax())
    seq = [tok]
    for _ in range(n - 1):
        tok = int(runner.decode([tok], [0])[0].argmax())
        seq.append(tok)
    runner.release(0)
    return seq


def fit_drafter(ckpt: Path, runner, sequences: list[list[int]], steps: int = 60) -> None:
    """Teach the random drafter the target's greedy continuations (step-0 teacher forcing), so that the tests
    see accepted paths of several lengths and not only rejections."""
    from eaglepipe.engine.model import rms_norm
    from eaglepipe.families.registry import family_of
    from eaglepipe.models.build import load_drafter_weights, save_drafter
    from eaglepipe.models.config import DrafterConfig

    cfg = DrafterConfig.from_json(ckpt / "drafter_config.json")
    family = family_of(cfg)
    model = family.new_module(cfg, runner.weights.lm_head.float().clone())
    load_drafter_weights(model, ckpt / "model.safetensors")
    out = runner.prefill(sequences, list(range(len(sequences))), capture_layers=cfg.aux_layers)
    for s in range(len(sequences)):
        runner.release(s)
    norm = runner.weights.norm.clone()

    def final_norm(h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, norm, runner.shapes.rms_norm_eps)

    batches = []
    for seq, aux in zip(sequences, out.aux_hidden):
        ids = torch.tensor(seq)
        # target id -> draft id (the identity over a whole-vocab drafter)
        labels = torch.cumsum(model.in_draft_vocab(torch.arange(cfg.vocab_size)).long(), 0)[ids[2:]] - 1
        batches.append((ids[1:-1][None], aux.clone()[None, :-2], torch.arange(len(seq) - 2)[None], labels))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        loss = 0.0
        for ids, aux, pos, labels in batches:
            _, logits, _ = model.step(ids, family.draft_input(model, aux, final_norm), pos)
            loss = loss + F.cross_entropy(logits[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_drafter(model, ckpt)


@pytest.fixture(scope="module")
def runner(tiny_llama_dir: Path):
    from eaglepipe.engine.model import LlamaRunner

    return LlamaRunner(tiny_llama_dir, device="cpu", dtype=torch.float32, max_slots=4, max_len=256)


@pytest.fixture(scope="module")
def references(runner) -> list[list[int]]:
    return [greedy_reference(runner, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def exported(tiny_llama_dir: Path, runner, references, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained-a-little drafters of every family, exported through the exporter (SGLang format)."""
    root = tmp_path_factory.mktemp("spec")
    seqs = [p + r for p, r in zip(PROMPTS, references)]
    vocab = sorted({t for s in seqs for t in s})
    out = {}
    for algo in ("eagle3", "eagle3.1", "eagle1"):
        ckpt = make_checkpoint(tiny_llama_dir, root / algo / "ckpt", algo, draft_vocab=256, include_ids=vocab)
        fit_drafter(ckpt, runner, seqs)
        export_to(tiny_llama_dir, ckpt, root / algo / "export")
        out[algo] = root / algo / "export" / "sglang"
    return out


def run_spec(gen, prompts, params=None, limit=NEW_TOKENS, slots=None) -> tuple[list[list[int]], list[int]]:
    from eaglepipe.engine.sampling import SamplingParams

    outs: list[list[int]] = [[] for _ in prompts]

    def callback(i: int):
        def on_tokens(tokens: list[int]) -> bool:
            outs[i].extend(tokens)
            return len(outs[i]) >= limit
        return on_tokens
    ct = gen.generate_batch(prompts, params or [SamplingParams()] * len(prompts), slots or list(range(len(prompts))),
                            [callback(i) for i in range(len(prompts))])
    return [o[:limit] for o in outs], ct


@pytest.mark.parametrize("algo", ["eagle3", "eagle3.1", "eagle1"])
@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"s{s['num_steps']}_k{s['topk']}_n{s['num_draft_tokens']}")
def test_greedy_is_exact(runner, references, exported, algo: str, spec: dict) -> None:
    from eaglepipe.speculative import SpeculativeGenerator

    gen = SpeculativeGenerator(runner, exported[algo], spec)
    # batch 1
    outs, cts = [], []
    for p in PROMPTS:
        o, ct = run_spec(gen, [p])
        outs.append(o[0])
        cts.append(ct[0])
    assert outs == references
    assert gen.stats.rounds == sum(cts) and all(0 < c <= NEW_TOKENS for c in cts)
    assert gen.stats.tau > 1.2, gen.stats  # the fitted drafter is accepted often
    rates = gen.stats.acceptance_rates()
    assert len(rates) == spec["num_steps"] and rates[0] >= rates[-1] and rates[0] > 0.3
    # batched, in slots that are not 0..B-1, with per-row acceptance differing
    gen.reset_stats()
    batched, _ = run_spec(gen, PROMPTS, slots=[3, 1, 2])
    assert batched == references


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"s{s['num_steps']}_k{s['topk']}_n{s['num_draft_tokens']}")
def test_greedy_is_exact_after_a_padded_prefill(runner, references, exported, spec: dict) -> None:
    """The target and drafter prefilled through `PrefillGraphs` (the padded body CUDA graphs capture)."""
    from eaglepipe.engine.prefill_graphs import PrefillGraphs
    from eaglepipe.speculative import SpeculativeGenerator

    gen = SpeculativeGenerator(runner, exported["eagle3"], spec)
    runner.prefill_graphs = PrefillGraphs(runner.padded_prefill, runner.max_len, runner.device)
    try:
        outs = [run_spec(gen, [p])[0][0] for p in PROMPTS]
    finally:
        runner.prefill_graphs = None
    assert outs == references


def test_tree_select_keeps_parents_and_orders_nodes() -> None:
    from eaglepipe.speculative.tree import Candidates, select_tree

    # candidates: 0,1 children of root; 2,3 children of 0; 4,5 children of 1
    scores = torch.tensor([[-0.1, -0.5, -0.3, -2.0, -0.6, -0.55]])
    cands = Candidates(tokens=torch.tensor([[10, 11, 12, 13, 14, 15]]), scores=scores,
                       parents=torch.tensor([[-1, -1, 0, 0, 1, 1]]), depths=torch.tensor([[1, 1, 2, 2, 2, 2]]))
    tree = select_tree(cands, torch.tensor([99]), keep=4, max_depth=2)
    # best four: 0 (-0.1), 2 (-0.3), 1 (-0.5), 5 (-0.55) -> candidate order 0, 1, 2, 5
    assert tree.tokens.tolist() == [[99, 10, 11, 12, 15]]
    assert tree.parents.tolist() == [[0, 0, 0, 1, 2]]
    assert tree.depths.tolist() == [[0, 1, 1, 2, 2]]
    assert tree.ancestors[0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                                [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]


def test_greedy_accept_takes_longest_matching_path() -> None:
    from eaglepipe.speculative.accept import greedy_accept
    from eaglepipe.speculative.tree import VerifyTree, ancestor_matrix

    parents = torch.tensor([[0, 0, 0, 1, 2]])
    tree = VerifyTree(torch.tensor([[5, 6, 7, 8, 9]]), parents, torch.tensor([[0, 1, 1, 2, 2]]),
                      ancestor_matrix(parents, 2))
    logits = torch.zeros(1, 5, 20)
    # target: after root 5 -> 7 (node 2), after 7 -> 9 (node 4), after 9 -> 3 (bonus)
    logits[0, 0, 7] = logits[0, 2, 9] = logits[0, 4, 3] = 1.0
    logits[0, 1, 1] = logits[0, 3, 1] = 1.0
    acc = greedy_accept(tree, logits)
    assert acc.paths == [[0, 2, 4]] and acc.bonus == [3] and acc.accepted_lengths == [2]


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with an expected count below 5 are pooled into one."""
    n = observed.sum()
    expected = expected_probs.double() * n
    small = expected < 5
    obs = torch.cat([observed[~small].double(), observed[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def test_sample_accept_row_matches_target_distribution() -> None:
    import random

    from eaglepipe.speculative.accept import sample_accept_row

    gen = random.Random(0)
    probs = torch.tensor([[0.05, 0.30, 0.25, 0.10, 0.20, 0.10],   # root
                          [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],   # node 1 (token 2)
                          [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],   # node 2 (token 0)
                          [0.10, 0.10, 0.10, 0.10, 0.10, 0.50]])  # node 3 (token 5, child of node 1)
    tokens, parents = [9, 2, 0, 5], [0, 0, 0, 1]
    first = torch.zeros(6)
    after_2 = torch.zeros(6)
    for _ in range(12000):
        path, bonus = sample_accept_row(tokens, parents, probs, gen)
        emitted = [tokens[i] for i in path[1:]] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 2:
            after_2[emitted[1]] += 1
    assert chi2_pvalue(first, probs[0]) > 1e-4
    assert chi2_pvalue(after_2, probs[1]) > 1e-4
    # and the test has power: a distribution shifted by 0.05 is rejected
    assert chi2_pvalue(first, torch.tensor([0.10, 0.25, 0.25, 0.10, 0.20, 0.10])) < 1e-3


@pytest.fixture(scope="module")
def small_vocab_setup(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer random Llama over an 8-token vocabulary, and a random full-vocab EAGLE-3 drafter for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eaglepipe.engine.model import LlamaRunner
    from eaglepipe.models.build import new_drafter, save_drafter
    from eaglepipe.models.config import DrafterConfig
    from eaglepipe.target.info import describe_model

    root = tmp_path_factory.mktemp("small_vocab")
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, max_position_embeddings=64, rope_theta=10000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(root / "target")
    info = describe_model(root / "target")
    dcfg = DrafterConfig.from_target(info, "eagle3", 8)
    drafter = new_drafter(dcfg, model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach(),
                          torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool), seed=3)
    with torch.no_grad():
        drafter.lm_head.weight.mul_(30.0)  # a confident, often wrong drafter: both accept and reject happen
    save_drafter(drafter, root / "ckpt")
    save_file({"d2t": torch.zeros(8, dtype=torch.long), "t2d": torch.ones(8, dtype=torch.bool)},
              str(root / "ckpt" / "vocab.safetensors"))
    export_to(root / "target", root / "ckpt", root / "export")
    runner = LlamaRunner(root / "target", device="cpu", dtype=torch.float32, max_slots=64, max_len=32)
    return model, runner, root / "export" / "sglang"


@pytest.mark.parametrize("spec", [dict(num_steps=2, topk=1, num_draft_tokens=3),
                                  dict(num_steps=2, topk=2, num_draft_tokens=4)], ids=["chain", "tree"])
def test_speculative_sampling_preserves_target_distribution(small_vocab_setup, spec: dict) -> None:
    from eaglepipe.engine.sampling import SamplingParams
    from eaglepipe.speculative import SpeculativeGenerator

    model, runner, export = small_vocab_setup
    prompt = [1, 5, 2]
    with torch.no_grad():  # exact marginals of the 2nd and 3rd generated tokens
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        seq2 = torch.tensor([prompt + [a] for a in range(8)])
        p2 = model(seq2).logits[:, -1].softmax(-1)  # [8, 8] given x1
        seq3 = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
        p3 = model(seq3).logits[:, -1].softmax(-1).view(8, 8, 8)
    joint12 = p1[:, None] * p2
    marg2 = joint12.sum(0)
    marg3 = (joint12[..., None] * p3).sum((0, 1))
    gen = SpeculativeGenerator(runner, export, spec)
    counts2, counts3 = torch.zeros(8), torch.zeros(8)
    batch, batches = 64, 24
    for b in range(batches):
        params = [SamplingParams(temperature=1.0, seed=b * batch + i) for i in range(batch)]
        outs, _ = run_spec(gen, [prompt] * batch, params, limit=3)
        for o in outs:
            counts2[o[1]] += 1
            counts3[o[2]] += 1
    assert gen.stats.rounds > 0 and 0 < sum(gen.stats.accepted_at) < gen.stats.rounds * spec["num_steps"]
    assert chi2_pvalue(counts2, marg2) > 1e-3, (counts2, marg2 * counts2.sum())
    assert chi2_pvalue(counts3, marg3) > 1e-3, (counts3, marg3 * counts3.sum())
