"""RMSProp as an optimizer level."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Hyper, HyperSpec, Rule, Step, addcmul_, copy_, scalars, sqrt_


class RMSPropRule(Rule):
    r"""RMSProp as in ``torch.optim.RMSprop`` (not centered, no momentum).

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2, \quad w_t = w_{t-1} - \eta \, \frac{g_t}{\sqrt{v_t} + \epsilon}

    ``alpha`` is the smoothing constant (the paper's :math:`\gamma`). ``gdtuo`` mode follows the
    reference: :math:`\sqrt{v_t + \epsilon}`, and the step size is stored as its square root.
    """

    name = "rmsprop"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(1e-2, "step", "step size"),
        "alpha": HyperSpec(0.99, "unit", "smoothing constant of the squared-gradient average"),
        "eps": HyperSpec(1e-8, "step", "added to the denominator"),
        "weight_decay": HyperSpec(0.0, "step", "L2 penalty added to the gradient"),
    }
    state_names = ("square_avg",)
    square_lr = True
    gdtuo_learn = ("lr", "alpha")

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor) -> Step:
        if not hp.zero("weight_decay"):
            grads = torch._foreach_add(grads, torch._foreach_mul(params, scalars(hp["weight_decay"])))
        alpha = hp["alpha"]
        square_avgs = state["square_avg"]
        torch._foreach_mul_(square_avgs, scalars(alpha))
        addcmul_(square_avgs, grads, grads, 1.0 - alpha)
        direction = work["direction"]
        copy_(direction, square_avgs)
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
