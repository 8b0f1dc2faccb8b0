"""What every optimizer level shares: its hyperparameters, their parametrisations, the rule contract.

A *level* is one optimizer in a tower. Its update rule is written once, as in-place multi-tensor
(``torch._foreach_*``) maths over lists of tensors, with every hyperparameter given as a 1-D tensor
holding one value per tensor in the list. The tower engine runs the same rule on the model's weights
(the bottom level) and on the vector of learned hyperparameters of the level below (every level above
it). A hypergradient needs the tangent of the update with respect to each learned hyperparameter: a
built-in rule writes it beside the update, in the same ``_foreach`` maths and from the same
intermediate results (:class:`Tangent`), because forward-mode autograd (``torch.autograd.forward_ad``)
through a whole update costs hundreds of optimizer steps' time and memory once anything but the step
size is learned. Forward mode stays the fallback for a rule that does not write tangents, and the
reference the written ones are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

Kind = Literal["step", "unit", "flag"]
Mode = Literal["default", "gdtuo"]
MODES: tuple[str, ...] = ("default", "gdtuo")


@dataclass(frozen=True)
class HyperSpec:
    """One hyperparameter of a level.

    Args:
        default: its initial value when none is given (``torch.optim``'s default).
        kind: ``"step"`` for non-negative sizes (``lr``, ``eps``, ``weight_decay``), ``"unit"`` for
            decay rates in ``[0, 1)`` (``momentum``, ``beta1``, ``beta2``, RMSProp's ``alpha``),
            ``"flag"`` for booleans that are never learned (``nesterov``).
        doc: one line for error messages and docs.
    """

    default: float
    kind: Kind
    doc: str


# Bounds of the learnable (raw) coordinates in the default mode. They are the guards that keep a
# learned value finite and inside its domain: exp(raw) for steps stays in [1e-30, 1e6], and
# sigmoid(raw) for rates stays in [3e-7, 1 - 3e-7], which float32 still tells apart from 0 and 1
# (a rate that rounds to 1 would zero Adam's bias correction and divide by it).
STEP_RAW_BOUNDS = (math.log(1e-30), math.log(1e6))
UNIT_RAW_BOUNDS = (-15.0, 15.0)


Parametrisation = Literal["log", "logit", "identity", "sqrt", "tanh"]


def parametrisation(rule: type[Rule], name: str, mode: Mode) -> Parametrisation:
    """How a learned hyperparameter is stored: the coordinate the level above updates.

    Default mode: steps (``lr``, ``eps``, ``weight_decay``) as ``log(value)``, so a step size can never
    become negative, zero or infinite; rates (``momentum``, betas, ``alpha``) as ``logit(value)``, so
    they stay in ``(0, 1)``. ``gdtuo`` mode follows the reference implementation: raw steps (they can
    go negative), ``sqrt`` for RMSProp's step size, ``atanh(2y - 1)`` for Adam's betas and RMSProp's
    smoothing constant, raw SGD momentum.
    """
    kind = rule.hyperparameters[name].kind
    if mode == "default":
        return "log" if kind == "step" else "logit"
    if name in rule.gdtuo_raw:
        return "identity"
    if kind == "step":
        return "sqrt" if name == "lr" and rule.square_lr else "identity"
    return "tanh"


def to_raw(value: float, how: Parametrisation) -> float:
    """The learnable coordinate of a hyperparameter from its natural value."""
    if how == "log":
        return math.log(value)
    if how == "logit":
        return math.log(value) - math.log1p(-value)
    if how == "sqrt":
        return math.sqrt(value)
    if how == "tanh":
        return math.atanh(2.0 * value - 1.0)
    return value


def to_natural(raw: Tensor, how: Parametrisation) -> Tensor:
    """Inverse of :func:`to_raw`, differentiable, on tensors."""
    if how == "log":
        return raw.exp()
    if how == "logit":
        return raw.sigmoid()
    if how == "sqrt":
        return raw.square()
    if how == "tanh":
        return (raw.tanh() + 1.0) / 2.0
    return raw


def raw_bounds(kind: Kind) -> tuple[float, float]:
    return STEP_RAW_BOUNDS if kind == "step" else UNIT_RAW_BOUNDS


class Hyper:
    """The hyperparameters handed to a rule: ``hp["lr"]`` is a 1-D tensor, one value per tensor.

    ``hp.zero(name)`` is a Python-level fact (no device read): the hyperparameter is zero for every
    tensor and is not learned, so a rule may skip the work it would multiply (weight decay, momentum).
    """

    __slots__ = ("_chain", "_values", "_zero")

    def __init__(self, values: dict[str, Tensor], zero: frozenset[str], chain: dict[str, Tensor] | None = None):
        self._values = values
        self._zero = zero
        self._chain = chain or {}

    def __getitem__(self, name: str) -> Tensor:
        return self._values[name]

    def zero(self, name: str) -> bool:
        return name in self._zero

    def chain(self, name: str) -> Tensor:
        """d(value)/d(theta) per tensor for a learned ``name``: what a written tangent is multiplied by."""
        return self._chain[name]

    def unpack(self, learn: tuple[str, ...]) -> Hyper:
        """These values without their forward-mode tangents, the tangents of ``learn`` as :meth:`chain`.

        Call inside the dual level in which the values were built.
        """
        values, chain = {}, {}
        for name, v in self._values.items():
            values[name], tangent = fwAD.unpack_dual(v)
            if name in learn:
                chain[name] = tangent if tangent is not None else torch.zeros_like(values[name])
        return Hyper(values, self._zero, chain)


def scalars(x: Tensor) -> list[float] | list[Tensor]:
    """A per-tensor hyperparameter vector in the form ``_foreach_*`` ops take as per-tensor scalars.

    A constant on the CPU becomes Python floats (the fast ``ScalarList`` overloads, exactly the
    numbers ``torch.optim`` would use); anything else, in particular a hyperparameter that carries a
    forward-mode tangent, becomes 0-dim tensors (the ``TensorList`` overloads, through which
    forward-mode AD flows). Some single-``Tensor`` overloads silently drop tangents, so rules never
    pass a hyperparameter that way.
    """
    if x.device.type == "cpu" and fwAD.unpack_dual(x).tangent is None:
        return x.tolist()
    return list(x.unbind(0))


def one_pass(*lists: list[Tensor]) -> bool:
    """Whether ``out=`` ops tensor by tensor may stand in for a copy and an in-place ``_foreach`` op.

    On the CPU ``_foreach_*`` ops run tensor by tensor anyway, so an op that writes its result into
    another buffer costs no more calls and saves a pass over memory. On an accelerator the fused
    ``_foreach`` kernels are fewer launches, and forward-mode AD flows only through them.
    """
    return all(t[0].device.type == "cpu" and fwAD.unpack_dual(t[0]).tangent is None for t in lists)


def sqrt_into(dst: list[Tensor], src: list[Tensor], divides: bool = False) -> list[Tensor]:
    """``dst[i] = sqrt(src[i])``, guarded as :func:`sqrt_`."""
    if not one_pass(dst, src):
        copy_(dst, src)
        return sqrt_(dst, divides)
    for d, s in zip(dst, src, strict=True):
        if divides:
            torch.clamp_min(s, torch.finfo(s.dtype).tiny, out=d).sqrt_()
        else:
            torch.sqrt(s, out=d)
    return dst


def mul_into(dst: list[Tensor], src: list[Tensor], alpha: Tensor) -> None:
    """``dst[i] = src[i] * alpha[i]`` (``alpha`` a per-tensor vector without a tangent)."""
    a = scalars(alpha)
    if one_pass(dst, src) and a and isinstance(a[0], float):
        for d, s, x in zip(dst, src, a, strict=True):
            torch.mul(s, x, out=d)
    else:
        torch._foreach_copy_(dst, src)
        torch._foreach_mul_(dst, a)


def div_into(dst: list[Tensor], num: list[Tensor], den: list[Tensor]) -> None:
    """``dst[i] = num[i] / den[i]``; ``dst`` may be ``den``."""
    if one_pass(dst, num, den):
        for d, n, q in zip(dst, num, den, strict=True):
            torch.div(n, q, out=d)
    elif dst is den:
        torch._foreach_reciprocal_(dst)
        torch._foreach_mul_(dst, num)
    elif dst is num:
        torch._foreach_div_(dst, den)
    else:
        copy_(dst, num)
        torch._foreach_div_(dst, den)


def _floats(alpha: Tensor | None) -> list[float] | None:
    a = None if alpha is None else scalars(alpha)
    return a if a and isinstance(a[0], float) else None


def lincomb_into(dst: list[Tensor], x: list[Tensor], y: list[Tensor], alpha: Tensor) -> None:
    """``dst[i] = x[i] + alpha[i] * y[i]``; ``dst`` may be ``y``."""
    a = _floats(alpha)
    if a is not None and one_pass(dst, x, y):
        for d, s, t, v in zip(dst, x, y, a, strict=True):
            torch.add(s, t, alpha=v, out=d)
    elif dst is y:
        torch._foreach_mul_(dst, scalars(alpha))
        torch._foreach_add_(dst, x)
    else:
        torch._foreach_copy_(dst, x)
        add_scaled_(dst, y, alpha)


def addcmul_into(dst: list[Tensor], x: list[Tensor], t1: list[Tensor], t2: list[Tensor], value: Tensor) -> None:
    """``dst[i] = x[i] + value[i] * t1[i] * t2[i]``."""
    a = _floats(value)
    if a is not None and one_pass(dst, x, t1, t2):
        for d, s, u, w, v in zip(dst, x, t1, t2, a, strict=True):
            torch.addcmul(s, u, w, value=v, out=d)
    else:
        torch._foreach_copy_(dst, x)
        addcmul_(dst, t1, t2, value)


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def quotient_into(dst: list[Tensor], num: list[Tensor], den: list[Tensor], alpha: Tensor | None = None) -> None:
    """``dst[i] = alpha[i] * num[i] / den[i]`` (``alpha=None``: 1); ``dst`` may be ``num`` or ``den``."""
    a = _floats(alpha)
    if alpha is None or a is not None and one_pass(dst, num, den):
        if alpha is None:
            div_into(dst, num, den)
            return
        zero = _zero(dst[0])
        for d, n, q, v in zip(dst, num, den, a, strict=True):
            torch.addcdiv(zero, n, q, value=v, out=d)
    else:
        div_into(dst, num, den)
        torch._foreach_mul_(dst, scalars(alpha))


def product_into(dst: list[Tensor], t1: list[Tensor], t2: list[Tensor], alpha: Tensor) -> None:
    """``dst[i] = alpha[i] * t1[i] * t2[i]``; ``dst`` may be ``t1`` or ``t2``."""
    a = _floats(alpha)
    if a is not None and one_pass(dst, t1, t2):
        zero = _zero(dst[0])
        for d, u, w, v in zip(dst, t1, t2, a, strict=True):
            torch.addcmul(zero, u, w, value=v, out=d)
    else:
        if dst is t2:
            t1, t2 = t2, t1
        if dst is not t1:
            torch._foreach_copy_(dst, t1)
        torch._foreach_mul_(dst, t2)
        torch._foreach_mul_(dst, scalars(alpha))


def rooted_direction(
    direction: list[Tensor],
    second_moment: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    eps: Tensor,
    eps_in_sqrt: bool,
    tangents: dict[str, list[Tensor] | None],
    decay_share: float | Tensor = 1.0,
) -> None:
    """``direction = g / (sqrt(v) + eps)`` (or ``g / sqrt(v + eps)``), and the tangents that pass through it.

    The step of AdaGrad and RMSProp, which differ in how they keep ``v``. ``tangents`` holds the buffers
    of the learned names among ``eps``, ``weight_decay`` and ``v`` (the tangent of ``v`` with respect to
    a hyperparameter of its average, written by the rule before ``v`` moved, e.g. RMSProp's ``alpha``):
    each leaves here as d(direction)/d(value), up to a constant per tensor that the rule returns in its
    :class:`Tangent`: ``eps`` and ``v`` up to ``-1`` (``-1/2`` with ``eps_in_sqrt``, and ``-1/2`` for
    ``v``), ``weight_decay`` exactly, for a coupled weight decay whose share of ``v`` is ``decay_share``
    (``dv/d(wd) = 2 decay_share g w``).
    """
    t_v, t_eps, t_wd = tangents.get("v"), tangents.get("eps"), tangents.get("weight_decay")
    if eps_in_sqrt:
        copy_(direction, second_moment)
        torch._foreach_add_(direction, scalars(eps))
        torch._foreach_sqrt_(direction)
    else:
        sqrt_into(direction, second_moment, divides=t_v is not None or t_wd is not None)
    # The tangents take their factors (the root, 1 / denominator, the direction) as they pass.
    if t_v is not None:
        torch._foreach_div_(t_v, direction)
    if t_wd is not None:
        # d(direction)/d(weight_decay) = w / denom * (1 - decay_share g^2 / (denom root))
        div_into(t_wd, grads, direction)
        torch._foreach_mul_(t_wd, grads)
    if not eps_in_sqrt:
        torch._foreach_add_(direction, scalars(eps))
    if t_v is not None:
        torch._foreach_div_(t_v, direction)
    if t_eps is not None:  # -g / denom^2, and / (2 denom) more inside the root
        div_into(t_eps, grads, direction)
        torch._foreach_div_(t_eps, direction)
        if eps_in_sqrt:
            torch._foreach_div_(t_eps, direction)
    if t_wd is not None:
        torch._foreach_div_(t_wd, direction)
        torch._foreach_mul_(t_wd, scalars(-decay_share) if isinstance(decay_share, Tensor) else -decay_share)
        torch._foreach_add_(t_wd, 1.0)
        torch._foreach_div_(t_wd, direction)
        torch._foreach_mul_(t_wd, params)
    div_into(direction, grads, direction)
    if t_v is not None:
        torch._foreach_mul_(t_v, direction)


def scaled_root_into(dst: list[Tensor], src: list[Tensor], inv_square: Tensor) -> None:
    """``dst[i] = sqrt(src[i] * inv_square[i])``, raised off zero as :func:`sqrt_` does for a divisor.

    One pass fewer than the root and then the division (torch.optim's order, which an update keeps when
    nothing divides by the root); the two orders differ in the last bits.
    """
    a = _floats(inv_square)
    if a is not None and one_pass(dst, src):
        tiny = torch.tensor(torch.finfo(src[0].dtype).tiny, dtype=src[0].dtype)
        for d, s, v in zip(dst, src, a, strict=True):
            torch.add(tiny, s, alpha=v, out=d).sqrt_()
    else:
        sqrt_into(dst, src, divides=True)
        torch._foreach_mul_(dst, scalars(inv_square.sqrt()))


def history_held_power(beta: Tensor, step: int | Tensor) -> Tensor:
    """``beta ** step``, differentiated (forward mode) as ``beta * held ** (step - 1)`` with ``held``
    constant: the derivative of this step's factor alone, the moment's history held constant.

    The value is ``beta ** step`` exactly, as ``torch.optim`` computes a bias correction.
    """
    primal, tangent = fwAD.unpack_dual(beta)
    if tangent is None:
        return beta**step
    return fwAD.make_dual(primal**step, tangent * primal ** (step - 1))


def lr_tangent_factor(hp: Hyper, want: dict, divisor: Tensor | float = 1.0) -> Tensor | None:
    """``-hp.chain("lr") / divisor`` when ``lr`` is learned and that can be read for free (on the CPU).

    A learned step size's tangent is the direction times a constant per tensor (``-1 / divisor`` for
    a step ``-lr / divisor``, times the chain to theta). A rule that builds its direction already
    multiplied by this factor, in a pass it makes anyway, saves the engine a copy and a rescale; it
    then returns ``scale / factor`` and the lr's coefficient ``(-1 / divisor) / factor``.
    """
    if "lr" not in want:
        return None
    k = -hp.chain("lr") / divisor
    if k.device.type == "cpu" and all(math.isfinite(x) and x != 0.0 for x in k.tolist()):
        return k
    return None


def copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i] = src[i]``; forward-mode AD has no rule for ``_foreach_copy_``, so a source that
    carries a tangent is added onto zeros instead."""
    if src and fwAD.unpack_dual(src[0]).tangent is not None:
        torch._foreach_zero_(dst)
        torch._foreach_add_(dst, src)
    else:
        torch._foreach_copy_(dst, src)


def coupled_decay(grads: list[Tensor], params: list[Tensor], weight_decay: Tensor) -> list[Tensor]:
    """``grads + weight_decay * params`` as new tensors (an L2 penalty added to the gradient)."""
    out = torch._foreach_mul(params, scalars(weight_decay))
    torch._foreach_add_(out, grads)
    return out


def add_scaled_(dst: list[Tensor], src: list[Tensor], alpha: Tensor) -> None:
    """``dst += alpha * src`` with one ``alpha`` per tensor; without a temporary when they are host floats."""
    a = scalars(alpha)
    if a and isinstance(a[0], float):
        if all(x == a[0] for x in a):
            torch._foreach_add_(dst, src, alpha=a[0])
        else:
            for d, s, x in zip(dst, src, a, strict=True):
                d.add_(s, alpha=x)
    else:
        torch._foreach_add_(dst, torch._foreach_mul(src, a))


def addcmul_(self: list[Tensor], t1: list[Tensor], t2: list[Tensor], value: Tensor) -> None:
    """``self += value * t1 * t2`` with a per-tensor ``value`` that may carry a tangent."""
    v = scalars(value)
    if v and isinstance(v[0], float):
        torch._foreach_addcmul_(self, t1, t2, v)
    else:
        torch._foreach_addcmul_(self, t1, torch._foreach_mul(t2, v))


@dataclass
class Tangent:
    """The derivative of the new parameters with respect to one hyperparameter (its natural value).

    ``d(new params)/d(name) = buffer * own + direction * direction + params * params``: per-tensor
    vectors (``None``: no such term), where ``buffer`` is what the rule wrote into the name's tangent
    buffer, ``direction`` the returned :attr:`Step.direction` and ``params`` the parameters before the
    step. Leaving the last products to the engine lets it build them in place, in the order that needs
    no parameter-sized temporary, and chain them to the learned coordinate with the same multiplication.
    """

    own: Tensor | None = None
    direction: Tensor | None = None
    params: Tensor | None = None
    # The buffer already holds its term times d(value)/d(theta) (``Hyper.chain``): a rule that scales
    # the buffer by a constant anyway folds the chain into that pass and saves the engine one.
    chained: bool = False


@dataclass
class Step:
    """What a rule's update returns: the new parameters are ``params * decay + direction * scale``.

    ``direction`` is a list of tensors that the engine may scale in place (the rule's workspace or a
    temporary, never state or gradients); ``scale`` and ``decay`` are per-tensor vectors
    (``decay=None`` means 1). Keeping the last multiplication factored lets the engine apply it in
    place and write the tangent of this product straight into its buffers: from ``tangents`` (one
    :class:`Tangent` per learned name, when the rule writes them) or, under forward-mode AD, when AD
    reports that ``direction`` does not depend on the learned hyperparameters (a learned step size).
    """

    direction: list[Tensor]
    scale: Tensor
    decay: Tensor | None = None
    tangents: dict[str, Tangent] = field(default_factory=dict)


def sqrt_(tensors: list[Tensor], divides: bool = False) -> list[Tensor]:
    """In-place square root of non-negative tensors, with a zero (not NaN) tangent at exact zeros.

    An exact-zero second moment (an embedding row that no batch has used) has an exact-zero tangent
    too, and forward-mode AD of ``sqrt`` gives 0 / (2 sqrt(0)) = NaN there, which would poison the
    whole hypergradient sum. Raising the values to the dtype's smallest normal number first (the
    clamp's tangent is 0 where it binds) changes sqrt(0) to ~1e-19 in float32, far below any eps.
    ``divides``: a written tangent will divide by the root (the same guard, so 0 / root is 0).
    """
    if divides or fwAD.unpack_dual(tensors[0]).tangent is not None:  # else sqrt(0) = 0 is fine
        torch._foreach_clamp_min_(tensors, torch.finfo(tensors[0].dtype).tiny)
    torch._foreach_sqrt_(tensors)
    return tensors


class Rule:
    """An optimizer level's update rule. Subclasses set the class variables and :meth:`update`.

    Attributes:
        name: the name used in spec strings (``"adam"``).
        hyperparameters: every hyperparameter the rule reads, in a fixed order.
        learnable: those that may appear in ``learn=`` (flags never do).
        state_names: the per-tensor buffers the rule keeps, created by :meth:`init_state`.
        nonnegative_state: those that are sums of squares, never negative (checked when a state dict loads).
        workspace_names: per-tensor scratch buffers the engine keeps between steps (never saved), so
            that a step allocates no parameter-sized memory of its own.
        square_lr: ``gdtuo`` mode stores this level's step size as its square root (RMSProp).
        gdtuo_raw: ``gdtuo`` mode stores these rates raw (SGD's momentum).
        writes_tangents: :meth:`update` takes ``tangents`` and writes them; otherwise the engine
            obtains them by forward-mode AD through :meth:`update`.
    """

    name: ClassVar[str]
    hyperparameters: ClassVar[dict[str, HyperSpec]]
    state_names: ClassVar[tuple[str, ...]]
    nonnegative_state: ClassVar[tuple[str, ...]] = ()
    workspace_names: ClassVar[tuple[str, ...]] = ("direction",)
    square_lr: ClassVar[bool] = False
    # gdtuo mode: hyperparameters the reference stores raw even though they are rates.
    gdtuo_raw: ClassVar[tuple[str, ...]] = ()
    # What the reference implementation learns for this level (gdtuo mode).
    gdtuo_learn: ClassVar[tuple[str, ...]] = ("lr",)
    writes_tangents: ClassVar[bool] = False

    def __init__(self, mode: Mode = "default", **options: bool):
        self.mode = mode
        self.options = options

    @classmethod
    def learnable(cls) -> tuple[str, ...]:
        return tuple(n for n, s in cls.hyperparameters.items() if s.kind != "flag")

    @staticmethod
    def split_learn(learn: str) -> tuple[str, ...]:
        """The names of a ``learn=`` string, ``"lr+beta1"``; ``ValueError`` for an empty name between
        ``+`` signs (``"lr+"``). An empty string gives no names, which :meth:`check_learn` refuses."""
        names = tuple(s.strip() for s in learn.split("+"))
        if learn.strip() and not all(names):
            raise ValueError(f"learn={learn!r} has an empty name; give names joined by '+', e.g. learn=lr+beta1")
        return tuple(n for n in names if n)

    @classmethod
    def check_learn(cls, names: Iterable[str]) -> tuple[str, ...]:
        """``names`` as a tuple, if they are a valid ``learn=`` for this rule; else ``ValueError``.

        The one check of ``learn=`` names: spec strings, the optimizers' ``learn=`` argument and
        ``--hyper_learn`` all come through here, and prefix the message with where the names came from.
        """
        names = tuple(names)
        allowed = ", ".join(cls.learnable())
        if not names:
            raise ValueError(f"learn= is empty; name at least one of {allowed}, joined by '+'")
        for name in names:
            if name not in cls.learnable():
                raise ValueError(
                    f"learn={'+'.join(names)}: {name!r} is not a hyperparameter of {cls.name} that can be learned; "
                    f"allowed: {allowed}, joined by '+'"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"learn={'+'.join(names)} names a hyperparameter twice")
        return names

    def gdtuo_learned(self, values: dict[str, float]) -> tuple[str, ...]:
        return self.gdtuo_learn

    def held_tangents(self, learn: tuple[str, ...]) -> dict[str, str]:
        """The learned names whose tangent this rule keeps in its own state, mapped to that state's name.

        Such a tangent is a multiple of a state buffer, one constant per tensor, so the rule writes no
        tangent for it: its :class:`Tangent` gives the constant (``own``, or ``direction`` for the step
        size, whose direction is then that state buffer) and the engine keeps it beside the buffer,
        reading the hypergradient as ``<g, buffer> * constant``. The rule is told so by
        ``update(..., held=...)``. None by default; the engine holds none when a trace keeps the tangents.
        """
        return {}

    def init_state(self, p: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
        """Fresh per-tensor state for ``p`` (a local tensor) given the hyperparameters' initial values."""
        return {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in self.state_names}

    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, list[Tensor]],
        work: dict[str, list[Tensor]],
        hp: Hyper,
        step: int | Tensor,
        tangents: dict[str, list[Tensor]] | None = None,
        held: dict[str, str] | None = None,
    ) -> Step:
        """Take one step: update ``state`` in place and say how ``params`` change (never touch them).

        Args:
            params: the tensors to update (weights, or one vector of lower-level hyperparameters).
            grads: their gradients, read only.
            state: ``state_names`` mapped to lists of buffers aligned with ``params``.
            work: ``workspace_names`` mapped to scratch buffers aligned with ``params``; contents are
                undefined on entry. The returned direction may be one of them.
            hp: the hyperparameters, one value per tensor; may carry forward-mode tangents.
            step: the 1-based step count: an int, or at the weight level, whose tensors count only
                the steps in which they had a gradient (as ``torch.optim`` counts ``state[p]["step"]``)
                and may disagree, a 1-D tensor with one count per tensor, like the hyperparameters.
            tangents: only for a rule with ``writes_tangents``: the learned hyperparameters' names
                mapped to parameter-sized buffers aligned with ``params`` (contents undefined on
                entry). The rule returns a :class:`Tangent` for each name in :attr:`Step.tangents`
                and writes into the buffer of those with an ``own`` term, holding the state's history,
                the gradients and the parameters constant (the paper's one-step hypergradient).
                The step size only scales the direction, so ``lr`` never has an ``own`` term and the
                engine may build the direction in its buffer (``work["direction"]`` is then it).
                ``hp.chain(name)`` is then d(value)/d(theta) per tensor, which a rule may fold
                into its own passes (``Tangent.chained``; for ``lr``, a direction built as the
                lr's tangent, with ``scale`` and the lr's coefficient divided by that factor).
            held: only for a rule with :meth:`held_tangents`, passed when the engine holds them: those
                names' tangents are read from the state buffers named there, after the update. With
                ``lr`` held the returned ``direction`` is that state buffer (the engine does not scale
                it) and ``work`` has no ``"direction"``.
        """
        raise NotImplementedError
