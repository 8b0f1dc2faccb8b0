"""The epochs' push on the lr's hypergradient during training, read off the batches' positions in their epoch.

``benchmarks/epoch_bias.py`` measures the push on a frozen model; this measures it in a run of a tower on
the small GPT-2 (``--hyper``: by default the default tower of the shipped results, whose lr collapses).
At every step it reads the cosine of the next batch's gradient and the last update, ``cos(g_{t+1}, u_t)``
(the sign of the lr's one-step hypergradient: positive asks for a smaller lr), and the share of the last
update's first moment that comes from batches of the next batch's epoch, ``1 - beta1^p`` for a next batch
at position ``p`` of its epoch (at ``p = 0`` none: a new permutation is independent of the last). Within
each window of the run a least-squares line ``cos = a + b * share`` separates the push (``b``, at a whole
first moment from the epoch) from the signal (``a``). With batches drawn with replacement (``--sampling
iid``) the positions mean nothing, so ``b`` is a control.

    python -m benchmarks.epoch_pairs --steps 3000 --sampling epochs --out results
    python -m benchmarks.epoch_pairs --steps 3000 --sampling iid --out results

Writes ``<out>/epoch_pairs_<sampling>.md`` (a table) and ``.json``. The batch at the end of an epoch can
be short (the GPT-2 text's last holds one block): pairs with it, as the next batch or in the last update's
newest place, are left out.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import hf_hyperopt as hh

from . import tasks
from .provenance import git_commit
from .sensitivity import final_lr


@dataclass
class EpochPairsArguments:
    steps: int = field(default=3000, metadata={"help": "training steps"})
    lr: float = field(default=1e-3, metadata={"help": "the tower's initial lr"})
    # The default tower when results/epoch_pairs_*.json were made: the push is read where the lr collapses.
    hyper: str = field(
        default="adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.3)",
        metadata={"help": "the level(s) above Adam on the weights; 'default' for DEFAULT_HYPER"},
    )
    sampling: str = field(default="epochs", metadata={"help": "epochs or iid", "choices": list(tasks.SAMPLINGS)})
    windows: int = field(default=6, metadata={"help": "windows of the run, one line each"})
    seed: int = field(default=0, metadata={"help": "model and data-order seed"})
    out: str = field(default="results", metadata={"help": "output folder"})


def record(args: EpochPairsArguments) -> tuple[list[dict], int, float]:
    """One row a step from the second on (step, position of the next batch in its epoch, cosine, learned
    lr), the batches an epoch, and the weight level's beta1."""
    task = tasks.gpt2_task(args.steps)
    with tasks.drawn(args.sampling):
        stream = task.batches(args.seed)
    k = task.steps_per_epoch
    model = task.build_model(args.seed)
    model.train()
    params = list(model.parameters())
    opt = hh.HyperAdam(params, lr=args.lr, **({} if args.hyper == "default" else {"hyper": args.hyper}))
    opt.set_horizon(task.horizon)  # as the Trainer does, for a level with trace=auto (others ignore it)
    rows, update = [], None
    for t in range(args.steps):
        task.loss(model, next(stream)).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        if update is not None:
            cos = float(g @ update / (g.norm() * update.norm()).clamp_min(torch.finfo(g.dtype).tiny))
            rows.append({"step": t, "position": t % k, "cos": cos, "lr": final_lr(opt)})
        before_step = torch.cat([p.detach().reshape(-1) for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
        update = torch.cat([p.detach().reshape(-1) for p in params]) - before_step
    return rows, k, opt.param_groups[0]["betas"][0]


def fit(rows: list[dict], k: int, beta1: float, windows: int, steps: int) -> list[dict]:
    """Per window, the line ``cos = a + b * share`` by least squares, with the slope's standard error."""
    out = []
    width = steps // windows
    for lo in range(0, steps, width):
        sel = [r for r in rows if lo <= r["step"] < lo + width and r["position"] not in (0, k - 1)]
        if len(sel) < 3:
            continue
        x = torch.tensor([1 - beta1 ** r["position"] for r in sel], dtype=torch.float64)
        y = torch.tensor([r["cos"] for r in sel], dtype=torch.float64)
        design = torch.stack([torch.ones_like(x), x], 1)
        coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
        resid = y - design @ coef
        sigma2 = float(resid.square().sum()) / (len(sel) - 2)
        cov = sigma2 * torch.linalg.inv(design.T @ design)
        out.append(
            {
                "steps": f"{lo}-{min(lo + width, steps)}",
                "lr_at_end": sel[-1]["lr"],
                "signal_a": float(coef[0]),
                "push_b": float(coef[1]),
                "push_stderr": float(cov[1, 1].sqrt()),
                "pairs": len(sel),
            }
        )
    return out


def main(args: EpochPairsArguments) -> list[dict]:
    tasks.check_sampling(args.sampling)  # before the model is built
    if args.steps < 2 * args.windows or args.windows < 1:
        raise ValueError(f"--steps {args.steps} --windows {args.windows}: give at least 2 steps a window")
    commit = git_commit()
    torch.set_num_threads(1)
    rows, k, beta1 = record(args)
    lines = fit(rows, k, beta1, args.windows, args.steps)
    drawn = f"in epochs of {k}" if args.sampling == "epochs" else f"with replacement (positions of {k} a nominal epoch)"
    table = [
        f"Small GPT-2, the default tower from lr {args.lr:g}, batches drawn {drawn}, seed {args.seed}; "
        "per window, cos = a + b * share with share = 1 - beta1^position:",
        "",
        "| steps | learned lr at the window's end | a (signal) | b (push) | b's standard error | pairs |",
        "|---|---|---|---|---|---|",
        *(
            f"| {w['steps']} | {w['lr_at_end']:.2g} | {w['signal_a']:+.4f} | {w['push_b']:+.4f} | "
            f"{w['push_stderr']:.4f} | {w['pairs']} |"
            for w in lines
        ),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"epoch_pairs_{args.sampling}"
    stem.with_suffix(".md").write_text("\n".join(table) + "\n")
    meta = {"args": asdict(args), "command": " ".join(sys.argv), "commit": commit, "torch": torch.__version__}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "windows": lines, "rows": rows}))
    print("\n".join(table))
    return lines


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(EpochPairsArguments).parse_args_into_dataclasses()
    main(parsed)
