"""Type checks of config.json values, as the validator and the families' checks need them."""
from __future__ import annotations

import math
from typing import Any


def is_int(v: Any) -> bool:
    """An int and not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_positive_number(v: Any) -> bool:
    """A positive int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def int_list(v: Any) -> bool:
    """A non-empty list of ints."""
    return isinstance(v, list) and bool(v) and all(is_int(i) for i in v)


def same(a: Any, b: Any) -> bool:
    """Equal, with floats compared to float32 precision (configs round-trip through float32 and JSON)."""
    if is_positive_number(a) and is_positive_number(b):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b
