"""The static import closure finds what a module really runs: lazy and relative imports, submodules named in
`from pkg import name`, package `__init__`s, modules started as `-m` subprocesses; and nothing else."""
from __future__ import annotations

from pathlib import Path

import pytest

from eaglepipe.workflow.imports import ImportProblem, closure

PACKAGE = {
    "__init__.py": "",
    "stages/__init__.py": "",
    "stages/entry.py": '''
import logging
import subprocess
import sys
from typing import TYPE_CHECKING

from ..lib import util
import eaglepipe.other.mod as mod

if TYPE_CHECKING:
    from ..typing_only import T

SERVER = "eaglepipe.server2"
log = logging.getLogger("eaglepipe.lib.unused")


def run():
    from ..lazy import thing
    subprocess.run([sys.executable, "-m", "eaglepipe.server.run", "--port", "1"])
    subprocess.run((sys.executable, "-m", SERVER))
    raise SystemExit(f"run `python -m eaglepipe.never` first, then {thing}")
''',
    "lib/__init__.py": "",
    "lib/util.py": "from . import helpers\n",
    "lib/helpers.py": "",
    "lib/unused.py": "",
    "lazy.py": "thing = 1\n",
    "typing_only.py": "T = int\n",
    "other/__init__.py": "",
    "other/mod.py": "",
    "server/__init__.py": "",
    "server/run.py": "from .app import App\n",
    "server/app.py": "App = object\n",
    "server2.py": "import json\n",
    "never.py": "",
}


def _package(root: Path, files: dict[str, str]) -> Path:
    src = root / "src"
    for rel, text in files.items():
        (src / "eaglepipe" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "eaglepipe" / rel).write_text(text)
    return src


def _names(src: Path, paths: list[Path]) -> list[str]:
    return [p.relative_to(src / "eaglepipe").as_posix() for p in paths]


def test_closure_follows_every_kind_of_import_and_started_module(tmp_path):
    src = _package(tmp_path, PACKAGE)
    assert _names(src, closure(src, "eaglepipe.stages.entry")) == sorted([
        "__init__.py", "stages/__init__.py", "stages/entry.py",
        "lib/__init__.py", "lib/util.py", "lib/helpers.py",  # relative from-import of a submodule, and its own
        "other/__init__.py", "other/mod.py",  # absolute import
        "lazy.py",  # imported inside a function
        "server/__init__.py", "server/run.py", "server/app.py",  # started with "-m" and what it imports
        "server2.py",  # started with "-m" through a module constant
    ])


def test_closure_of_a_leaf_module_is_it_and_its_packages(tmp_path):
    src = _package(tmp_path, PACKAGE)
    assert _names(src, closure(src, "eaglepipe.lib.helpers")) == ["__init__.py", "lib/__init__.py", "lib/helpers.py"]


@pytest.mark.parametrize("code, missing", [("from ..gone import x\n", "eaglepipe.gone"),
                                           ("import eaglepipe.lib.gone\n", "eaglepipe.lib.gone"),
                                           ('ARGV = ["python", "-m", "eaglepipe.gone"]\n', "eaglepipe.gone")])
def test_an_import_of_a_missing_module_is_an_error_naming_it(tmp_path, code, missing):
    src = _package(tmp_path, {**PACKAGE, "stages/entry.py": code})
    with pytest.raises(ImportProblem, match=f"entry.py:.*'{missing}'"):
        closure(src, "eaglepipe.stages.entry")


def test_a_module_that_lists_its_package_depends_on_every_module_of_it(tmp_path):
    plugins = {"plugins/__init__.py": "", "plugins/a.py": "", "plugins/b.py": "from ..lib import helpers\n",
               "plugins/registry.py": "import importlib\nimport pkgutil\n\n"
                                      "for m in pkgutil.iter_modules(__path__):\n"
                                      "    importlib.import_module(m.name)\n"}
    src = _package(tmp_path, {**PACKAGE, **plugins, "stages/entry.py": "from ..plugins import registry\n"})
    assert _names(src, closure(src, "eaglepipe.stages.entry")) == sorted([
        "__init__.py", "stages/__init__.py", "stages/entry.py", "plugins/__init__.py", "plugins/registry.py",
        "plugins/a.py", "plugins/b.py", "lib/__init__.py", "lib/helpers.py"])
