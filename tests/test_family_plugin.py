"""Adding a drafter family is one module and one conf file: a family defined outside the package
(eagle3_nbr_family.py, speculators' EAGLE-3 layout served by vLLM only) composes from its conf file, trains,
exports, validates and decodes exactly through the generic stages' code, untouched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import eagle3_nbr_family
from eagle3_nbr_family import ALGORITHM, NormBeforeResidualDrafter
from test_export import export_to, make_checkpoint
from test_spec_decode import PROMPTS, fit_drafter, references, run_spec, runner  # noqa: F401  (module fixtures)
from test_train import conversations, make_cfg, paths, sharp_target  # noqa: F401  (module fixtures)

REPO = Path(__file__).resolve().parents[1]
SPECS = [dict(num_steps=3, topk=1, num_draft_tokens=4), dict(num_steps=3, topk=2, num_draft_tokens=5)]


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The plug-in's one registration call (it stays registered: its names are its own)."""
    from eaglepipe.families.registry import register

    return register(eagle3_nbr_family.FAMILY)


def test_its_conf_file_composes(tmp_path: Path) -> None:
    from eaglepipe.compose import compose_dict

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "train" / "eagle3_nbr.yaml").write_text(f"algorithm: {ALGORITHM}\n")
    assert compose_dict(["train=eagle3_nbr"], config_dir=conf)["train"]["algorithm"] == ALGORITHM


def test_it_trains_through_the_training_loop(conversations, sharp_target, tmp_path: Path) -> None:  # noqa: F811
    from eaglepipe.train.loop import Trainer

    trainer = Trainer(make_cfg(algorithm=ALGORITHM, max_steps=3), paths(conversations, sharp_target, tmp_path / "t"))
    summary = trainer.train()
    assert isinstance(trainer.drafter, NormBeforeResidualDrafter)
    assert summary["algorithm"] == ALGORITHM and summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history.rows)
    ckpt = tmp_path / "t" / "checkpoints" / (tmp_path / "t" / "LATEST").read_text().strip()
    assert json.loads((ckpt / "drafter_config.json").read_text())["algorithm"] == ALGORITHM


def test_its_layer_is_its_own() -> None:
    """The same weights give other outputs than an EAGLE-3 drafter's: the plug-in's module is what runs."""
    import dataclasses

    from eaglepipe.models.build import new_drafter
    from eaglepipe.models.config import DrafterConfig
    from eaglepipe.models.eagle3 import Eagle3Drafter

    cfg = DrafterConfig(algorithm=ALGORITHM, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=100, draft_vocab_size=100,
                        target_hidden_size=32, aux_layers=[1, 2, 3], max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    drafter = new_drafter(cfg, torch.randn(100, 32, generator=g), torch.randn(100, 32, generator=g),
                          torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.bool))
    assert isinstance(drafter, NormBeforeResidualDrafter)
    plain = Eagle3Drafter(dataclasses.replace(cfg, algorithm="eagle3"))
    plain.load_state_dict(drafter.state_dict())
    ids, hidden = torch.randint(0, 100, (1, 5), generator=g), torch.randn(1, 5, 32, generator=g) * 4
    pos = torch.arange(5)[None]
    assert not torch.allclose(drafter.step(ids, hidden, pos)[1], plain.step(ids, hidden, pos)[1])


@pytest.fixture(scope="module")
def exported(tiny_llama_dir: Path, runner, references, tmp_path_factory) -> Path:  # noqa: F811
    """A checkpoint of the family taught the target's greedy continuations, through the export stage's code."""
    root = tmp_path_factory.mktemp("nbr")
    seqs = [p + r for p, r in zip(PROMPTS, references)]
    ckpt = make_checkpoint(tiny_llama_dir, root / "ckpt", ALGORITHM, draft_vocab=256,
                           include_ids=sorted({t for s in seqs for t in s}))
    fit_drafter(ckpt, runner, seqs)
    summary = export_to(tiny_llama_dir, ckpt, root / "export")
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    return root / "export"


def test_it_exports_for_the_engines_that_serve_it(exported: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from eaglepipe.export.validate import validate_export

    assert sorted(p.name for p in exported.iterdir() if p.is_dir()) == ["vllm"]
    cfg = json.loads((exported / "vllm" / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3Speculator"] and cfg["norm_before_residual"] is True
    commands = (exported / "commands.txt").read_text()
    assert commands.startswith("# vLLM\nvllm serve") and "sglang" not in commands
    # without its training config, the same dir reads as an EAGLE-3 export, whose layout it is not
    alone = shutil.copytree(exported / "vllm", tmp_path / "vllm")
    problems = validate_export(alone, tiny_llama_dir, strict=False).problems
    assert any("norm_before_residual must be false" in p for p in problems), problems


@pytest.mark.parametrize("spec", SPECS, ids=["chain", "tree"])
def test_it_decodes_exactly(runner, references, exported: Path, spec: dict) -> None:  # noqa: F811
    from eaglepipe.speculative import SpeculativeGenerator

    gen = SpeculativeGenerator(runner, exported, spec)
    assert isinstance(gen.loaded.model, NormBeforeResidualDrafter) and not gen.steps.fast
    assert [run_spec(gen, [p])[0][0] for p in PROMPTS] == references
    assert gen.stats.tau > 1.2, gen.stats  # its drafts are accepted: the module was loaded as trained
