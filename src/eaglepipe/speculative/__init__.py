"""Speculative decoding (EAGLE-1/2/3 chains and trees) on the native engine with an exported drafter.

`SpeculativeGenerator(runner, draft_dir, spec)` is what `eaglepipe.engine.Engine(draft_dir=...)` delegates to;
`load_exported_drafter(export_sglang_dir, target_dir, device, dtype)` loads what users deploy. A round's device
side is `RoundSteps` (draft, verify, accept, extend); `RoundGraph` replays greedy rounds from CUDA graphs.
"""
from .config import SpecConfig
from .drafter_loader import load_exported_drafter
from .generator import Rows, SpecStats, SpeculativeGenerator
from .steps import RoundSteps

__all__ = ["RoundSteps", "Rows", "SpecConfig", "SpecStats", "SpeculativeGenerator", "load_exported_drafter"]
