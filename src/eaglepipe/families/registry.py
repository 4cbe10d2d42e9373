"""The registry of drafter families: the family of a `train.algorithm`, of a drafter config, or of an exported
config.json.

Every family module of this package (names.family_modules) is imported and its `FAMILY` registered, so a new
family needs no line here; the stage wiring's import closure counts every module of a package that lists its own
modules (workflow/imports.py), so every stage that looks a family up depends on their code. A family added at run
time (a plug-in, a test) goes through `register`.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Optional

from .base import DrafterFamily
from .names import ALGORITHMS, NOT_FAMILIES, add_algorithms

_FAMILIES: dict[str, DrafterFamily] = {}


def register(family: DrafterFamily) -> DrafterFamily:
    """Add `family` under its name and accept its `algorithms` as train.algorithm values."""
    if not family.name or not family.algorithms or not family.formats:
        raise ValueError(f"{type(family).__name__} needs a name, its algorithms and its export formats")
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a drafter family named {family.name!r} is registered already")
    add_algorithms(family.name, family.algorithms, family.draft_round)
    _FAMILIES[family.name] = family
    return family


def families() -> list[DrafterFamily]:
    """Every registered family, built-ins first."""
    return list(_FAMILIES.values())


def family_named(algorithm: str) -> DrafterFamily:
    """The family that implements `algorithm` (a train.algorithm / DrafterConfig.algorithm value)."""
    name = ALGORITHMS.get(algorithm)
    if name not in _FAMILIES:
        raise ValueError(f"unknown drafter algorithm {algorithm!r} (known: {'|'.join(ALGORITHMS)})")
    return _FAMILIES[name]


def family_of(cfg: Any) -> DrafterFamily:
    """The family of a drafter config (anything with an `algorithm`)."""
    return family_named(cfg.algorithm)


def architectures() -> list[str]:
    """Every config.json architecture some family exports."""
    return sorted({arch for f in families() for arch in f.architectures})


def foreign_family(cfg: dict[str, Any]) -> Optional[tuple[DrafterFamily, str]]:
    """(family, format) of a config saved under an architecture no engine serves but a family knows as another
    trainer's name for its drafters (None otherwise)."""
    arch = (cfg.get("architectures") or [None])[0]
    return next(((f, f.foreign_architectures[arch]) for f in families() if arch in f.foreign_architectures), None)


def export_family(cfg: dict[str, Any], trained_as: Optional[str] = None) -> Optional[DrafterFamily]:
    """The family whose exports carry `cfg`'s architecture (None when none does). Where several families share
    the architecture, the one of `trained_as` (the algorithm of the export's drafter_config.json) when it is among
    them, else the first registered."""
    arch = (cfg.get("architectures") or [None])[0]
    claims = [f for f in families() if arch in f.architectures]
    if trained_as in ALGORITHMS and ALGORITHMS[trained_as] in {f.name for f in claims}:
        return _FAMILIES[ALGORITHMS[trained_as]]
    return claims[0] if claims else None


for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _info.name not in NOT_FAMILIES:
        register(importlib.import_module(f"{__package__}.{_info.name}").FAMILY)
