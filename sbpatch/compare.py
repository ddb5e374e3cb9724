"""Bitwise comparison of attack outputs, and seeding: what ``verify``, ``bench`` and the tests judge identity with.

A module of its own so that ``sbpatch.verify`` and the benchmark's modules (``sbpatch.bench.runner``,
``sbpatch.bench.text``) both import it and never each other.
"""

from __future__ import annotations

import random
from typing import Any


def identical(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors, arrays (NaN equal to NaN), numbers and nested tuples/lists/dicts of them."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if torch.equal(a, b):
            return True
        if not a.is_floating_point():
            return False
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]  # same bits, NaN included
        return torch.equal(a.detach().contiguous().view(ints), b.detach().contiguous().view(ints))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if hasattr(a, "__dict__") and type(a) is type(b) and not callable(a):
        return identical(vars(a), vars(b))
    return bool(a == b)


def seed_all(seed: int = 0) -> None:
    """Seed torch, numpy and Python's ``random`` (what an attack with fixed seeds draws from)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
