"""What the hypergradient reduction costs under FSDP2: a table of optimizer-step times, 2 ranks.

Run (CPU, gloo; prints a markdown table and writes it to ``--out``)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/dist_workers/comm_cost.py --out comm_cost.md

An MLP (``--width`` wide, 4 layers) is sharded with ``fully_shard``; after one forward/backward the
gradients are kept and only ``opt.step()`` is timed, ``--repeats`` times after ``--warmup`` untimed
steps, for ``torch.optim.Adam`` (foreach), the tower ``adam(lr=1e-3)/adam(lr=1e-2)``, and the same
tower with its all-reduce removed (wrong results) or replaced by a barrier (no data moves: what is
left is waiting for the slower rank). The last row times the reduction alone: ``all_reduce`` of the
1-float hypergradient vector. Medians over the repeats, the maximum over ranks; the machine's load
shows in them, so compare rows of one run.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import hf_hyperopt as hh

hypergradients = importlib.import_module("hf_hyperopt.optim.hypergradients")


def model_and_grads(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(width, width) for _ in range(4)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())])
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    model(torch.randn(32, width)).square().mean().backward()
    return model


def time_steps(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    local = torch.tensor(statistics.median(times))
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return float(local) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()

    rows = []
    model = model_and_grads(args.width)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    rows.append(("torch.optim.Adam (foreach)", time_steps(opt.step, args.warmup, args.repeats)))

    model = model_and_grads(args.width)
    opt = hh.tower(model.parameters(), "adam(lr=1e-3)/adam(lr=1e-2)")
    rows.append(("tower adam/adam", time_steps(opt.step, args.warmup, args.repeats)))

    model = model_and_grads(args.width)
    opt = hh.tower(model.parameters(), "adam(lr=1e-3)/adam(lr=1e-2)")
    original = hypergradients.reduce_hypergradients
    hypergradients.reduce_hypergradients = lambda h, groups: None
    rows.append(("tower adam/adam, all-reduce removed", time_steps(opt.step, args.warmup, args.repeats)))
    # A barrier in its place: what is left of the cost when no data moves (waiting for the other rank).
    hypergradients.reduce_hypergradients = lambda h, groups: dist.barrier()
    rows.append(("tower adam/adam, all-reduce replaced by a barrier", time_steps(opt.step, args.warmup, args.repeats)))
    hypergradients.reduce_hypergradients = original

    h = torch.zeros(1)
    rows.append(("all_reduce of the 1-float hypergradient alone", time_steps(lambda: dist.all_reduce(h), 5, 200)))

    table = [
        f"FSDP2 on CPU (gloo), {world} ranks, MLP 4 x {args.width}x{args.width} ({n / 1e6:.2f} M parameters), "
        f"median of {args.repeats} optimizer steps, max over ranks",
        "",
        "| optimizer step | ms |",
        "|---|---|",
        *[f"| {name} | {ms:.3f} |" for name, ms in rows],
    ]
    if dist.get_rank() == 0:
        print("\n".join(table))
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(table) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
