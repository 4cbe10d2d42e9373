"""Speculative decoding (EAGLE-1/2/3 chains and trees) on the native engine with an exported drafter.

`SpeculativeGenerator(runner, draft_dir, spec)` is what `eaglepipe.engine.Engine(draft_dir=...)` delegates to;
`load_exported_drafter(export_sglang_dir, target_dir, device, dtype)` loads what users deploy.
"""
from .config import SpecConfig
from .drafter_loader import load_exported_drafter
from .generator import SpecStats, SpeculativeGenerator

__all__ = ["SpecConfig", "SpecStats", "SpeculativeGenerator", "load_exported_drafter"]
