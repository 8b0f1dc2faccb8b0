"""Stochastic gradient descent, with momentum and Nesterov momentum, as an optimizer level."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    Hyper,
    HyperSpec,
    Rule,
    Step,
    Tangent,
    add_scaled_,
    copy_,
    coupled_decay,
    lincomb_into,
    lr_tangent_factor,
    mul_into,
    scalars,
)


class SGDRule(Rule):
    r"""SGD as in ``torch.optim.SGD`` (no dampening).

    .. math::
        d_t = g_t + \lambda w_{t-1}, \quad
        b_t = \mu b_{t-1} + d_t, \quad
        w_t = w_{t-1} - \eta \, (d_t + \mu b_t \text{ if nesterov else } b_t)

    With ``momentum == 0`` there is no buffer and :math:`w_t = w_{t-1} - \eta d_t`.
    """

    name = "sgd"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(1e-3, "step", "step size"),
        "momentum": HyperSpec(0.0, "unit", "momentum factor"),
        "weight_decay": HyperSpec(0.0, "step", "L2 penalty added to the gradient"),
        "nesterov": HyperSpec(0.0, "flag", "use Nesterov momentum"),
    }
    state_names = ("momentum_buffer",)
    gdtuo_raw = ("momentum",)
    writes_tangents = True

    def gdtuo_learned(self, values: dict[str, float]) -> tuple[str, ...]:
        # The reference learns its momentum only when it starts non-zero.
        return ("lr", "momentum") if values["momentum"] != 0.0 else ("lr",)

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        if values["momentum"] == 0.0 and not self.options.get("learn_momentum", False):
            return {}
        return super().init_state(p, values)

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor, tangents=None) -> Step:
        want = tangents or {}
        d, owned = grads, False  # owned: d is a temporary the engine may scale in place
        if not hp.zero("weight_decay"):
            d, owned = coupled_decay(grads, params, hp["weight_decay"]), True
        wd_factor = None  # d(direction)/d(weight_decay) = params * wd_factor (None: 1)
        scale = -hp["lr"]
        t_momentum = want.get("momentum")
        if t_momentum is not None:
            # Both terms of the momentum's tangent are multiples of the buffer: it is written scaled
            # by the step size and the chain to theta from the start (no pass of its own for them).
            f_momentum = scale * hp.chain("momentum")
        if not hp.zero("momentum"):
            momentum = scalars(hp["momentum"])
            bufs = state["momentum_buffer"]
            if t_momentum is not None:  # db/dmomentum = b_{t-1}
                mul_into(t_momentum, bufs, f_momentum)
            lincomb_into(bufs, d, bufs, hp["momentum"])
            if self.options.get("nesterov"):
                nd = torch._foreach_mul(bufs, momentum)
                torch._foreach_add_(nd, d)
                d, owned = nd, True
                wd_factor = 1.0 + hp["momentum"]
                if t_momentum is not None:  # d(d + momentum b)/dmomentum = b + momentum b_{t-1}
                    torch._foreach_mul_(t_momentum, momentum)
                    add_scaled_(t_momentum, bufs, f_momentum)
            else:
                d, owned = bufs, False
        # The learned lr's tangent is the direction times this: the direction is built with it (one
        # pass instead of a copy and a rescale), where that can be read for free.
        lr_factor = lr_tangent_factor(hp, want)
        if lr_factor is not None:
            mul_into(work["direction"], d, lr_factor)
            d = work["direction"]
        elif not owned:
            copy_(work["direction"], d)
            d = work["direction"]
        written = {}
        for name in want:
            if name == "lr":
                written[name] = Tangent(direction=-torch.ones_like(scale) if lr_factor is None else -1.0 / lr_factor)
            elif name == "momentum":
                written[name] = Tangent(chained=True)
            elif name == "weight_decay":
                written[name] = Tangent(params=scale if wd_factor is None else scale * wd_factor)
        return Step(d, scale if lr_factor is None else scale / lr_factor, tangents=written)
