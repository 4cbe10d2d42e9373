"""The `train.algorithm` names of the drafter families, without importing torch or the families.

The config schema checks `train.algorithm` against these, and the bench sweep against the algorithm's draft round.
They are read from the family modules' source: every module of this package other than the protocol and the
registry is a family, whose class states its `name` and its `algorithms` (and its `draft_round`, when not
`sequential`) as literals or module-level string constants (families/base.py). So a new family is its module and
a conf file. A family registered at run time (a plug-in, a test) adds its names through `add_algorithms`.
"""
from __future__ import annotations

import ast
from pathlib import Path

# modules of this package that are not families
NOT_FAMILIES = frozenset({"__init__", "base", "names", "registry"})


def family_modules() -> list[str]:
    """The names of this package's family modules, sorted."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in NOT_FAMILIES)


def _literal(node: ast.expr, constants: dict[str, str]) -> object:
    """A literal, a module-level string constant, or a tuple/list of them."""
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, constants) for e in node.elts)
    return ast.literal_eval(node)


def _declared_names(path: Path) -> dict[str, tuple[str, str]]:
    """train.algorithm -> (family name, draft round), from the `name`, `algorithms` and `draft_round` (`sequential`
    when the class does not state it) of each class in `path` (literals or the module's string constants)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    out: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {t.id: stmt.value for stmt in node.body if isinstance(stmt, ast.Assign)
                  for t in stmt.targets if isinstance(t, ast.Name)}
        if "name" in fields and "algorithms" in fields:
            name = _literal(fields["name"], constants)
            rounds = _literal(fields["draft_round"], constants) if "draft_round" in fields else "sequential"
            out.update({a: (name, rounds) for a in _literal(fields["algorithms"], constants)})
    return out


# train.algorithm -> the name of the family that implements it (eagle2 trains as eagle1; its tree is inference's)
ALGORITHMS: dict[str, str] = {}
# train.algorithm -> its family's `draft_round` (`parallel`: rounds are chains drafted in one forward)
DRAFT_ROUNDS: dict[str, str] = {}
for _module in family_modules():
    for _algorithm, (_family, _round) in _declared_names(Path(__file__).with_name(f"{_module}.py")).items():
        ALGORITHMS[_algorithm], DRAFT_ROUNDS[_algorithm] = _family, _round


def algorithm_names() -> tuple[str, ...]:
    """Every accepted `train.algorithm`, in registration order."""
    return tuple(ALGORITHMS)


def add_algorithms(family: str, algorithms: tuple[str, ...], draft_round: str = "sequential") -> None:
    """Accept `algorithms` as names of `family`, whose rounds draft as `draft_round` (a family registered at run
    time, e.g. a plug-in)."""
    taken = {a: f for a, f in ALGORITHMS.items() if a in algorithms and f != family}
    if taken:
        raise ValueError(f"train.algorithm names {sorted(taken)} already belong to {sorted(set(taken.values()))}")
    ALGORITHMS.update({a: family for a in algorithms})
    DRAFT_ROUNDS.update({a: draft_round for a in algorithms})


def drafts_chains_only(algorithm: str) -> bool:
    """Whether `algorithm`'s drafter drafts its rounds as one chain from one forward (no trees)."""
    return DRAFT_ROUNDS.get(algorithm) == "parallel"
