"""AdaGrad as an optimizer level."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Hyper, HyperSpec, Rule, Step, Tangent, coupled_decay, rooted_direction


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
    nonnegative_state = ("sum",)
    writes_tangents = True

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        state = super().init_state(p, values)
        if self.options.get("gdtuo_init"):
            state["sum"].fill_(0.1)
        return state

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor, tangents=None) -> Step:
        want = tangents or {}
        if not hp.zero("weight_decay"):
            grads = coupled_decay(grads, params, hp["weight_decay"])
        t_eps, t_wd = want.get("eps"), want.get("weight_decay")
        sums = state["sum"]
        torch._foreach_addcmul_(sums, grads, grads)
        direction = work["direction"]
        in_sqrt = bool(self.options.get("eps_in_sqrt"))
        rooted_direction(direction, sums, grads, params, hp["eps"], in_sqrt, {"eps": t_eps, "weight_decay": t_wd})
        scale = -hp["lr"]
        written = {}
        for name in want:
            if name == "lr":
                written[name] = Tangent(direction=-torch.ones_like(scale))
            elif name == "eps":
                written[name] = Tangent(own=-0.5 * scale if in_sqrt else -scale)
            elif name == "weight_decay":
                written[name] = Tangent(own=scale)
        return Step(direction, scale, tangents=written)
