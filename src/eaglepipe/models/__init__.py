"""EAGLE drafters (EAGLE-3/3.1 and EAGLE-1/2) and the frozen target wrapper that captures aux hidden states."""
from .config import DrafterConfig
from .eagle1 import Eagle1Drafter
from .eagle3 import Eagle3Drafter

__all__ = ["DrafterConfig", "Eagle1Drafter", "Eagle3Drafter"]
