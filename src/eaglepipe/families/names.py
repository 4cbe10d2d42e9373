"""The `train.algorithm` names of the registered drafter families, without importing torch or the families.

The config schema checks `train.algorithm` against these; the registry fills them from each family's
`algorithms` and refuses a family whose names are not listed here.
"""
from __future__ import annotations

# train.algorithm -> the name of the family that implements it (eagle2 trains as eagle1; its tree is inference's)
ALGORITHMS: dict[str, str] = {"eagle1": "eagle1", "eagle2": "eagle1", "eagle3": "eagle3", "eagle3.1": "eagle3"}


def algorithm_names() -> tuple[str, ...]:
    """Every accepted `train.algorithm`, in registration order."""
    return tuple(ALGORITHMS)


def add_algorithms(family: str, algorithms: tuple[str, ...]) -> None:
    """Accept `algorithms` as names of `family` (a family registered at run time, e.g. a plug-in)."""
    taken = {a: f for a, f in ALGORITHMS.items() if a in algorithms and f != family}
    if taken:
        raise ValueError(f"train.algorithm names {sorted(taken)} already belong to {sorted(set(taken.values()))}")
    ALGORITHMS.update({a: family for a in algorithms})
