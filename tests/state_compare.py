"""Exact comparison of optimizer state dicts (nested dicts, lists and tensors), for the tests."""

from __future__ import annotations

import torch


def same_state(a, b) -> bool:
    """Whether ``a`` and ``b`` hold the same structure, the same Python values and bit-equal tensors of one dtype."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b
