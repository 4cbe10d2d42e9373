"""The native engine's fast paths (`EngineOptions`) as command-line flags: `--token-path auto|on|off` and so on.

The server, the regenerate stage's server command and the benchmarks share them, so that one spelling reaches the
engine from every entry point. `auto` leaves the option null (on where it runs), `on`/`off` force it.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..config.schema import EngineOptions

VALUES = {"auto": None, "on": True, "off": False}
HELP = {
    "token_path": "Triton kernels for decode steps, draft verification and EAGLE-3 drafter steps, top-k and tree "
                  "bookkeeping (off: the PyTorch path)",
    "cuda_graphs": "plain decode steps replayed from CUDA graphs",
    "prefill_graphs": "a lone prompt's prefill replayed from a CUDA graph per padded length",
    "graph_rounds": "greedy speculative rounds replayed from CUDA graphs",
}


def flag(name: str) -> str:
    """The command-line flag of the EngineOptions field `name`."""
    return "--" + name.replace("_", "-")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One `auto|on|off` flag per EngineOptions field (default auto: on where the path runs)."""
    group = parser.add_argument_group("engine fast paths (auto: on where they run, on CUDA; off: the PyTorch path)")
    for f in fields(EngineOptions):
        group.add_argument(flag(f.name), choices=list(VALUES), default="auto", help=HELP[f.name])


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    """The EngineOptions that `add_engine_flags`' flags give."""
    return EngineOptions(**{f.name: VALUES[getattr(args, f.name)] for f in fields(EngineOptions)})


def engine_flags(options: EngineOptions) -> list[str]:
    """The flags that give `options` to a command (none for an option left null)."""
    spelled = {value: word for word, value in VALUES.items()}
    out: list[str] = []
    for f in fields(EngineOptions):
        value = getattr(options, f.name)
        if value is not None:
            out += [flag(f.name), spelled[value]]
    return out
