"""The hypergradients: ``h[k] = dL/dtheta[k]`` for every level that has learned hyperparameters.

At step ``t + 1`` the weight level's hypergradient is ``h[0] = <g_{t+1}, Z_t>`` summed per unit (one
sum for the shared scope, one per group or per tensor), where ``Z_t`` is the tangent kept from step
``t`` (:mod:`.buckets`); under FSDP2 each rank sums its shards and one ``all_reduce`` completes it
(:mod:`.distributed`). A level ``k >= 1`` chains it through the tangent of its own last update:
``h[k] = <h[k-1], dtheta[k-1]/dtheta[k]>``, computed from the unguarded level below, so that a
hypergradient built on a non-finite one is skipped too. With ``normalize`` on the level above, the
hypergradient it learns from is divided by the tangent's norm (the slope along the update); with
``cosine=c`` on level 1, by the next gradient's norm to the power ``c`` as well (``c = 1``: the cosine).

A non-finite hypergradient is replaced by zero and counted (:func:`guard`); its coordinates keep
their values and state (:func:`.stepping.keep_skipped`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..levels.base import one_pass
from .distributed import local_tensor, reduce_hypergradients
from .ramp import advance_ramp, asks_for_more, size_ramp

if TYPE_CHECKING:
    from .buckets import Bucket
    from .engine import TowerOptimizer
    from .state import TowerState


def hypergradients(opt: TowerOptimizer, ts: TowerState) -> tuple[list[Tensor], dict[int, Tensor]]:
    """``h[k]`` for every learned level, bottom-up and guarded, and where each was not finite.

    Returns:
        The hypergradients, and for each learned level ``k`` a bool vector of the coordinates whose
        update is skipped this step (non-finite, or the lr's while the ramp approaches its target).
    """
    n = len(opt.levels)
    hyper: list[Tensor] = []
    skip_masks: dict[int, Tensor] = {}
    if n == 1:
        return hyper, skip_masks
    theta0 = ts.theta[0]
    units = opt._units()
    h0 = torch.zeros_like(theta0)
    normalize = opt.levels[1].normalize
    cosine = opt.levels[1].cosine
    if normalize:
        zz0 = torch.zeros_like(theta0)
    if cosine:
        gg0 = torch.zeros_like(theta0)
    # ramp_search judges by |g_{t+1}|^2 and the lr tangent's |Z_t|^2, summed over everything; only while it may be on
    search = ts.ramp is not None and ts.ramp.search is not None and ts.ramp.searching
    if search:
        norms = torch.zeros(2, dtype=theta0.dtype, device=theta0.device)
    for b in opt._buckets:
        grads = [local_tensor(p.grad) for p in b.params]
        if cosine or search:  # the same gradient norms for every learned name and for the search
            gsq = squared_norms(grads).to(theta0.device, theta0.dtype)
        if search:
            norms[0] += gsq.sum()
            norms[1] += tangent_squared_norms(b, "lr").sum().to(norms.device, norms.dtype)
        keep = not consumes_tangents(opt, b)
        names = [n for n in opt._learn[0] if keep or n in b.scales]
        dots, zsq_read = per_tensor_dots(b, grads, names, squares=normalize and one_pass(b.local))
        for j, name in enumerate(opt._learn[0]):
            # A held tangent is a state buffer (never overwritten here) times one constant per tensor.
            scale = b.scales.get(name)
            if normalize:
                zsq = tangent_squared_norms(b, name, squares=zsq_read.get(name))
                zz0.index_add_(0, b.unit_index.to(theta0.device) + j * units, zsq.to(theta0.device, theta0.dtype))
            if cosine:
                gg0.index_add_(0, b.unit_index.to(theta0.device) + j * units, gsq)
            if name in dots:
                sums = dots[name]
                if scale is not None:  # a zero constant (a cleared tangent) reads zero, whatever the buffer
                    sums = torch.where(scale == 0, torch.zeros_like(scale), sums.to(scale.dtype) * scale)
                ids = b.unit_index
            else:
                torch._foreach_mul_(b.views[name], grads)
                sums = b.unit_sums(b.flat[name], theta0.dtype)
                ids = b.unit_ids
            h0.index_add_(0, ids.to(theta0.device) + j * units, sums.to(theta0.device, theta0.dtype))
    summed = [h0] + ([zz0] if normalize else []) + ([gg0] if cosine else []) + ([norms] if search else [])
    if len(summed) > 1:  # one reduction for all the sums
        both = torch.cat(summed)
        reduce_hypergradients(both, opt._sharding_group)
        parts = list(both.split([t.numel() for t in summed]))
        h0 = parts.pop(0)
        zz0 = parts.pop(0) if normalize else None
        gg0 = parts.pop(0) if cosine else None
        norms = parts.pop(0) if search else None
    else:
        reduce_hypergradients(h0, opt._sharding_group)
    held = _advance_ramp(opt, ts, h0, units, norms if search else None)
    raw = h0  # the true hypergradient: what the levels above chain through
    if normalize:
        h0 = per_length(h0, zz0)
    if cosine:
        h0 = per_length(h0, gg0.pow(cosine))
    hyper.append(guard(h0, ts, 0, skip_masks))
    if held is not None:
        skip_masks[0] = skip_masks[0] | held
    for k in range(1, n - 1):
        tangent = ts.upper_tangent[k - 1]
        # From the unguarded level below: a hypergradient built on a non-finite one is skipped too.
        raw_below = raw
        raw = torch.stack([torch.dot(raw_below, tangent[name]) for name in opt._learn[k]])
        h = raw
        if opt.levels[k + 1].normalize:
            h = per_length(raw, torch.stack([tangent[n].dot(tangent[n]) for n in opt._learn[k]]))
        hyper.append(guard(h, ts, k, skip_masks))
    return hyper, skip_masks


def consumes_tangents(opt: TowerOptimizer, b: Bucket) -> bool:
    """Whether the hypergradient may multiply the written tangents by the gradients in place and sum them.

    A trace lives on across steps, so it is read without being overwritten (and a held tangent is the
    rule's state: it is always read). On the CPU a dot per tensor is also the cheaper read (the buffer
    once, no write), and so it is in the tensor scope, which needs one sum per tensor anyway; elsewhere
    the fused product and one sum per unit are fewer kernels than a dot per tensor.
    """
    return not (opt.levels[1].trace or opt.scope == "tensor" or b.local[0].device.type == "cpu")


def per_tensor_dots(
    b: Bucket, grads: list[Tensor], names: list[str], squares: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``<tangent, g>`` of each tensor for each of ``names``, tensor by tensor: a gradient that fits in
    the cache is read from memory once for all the names. With ``squares`` (on the CPU, where one
    ``_foreach_norm`` would run tensor by tensor too), also each tangent's ``<tangent, tangent>`` (its
    buffer's, unscaled) right after, while it is in the cache."""
    out: list[list[Tensor]] = [[] for _ in names]
    sq: list[list[Tensor]] = [[] for _ in names] if squares else []
    views = [b.views[n] for n in names]
    low = grads and grads[0].dtype in (torch.float16, torch.bfloat16)
    for i, g in enumerate(grads):
        g = g.reshape(-1)
        for j, z in enumerate(views):
            z = z[i].reshape(-1)
            out[j].append(dot(z, g) if low else torch.dot(z, g))
            if squares:
                sq[j].append(dot(z, z) if low else torch.dot(z, z))
    dots = {n: torch.stack(acc) for n, acc in zip(names, out, strict=True)}
    return dots, {n: torch.stack(acc) for n, acc in zip(names, sq, strict=True)} if squares else {}


def guard(h: Tensor, ts: TowerState, k: int, skip_masks: dict[int, Tensor]) -> Tensor:
    """``h`` with non-finite entries replaced by zero; they are counted (``ts.skipped``) and marked in ``skip_masks[k]``."""
    finite = torch.isfinite(h)
    ts.skipped[k].add_((~finite).sum())
    skip_masks[k] = ~finite
    return torch.where(finite, h, torch.zeros_like(h))


def _advance_ramp(opt: TowerOptimizer, ts: TowerState, h0: Tensor, units: int, norms: Tensor | None) -> Tensor | None:
    """The coordinates of theta[0] the level above leaves alone this step (the lr's, while the ramp
    approaches its target or, with ``ramp_search``, searches past it), or None without a ramp."""
    if ts.ramp is None:
        return None
    j = opt._learn[0].index("lr")
    held = torch.zeros_like(h0, dtype=torch.bool)
    larger = None
    if norms is not None:  # dL/dlog(ramp factor): the factor scales every unit's lr
        larger = asks_for_more(h0[j * units : (j + 1) * units].sum(), norms[0], norms[1], opt.levels[1].ramp_search)
    held[j * units : (j + 1) * units] = advance_ramp(ts.ramp, h0.device, larger)
    return held


def measure_ramp(opt: TowerOptimizer, ts: TowerState) -> None:
    """After the probe step: two norms, once (see :mod:`.ramp`).

    The weights' norm is taken before the probe (the weights less its increment, the lr's tangent),
    one tensor at a time, so that weights that started at zero read as zero. Both are summed in float64:
    the probe's increment is a millionth of the initial lr's, whose square float32 cannot hold for an
    lr far below 1e-13, and a float16 sum of squares overflows for a large model.

    The probe's increment is taken without the schedule's factor, which multiplies the learned lr: the
    target is where an unscheduled step moves the weights by ``tau``, so a warm-up (a factor far below 1
    at the probe) does not start the learned lr a hundred times too high. Its factor is that of the probe
    step (the schedule has not moved yet); a group whose factor is 0 moved nothing and adds nothing.
    """
    schedule = torch.tensor(opt.schedule_factors(), dtype=torch.float64)
    if not bool((schedule > 0).any()):  # a warm-up from 0: the probe was scaled to nothing; take it again as it was
        return
    sq = torch.zeros(2, dtype=torch.float64, device=ts.ramp.factor.device)
    unscheduled = torch.where(schedule > 0, schedule.pow(-2), torch.zeros((), dtype=torch.float64))
    for b in opt._buckets:
        scale = b.scales.get("lr")  # a held tangent: the state buffer times this
        factors = [None] * len(b.local) if scale is None else scale.tolist()
        for w, d, f in zip(b.local, b.views["lr"], factors, strict=True):
            before = w - d if f is None else w - d * f
            sq[0] += torch.linalg.vector_norm(before, dtype=torch.float64).square().to(sq.device)
        per_tensor = tangent_squared_norms(b, "lr", torch.float64)
        sq[1] += (per_tensor * unscheduled.to(per_tensor.device)[b.group_index]).sum().to(sq.device)
    reduce_hypergradients(sq, opt._sharding_group)
    size_ramp(ts.ramp, opt.levels[1].ramp, sq[0], sq[1])


def per_length(h: Tensor, norms_sq: Tensor) -> Tensor:
    """``h / sqrt(norms_sq)``, and ``0 * h`` where the norm is 0 (no step taken yet).

    Not finite wherever ``h`` or the norm is not (a NaN tangent has a NaN norm), so that :func:`guard`
    counts and skips it.
    """
    per = h / norms_sq.sqrt().clamp_min(torch.finfo(h.dtype).tiny)
    return torch.where(norms_sq == 0, h * 0, per)


def tangent_squared_norms(
    b: Bucket, name: str, dtype: torch.dtype | None = None, squares: Tensor | None = None
) -> Tensor:
    """``|Z|^2`` of each tensor's tangent for ``name``: of its buffer (``squares`` where already
    summed), times its constant squared if held."""
    sq = squared_norms(b.views[name], dtype) if squares is None else squares
    scale = b.scales.get(name)
    return sq if scale is None else sq * scale.to(sq.dtype).square()


def squared_norms(tensors: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``|t|^2`` of each tensor, in one fused pass: in ``dtype``, or at least float32."""
    if dtype is not None:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()
    norms = torch.stack(torch._foreach_norm(tensors))
    return (norms.float() if norms.dtype in (torch.float16, torch.bfloat16) else norms).square()


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` over all elements, accumulated in at least float32."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))
