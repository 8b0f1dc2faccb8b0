"""What the tower needs to know about sharded parameters (FSDP2 ``DTensor``) and process groups.

Under DDP every rank holds the full, already all-reduced gradient, so the hypergradients a rank
computes are the global ones and no communication is needed. Under FSDP2 a parameter is a
``DTensor`` sharded on dim 0 and a rank sees only its shard of the gradient, so the weight-level
hypergradient (a sum over all parameters) is a partial sum: it is all-reduced once per step, as one
small vector holding every learned hyperparameter. The levels above work on that replicated vector
and need no communication.
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


def sharding_group(params: list[Tensor]) -> Any:
    """The process group over which parameters are sharded, or ``None`` if no parameter is sharded."""
    for p in params:
        if is_dtensor(p) and any(isinstance(pl, Shard) for pl in p.placements):
            return p.device_mesh.get_group()
    return None


def reduce_hypergradients(h: Tensor, group: Any) -> None:
    """Sum the weight-level hypergradient vector over the ranks that shard the parameters (in place)."""
    if group is not None:
        torch.distributed.all_reduce(h, group=group)
