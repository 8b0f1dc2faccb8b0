"""COCOB-Backprop (coin betting) as an optimizer level: a top for a tower with no step size to tune."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Hyper, HyperSpec, Rule, Step, scalars


class COCOBRule(Rule):
    r"""COCOB-Backprop (Orabona and Tommasi, NeurIPS 2017, Algorithm 2), per coordinate.

    Each coordinate bets on the sign of its negative gradient with the wealth it has won so far:

    .. math::
        L_t = \max(L_{t-1}, |g_t|), \quad G_t = G_{t-1} + |g_t|, \quad
        R_t = \max(R_{t-1} - u_t g_t, 0), \quad S_t = S_{t-1} + g_t, \\
        u_{t+1} = -\frac{S_t}{L_t \max(G_t + L_t, \alpha L_t)} \left(1 + \frac{R_t}{L_t}\right), \quad
        w_{t+1} = w_1 + \eta \, u_{t+1}

    where :math:`w_1` is the value at the first step. The bet is invariant to the scale of the
    gradient, and it grows geometrically while the gradient keeps its sign (the wealth compounds)
    and shrinks back towards :math:`w_1` when it does not, so the level moves a learned log step size
    by whole factors of e in tens of steps and jitters little on noise. :math:`\eta` (``lr``, default
    1) is the unit of the bet in the coordinates learned: one e-fold of a log-parametrised step size.
    :math:`\alpha` (default 100 as in the paper) damps the first :math:`\alpha` steps.
    """

    name = "cocob"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(1.0, "step", "unit of the bet"),
        "alpha": HyperSpec(100.0, "step", "damping of the first bets, in steps"),
    }
    state_names = ("initial", "grad_sum", "abs_grad_sum", "max_abs_grad", "reward", "bet")

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        state = super().init_state(p, values)
        state["initial"].copy_(p)
        return state

    def update(self, params, grads, state, work, hp: Hyper, step: int) -> Step:
        # Written with whole-tensor maths: an upper level's parameters are one small vector.
        (w1,), (s,), (g_abs,), (lmax,), (reward,), (bet,) = (state[n] for n in self.state_names)
        (g,) = grads
        tiny = torch.finfo(g.dtype).tiny
        lmax.copy_(torch.maximum(lmax, g.abs()).clamp_min(tiny))
        g_abs.add_(g.abs())
        reward.copy_((reward - bet * g).clamp_min(0.0))
        s.add_(g)
        alpha = scalars(hp["alpha"])[0]
        # Both factors are ratios of like quantities, so nothing underflows while the gradients are zero.
        bet.copy_(-(s / lmax) * ((lmax + reward) / torch.maximum(g_abs + lmax, alpha * lmax)))
        (p,) = params
        # new = w1 + lr * bet, in the form params + direction * scale (scale = lr).
        lr = hp["lr"]
        direction = [(w1 - p) / lr + bet]
        return Step(direction, lr)
