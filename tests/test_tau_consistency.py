"""Training and serving agree on acceptance.

An EAGLE-3 / EAGLE-3.1 drafter is trained through the real loop (`Trainer`, TTT unroll of K steps) on a small
random target's own greedy answers, exported through the real exporter (fp32), and served by
`SpeculativeGenerator` (chain (K, 1, K+1), greedy, fp32) on held-out prompts of the same kind.

On such data the comparison is exact, not statistical. The engine's output is the data itself; the drafter's
KV cache holds one entry per committed slot, computed from the target's hidden states as TTT step 0 computes
its keys; and chain step k at slot p attends to those entries and to its own steps 1..k at p (the TTT
diagonal), at RoPE position p + k. So a round that starts at slot p accepts exactly the number of leading
correct TTT steps at p, and the tau the engine measures is the training code's `replay_tau`. We check that
round by round, and that the exported drafter's step-0 and step-1 logits equal the training module's.

The training code's per-slot `sim_tau` (1 + sum_k P(steps 0..k correct) over every slot) is *not* what an
engine measures: rounds start only where the previous one ended, and rounds that start in hard stretches are
short, so the same answer takes more rounds than the per-slot average suggests. It is printed for reference.

The target has a 512-token vocabulary and a 256-token draft vocabulary (so d2t is not the identity and some
target argmaxes lie outside it), 6 layers, and the drafter reads the distinct layers h[1], h[3], h[5], so that
any layer-numbering slip between training, export and serving changes the features and shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from eaglepipe.config import params_from_dict, to_dict
from eaglepipe.config.schema import Config
from eaglepipe.speculative.agreement import compare, first_slots_of_runs, replay_by_turn, training_unroll
from eaglepipe.train.objective import replay_rounds, summarize

if TYPE_CHECKING:
    from eaglepipe.speculative import SpeculativeGenerator
    from eaglepipe.train.loop import Trainer

VOCAB, DRAFT_VOCAB, ANSWER = 512, 256, 48
AUX_LAYERS = [1, 3, 5]


@dataclass
class Corpus:
    """Tokens, vocab and online manifest of greedy conversations, and the samples of both splits."""

    root: Path
    target: Path
    train: list[dict]
    val: list[dict]


@dataclass
class Served:
    """One trained and exported drafter: its trainer, the training's final validation metrics, and the engine
    serving the export."""

    trainer: Trainer
    val_metrics: dict
    generator: SpeculativeGenerator
    ttt_steps: int


def make_target(out: Path) -> Path:
    """A random 6-layer Llama over VOCAB tokens, its lm_head scaled by 40 so that its distributions are peaked."""
    from eaglepipe.target.tiny import make_random_llama

    return make_random_llama(out, vocab_size=VOCAB, num_layers=6, max_position_embeddings=1024, lm_head_scale=40.0)


def greedy_answers(target: Path, prompts: list[list[int]], length: int) -> list[list[int]]:
    """The target's own greedy continuations, decoded in one batch by the engine's runner."""
    from eaglepipe.engine.model import LlamaRunner

    runner = LlamaRunner(target, device="cpu", dtype=torch.float32, max_slots=len(prompts), max_len=256)
    slots = list(range(len(prompts)))
    tokens = [runner.prefill(prompts, slots).last_logits.argmax(-1)]
    for _ in range(length - 1):
        tokens.append(runner.decode(tokens[-1].tolist(), slots).argmax(-1))
    return torch.stack(tokens, 1).tolist()


def build_corpus(root: Path, target: Path, n_train: int, n_val: int) -> Corpus:
    """Random prompts of 6-15 tokens answered greedily by the target (answers supervised), a DRAFT_VOCAB draft
    vocab counted over the training answers, and the online manifest, under `root`."""
    from eaglepipe.data.tokens_io import write_token_shards
    from eaglepipe.data.vocab import build_vocab_maps, save_vocab

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, int(rng.integers(6, 16))).tolist() for _ in range(n_train + n_val)]
    samples = []
    for i, (p, a) in enumerate(zip(prompts, greedy_answers(target, prompts, ANSWER))):
        mask = np.zeros(len(p) + len(a), np.int8)
        mask[len(p):] = 1
        samples.append({"id": f"c{i}", "input_ids": np.array(p + a, np.int32), "loss_mask": mask})
    write_token_shards(root / "tokens", "train", samples[:n_train])
    write_token_shards(root / "tokens", "val", samples[n_train:])
    freq = torch.zeros(VOCAB, dtype=torch.long)
    for s in samples[:n_train]:
        freq.index_add_(0, torch.from_numpy(s["input_ids"].astype(np.int64)), torch.from_numpy(s["loss_mask"]).long())
    save_vocab(root / "vocab", *build_vocab_maps(freq, DRAFT_VOCAB), freq)
    (root / "hidden").mkdir()
    (root / "hidden" / "manifest.json").write_text('{"mode": "online"}')
    return Corpus(root, target, samples[:n_train], samples[n_train:])


def train_and_serve(corpus: Corpus, out: Path, algorithm: str, ttt_steps: int, steps: int) -> Served:
    """Train through `Trainer`, export through the exporter (fp32) and load the export into the engine."""
    from eaglepipe.engine.model import LlamaRunner
    from eaglepipe.export.checkpoint import read_checkpoint, resolve_checkpoint
    from eaglepipe.export.writer import ExportRequest, export_checkpoint
    from eaglepipe.speculative import SpeculativeGenerator
    from eaglepipe.train.loop import Paths, Trainer

    d = to_dict(Config())
    d["device"] = "cpu"
    d["data"]["seq_length"] = 128
    d["target"]["aux_layers"] = AUX_LAYERS
    d["bench"]["sweep"] = [dict(num_steps=ttt_steps, topk=1, num_draft_tokens=ttt_steps + 1)]  # the round served
    d["train"].update(dict(algorithm=algorithm, ttt_steps=ttt_steps, max_steps=steps, micro_batch_size=4, lr=5e-3,
                           warmup_ratio=0.0, min_lr_ratio=0.01, max_grad_norm=10.0, pack=False, log_every=steps,
                           eval_every=steps, save_every=steps))
    c = corpus.root
    trainer = Trainer(params_from_dict(d), Paths(corpus.target, c / "tokens", c / "vocab", c / "hidden", out / "train"))
    val_metrics = trainer.train()["final"]["val"]
    req = ExportRequest(dtype="float32", verifier_name=str(corpus.target), num_steps=ttt_steps, topk=1,
                        num_draft_tokens=ttt_steps + 1)
    export_checkpoint(read_checkpoint(resolve_checkpoint(out / "train", "LATEST")), corpus.target, out / "export", req)
    runner = LlamaRunner(corpus.target, device="cpu", dtype=torch.float32, max_slots=1, max_len=256)
    spec = dict(num_steps=ttt_steps, topk=1, num_draft_tokens=ttt_steps + 1)
    return Served(trainer, val_metrics, SpeculativeGenerator(runner, out / "export", spec), ttt_steps)


def assert_consistent(served: Served, corpus: Corpus, seen: int = 4) -> None:
    """The engine accepts what training predicts: on the held-out prompts round by round and in tau against
    the training run's validation `replay_tau`; on `seen` training prompts (where the drafter is accepted
    deeper) round by round.

    Tolerance: the fp32 logits agree to ~1e-6 relative (the logits test), so only a top-2 near-tie could flip
    one accept decision; one flipped decision moves tau by at most (K + 1) / rounds. Allow that, no more.
    """
    algo = served.trainer.drafter.config.algorithm
    held_out = compare(served.trainer, served.generator, corpus.val, served.ttt_steps)
    train = compare(served.trainer, served.generator, corpus.train[:seen], served.ttt_steps)
    print(f"\n{algo} K={served.ttt_steps}: training sim_tau {served.val_metrics['sim_tau']:.4f}, "
          f"replay_tau {served.val_metrics['replay_tau']:.4f}; held-out {held_out}; seen {train}")
    for got in (held_out, train):
        tol = (served.ttt_steps + 1) / got["rounds"]
        assert got["rounds_differing"] <= 1, got
        assert abs(got["engine_tau"] - got["replayed_tau"]) <= tol, got
        assert np.allclose(got["engine_rates"], got["replayed_rates"], atol=tol), got
    tol = (served.ttt_steps + 1) / held_out["rounds"]
    assert abs(held_out["engine_tau"] - served.val_metrics["replay_tau"]) <= tol, (held_out, served.val_metrics)
    assert train["engine_rates"][-1] > 0, f"no round accepted all {served.ttt_steps} drafts: {train}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("tau")
    return build_corpus(root / "corpus", make_target(root / "target"), n_train=48, n_val=8)


@pytest.fixture(scope="module", params=["eagle3", "eagle3.1"])
def served(request: pytest.FixtureRequest, corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_serve(corpus, tmp_path_factory.mktemp(request.param), request.param, ttt_steps=7, steps=120)


def test_replay_rounds_equals_a_walk_along_each_answer() -> None:
    """Pointer doubling counts the same rounds and tokens as walking each run of supervised slots."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        b, t = 3, int(torch.randint(2, 40, (1,), generator=gen))
        supervised = torch.rand(b, t, generator=gen) < 0.7
        supervised[:, -1] = False  # the last slot of a row has no next token
        supervised = supervised.flatten()
        accepted = torch.randint(0, 5, (b * t,), generator=gen) * supervised
        rounds = tokens = 0
        sup, acc = supervised.tolist(), accepted.tolist()
        for p in range(b * t):
            q = p if sup[p] and (p == 0 or not sup[p - 1]) else None
            while q is not None:
                rounds, tokens = rounds + 1, tokens + acc[q] + 1
                nxt = q + acc[q] + 1
                q = nxt if nxt < b * t and all(sup[q:nxt + 1]) else None
        got = replay_rounds(accepted, supervised, t)
        assert (int(got[0]), int(got[1])) == (rounds, tokens)


def test_aux_layers_no_engine_can_capture_are_rejected_before_training() -> None:
    from eaglepipe.config import ConfigError
    from eaglepipe.train.setup import check_config_against_target

    info = {"vocab_size": 100, "num_layers": 6, "aux_layers": [2, 3, 3], "max_position_embeddings": 1024}
    cfg = params_from_dict(to_dict(Config()))
    check_config_against_target(cfg, info, 10, 100)
    for bad in ([0, 3, 5], [1, 3, 6]):
        cfg.target.aux_layers = bad
        with pytest.raises(ConfigError, match="aux_layers"):
            check_config_against_target(cfg, info, 10, 100)


def test_engine_accepts_what_training_predicts(served: Served, corpus: Corpus) -> None:
    assert_consistent(served, corpus)


def test_first_slots_of_runs_keeps_the_head_of_every_run() -> None:
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert torch.nonzero(first_slots_of_runs(mask, 2)).flatten().tolist() == [3, 4, 9, 11, 12]
    assert torch.equal(first_slots_of_runs(mask, None), mask)
    assert not first_slots_of_runs(torch.zeros(4, dtype=torch.bool), 2).any()


def test_replay_by_turn_splits_answers_and_agrees_with_training(served: Served, corpus: Corpus) -> None:
    """Single-turn samples: every round is a first-turn round, and the replay is the training run's validation
    replay_tau; a cap keeps the first slots of each answer. Two answers in one sample: the second one's slots
    count as a later turn."""
    whole, capped = replay_by_turn(served.trainer, corpus.val, served.ttt_steps, caps=(None, 5))
    assert whole["later"]["rounds"] == 0 and whole["first"]["slots"] == ANSWER * len(corpus.val)
    tol = (served.ttt_steps + 1) / whole["first"]["rounds"]
    assert abs(whole["replay_tau"] - served.val_metrics["replay_tau"]) <= tol, (whole, served.val_metrics)
    assert capped["first"]["slots"] == 5 * len(corpus.val) and capped["first"]["rounds"] <= 5 * len(corpus.val)
    a, b = corpus.val[0], corpus.val[1]
    two = {"id": "two", "input_ids": np.concatenate([a["input_ids"], b["input_ids"]]),
           "loss_mask": np.concatenate([a["loss_mask"], b["loss_mask"]])}
    (split,) = replay_by_turn(served.trainer, [two], served.ttt_steps)
    assert split["first"]["slots"] == ANSWER and split["later"]["slots"] == ANSWER, split
    assert served.val_metrics["replay_tau_first"] == served.val_metrics["replay_tau"]  # single-turn samples
    sums = training_unroll(served.trainer, two, served.ttt_steps).sums
    metrics = summarize(sums, served.ttt_steps, served.trainer.objective.step_weight_decay)
    assert metrics["replay_tau_first"] == pytest.approx(split["first"]["replay_tau"], abs=1e-4)


def test_exported_drafter_logits_equal_the_training_module(served: Served, corpus: Corpus) -> None:
    """Steps 0 and 1 at every answer slot: the engine's drafter (loaded from the export, over its own KV
    cache) and the training module, fed the same target hidden states and tokens."""
    from eaglepipe.speculative.draft_runner import DraftRunner

    sample = corpus.val[0]
    batch, _, logits, _ = training_unroll(served.trainer, sample, served.ttt_steps)
    want = [dict(zip(batch.step_slots[k].tolist(), logits[k])) for k in range(2)]
    gen = served.generator
    ids = sample["input_ids"].tolist()
    out = gen.runner.prefill([ids], [0], capture_layers=gen.steps.capture)
    gen.runner.release(0)
    fused = gen.steps.draft_input(out.aux_hidden[0][None])
    draft = DraftRunner(gen.steps.drafter, 1, len(ids) + 2, torch.device("cpu"), torch.float32)
    slot0, zero = torch.tensor([0]), torch.zeros(1, dtype=torch.long)
    worst = [0.0, 0.0]
    for p in range(int(np.argmax(sample["loss_mask"])) - 1, len(ids) - 2):
        hidden, step0 = draft.extend(slot0, zero, 0, torch.tensor([ids[1:p + 2]]), fused[:, :p + 1])
        _, step1 = draft.chain_step(slot0, torch.tensor([p + 1]), p + 1, torch.tensor([[ids[p + 2]]]),
                                    hidden[:, -1:], 1)
        worst[0] = max(worst[0], float((step0[0, -1] - want[0][p]).abs().max()))
        if p in want[1]:
            worst[1] = max(worst[1], float((step1[0, 0] - want[1][p]).abs().max()))
    scale = float(logits[0].abs().max())
    assert max(worst) <= 1e-5 * scale, (worst, scale)


def test_p_eagle_serving_accepts_what_its_training_predicts(corpus: Corpus, tmp_path: Path) -> None:
    """P-EAGLE: a round's K drafts come from one forward over the emitted tokens and K-1 mask positions; the
    training module's depths at every slot (validation keeps them all) predict each round's acceptance, depth
    by depth."""
    assert_consistent(train_and_serve(corpus, tmp_path, "peagle", ttt_steps=5, steps=120), corpus)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("tau_big")
    return build_corpus(root / "corpus", make_target(root / "target"), n_train=384, n_val=16)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["eagle3", "eagle3.1"])
def test_a_stronger_drafter_agrees_too(algorithm: str, big_corpus: Corpus, tmp_path: Path) -> None:
    """Eight times the data and seven times the steps: held-out tau near 2, where the per-slot sim_tau
    overestimates it most."""
    served = train_and_serve(big_corpus, tmp_path, algorithm, ttt_steps=7, steps=800)
    assert_consistent(served, big_corpus)
    assert served.val_metrics["replay_tau"] > 1.6, served.val_metrics
