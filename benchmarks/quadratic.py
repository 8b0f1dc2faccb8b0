"""A problem whose best constant learning rate is known exactly: SGD on a noisy quadratic.

``f(x) = sum_i a_i x_i^2 / 2`` in 50 dimensions, curvatures ``a_i`` from 1e-2 to 10, gradients with
Gaussian noise ``sigma``, ``x_0 = 1``. For a constant step size ``eta`` the expected loss after ``T``
steps has a closed form (:func:`expected_loss`), so the best constant ``eta*`` is computed, not
estimated (0.197 for the defaults, just under the stability limit 2 / max(a) = 0.2). A tower
``HyperSGD`` starts far below (1e-6) and far above (1.0, where plain SGD diverges) and should end
within 2x of ``eta*`` (issue 10; ``tests/test_tower_quadratic.py``).

Usage::

    # the default upper level and others, three noise seeds: end lr / eta* from each start
    python -m benchmarks.quadratic --seeds 0 1 2 --hyper default "adam(lr=0.05,ramp=0.001,normalize=true,cosine=0.5)"
    # other noise levels, lengths or shapes
    python -m benchmarks.quadratic --sigma 0.1 --hyper default
    python -m benchmarks.quadratic --dim 10 --curvatures -3 0 --steps 1000 --hyper default
"""

from __future__ import annotations

import argparse
import math

import torch

import hf_hyperopt as hh

from . import top_levels  # noqa: F401  (registers the experimental top levels for --hyper)

D, T, SIGMA = 50, 300, 0.01
CURVATURES = torch.logspace(-2, 1, D, dtype=torch.float64)
STARTS = (1e-6, 1.0)


def curvatures(dim: int = D, low: float = -2.0, high: float = 1.0) -> torch.Tensor:
    """``dim`` curvatures spaced evenly in log10 from ``10**low`` to ``10**high`` (the default: CURVATURES)."""
    return torch.logspace(low, high, dim, dtype=torch.float64)


def expected_loss(eta: float, sigma: float = SIGMA, steps: int = T, a: torch.Tensor = CURVATURES) -> float:
    """E f(x_T) for SGD with constant ``eta`` from x_0 = 1: each coordinate contracts by (1 - eta a)^2 a
    step and gains eta^2 sigma^2 of noise."""
    r = (1 - eta * a) ** 2
    noise = torch.where((r - 1).abs() > 1e-12, (1 - r**steps) / (1 - r), torch.full_like(r, float(steps)))
    return float(0.5 * (a * (r**steps + eta**2 * sigma**2 * noise)).sum())


def best_constant_lr(sigma: float = SIGMA, steps: int = T, a: torch.Tensor = CURVATURES) -> float:
    """The best constant lr on a log grid from 1e-3 / max(a) to 10^1.5 / max(a) (the stability limit is 2 / max(a))."""
    shift = float(torch.log10(1.0 / a.max()))  # 1e-4 .. 10^0.5 for the default curvatures (max 10)
    etas = torch.logspace(-3 + shift, 1.5 + shift, 4000, dtype=torch.float64).tolist()
    return min(etas, key=lambda eta: expected_loss(eta, sigma, steps, a))


def train(
    lr0: float,
    hyper: str | None = None,
    seed: int = 0,
    sigma: float = SIGMA,
    steps: int = T,
    a: torch.Tensor = CURVATURES,
) -> tuple[float, torch.Tensor]:
    """``HyperSGD`` from ``lr0`` with upper level ``hyper`` (None: the default): its final lr and x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(len(a), dtype=torch.float64, requires_grad=True)
    opt = hh.HyperSGD([x], lr=lr0) if hyper is None else hh.HyperSGD([x], lr=lr0, hyper=hyper)
    opt.set_horizon(steps)  # fresh noise every step: no epochs, the run is the horizon (trace=auto)
    for _ in range(steps):
        x.grad = a * x.detach() + sigma * torch.randn(len(a), generator=g, dtype=torch.float64)
        opt.step()
    return opt.hyperparameters()[0]["lr"], x.detach()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hyper", nargs="+", default=["default"], help="upper-level specs; 'default' for DEFAULT_HYPER"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--sigma", type=float, default=SIGMA)
    parser.add_argument("--steps", type=int, default=T)
    parser.add_argument("--dim", type=int, default=D, help="dimensions (curvatures)")
    parser.add_argument(
        "--curvatures", nargs=2, type=float, default=[-2.0, 1.0], metavar=("LOW", "HIGH"),
        help="log10 of the smallest and largest curvature",
    )  # fmt: skip
    args = parser.parse_args(argv)
    a = curvatures(args.dim, *args.curvatures)
    best = best_constant_lr(args.sigma, args.steps, a)
    best_loss = expected_loss(best, args.sigma, args.steps, a)
    shape = (
        ""
        if (args.dim, args.curvatures) == (D, [-2.0, 1.0])
        else f"{args.dim} dims, curvatures {a[0]:g} .. {a[-1]:g}, "
    )
    print(f"{shape}sigma {args.sigma}, {args.steps} steps: best constant lr {best:.3g}, expected loss {best_loss:.4g}")
    print(
        f"\n| upper level | end lr / best from {STARTS[0]:g} / {STARTS[1]:g}, seed {args.seeds[0]} | all runs (both starts, "
        "every seed) | within 2x | final loss / best constant's expected loss, mean from each start |"
    )
    print("|---|---|---|---|---|")
    rows = []
    for hyper in args.hyper:
        ratios, losses = {}, {}
        for lr0 in STARTS:
            for s in args.seeds:
                lr, x = train(lr0, None if hyper == "default" else hyper, s, args.sigma, args.steps, a)
                ratios[(lr0, s)] = lr / best
                final = float((0.5 * a * x**2).sum())
                losses[(lr0, s)] = final / best_loss if best_loss > 0 else (0.0 if final == 0 else math.inf)
        first = " / ".join(f"{ratios[(lr0, args.seeds[0])]:.2f}" for lr0 in STARTS)
        within = all(0.5 <= r <= 2.0 for r in ratios.values())
        mean_loss = " / ".join(f"{sum(losses[(lr0, s)] for s in args.seeds) / len(args.seeds):.2f}" for lr0 in STARTS)
        print(
            f"| `{hyper}` | {first} | {min(ratios.values()):.2f} .. {max(ratios.values()):.2f} | "
            f"{'yes' if within else 'no'} | {mean_loss} |"
        )
        rows.append({"hyper": hyper, "ratios": ratios, "within_2x": within, "loss_ratios": losses})
    return rows


if __name__ == "__main__":
    main()
