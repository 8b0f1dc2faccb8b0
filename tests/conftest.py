"""Shared fixtures: a float64 switch that restores the default dtype, a tiny MLP and its data."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with float64 as the default dtype; the previous default comes back afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def make_mlp() -> Callable[..., nn.Module]:
    """``make_mlp(seed)``: a 4-8-3 tanh MLP in the default dtype; the same seed gives the same weights."""

    def build(seed: int = 0, width: int = 8) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))

    return build


@pytest.fixture
def batches() -> Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]:
    """``batches(n)``: ``n`` fixed regression batches (16 x 4 inputs, 16 x 3 targets) in the default dtype."""

    def build(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        dtype = torch.get_default_dtype()
        w = torch.randn(4, 3, generator=g, dtype=dtype)
        out = []
        for _ in range(n):
            x = torch.randn(16, 4, generator=g, dtype=dtype)
            out.append((x, torch.tanh(x @ w) + 0.1 * torch.randn(16, 3, generator=g, dtype=dtype)))
        return out

    return build
