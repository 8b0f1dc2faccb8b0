"""Adam and AdamW (decoupled weight decay) as an optimizer level."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Hyper, HyperSpec, Rule, Step, addcmul_, copy_, scalars, sqrt_


class AdamRule(Rule):
    r"""Adam as in ``torch.optim.Adam``; with ``decoupled=True``, AdamW as in ``torch.optim.AdamW``.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
        w_t = w_{t-1} - \frac{\eta}{1-\beta_1^t} \, \frac{m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    :math:`t` counts the steps in which the tensor had a gradient (``torch.optim``'s
    ``state[p]["step"]``), so ``step`` may hold one count per tensor. Adam adds :math:`\lambda w_{t-1}`
    to the gradient; AdamW multiplies :math:`w_{t-1}` by :math:`1 - \eta\lambda` first. Every symbol
    above but :math:`t` is a hyperparameter and can be learned; the bias corrections depend on
    :math:`\beta_1, \beta_2`, so their hypergradients include them.
    """

    name = "adam"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(1e-3, "step", "step size"),
        "beta1": HyperSpec(0.9, "unit", "decay of the first moment"),
        "beta2": HyperSpec(0.999, "unit", "decay of the second moment"),
        "eps": HyperSpec(1e-8, "step", "added to the denominator"),
        "weight_decay": HyperSpec(0.0, "step", "weight decay"),
    }
    state_names = ("exp_avg", "exp_avg_sq")
    gdtuo_learn = ("lr", "beta1", "beta2")

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        state = super().init_state(p, values)
        if self.options.get("gdtuo_init"):
            # The reference starts v at eps so that sqrt stays differentiable at step 1.
            state["exp_avg_sq"].fill_(values["eps"])
        return state

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor) -> Step:
        lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        decay = None
        if not hp.zero("weight_decay"):
            if self.options.get("decoupled"):
                decay = 1.0 - lr * hp["weight_decay"]
            else:
                grads = torch._foreach_add(grads, torch._foreach_mul(params, scalars(hp["weight_decay"])))
        torch._foreach_lerp_(exp_avgs, grads, scalars(1.0 - beta1))
        torch._foreach_mul_(exp_avg_sqs, scalars(beta2))
        addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        # m / (sqrt(v) / sqrt(bc2) + eps), built in the workspace without allocating.
        direction = work["direction"]
        copy_(direction, exp_avg_sqs)
        sqrt_(direction)
        torch._foreach_div_(direction, scalars(bias_correction2.sqrt()))
        torch._foreach_add_(direction, scalars(hp["eps"]))
        torch._foreach_reciprocal_(direction)
        torch._foreach_mul_(direction, exp_avgs)
        return Step(direction, -lr / bias_correction1, decay)


class AdamWRule(AdamRule):
    """AdamW: :class:`AdamRule` with decoupled weight decay (``torch.optim.AdamW``, default 1e-2)."""

    name = "adamw"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        **AdamRule.hyperparameters,
        "weight_decay": HyperSpec(1e-2, "step", "decoupled weight decay"),
    }

    def __init__(self, mode="default", **options: bool):
        super().__init__(mode, decoupled=True, **options)
