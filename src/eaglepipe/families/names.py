"""The `train.algorithm` names of the drafter families, without importing torch or the families.

The config schema checks `train.algorithm` against these. They are read from the family modules' source: every
module of this package other than the protocol and the registry is a family, whose class states its `name` and
its `algorithms` as literals or module-level string constants (families/base.py). So a new family is its module
and a conf file. A family registered at run time (a plug-in, a test) adds its names through `add_algorithms`.
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


def _declared_names(path: Path) -> dict[str, str]:
    """train.algorithm -> family name, from the `name` and `algorithms` of each class in `path` (literals or the
    module's string constants)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    out: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {t.id: stmt.value for stmt in node.body if isinstance(stmt, ast.Assign)
                  for t in stmt.targets if isinstance(t, ast.Name)}
        if "name" in fields and "algorithms" in fields:
            name = _literal(fields["name"], constants)
            out.update({a: name for a in _literal(fields["algorithms"], constants)})
    return out


# train.algorithm -> the name of the family that implements it (eagle2 trains as eagle1; its tree is inference's)
ALGORITHMS: dict[str, str] = {}
for _module in family_modules():
    ALGORITHMS.update(_declared_names(Path(__file__).with_name(f"{_module}.py")))


def algorithm_names() -> tuple[str, ...]:
    """Every accepted `train.algorithm`, in registration order."""
    return tuple(ALGORITHMS)


def add_algorithms(family: str, algorithms: tuple[str, ...]) -> None:
    """Accept `algorithms` as names of `family` (a family registered at run time, e.g. a plug-in)."""
    taken = {a: f for a, f in ALGORITHMS.items() if a in algorithms and f != family}
    if taken:
        raise ValueError(f"train.algorithm names {sorted(taken)} already belong to {sorted(set(taken.values()))}")
    ALGORITHMS.update({a: family for a in algorithms})
