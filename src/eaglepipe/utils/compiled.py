"""`compiled_on_cuda`: run a pure tensor function through torch.compile when its tensors are on CUDA.

A draft tree's bookkeeping (log-probs, top-k, cumulative scores, parents, the next frontier, the rows the
drafter's kernels read) is dozens of tiny kernels per depth in eager PyTorch, each a launch and a pass over
memory of its own. Compiled, Inductor fuses each function into a few kernels. They compile only inside
`compile_scope`, which the static round body opens. The functions stay plain PyTorch: outside it, off CUDA, or
with EAGLEPIPE_COMPILE_DRAFT=0, they run eagerly (the CPU tests run them so; `compile_everywhere()` makes them
compile on CPU too, for a test of the compiled form). A function whose compilation fails runs eagerly from then on, with one warning.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Iterator, TypeVar

import torch

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)
_everywhere = [False]
_scope = [0]  # depth of `compile_scope`
FAILED: list[str] = []  # qualified names of the functions that fell back to eager


def compile_wanted(device: torch.device) -> bool:
    """Whether `compiled_on_cuda` functions compile for tensors on `device`: only inside `compile_scope` (the
    static-shape round body that CUDA graphs capture; elsewhere shapes vary from call to call and each new one
    would recompile in the middle of a decode)."""
    if os.environ.get("EAGLEPIPE_COMPILE_DRAFT", "1") == "0" or not _scope[0]:
        return False
    return device.type == "cuda" or _everywhere[0]


@contextlib.contextmanager
def compile_scope() -> Iterator[None]:
    """Let `compiled_on_cuda` functions compile while inside."""
    _scope[0] += 1
    try:
        yield
    finally:
        _scope[0] -= 1


@contextlib.contextmanager
def compile_everywhere() -> Iterator[None]:
    """Compile `compiled_on_cuda` functions on every device while inside (tests of the compiled form on CPU)."""
    _everywhere[0] = True
    try:
        yield
    finally:
        _everywhere[0] = False


def compiled_on_cuda(fn: F) -> F:
    """`fn`, compiled (fullgraph, automatic dynamic shapes) when its first tensor argument is on a device that
    `compile_wanted` accepts, eager otherwise."""
    state: dict = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        if state["failed"] or not compile_wanted(tensor.device):
            return fn(*args, **kwargs)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, fullgraph=True)
        try:
            return state["compiled"](*args, **kwargs)
        except Exception:  # a backend that cannot compile it: the eager function computes the same
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # a capture cannot continue past a failed launch
            log.warning("torch.compile failed for %s; running it eagerly", fn.__qualname__, exc_info=True)
            state["failed"] = True
            FAILED.append(fn.__qualname__)
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
