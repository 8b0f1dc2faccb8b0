"""AdaGrad as an optimizer level."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Hyper, HyperSpec, Rule, Step, copy_, scalars, sqrt_


class AdaGradRule(Rule):
    r"""AdaGrad as in ``torch.optim.Adagrad`` (no learning-rate decay).

    .. math::
        s_t = s_{t-1} + g_t^2, \quad w_t = w_{t-1} - \eta \, \frac{g_t}{\sqrt{s_t} + \epsilon}

    ``gdtuo`` mode follows the reference: :math:`s_0 = 0.1` and :math:`\sqrt{s_t + \epsilon}`.
    """

    name = "adagrad"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(1e-2, "step", "step size"),
        "eps": HyperSpec(1e-10, "step", "added to the denominator"),
        "weight_decay": HyperSpec(0.0, "step", "L2 penalty added to the gradient"),
    }
    state_names = ("sum",)

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        state = super().init_state(p, values)
        if self.options.get("gdtuo_init"):
            state["sum"].fill_(0.1)
        return state

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor) -> Step:
        if not hp.zero("weight_decay"):
            grads = torch._foreach_add(grads, torch._foreach_mul(params, scalars(hp["weight_decay"])))
        sums = state["sum"]
        torch._foreach_addcmul_(sums, grads, grads)
        direction = work["direction"]
        copy_(direction, sums)
        eps = scalars(hp["eps"])
        if self.options.get("eps_in_sqrt"):
            torch._foreach_add_(direction, eps)
            torch._foreach_sqrt_(direction)
        else:
            sqrt_(direction)
            torch._foreach_add_(direction, eps)
        torch._foreach_reciprocal_(direction)
        torch._foreach_mul_(direction, grads)
        return Step(direction, -hp["lr"])
