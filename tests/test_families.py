"""The drafter-family protocol and registry: what a family must provide, the names the config accepts, and no
algorithm branches outside the family modules."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eaglepipe.families import eagle1, eagle3
from eaglepipe.families.base import DrafterFamily
from eaglepipe.families.names import ALGORITHMS
from eaglepipe.families.registry import export_family, families, family_named

SRC = Path(__file__).resolve().parents[1] / "src" / "eaglepipe"
BUILT_IN = {"eagle1": eagle1.FAMILY, "eagle2": eagle1.FAMILY, "eagle3": eagle3.FAMILY, "eagle3.1": eagle3.FAMILY}


def test_every_algorithm_name_has_its_registered_family():
    assert {a: family_named(a) for a in BUILT_IN} == BUILT_IN
    for family in families():
        assert family.formats and set(family.architectures.values()) <= set(family.formats)
        assert all(ALGORITHMS[a] == family.name for a in family.algorithms)
    assert set(ALGORITHMS) == {a for f in families() for a in f.algorithms}
    with pytest.raises(ValueError, match="unknown drafter algorithm 'medusa'"):
        family_named("medusa")


def test_the_config_accepts_exactly_the_registered_algorithms():
    from eaglepipe.config import ConfigError
    from eaglepipe.config.schema import TrainCfg

    for name in ALGORITHMS:
        TrainCfg(algorithm=name).check()
    names = "dflash|eagle1|eagle2|eagle3|eagle3.1|peagle"
    with pytest.raises(ConfigError, match=re.escape(f"train.algorithm must be {names}, got")):
        TrainCfg(algorithm="medusa").check()


def test_what_a_new_family_must_provide():
    """The abstract methods; everything else has a default that a family overrides where it differs."""
    assert DrafterFamily.__abstractmethods__ == {
        "target_layers", "config_fields", "new_module", "target_features", "export_tensors", "export_config",
        "served_config", "check_export", "draft_input"}

    class Partial(DrafterFamily):
        name, algorithms, formats = "partial", ("partial",), ("sglang",)

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_an_exported_config_names_its_family():
    assert export_family({"architectures": ["LlamaForCausalLMEagle3"]}) is eagle3.FAMILY
    assert export_family({"architectures": ["Eagle3Speculator"]}, "eagle3.1") is eagle3.FAMILY
    assert export_family({"architectures": ["LlamaForCausalLMEagle"]}) is eagle1.FAMILY
    assert export_family({"architectures": ["LlamaEagle3DraftModel"]}) is None


def _algorithm_branches(path: Path) -> list[str]:
    """Lines of `path` that name an algorithm or test an is_eagle3 flag, besides a field's default value."""
    tree = ast.parse(path.read_text())
    defaults = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and n.value is not None}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in BUILT_IN and id(node) not in defaults:
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
        elif isinstance(node, (ast.Attribute, ast.Name)) and "eagle3" in getattr(node, "attr", getattr(node, "id", "")):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_the_family_modules_names_an_algorithm():
    """Only families/ knows which algorithms there are and what they do; names.py lists them for the config."""
    outside = [p for p in SRC.rglob("*.py") if "families" not in p.relative_to(SRC).parts]
    assert [line for p in outside for line in _algorithm_branches(p)] == []


def test_a_new_family_is_one_module(tmp_path: Path) -> None:
    """A family module dropped into the package (and nothing else edited) is a train.algorithm the config accepts,
    a registered family, and part of every stage closure that looks families up."""
    src = tmp_path / "src"
    shutil.copytree(SRC, src / "eaglepipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("eagle3_nbr_family.py"), src / "eaglepipe" / "families" / "eagle3_nbr.py")
    probe = """
import dataclasses
from pathlib import Path
from eaglepipe.config import params_from_dict, to_dict
from eaglepipe.config.schema import Config
from eaglepipe.families.names import ALGORITHMS
print(ALGORITHMS["eagle3-nbr"])
cfg = to_dict(Config())
cfg["train"]["algorithm"] = "eagle3-nbr"
print(params_from_dict(cfg).train.algorithm)
from eaglepipe.families.registry import family_named
print(family_named("eagle3-nbr").name)
from eaglepipe.workflow.imports import closure
print(any(p.name == "eagle3_nbr.py" for p in closure(Path("src"), "eaglepipe.stages.train")))
print(any(p.name == "eagle3_nbr.py" for p in closure(Path("src"), "eaglepipe.stages.download")))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(src)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["eagle3_nbr", "eagle3-nbr", "eagle3_nbr", "True", "False"]
