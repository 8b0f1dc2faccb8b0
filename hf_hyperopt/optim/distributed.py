"""What the tower needs to know about sharded parameters (FSDP2 ``DTensor``) and process groups.

A hypergradient is a sum over every parameter: ``h = sum_p <g_p, dw_p/dtheta>``. What a rank must
communicate to get the global ``h`` depends on what it holds:

* Single process and DDP: every rank holds every parameter and, after ``backward``, the gradient
  already averaged over the ranks, so each rank computes the global ``h`` by itself. The optimizer
  issues **no collective**; the ranks stay identical because they start identical and apply the same
  deterministic update to the same numbers.
* FSDP2 (``fully_shard``): a parameter is a ``DTensor`` sharded on dim 0 and a rank holds its shard
  of the weights, of the already reduce-scattered gradient, and of every state tensor (the tangents
  included). Each rank computes a *partial* ``h`` over its shards; one ``all_reduce`` (sum) of that
  vector over the sharding group makes it global. The vector holds every learned weight-level
  hyperparameter (one entry per unit and learned name: ``lr`` in the shared scope is 1 float), so the
  cost is one latency-bound collective of a few bytes per optimizer step. The levels above work on
  that replicated vector and need no communication.
* HSDP (a 2-D mesh, ``(Replicate(), Shard(0))``): gradients are already averaged over the replicate
  dimension, so the partial ``h`` is summed over the shard dimension only.

Anything else (parameters sharded on different meshes or placements, or a mix of sharded and plain
parameters) would count some contributions more than once; :func:`sharding_group` refuses it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

# The key under which ``TowerOptimizer.state_dict`` stores the tower's state, in its first param group:
# ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (used by FSDP2 checkpoints in
# Accelerate and the Trainer) keeps only ``state`` and ``param_groups`` (see :mod:`.state`).
TOWER_GROUP_KEY = "hyper_tower"


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The plain tensor a rank holds: the local shard of a ``DTensor``, else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def wrap_like(param: Tensor, local: Tensor) -> Tensor:
    """State for ``param``: a ``DTensor`` with the same sharding when ``param`` is one."""
    if not is_dtensor(param):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def standalone(value: Any) -> Any:
    """``value`` ready to be saved: a ``DTensor`` whose local tensor is a view gets its own storage.

    The tangents live in one flat buffer per bucket and the state holds views of it; ``torch.save``
    cannot pickle a ``DTensor`` around such a view, and a checkpoint writer would copy the whole
    buffer for each. Plain tensors are returned as they are (``torch.save`` stores a shared storage once).
    """
    if not is_dtensor(value):
        return value
    local = value._local_tensor
    if local.storage_offset() == 0 and local.untyped_storage().nbytes() == local.numel() * local.element_size():
        return value
    return DTensor.from_local(
        local.clone(), value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
    )


def _describe(p: Tensor) -> str:
    if not is_dtensor(p):
        return f"a plain tensor of shape {tuple(p.shape)}"
    return f"a DTensor on mesh {tuple(p.device_mesh.shape)} with placements {tuple(p.placements)}"


def sharding_group(params: list[Tensor]) -> tuple[Any, ...] | None:
    """The process groups over which the partial weight-level hypergradient must be summed.

    Returns ``None`` when no parameter is sharded (single process, DDP, replicated ``DTensor``), else
    one group per sharded mesh dimension (one group for FSDP2 and HSDP).

    Raises:
        ValueError: if the parameters are not all sharded the same way, so that no single reduction
            counts every contribution exactly once.
    """
    if DTensor is None:
        return None
    layouts = {}
    for p in params:
        if is_dtensor(p):
            dims = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
            layouts.setdefault((p.device_mesh, dims), p)
        else:
            layouts.setdefault((None, ()), p)
    sharded = [key for key in layouts if key[1]]
    if not sharded:
        return None
    if len(layouts) > 1:
        a, b = list(layouts.values())[:2]
        raise ValueError(
            "hf_hyperopt learns hyperparameters from a sum over all parameters, so the trainable parameters "
            f"must all be sharded the same way; found {_describe(a)} and {_describe(b)}. "
            "Shard every trainable parameter with fully_shard on the same mesh (wrap the root module too), "
            "or freeze the others (requires_grad=False)."
        )
    p = layouts[sharded[0]]
    return tuple(p.device_mesh.get_group(d) for d in sharded[0][1])


def reduce_hypergradients(h: Tensor, groups: tuple[Any, ...] | None) -> None:
    """Sum the weight-level hypergradient vector over the ranks that shard the parameters (in place).

    One ``all_reduce`` per sharded mesh dimension (one for FSDP2 and HSDP); nothing when ``groups`` is
    ``None`` (single process, DDP).
    """
    for group in groups or ():
        torch.distributed.all_reduce(h, group=group)
