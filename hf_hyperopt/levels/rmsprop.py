"""RMSProp as an optimizer level."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Hyper, HyperSpec, Rule, Step, Tangent, addcmul_, coupled_decay, rooted_direction, scalars


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
    nonnegative_state = ("square_avg",)
    square_lr = True
    writes_tangents = True
    gdtuo_learn = ("lr", "alpha")

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor, tangents=None) -> Step:
        want = tangents or {}
        if not hp.zero("weight_decay"):
            grads = coupled_decay(grads, params, hp["weight_decay"])
        alpha = hp["alpha"]
        t_alpha, t_eps, t_wd = want.get("alpha"), want.get("eps"), want.get("weight_decay")
        square_avgs = state["square_avg"]
        if t_alpha is not None:  # dv/dalpha = v_{t-1} - g^2, read before v moves
            torch._foreach_copy_(t_alpha, square_avgs)
            torch._foreach_addcmul_(t_alpha, grads, grads, value=-1.0)
        torch._foreach_mul_(square_avgs, scalars(alpha))
        addcmul_(square_avgs, grads, grads, 1.0 - alpha)
        direction = work["direction"]
        in_sqrt = bool(self.options.get("eps_in_sqrt"))
        rooted_direction(
            direction, square_avgs, grads, params, hp["eps"], in_sqrt,
            {"v": t_alpha, "eps": t_eps, "weight_decay": t_wd}, decay_share=1.0 - alpha,
        )  # fmt: skip
        scale = -hp["lr"]
        written = {}
        for name in want:
            if name == "lr":
                written[name] = Tangent(direction=-torch.ones_like(scale))
            elif name == "alpha":
                written[name] = Tangent(own=-0.5 * scale)
            elif name == "eps":
                written[name] = Tangent(own=-0.5 * scale if in_sqrt else -scale)
            elif name == "weight_decay":
                written[name] = Tangent(own=scale)
        return Step(direction, scale, tangents=written)
