"""Train a tiny MLP with a tower optimizer for a few steps and write every level's trajectory to JSON.

Launched by ``tests/test_distributed.py``, either as one plain process (the reference) or under
``torchrun --nproc_per_node 2`` with gloo on CPU::

    python tests/dist_workers/tower_worker.py --wrap none --spec "adam(lr=1e-3)/adam(lr=1e-2)" --out ref.json
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_workers/tower_worker.py \
        --wrap fsdp --spec "adam(lr=1e-3)/adam(lr=1e-2)" --out fsdp.json

Every run draws the same global batches from one seed. Under ``ddp`` and ``fsdp`` each rank trains on
its contiguous half of the global batch, and both wrappers average gradients over the ranks, so with
a mean loss the averaged gradient is the single-process gradient of the whole batch. Rank ``r``
writes ``<out>.rank<r>.json`` (the single process writes ``<out>.rank0.json``) holding, for every
step, ``opt.hyperparameters()`` and a checksum of the weights, and the number of collectives the
optimizer issued during its ``step`` calls.

``--save-at N --ckpt DIR`` writes a per-rank checkpoint after step ``N`` (the model's and the
optimizer's ``state_dict``, whose tensors are ``DTensor`` shards under FSDP2, in one file per rank);
``--resume DIR`` loads it into a freshly built model and optimizer and continues from step ``N``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import hf_hyperopt as hh

IN, HIDDEN, OUT = 8, 12, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, IN, generator=g)
    y = torch.randint(0, OUT, (size,), generator=g)
    return x, y


class CountCollectives:
    """Count the collectives issued while active, by wrapping the ``torch.distributed`` entry points."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        self._orig = {}
        for name in self.NAMES:
            fn = getattr(dist, name)
            self._orig[name] = fn

            def wrapped(*args, _fn=fn, **kwargs):
                if self.active:
                    self.count += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)

    def restore(self) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)


def save_checkpoint(path: str, fmt: str, model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    """``torch``: one ``torch.save`` file per rank. ``dcp``: ``torch.distributed.checkpoint`` of the
    ``get_model_state_dict`` / ``get_optimizer_state_dict`` views, as Accelerate saves FSDP2 runs."""
    os.makedirs(path, exist_ok=True)
    if fmt == "torch":
        blob = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
        torch.save(blob, os.path.join(path, f"rank{rank}.pt"))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": step}
    dcp.save(sd, checkpoint_id=path)


def load_checkpoint(path: str, fmt: str, model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> int:
    if fmt == "torch":
        blob = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optim"])
        return blob["step"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # The templates DCP loads into come from the fresh model and optimizer, as in Accelerate.
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": 0}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return int(sd["step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wrap", choices=("none", "ddp", "fsdp", "hsdp"), required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--scope", default="shared")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="global batch size")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--resume", default="")
    ap.add_argument("--ckpt-format", choices=("torch", "dcp"), default="torch")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    distributed = args.wrap != "none"
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    counter = CountCollectives() if distributed else None

    model = make_model()
    if args.wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif args.wrap in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # HSDP on a (1, world) mesh: parameters are (Replicate(), Shard(0)); the shard dim is reduced.
        mesh = init_device_mesh("cpu", (1, world) if args.wrap == "hsdp" else (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = hh.tower(model.parameters(), args.spec, scope=args.scope)

    start = 0
    if args.resume:
        start = load_checkpoint(args.resume, args.ckpt_format, model, opt, rank)

    records = []
    for step in range(start, args.steps):
        x, y = batch(step, args.batch)
        if distributed:
            per = args.batch // world
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if counter is not None:
            counter.active = True
        opt.step()
        if counter is not None:
            counter.active = False
        opt.zero_grad()
        with torch.no_grad():
            full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
            checksum = float(sum(p.double().sum() for p in full))
        records.append({"step": step + 1, "hyper": opt.hyperparameters(), "checksum": checksum})
        if args.save_at and step + 1 == args.save_at:
            save_checkpoint(args.ckpt, args.ckpt_format, model, opt, rank, step + 1)

    result = {
        "rank": rank,
        "world": world,
        "records": records,
        "optimizer_collectives": counter.count if counter is not None else 0,
        "optimizer_steps": args.steps - start,
    }
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if counter is not None:
        counter.restore()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
