"""Drafter families (EAGLE-1/2, EAGLE-3/3.1): each is one module behind the `DrafterFamily` protocol (base.py),
found by its `train.algorithm` names through the registry (registry.py).

This package's own `__init__` imports nothing, so that the torch-free config can read the algorithm names
(names.py) without loading the families.
"""
