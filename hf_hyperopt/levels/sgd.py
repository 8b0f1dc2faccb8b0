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
    # "momentum_previous": the buffer before the last step, kept while the engine holds the tangents.
    state_names = ("momentum_buffer", "momentum_previous")
    gdtuo_raw = ("momentum",)
    writes_tangents = True

    def gdtuo_learned(self, values: dict[str, float]) -> tuple[str, ...]:
        # The reference learns its momentum only when it starts non-zero.
        return ("lr", "momentum") if values["momentum"] != 0.0 else ("lr",)

    def _holds(self) -> bool:
        o = self.options
        return bool(o.get("hold") and not o.get("nesterov") and (o.get("has_momentum") or o.get("learn_momentum")))

    def held_tangents(self, learn: tuple[str, ...]) -> dict[str, str]:
        # Without Nesterov the direction is the momentum buffer, so the step size's tangent is a multiple
        # of it; the momentum's is a multiple of the buffer before the step, which is kept by writing the
        # new buffer where the one before that was. Neither tangent is then written: torch.optim's passes
        # and the hypergradients' dot products are all the step makes over memory.
        if not self._holds():
            return {}
        return {n: s for n, s in (("lr", "momentum_buffer"), ("momentum", "momentum_previous")) if n in learn}

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        learned = bool(self.options.get("learn_momentum"))
        names = []
        if values["momentum"] != 0.0 or learned or self._holds():  # a held lr reads every tensor's buffer
            names.append("momentum_buffer")
        if learned and "momentum" in self.held_tangents(("momentum",)):  # only where it holds the tangent
            names.append("momentum_previous")
        return {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n in names}

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor, tangents=None, held=None) -> Step:
        want = tangents or {}
        held = held or {}
        d, owned = grads, False  # owned: d is a temporary the engine may scale in place
        if not hp.zero("weight_decay"):
            d, owned = coupled_decay(grads, params, hp["weight_decay"]), True
        wd_factor = None  # d(direction)/d(weight_decay) = params * wd_factor (None: 1)
        scale = -hp["lr"]
        if "momentum" in want or "momentum" in held:
            # Both terms of the momentum's tangent are multiples of the buffer: it is written (or held)
            # scaled by the step size and the chain to theta from the start (no pass of its own for them).
            f_momentum = scale * hp.chain("momentum")
        if not hp.zero("momentum"):
            momentum = scalars(hp["momentum"])
            bufs = state["momentum_buffer"]
            if "momentum" in held:  # db/dmomentum = b_{t-1}, kept; the new buffer goes where the one before it was
                newer = state["momentum_previous"]
                lincomb_into(newer, d, bufs, hp["momentum"])
                state["momentum_buffer"], state["momentum_previous"] = newer, bufs
                bufs = newer
            else:
                if "momentum" in want:  # db/dmomentum = b_{t-1}
                    mul_into(want["momentum"], bufs, f_momentum)
                lincomb_into(bufs, d, bufs, hp["momentum"])
            if self.options.get("nesterov"):
                nd = torch._foreach_mul(bufs, momentum)
                torch._foreach_add_(nd, d)
                d, owned = nd, True
                wd_factor = 1.0 + hp["momentum"]
                if "momentum" in want:  # d(d + momentum b)/dmomentum = b + momentum b_{t-1}
                    t_momentum = want["momentum"]
                    torch._foreach_mul_(t_momentum, momentum)
                    add_scaled_(t_momentum, bufs, f_momentum)
            else:
                d, owned = bufs, False
        elif "lr" in held:  # every group's momentum is 0: the held lr's buffer is the direction itself
            copy_(state["momentum_buffer"], d)
            d, owned = state["momentum_buffer"], False
        # The learned lr's tangent is the direction times this: the direction is built with it (one
        # pass instead of a copy and a rescale), where that can be read for free. A held one is the
        # momentum buffer itself, which the engine adds to the weights without scaling it.
        lr_factor = lr_tangent_factor(hp, want)
        if lr_factor is not None:
            mul_into(work["direction"], d, lr_factor)
            d = work["direction"]
        elif not owned and "lr" not in held:
            copy_(work["direction"], d)
            d = work["direction"]
        written = {}
        for name in (*want, *held):
            if name == "lr":
                written[name] = Tangent(direction=-torch.ones_like(scale) if lr_factor is None else -1.0 / lr_factor)
            elif name == "momentum":
                written[name] = Tangent(own=f_momentum, chained=True) if name in held else Tangent(chained=True)
            elif name == "weight_decay":
                written[name] = Tangent(params=scale if wd_factor is None else scale * wd_factor)
        return Step(d, scale if lr_factor is None else scale / lr_factor, tangents=written)
