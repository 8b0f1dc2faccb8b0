"""Running a level's rule and keeping the tangent of its update, d(new params)/d(theta).

A rule with ``writes_tangents`` (every built-in one) writes d(new params)/d(value) for each learned
hyperparameter beside its update (:class:`~hf_hyperopt.levels.base.Tangent`); the engine chains it to
the learned coordinate theta with one scalar per tensor, d(value)/d(theta), which forward-mode AD
gives cheaply on the tiny vector of hyperparameters (it holds the parametrisation, the ramp's factor
and a scheduler's). One update, no copies of the parameters or state, and no parameter-sized memory
beyond the tangent buffers and one temporary; with a trace, one more per learned name while the step
runs (the new tangents are built beside the kept ones).

Any other rule gets its tangents from forward-mode AD through the whole update (:func:`forward_ad`),
one pass per learned name, all but the last on copies of the parameters and state. That is the
reference the written tangents are tested against, and it costs hundreds of optimizer steps once the
direction depends on what is learned (anything but the step size).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ..levels.base import Hyper, Rule, Step, Tangent, add_scaled_, mul_into, one_pass, scalars

# A step size's tangent is the increment over the step size: d(scale) / scale is 1 up to rounding
# with a log-parametrised lr, and then the increment is the tangent. Rounding: a few units in the
# last place of the hyperparameters' dtype (float32 for learned values of float32 weights).
_ROUNDING = 4


def run_rule(
    rule: Rule,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    work: dict[str, list[Tensor]],
    hyper_fn: Callable[[Tensor | None], Hyper],
    step: int | Tensor,
    theta: Tensor | None,
    learn: tuple[str, ...],
    out: dict[str, list[Tensor]],
    trace: float = 0.0,
    held: dict[str, str] | None = None,
    scales: dict[str, Tensor] | None = None,
) -> None:
    """Run ``rule`` on ``params`` in place; write d(new params)/d(theta_j) into ``out[j]`` for each learned j.

    ``hyper_fn(theta)`` builds the rule's hyperparameters from theta (``None``: the current values);
    each learned value must read only the theta entries of its own name. ``work`` holds the rule's
    workspace, which a learned ``lr`` replaces by its tangent buffer. With a ``trace`` ``mu``, ``out``
    holds ``Z_{t-1}`` and becomes ``mu * Z_{t-1} + d(new params)/d(theta)``. A name the rule holds
    (``held``, :meth:`~hf_hyperopt.levels.base.Rule.held_tangents`) has no buffer in ``out``: its
    per-tensor constant goes into ``scales[name]`` instead.
    """
    if theta is None:
        apply_step(params, rule.update(params, grads, state, work, hyper_fn(None), step), None)
    elif rule.writes_tangents:
        written(rule, params, grads, state, work, hyper_fn, step, theta, learn, out, trace, held or {}, scales or {})
    else:
        forward_ad(rule, params, grads, state, hyper_fn, step, theta, learn, out, trace)


def chained_hyper(hyper_fn: Callable[[Tensor | None], Hyper], theta: Tensor, learn: tuple[str, ...]) -> Hyper:
    """The hyperparameters at ``theta``, with d(value)/d(theta) per tensor of each learned one (``hp.chain``).

    One forward-mode pass with every entry of theta seeded at once: each value reads only its own
    name's entries, and each tensor only its own unit's.
    """
    with fwAD.dual_level():
        return hyper_fn(fwAD.make_dual(theta, torch.ones_like(theta))).unpack(learn)


def written(
    rule: Rule,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    work: dict[str, list[Tensor]],
    hyper_fn: Callable[[Tensor | None], Hyper],
    step: int | Tensor,
    theta: Tensor,
    learn: tuple[str, ...],
    out: dict[str, list[Tensor]],
    trace: float = 0.0,
    held: dict[str, str] | None = None,
    scales: dict[str, Tensor] | None = None,
) -> None:
    """:func:`run_rule` for a rule that writes its tangents."""
    held, scales = held or {}, scales or {}
    hp = chained_hyper(hyper_fn, theta, learn)
    written_names = [n for n in learn if n not in held]
    # A trace keeps Z_{t-1} in the buffers, so this step's tangents are built beside them.
    bufs = {n: [torch.empty_like(t) for t in params] for n in written_names} if trace else out
    work = dict(work)
    if "lr" in written_names:  # the lr's tangent is the direction, rescaled in place
        work["direction"] = bufs["lr"]
    elif "direction" not in work and "lr" not in held:  # a held lr's direction is the rule's state
        work["direction"] = [torch.empty_like(t) for t in params]
    tangents = {n: bufs[n] for n in written_names}
    if held:  # only then: a rule of one's own need not take the keyword
        st = rule.update(params, grads, state, work, hp, step, tangents, held=held)
    else:
        st = rule.update(params, grads, state, work, hp, step, tangents)
    missing = [n for n in learn if n not in st.tangents]
    if missing:
        raise RuntimeError(f"{type(rule).__name__}.update wrote no tangent for {', '.join(missing)}")
    _apply_written(params, st, bufs, hp, "lr" if "lr" in written_names else None, scales)
    if trace:
        for name in written_names:
            accumulate_trace(out[name], bufs[name], trace)


def accumulate_trace(kept: list[Tensor], new: list[Tensor], trace: float) -> None:
    """``kept <- trace * kept + new`` in place.

    On the CPU one pass per tensor (``torch.add`` with ``alpha``, whose kernel fuses the multiply and
    the add, so it rounds once where the two ``_foreach`` ops round twice); elsewhere the two fused
    multi-tensor kernels, fewer launches than one op per tensor (:func:`~hf_hyperopt.levels.base.one_pass`).
    """
    if one_pass(kept, new):
        for z, d in zip(kept, new, strict=True):
            torch.add(d, z, alpha=trace, out=z)
    else:
        torch._foreach_mul_(kept, trace)
        torch._foreach_add_(kept, new)


def _apply_written(
    params: list[Tensor],
    step: Step,
    bufs: dict[str, list[Tensor]],
    hp: Hyper,
    step_size: str | None,
    scales: dict[str, Tensor] | None = None,
) -> None:
    """``params <- params * decay + direction * scale`` in place, and each tangent chained to theta.

    Every tangent but the step size's reads the direction and the parameters as they are, so it is
    finished first. The step size's (``step_size``, when written) is the direction itself, in its
    buffer: a rule may have built it as the tangent already (then the parameters take it times
    ``scale``); otherwise it is scaled into the increment, added to the parameters and rescaled into
    the tangent, in place. A tangent the rule holds (named in ``scales``) is only its constant,
    chained; a held step size's direction is the rule's state, added to the parameters unscaled.
    """
    scales = scales or {}
    direction = step.direction
    for name, tangent in step.tangents.items():
        if name in scales:
            if tangent.params is not None or (name == "lr") == (tangent.own is not None):
                raise RuntimeError(f"a held tangent ({name}) is one multiple of a state buffer, nothing more")
            coef = tangent.direction if name == "lr" else tangent.own
            scales[name].copy_(coef if tangent.chained else coef * hp.chain(name))
        elif name != step_size:
            _combine(bufs[name], tangent, hp.chain(name), direction, params)
    if "lr" in scales:
        if step.decay is not None:
            torch._foreach_mul_(params, scalars(step.decay))
        add_scaled_(params, direction, step.scale)
        return
    if step_size is None:
        if step.decay is not None:
            torch._foreach_mul_(params, scalars(step.decay))
        torch._foreach_mul_(direction, scalars(step.scale))
        torch._foreach_add_(params, direction)
        return
    tangent, c = step.tangents[step_size], hp.chain(step_size)
    if tangent.own is not None or tangent.chained:
        raise RuntimeError("a step size's tangent has no term of its own: it only scales the direction")
    params_term = torch._foreach_mul(params, scalars(tangent.params * c)) if tangent.params is not None else None
    if step.decay is not None:
        torch._foreach_mul_(params, scalars(step.decay))
    buf = bufs[step_size]
    if not _same(buf, direction):
        torch._foreach_copy_(buf, direction)
    d_scale = tangent.direction * c if tangent.direction is not None else None
    if d_scale is not None and _near_one(d_scale):  # the rule built the direction as the tangent
        if _near_one(step.scale):
            torch._foreach_add_(params, buf)
        else:
            add_scaled_(params, buf, step.scale)
    elif d_scale is not None and _near_one(d_scale / step.scale):
        torch._foreach_mul_(buf, scalars(step.scale))
        torch._foreach_add_(params, buf)
    else:
        add_scaled_(params, buf, step.scale)
        if d_scale is None:
            torch._foreach_zero_(buf)
        else:
            torch._foreach_mul_(buf, scalars(d_scale))
    if params_term is not None:
        torch._foreach_add_(buf, params_term)


def _combine(buf: list[Tensor], tangent: Tangent, c: Tensor, direction: list[Tensor], params: list[Tensor]) -> None:
    """``buf <- (buf * own + direction * direction_coef + params * params_coef) * c``, one temporary at most."""
    started = tangent.own is not None or tangent.chained
    if tangent.own is not None:
        torch._foreach_mul_(buf, scalars(tangent.own * c))
    for source, coef in ((direction, tangent.direction), (params, tangent.params)):
        if coef is None:
            continue
        if started:
            add_scaled_(buf, source, coef * c)
        else:
            mul_into(buf, source, coef * c)
            started = True
    if not started:
        torch._foreach_zero_(buf)


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(x is y for x, y in zip(a, b, strict=True))


def forward_ad(
    rule: Rule,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    hyper_fn: Callable[[Tensor | None], Hyper],
    step: int | Tensor,
    theta: Tensor,
    learn: tuple[str, ...],
    out: dict[str, list[Tensor]],
    trace: float = 0.0,
) -> None:
    """:func:`run_rule` by forward-mode AD through the rule's update.

    One pass per learned name: the theta entries of that name get tangent 1 (all units at once, since
    each tensor reads only its own unit). All but the last pass run on copies, so the state and
    parameters are updated exactly once. A pass uses its tangent buffers as the rule's workspace: the
    direction is built there and turned into the tangent in place. With a ``trace`` the buffers hold
    ``Z_{t-1}``, so the direction is built in a temporary instead.
    """
    units = theta.numel() // len(learn)
    for j, name in enumerate(learn):
        last = j == len(learn) - 1
        p = params if last else [t.clone() for t in params]
        s = state if last else {n: [t.clone() for t in ts_] for n, ts_ in state.items()}
        seed = torch.zeros_like(theta)
        seed[j * units : (j + 1) * units] = 1.0
        if trace:
            work = {n: [torch.empty_like(t) for t in params] for n in rule.workspace_names}
        else:
            work = {n: out[name] for n in rule.workspace_names}
        with fwAD.dual_level():
            hp = hyper_fn(fwAD.make_dual(theta, seed))
            apply_step(p, rule.update(p, grads, s, work, hp, step), out[name], trace)


def apply_step(params: list[Tensor], step: Step, tangent: list[Tensor] | None, trace: float = 0.0) -> None:
    """``params <- params * decay + direction * scale`` in place; with ``tangent``, also its tangent (forward AD).

    When forward-mode AD reports that the direction does not depend on the learned hyperparameters
    (a learned step size), the tangent of this last product is ``params * d(decay) + direction *
    d(scale)``: the product rule of one multiplication, with ``d(scale)`` and ``d(decay)`` from AD.
    The direction is then scaled into the increment in the tangent buffer, added to the parameters,
    and rescaled by ``d(scale) / scale`` into the tangent, all in place (with a log-parametrised step
    size that ratio is 1 and the tangent *is* the increment). Otherwise AD carries the tangent
    through the whole update. With a ``trace`` ``mu``, ``tangent`` holds ``Z_{t-1}`` and becomes
    ``mu * Z_{t-1} + d(new params)/d(theta)``.
    """
    direction = step.direction
    if tangent is None or fwAD.unpack_dual(direction[0]).tangent is not None:
        # No tangent wanted, or one AD carries through the whole product (direction depends on theta).
        if step.decay is not None:
            torch._foreach_mul_(params, scalars(step.decay))
        torch._foreach_mul_(direction, scalars(step.scale))
        torch._foreach_add_(params, direction)
        if tangent is None:
            return
        out = [fwAD.unpack_dual(t).tangent for t in params]
        out = [t if t is not None else torch.zeros_like(q) for t, q in zip(out, params, strict=True)]
        # The buffers may have carried the direction's tangent; write through their primal.
        primal = [fwAD.unpack_dual(t).primal for t in tangent]
        if trace:
            accumulate_trace(primal, out, trace)
        else:
            torch._foreach_copy_(primal, out)
        return
    scale, d_scale = fwAD.unpack_dual(step.scale)
    decay_term = None
    if step.decay is not None:
        decay, d_decay = fwAD.unpack_dual(step.decay)
        if d_decay is not None:
            decay_term = torch._foreach_mul(params, scalars(d_decay))
        torch._foreach_mul_(params, scalars(decay))
    # This step's tangent is built in `step_tangent`: the tangent buffer itself, or, when the buffer
    # holds a trace, the temporary the direction was built in.
    step_tangent = direction if trace else tangent
    if step_tangent is not direction:
        torch._foreach_copy_(step_tangent, direction)
    ratio = _ratio(d_scale, scale)
    if ratio is not None:
        torch._foreach_mul_(step_tangent, scalars(scale))
        torch._foreach_add_(params, step_tangent)
        if any(r != 1.0 for r in ratio):
            torch._foreach_mul_(step_tangent, ratio)
    else:
        torch._foreach_add_(params, torch._foreach_mul(step_tangent, scalars(scale)))
        if d_scale is None:
            torch._foreach_zero_(step_tangent)
        else:
            torch._foreach_mul_(step_tangent, scalars(d_scale))
    if decay_term is not None:
        torch._foreach_add_(step_tangent, decay_term)
    if trace:
        accumulate_trace(tangent, step_tangent, trace)


def _near_one(x: Tensor | None) -> bool:
    """Whether every entry is 1 up to its dtype's rounding, when that can be read for free (on the CPU)."""
    if x is None or x.device.type != "cpu":
        return False
    tol = _ROUNDING * torch.finfo(x.dtype).eps
    return all(abs(r - 1.0) <= tol for r in x.tolist())


def _ratio(d_scale: Tensor | None, scale: Tensor) -> list[float] | None:
    """``d_scale / scale`` as floats when it can be read for free (on the CPU) and is finite."""
    if d_scale is None or scale.device.type != "cpu" or d_scale.device.type != "cpu":
        return None
    ratio = (d_scale / scale).tolist()
    return ratio if all(math.isfinite(r) for r in ratio) else None
