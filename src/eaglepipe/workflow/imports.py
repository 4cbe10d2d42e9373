"""A module's code dependencies: its import closure inside the package, found statically with `ast`.

The closure holds every module the entry module imports (at the top or lazily inside a function, absolute or
relative), the `__init__.py` of every package on the way, and every package module the code starts as a
subprocess with `-m <name>` (a literal next to "-m" in a list, tuple or call), with their own closures. A module
that lists its own package's modules to import them (a call to `pkgutil.iter_modules`, as the drafter-family
registry does) depends on every module of that package. Imports under `if TYPE_CHECKING:` never run and are left
out.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "eaglepipe"


class ImportProblem(ValueError):
    """An import inside the package names a module that does not exist."""


def module_file(src: Path, name: str) -> Path | None:
    """The file that defines module `name` under `src` (a package's `__init__.py`), None when there is none."""
    base = src.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _inside(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST):
    """Every node, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _type_checking_only(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` assignments, so `["-m", SERVER]` resolves too."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return found


def _started_modules(tree: ast.Module) -> dict[str, int]:
    """Names written next to "-m" in a list, tuple or call (modules the code starts as subprocesses), with
    the line that names each."""
    constants = _string_constants(tree)
    started = {}
    for node in _nodes(tree):
        items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else \
            node.args if isinstance(node, ast.Call) else []
        for flag, value in zip(items, items[1:]):
            if not (isinstance(flag, ast.Constant) and flag.value == "-m"):
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                started[value.value] = value.lineno
            elif isinstance(value, ast.Name) and value.id in constants:
                started[constants[value.id]] = value.lineno
    return {name: line for name, line in started.items() if _inside(name)}


def _lists_its_package(tree: ast.Module) -> int | None:
    """The line of a call to `iter_modules` (the code imports the modules it finds in its package), else None."""
    for node in _nodes(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) == "iter_modules":
                return node.lineno
    return None


def _package_siblings(src: Path, module: str, is_package: bool, tree: ast.Module) -> dict[str, int]:
    """Every module of `module`'s package when its code lists that package's modules, else nothing."""
    line = _lists_its_package(tree)
    if line is None:
        return {}
    package = module if is_package else module.rpartition(".")[0]
    directory = src.joinpath(*package.split("."))
    return {f"{package}.{p.stem}": line for p in sorted(directory.glob("*.py")) if p.stem != "__init__"}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from ... import` statement reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[:len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _direct(src: Path, module: str) -> tuple[set[str], set[str]]:
    """(modules `module` imports, modules it starts with -m), both inside the package."""
    path = module_file(src, module)
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}  # module -> line that names it
    for node in _nodes(tree):
        if isinstance(node, ast.Import):
            found.update({alias.name: node.lineno for alias in node.names})
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            found[base] = node.lineno
            # `from pkg import name` imports the submodule pkg.name when there is one.
            found.update({f"{base}.{a.name}": node.lineno for a in node.names
                          if module_file(src, f"{base}.{a.name}")})
    found.update(_package_siblings(src, module, is_package, tree))
    started = _started_modules(tree)
    imported = {name for name in found if _inside(name)}
    for name, line in sorted({**{n: found[n] for n in imported}, **started}.items()):
        if module_file(src, name) is None:
            raise ImportProblem(f"{path}:{line}: no module {name!r}")
    return imported, set(started)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(src: Path, module: str) -> list[Path]:
    """Every file of the package that running `python -m module` may execute, sorted.

    `src` is the directory that holds the package (the repository's `src/`).
    """
    src = Path(src).absolute()
    if module_file(src, module) is None:
        raise ImportProblem(f"no module {module!r} under {src}")
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            if name in seen:
                continue
            seen.add(name)
            imported, started = _direct(src, name)
            todo.extend(imported | started)
    return sorted(module_file(src, name) for name in seen)
