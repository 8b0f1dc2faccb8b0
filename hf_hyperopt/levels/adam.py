"""Adam and AdamW (decoupled weight decay) as an optimizer level."""

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
    addcmul_,
    addcmul_into,
    coupled_decay,
    div_into,
    history_held_power,
    lincomb_into,
    lr_tangent_factor,
    product_into,
    quotient_into,
    scalars,
    scaled_root_into,
    sqrt_into,
)


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

    A learned beta's derivative holds the moment's history constant, as the paper does for
    :math:`m_{t-1}`: the bias correction :math:`1-\beta^t` is the weight of a history made with
    past betas, so only this step's factor :math:`\beta` of :math:`\beta^t` is differentiated
    (:math:`\beta^{t-1}`, not :math:`t\beta^{t-1}`). Differentiating all :math:`t` factors would
    make :math:`\beta_1` a second step size (:math:`1/(1-\beta_1^t)` grows as :math:`\beta_1 \to
    1`) that a level above drives toward 1 wherever larger steps help. ``compat="gdtuo"`` keeps the
    reference implementation's full derivative.
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
    nonnegative_state = ("exp_avg_sq",)
    gdtuo_learn = ("lr", "beta1", "beta2")
    writes_tangents = True

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        state = super().init_state(p, values)
        if self.options.get("gdtuo_init"):
            # The reference starts v at eps so that sqrt stays differentiable at step 1.
            state["exp_avg_sq"].fill_(values["eps"])
        return state

    def update(self, params, grads, state, work, hp: Hyper, step: int | Tensor, tangents=None) -> Step:
        lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        exp_avgs, exp_avg_sqs = state["exp_avg"], state["exp_avg_sq"]
        want = tangents or {}
        decay, coupled = None, False
        if not hp.zero("weight_decay"):
            if self.options.get("decoupled"):
                decay = 1.0 - lr * hp["weight_decay"]
            else:
                grads, coupled = coupled_decay(grads, params, hp["weight_decay"]), True
        held = self.mode != "gdtuo"  # the history's factors in beta**t are not differentiated
        bias_correction1 = 1.0 - (history_held_power(beta1, step) if held else beta1**step)
        bias_correction2 = 1.0 - (history_held_power(beta2, step) if held else beta2**step)
        root_bc2 = bias_correction2.sqrt()
        scale = -lr / bias_correction1
        t_beta1, t_beta2, t_eps = want.get("beta1"), want.get("beta2"), want.get("eps")
        t_wd = want.get("weight_decay") if coupled else None
        # The learned lr's tangent is the direction times this: the direction is built with it
        # (one pass fewer than scaling it afterwards), where that can be read for free.
        lr_factor = lr_tangent_factor(hp, want, bias_correction1)
        # Tangents that read the moments' history are started before the moments move; constant
        # factors and the chain to theta (f) fold into passes made anyway.
        if t_beta1 is not None:
            # dm/dbeta1 = m_{t-1} - g; bc1 in the step size adds c m, c = tb / bc1 with tb = d(beta1^t)/dbeta1
            # (beta1^(t-1) with the history held). Both are linear in m_{t-1} and g, so their sum is
            # written from them now; / denom below.
            tb = beta1 ** (step - 1) * (1.0 if held else step)
            k1 = 1.0 + tb * beta1 / bias_correction1
            # (c (1 - beta1) - 1) / k1, written so that it is exactly 0 at a tensor's first step (where
            # m / bc1 = g whatever beta1 is): rounding noise there would be a full step under normalize.
            lincomb_into(
                t_beta1, exp_avgs, grads, (tb * (1.0 - beta1) - bias_correction1) / (bias_correction1 + tb * beta1)
            )
            f1 = scale * hp.chain("beta1") * k1
        if t_beta2 is not None:
            # dv/dbeta2 = v_{t-1} - g^2; bc2 in sqrt(v / bc2) adds c v, c = tb / bc2: as for beta1.
            # Times -direction / (2 sqrt(v / bc2) denom bc2) below.
            tb = beta2 ** (step - 1) * (1.0 if held else step)
            k1 = 1.0 + tb * beta2 / bias_correction2
            addcmul_into(
                t_beta2,
                exp_avg_sqs,
                grads,
                grads,
                (tb * (1.0 - beta2) - bias_correction2) / (bias_correction2 + tb * beta2),
            )
            f2 = -0.5 * scale * hp.chain("beta2") * k1 / bias_correction2
            if lr_factor is not None:
                f2 = f2 / lr_factor
        torch._foreach_lerp_(exp_avgs, grads, scalars(1.0 - beta1))
        torch._foreach_mul_(exp_avg_sqs, scalars(beta2))
        addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        # m / (sqrt(v) / sqrt(bc2) + eps), built in the workspace without allocating; each tangent
        # takes its factors (1 / sqrt(v / bc2), 1 / denominator, the direction) as they pass.
        direction = work["direction"]
        if t_beta2 is not None or t_wd is not None:  # they divide by the root: keep it off zero
            scaled_root_into(direction, exp_avg_sqs, 1.0 / bias_correction2)
        else:
            sqrt_into(direction, exp_avg_sqs)
            torch._foreach_div_(direction, scalars(root_bc2))
        if t_beta2 is not None:
            torch._foreach_div_(t_beta2, direction)
        if t_wd is not None:
            div_into(t_wd, grads, direction)
        torch._foreach_add_(direction, scalars(hp["eps"]))
        if t_beta1 is not None:
            quotient_into(t_beta1, t_beta1, direction, f1)
        if t_beta2 is not None:
            torch._foreach_div_(t_beta2, direction)
        if t_eps is not None:  # -m / denom^2
            div_into(t_eps, exp_avgs, direction)
            torch._foreach_div_(t_eps, direction)
        if t_wd is not None:
            # d(direction)/d(weight_decay) = w / denom * ((1 - beta1) - (1 - beta2) m g / (denom sqrt(v bc2)))
            f = scale * hp.chain("weight_decay")
            torch._foreach_mul_(t_wd, exp_avgs)
            torch._foreach_div_(t_wd, direction)
            torch._foreach_mul_(t_wd, scalars(f * (beta2 - 1.0) / bias_correction2))
            torch._foreach_add_(t_wd, scalars(f * (1.0 - beta1)))
            torch._foreach_div_(t_wd, direction)
            torch._foreach_mul_(t_wd, params)
        quotient_into(direction, exp_avgs, direction, lr_factor)
        if t_beta2 is not None:
            product_into(t_beta2, t_beta2, direction, f2)
        written = {}
        for name in want:
            if name == "lr":
                wd = hp["weight_decay"] if decay is not None else None
                coef = -1.0 / bias_correction1
                written[name] = Tangent(
                    direction=coef if lr_factor is None else coef / lr_factor, params=None if wd is None else -wd
                )
            elif name in ("beta1", "beta2") or name == "weight_decay" and coupled:
                written[name] = Tangent(chained=True)
            elif name == "eps":
                written[name] = Tangent(own=-scale)
            elif name == "weight_decay":
                written[name] = Tangent(params=-lr)
        return Step(direction, scale if lr_factor is None else scale / lr_factor, decay, written)


class AdamWRule(AdamRule):
    """AdamW: :class:`AdamRule` with decoupled weight decay (``torch.optim.AdamW``, default 1e-2)."""

    name = "adamw"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        **AdamRule.hyperparameters,
        "weight_decay": HyperSpec(1e-2, "step", "decoupled weight decay"),
    }

    def __init__(self, mode="default", **options: bool):
        super().__init__(mode, decoupled=True, **options)
