"""Train a tiny MLP with tower optimizers and write every level's trajectory, per rank, to JSON.

Launched by ``tests/test_distributed.py`` as one plain process (the reference) or under torchrun
with gloo on CPU; one launch runs several cases so that the process group is set up only once::

    python tests/dist_workers/tower_worker.py --cases cases.json --out ref
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_workers/tower_worker.py --cases cases.json --out dist

``cases.json`` is a list of cases, each a dict with ``name``, ``spec`` and optionally ``wrap``
(``ddp``, ``fsdp``: FSDP2 ``fully_shard`` on a 1-D mesh, ``hsdp``: ``fully_shard`` on a
``(1, world)`` mesh; ignored in a single process), ``scope``, ``steps`` (20), ``save_at`` + ``ckpt``
+ ``ckpt_format`` (``torch``: one ``torch.save`` file per rank of ``model.state_dict()`` and
``opt.state_dict()``; ``dcp``: ``torch.distributed.checkpoint`` of ``get_model_state_dict`` /
``get_optimizer_state_dict``, as Accelerate saves FSDP2 runs; ``full``: the same API with
``full_state_dict=True``, one file from rank 0, as Accelerate's ``FULL_STATE_DICT``), ``resume`` (a ``ckpt`` directory to
continue from), ``fixed_batch`` (the first batch at every step: gradients that stay aligned, so
that the ramp's search runs), ``record_search`` (record what the search judges at every step: the lr's
hypergradient and the two squared norms, which must be global sums), ``no_reduce`` (replace the hypergradient all-reduce by nothing: the control that
shows the comparison can fail) and the ``wrap`` ``fsdp_first_layer_only`` (a misconfiguration that the
optimizer must refuse; the ``ValueError`` is recorded as ``error``, and where it came as ``error_at``).

Every run draws the same global batches from one seed. Distributed, rank ``r`` trains on its
contiguous ``1/world`` of the global batch; DDP and FSDP2 both average gradients over the ranks, so
with a mean loss the gradient is the single-process gradient of the whole batch. Rank ``r`` writes
``<out>.rank<r>.json``: per case, for every step ``opt.hyperparameters()`` and a checksum of the
full weights, and the collectives issued inside ``opt.step()`` (counted with ``CommDebugMode``,
which sees both ``torch.distributed`` and functional/DTensor collectives).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

import hf_hyperopt as hh

hypergradients = importlib.import_module("hf_hyperopt.optim.hypergradients")

IN, HIDDEN, OUT = 8, 12, 3
GLOBAL_BATCH = 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randint(0, OUT, (GLOBAL_BATCH,), generator=g)


def wrap(model: nn.Module, how: str, world: int) -> nn.Module:
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if how == "fsdp_first_layer_only":
        # A misconfiguration: the other layers keep plain parameters that FSDP2 does not reduce.
        fully_shard(model[0], mesh=init_device_mesh("cpu", (world,)))
        return model
    if how == "hsdp":
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def save_checkpoint(path: str, fmt: str, model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    os.makedirs(path, exist_ok=True)
    if fmt == "torch":
        blob = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
        torch.save(blob, os.path.join(path, f"rank{rank}.pt"))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if fmt == "full":
        # Accelerate's FULL_STATE_DICT for FSDP2: full tensors gathered to CPU, rank 0 writes one file.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        blob = {
            "model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, opt, options=options),
            "step": step,
        }
        if rank == 0:
            torch.save(blob, os.path.join(path, "full.pt"))
        dist.barrier()
        return
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": step},
        checkpoint_id=path,
    )


def load_checkpoint(path: str, fmt: str, model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> int:
    if fmt == "torch":
        blob = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optim"])
        return blob["step"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if fmt == "full":
        # Every rank reads the full file and keeps its shard, as Accelerate does without rank0_only.
        blob = torch.load(os.path.join(path, "full.pt"), weights_only=True)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, blob["model"], options=options)
        set_optimizer_state_dict(model, opt, blob["optim"], options=options)
        return blob["step"]

    # DCP loads into templates taken from the fresh model and optimizer, as Accelerate does.
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": 0}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return int(sd["step"])


def run_case(case: dict, rank: int, world: int) -> dict:
    distributed = world > 1
    model = make_model()
    if distributed:
        model = wrap(model, case.get("wrap", "ddp"), world)
    try:
        opt = hh.tower(model.parameters(), case["spec"], scope=case.get("scope", "shared"))
    except ValueError as e:
        return {"error": f"ValueError: {e}", "error_at": "construction", "records": []}
    steps = case.get("steps", 20)
    start = (
        load_checkpoint(case["resume"], case.get("ckpt_format", "torch"), model, opt, rank) if "resume" in case else 0
    )
    if distributed:
        from torch.distributed.tensor.debug import CommDebugMode
    records, collectives = [], []
    error = error_at = None
    judged: list[list[float]] = []
    original_reduce, original_judge = hypergradients.reduce_hypergradients, hypergradients.asks_for_more
    try:
        if case.get("no_reduce"):
            hypergradients.reduce_hypergradients = lambda h, groups: None
        if case.get("record_search"):

            def recorded(h_lr, grads_sq, tangent_sq, cosine):
                judged.append([float(h_lr), float(grads_sq), float(tangent_sq)])
                return original_judge(h_lr, grads_sq, tangent_sq, cosine)

            hypergradients.asks_for_more = recorded
        for step in range(start, steps):
            x, y = batch(0 if case.get("fixed_batch") else step)
            if distributed:
                per = GLOBAL_BATCH // world
                x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            nn.functional.cross_entropy(model(x), y).backward()
            counter = CommDebugMode() if distributed else nullcontext()
            with counter:
                try:
                    opt.step()
                except ValueError as e:
                    error = f"ValueError: {e}"
                    error_at = f"step {step + 1}"
                    break
            collectives.append(counter.get_total_counts() if distributed else 0)
            opt.zero_grad()
            with torch.no_grad():
                full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
                checksum = float(sum(p.double().sum() for p in full))
            records.append({"step": step + 1, "hyper": opt.hyperparameters(), "checksum": checksum})
            if case.get("save_at") == step + 1:
                save_checkpoint(case["ckpt"], case.get("ckpt_format", "torch"), model, opt, rank, step + 1)
    finally:
        hypergradients.reduce_hypergradients, hypergradients.asks_for_more = original_reduce, original_judge
    # How the per-parameter state (Adam's moments, the tangent buffers) is held: local shard vs whole.
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "state_tensors": len(state),
        "state_dtensors": sum(hasattr(v, "to_local") for v in state),
        "state_local_numel": sum((v.to_local() if hasattr(v, "to_local") else v).numel() for v in state),
        "state_global_numel": sum(v.numel() for v in state),
        "error": error,
        "error_at": error_at,
        "records": records,
        "judged": judged,
        "collectives_per_step": collectives,
        "reduced_floats": int(opt._tower_state.theta[0].numel()) if opt.height and opt._tower_state else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON file: a list of cases")
    ap.add_argument("--out", required=True, help="prefix; rank r writes <out>.rank<r>.json")
    args = ap.parse_args()
    with open(args.cases) as f:
        cases = json.load(f)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    results = {case["name"]: run_case(case, rank, world) for case in cases}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "cases": results}, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
