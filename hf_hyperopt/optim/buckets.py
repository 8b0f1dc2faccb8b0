"""Where the weight level's tangents are stored: one flat buffer per (device, dtype) and learned name.

The tangent ``dw_{t+1}/dtheta_t`` of every weight tensor is kept between steps (one buffer the size
of the weights per learned hyperparameter). The tensors with a gradient are grouped in *buckets* of
one device and dtype; each bucket keeps, per learned name, one flat buffer and, in ``state[p]``, a
tensor per parameter that shares its storage (``hypertangent_<name>``), so that ``torch.optim``'s
state dict saves and loads them like any other state while a step reads them with one multi-tensor
op or one flat sum.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .distributed import local_tensor, wrap_like

if TYPE_CHECKING:
    from .engine import TowerOptimizer

TANGENT_PREFIX = "hypertangent_"
# A held tangent (``Rule.held_tangents``) is a state buffer times this per-tensor constant.
SCALE_PREFIX = "hyperscale_"

# (param, unit, group, position) for each parameter that has a gradient this step.
Entry = tuple[Tensor, int, int, int]


def _aliases(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Contiguous tensors shaped like ``like`` that share ``flat``'s storage, one after another.

    They are made with ``set_`` rather than as views: forward-mode AD then treats each as a tensor
    of its own, so a rule may build a direction that carries a tangent in them (a view of a base
    without a tangent cannot take one).
    """
    out, offset = [], flat.storage_offset()
    for t in like:
        out.append(flat.new_empty(0).set_(flat.untyped_storage(), offset, t.shape))
        offset += t.numel()
    return out


class Bucket:
    """The weight-level tensors of one (device, dtype), with index tensors and flat tangent storage.

    ``positions`` are the tensors' places in the optimizer's parameter list (every group's params,
    in order): where their step counts are kept.
    """

    def __init__(
        self, params: list[Tensor], units: list[int], groups: list[int], positions: list[int], learn: tuple[str, ...]
    ):
        self.params = params
        self.positions = positions
        self.local = [local_tensor(p) for p in params]
        device = self.local[0].device
        self.unit_index = torch.tensor(units, device=device)
        self.group_index = torch.tensor(groups, device=device)
        # Units are contiguous runs of tensors (params are kept in group order), so per-unit sums are
        # sums over slices of the flat buffer.
        self.unit_ids, counts = torch.unique_consecutive(torch.tensor(units), return_counts=True)
        numels = [t.numel() for t in self.local]
        self.unit_numels = [sum(c) for c in _runs(numels, counts.tolist())]
        self.learn = learn
        self.flat: dict[str, Tensor] = {}
        self.views: dict[str, list[Tensor]] = {}
        self.work: dict[str, list[Tensor]] = {}
        # Held tangents: ``views[name]`` are the rule's state buffers (``held[name]``), whose tangent is
        # each buffer times its entry of ``scales[name]``.
        self.held: dict[str, str] = {}
        self.scales: dict[str, Tensor] = {}

    def attach_tangents(self, state: dict, held: dict[str, str], scale_dtype: torch.dtype) -> None:
        """Move each parameter's tangent buffers into one flat buffer per learned name (views stay in state).

        A held name has no buffer: its views are the rule's state buffers, and its constants one vector
        (each parameter's ``hyperscale_<name>`` a view of it in state; 1 where none was saved).
        """
        self.held = held
        for name in held:
            key = SCALE_PREFIX + name
            saved = [float(state[p][key]) if key in state[p] else 1.0 for p in self.params]
            scales = torch.tensor(saved, dtype=scale_dtype, device=self.local[0].device)
            for p, v in zip(self.params, scales.unbind(), strict=True):
                state[p][key] = v
            self.scales[name] = scales
        self.refresh_held(state)
        total = sum(t.numel() for t in self.local)
        for name in (n for n in self.learn if n not in held):
            key = TANGENT_PREFIX + name
            flat = torch.empty(total, dtype=self.local[0].dtype, device=self.local[0].device)
            views = _aliases(flat, self.local)
            old = [
                local_tensor(state[p][key]) if key in state[p] else torch.zeros_like(t)
                for p, t in zip(self.params, self.local, strict=False)
            ]
            torch._foreach_copy_(views, old)
            for p, v in zip(self.params, views, strict=False):
                state[p][key] = wrap_like(p, v)
            self.flat[name], self.views[name] = flat, views

    def refresh_held(self, state: dict) -> None:
        """Point the held names' views at the rule's state buffers, which a step may have swapped."""
        for name, state_name in self.held.items():
            self.views[name] = [local_tensor(state[p][state_name]) for p in self.params]

    def unit_sums(self, flat: Tensor, dtype: torch.dtype) -> Tensor:
        """The sum of ``flat`` over each unit's slice, accumulated in ``dtype`` (no copy of ``flat``)."""
        return torch.stack([chunk.sum(dtype=dtype) for chunk in flat.split(self.unit_numels)])


def _runs(values: list[int], lengths: list[int]) -> list[list[int]]:
    out, i = [], 0
    for n in lengths:
        out.append(values[i : i + n])
        i += n
    return out


def collect(opt: TowerOptimizer) -> list[Entry]:
    """(param, unit, group, position) for every parameter that has a gradient this step."""
    out, offset = [], 0
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(opt).__name__} does not support sparse gradients (a parameter of shape "
                        f"{tuple(p.shape)} has one); use a dense layer, e.g. nn.Embedding(..., sparse=False)"
                    )
                unit = 0 if opt.scope == "shared" else gi if opt.scope == "group" else offset + pi
                out.append((p, unit, gi, offset + pi))
        offset += len(group["params"])
    return out


def zero_idle_tangents(opt: TowerOptimizer, entries: list[Entry]) -> None:
    """Clear the tangents of parameters that have no gradient this step.

    Such a parameter does not move, so its tangent dw_{t+1}/dtheta_t is zero; the one it kept from
    its last step would otherwise be dotted with its next gradient. Only called when the set of
    parameters with gradients changes, so the usual step pays nothing.
    """
    active = {id(e[0]) for e in entries}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in active and p in opt.state:
                for key, buf in opt.state[p].items():
                    # A held tangent's buffer is the rule's state: its constant is zeroed instead.
                    if key.startswith((TANGENT_PREFIX, SCALE_PREFIX)):
                        buf.zero_()


def build_buckets(opt: TowerOptimizer, entries: list[Entry]) -> list[Bucket]:
    """Buckets for ``entries``, creating the weight level's state of tensors that have none yet."""
    by_key: dict[tuple, list[Entry]] = defaultdict(list)
    for e in entries:
        t = local_tensor(e[0])
        by_key[(t.device, t.dtype)].append(e)
    rule0 = opt._rules[0]
    learn0 = opt._learn[0] if opt.height else ()
    buckets = []
    for items in by_key.values():
        params, units, groups, positions = (list(column) for column in zip(*items, strict=True))
        b = Bucket(params, units, groups, positions, learn0)
        for p, t in zip(b.params, b.local, strict=False):
            st = opt.state[p]
            if not any(n in st for n in rule0.state_names):
                for name, buf in rule0.init_state(t, opt._param_values(p)).items():
                    st[name] = wrap_like(p, buf)
        # A bucket steps in one multi-tensor call, so its tensors hold the same buffers: one whose group needs
        # none (SGD at momentum 0 beside a group with momentum) gets them as zeros, and steps as torch's would.
        kept = {n for p in b.params for n in opt.state[p] if n in rule0.state_names}
        for p, t in zip(b.params, b.local, strict=True):
            for name in kept.difference(opt.state[p]):
                opt.state[p][name] = wrap_like(p, torch.zeros_like(t, memory_format=torch.preserve_format))
        b.attach_tangents(opt.state, opt._held, opt._hyper_dtype(b.local[0].dtype))
        if not learn0 or rule0.writes_tangents:
            # A learned lr's tangent buffer is the direction's workspace (a rule run by forward AD
            # works in the tangent buffers of each learned name instead: tangents.forward_ad); a rule
            # that holds the lr's tangent has its direction in its state and needs none.
            kept = ("direction",) if "lr" in learn0 else ()
            b.work = {n: [torch.empty_like(t) for t in b.local] for n in rule0.workspace_names if n not in kept}
        buckets.append(b)
    return buckets


def hold_saved_tangents(opt: TowerOptimizer) -> None:
    """Keep, as held tangents, the written tangents of held names that a loaded state dict carries.

    A state dict saved with every tangent written (hf_hyperopt 0.1.0 did) has a buffer for each held
    name. One whose holding buffer is there (the step size's, held by the momentum buffer, of which it
    is a multiple) keeps only the multiple, ``<t, b> / <b, b>``; one whose holding buffer is not (the
    momentum's, whose previous buffer exists only while tangents are held) becomes it, times 1.
    """
    for state in opt.state.values():
        for name, state_name in opt._held.items():
            tangent = state.pop(TANGENT_PREFIX + name, None)
            if tangent is None:
                continue
            if state_name in state:
                t, buf = local_tensor(tangent).double(), local_tensor(state[state_name]).double()
                norm = buf.square().sum()
                scale = torch.where(norm > 0, (t * buf).sum() / norm, torch.zeros_like(norm))
            else:  # a copy: the loaded tensor may be shared with the state dict
                state[state_name] = tangent.clone()
                scale = torch.ones((), dtype=torch.float64)
            state[SCALE_PREFIX + name] = scale.to(opt._hyper_dtype(tangent.dtype))
