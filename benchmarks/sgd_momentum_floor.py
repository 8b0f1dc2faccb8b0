"""A tower on SGD with momentum beside ``torch.optim.SGD`` and beside the bare ops of its step.

Issue 11 asks for ``sgd(momentum=0.9, learn=lr+momentum)`` within 2x of ``torch.optim.SGD(momentum=0.9)``.
An SGD step is a few passes over memory (torch: scale the buffer, add the gradient, add the buffer to the
weights), so the tower's own passes decide the ratio. The tower writes no tangent for this rule (the
engine holds both: the step size's is a multiple of the momentum buffer, the momentum's of the buffer
before the step); what it adds to torch's passes is the two hypergradient dot products with the new
gradient. This times, side by side (interleaved, medians):

* ``torch.optim.SGD`` with momentum (``foreach=True``);
* the tower ``sgd(lr=0.001,momentum=0.9,learn=lr+momentum)/adam(lr=0.05)`` (its whole ``step()``);
* the same passes as bare ops (the dots, the new buffer written where the one before the last was, the
  weights' update), without the engine's bookkeeping: the difference is what the engine costs.

Usage::

    python -m benchmarks.sgd_momentum_floor            # the 22.7M BERT of benchmark_optimizer, 2 threads
    python -m benchmarks.sgd_momentum_floor --quick    # a tiny model: a smoke run
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import Tensor

import hf_hyperopt as hh

from .benchmark_optimizer import build_model, interleaved

SPEC = "sgd(lr=0.001,momentum=0.9,learn=lr+momentum)/adam(lr=0.05)"


def bare_ops_step(
    weights: list[Tensor], grads: list[Tensor], buffers: list[list[Tensor]], lr: float, momentum: float
) -> tuple[Tensor, Tensor]:
    """torch.optim.SGD's update with momentum, plus the dots of a tower learning the step size and momentum.

    ``buffers`` is ``[b_t, b_{t-1}]`` (the momentum buffer and the one before it); the new buffer is
    written over ``b_{t-1}`` and the two swap places. Returns the per-tensor dot products of the new
    gradient with ``b_t`` and ``b_{t-1}`` (each hypergradient up to a constant per tensor).
    """
    buf, previous = buffers
    h_lr, h_momentum = [], []
    for b, q, g in zip(buf, previous, grads, strict=True):
        g = g.view(-1)
        h_lr.append(torch.dot(b.view(-1), g))
        h_momentum.append(torch.dot(q.view(-1), g))
    for q, b, g in zip(previous, buf, grads, strict=True):
        torch.add(g, b, alpha=momentum, out=q)
    torch._foreach_add_(weights, previous, alpha=-lr)
    buffers[:] = [previous, buf]
    return torch.stack(h_lr), torch.stack(h_momentum)


def measure(quick: bool = False, reps: int = 9, threads: int = 2) -> dict[str, tuple[float, float]]:
    """Median wall and process CPU milliseconds of each step, keyed ``torch``, ``tower`` and ``floor``."""
    torch.set_num_threads(threads)
    base = [p.detach() for p in build_model("bert", quick, seed=0).parameters()]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in base]

    def params() -> list[torch.Tensor]:
        out = [torch.nn.Parameter(p.clone()) for p in base]
        for p, grad in zip(out, grads, strict=True):
            p.grad = grad
        return out

    torch_opt = torch.optim.SGD(params(), lr=1e-3, momentum=0.9, foreach=True)
    tower = hh.tower(params(), SPEC)
    w = [p.detach().clone() for p in base]
    buffers = [[torch.zeros_like(p) for p in base], [torch.zeros_like(p) for p in base]]

    def floor() -> None:
        bare_ops_step(w, grads, buffers, 1e-3, 0.9)

    steps = {"torch": torch_opt.step, "tower": tower.step, "floor": floor}
    for step in steps.values():  # state allocated, buckets built
        step()
        step()
    times = interleaved(steps, reps)
    return {name: (statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3) for name, (wall, cpu) in times.items()}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 3 repetitions")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ms = measure(args.quick, 3 if args.quick else args.reps, args.threads)
    (torch_wall, torch_cpu) = ms["torch"]
    print("| step | wall ms | CPU ms | vs torch.optim.SGD(momentum=0.9), wall / CPU |\n|---|---|---|---|")
    for name, label in (
        ("torch", "torch.optim.SGD"),
        ("tower", f"tower `{SPEC}`"),
        ("floor", "the same passes as bare ops"),
    ):
        wall, cpu = ms[name]
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {wall / torch_wall:.2f} / {cpu / torch_cpu:.2f} |")
    return ms


if __name__ == "__main__":
    main()
