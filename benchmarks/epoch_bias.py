"""How much batches drawn in epochs bias the lr's one-step hypergradient (``hf_hyperopt/optim/epochs.py``).

A small GPT-2 (``benchmarks.tasks.gpt2_task``) is trained with Adam for ``--warm_steps``, then frozen: the
weights no longer move, while Adam's moments keep running over the batches as they would. At each step
the script reads ``<g_{t+1}, P m_t>`` (the lr's hypergradient up to the factor ``-lr``: the next batch's
gradient against the preconditioned first moment the last update used) and ``<g_{t+1}, P g_{t+1}>``, over
``--epochs`` epochs of batches drawn in epochs and as many drawn with replacement. With the weights frozen
the mean gradient is the same for both, so the two means of ``<g', P m>`` differ by the epochs' term
alone: two batches of one epoch have noise covariance ``-Sigma / (K - 1)`` (``K`` batches an epoch, their
noises sum to zero), batches of different epochs none. Its model estimate is ``-<g', P g'> / (K - 1)``
(``<g', P g'>`` is ``tr(P Sigma)`` when the mean gradient is small beside the noise) times the share of
the first moment's weight that falls in the current epoch (``1 - beta1^p`` at position ``p``, averaged
over an epoch's positions).

    python -m benchmarks.epoch_bias --out results

Writes ``<out>/epoch_bias.md`` (a table) and ``<out>/epoch_bias.json``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import tasks
from .provenance import git_commit


@dataclass
class EpochBiasArguments:
    warm_steps: int = field(default=600, metadata={"help": "Adam steps before the weights are frozen"})
    lr: float = field(default=1e-3, metadata={"help": "Adam's lr for the warm steps"})
    epochs: int = field(default=4, metadata={"help": "epochs of batches read per sampling, after a burn-in"})
    burn_in: int = field(default=20, metadata={"help": "steps of each sampling not counted (the moments restart)"})
    seed: int = field(default=0, metadata={"help": "model, data order and sampling seed"})
    out: str = field(default="results", metadata={"help": "output folder"})


def measure(args: EpochBiasArguments) -> dict:
    torch.manual_seed(args.seed)
    task = tasks.gpt2_task(args.warm_steps)
    if task.steps_per_epoch < 2:  # one batch an epoch: nothing to be anti-correlated with
        raise ValueError(f"the task's training set is one batch (steps_per_epoch={task.steps_per_epoch})")
    model = task.build_model(args.seed)
    model.train()
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=args.lr)
    batches = task.batches(args.seed)
    for _ in range(args.warm_steps):
        task.loss(model, next(batches)).backward()
        adam.step()
        adam.zero_grad()
    rows = [_read(task, model, params, adam, args, sampling) for sampling in tasks.SAMPLINGS]
    by = {r["sampling"]: r for r in rows}
    k, beta1 = task.steps_per_epoch, adam.defaults["betas"][0]
    share = sum(1 - beta1**p for p in range(k)) / k
    return {
        "steps_per_epoch": k,
        "rows": rows,
        "measured_epoch_term": by["epochs"]["mean_g_P_m"] - by["iid"]["mean_g_P_m"],
        "measured_stderr": math.hypot(by["epochs"]["stderr_g_P_m"], by["iid"]["stderr_g_P_m"]),
        "estimated_epoch_term": -by["epochs"]["mean_g_P_g"] / (k - 1) * share,
        "in_epoch_share": share,
    }


def _read(task, model, params, adam, args: EpochBiasArguments, sampling: str) -> dict:
    """The two means over ``args.epochs`` epochs of batches drawn by ``sampling``, the weights frozen."""
    beta1, beta2 = adam.defaults["betas"]
    eps = adam.defaults["eps"]

    def gradient(batch) -> list[torch.Tensor]:
        model.zero_grad()
        task.loss(model, batch).backward()
        return [p.grad.detach().clone() for p in params]

    with tasks.drawn(sampling):
        stream = task.batches(args.seed + 1)
    m = [torch.zeros_like(p) for p in params]
    v = [adam.state[p]["exp_avg_sq"].clone() for p in params]
    g = gradient(next(stream))
    k = task.steps_per_epoch
    pm, pg, n = [0.0] * args.epochs, 0.0, 0  # <g', P m> summed by epoch: its spread is the epochs' means'
    for t in range(1, args.burn_in + args.epochs * k + 1):
        for mi, vi, gi in zip(m, v, g, strict=True):
            mi.lerp_(gi, 1 - beta1)
            vi.mul_(beta2).addcmul_(gi, gi, value=1 - beta2)
        bc1, bc2 = 1 - beta1**t, 1 - beta2 ** (args.warm_steps + t)
        precond = [1 / ((vi / bc2).sqrt() + eps) for vi in v]
        g = gradient(next(stream))
        if t > args.burn_in:
            e = (t - args.burn_in - 1) // k
            pm[e] += sum(float((gi * pi * mi).sum()) for gi, pi, mi in zip(g, precond, m, strict=True)) / bc1
            pg += sum(float((gi * pi * gi).sum()) for gi, pi in zip(g, precond, strict=True))
            n += 1
    means = torch.tensor(pm, dtype=torch.float64) / k
    # Successive <g', P m> share the first moment, so the spread of whole epochs' means, not of steps.
    stderr = float(means.std() / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return {"sampling": sampling, "mean_g_P_m": sum(pm) / n, "stderr_g_P_m": stderr, "mean_g_P_g": pg / n, "steps": n}


def main(args: EpochBiasArguments) -> dict:
    for name, low in (("warm_steps", 0), ("epochs", 1), ("burn_in", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} {getattr(args, name)}: give at least {low}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: give a positive step size")
    commit = git_commit()
    torch.set_num_threads(1)
    result = measure(args)
    lines = [
        f"Small GPT-2 after {args.warm_steps} Adam steps at lr {args.lr:g}, then frozen; {args.epochs} epochs of "
        f"{result['steps_per_epoch']} batches per sampling (seed {args.seed}).",
        "",
        "| sampling | mean <g', P m> (standard error, from the epochs' means) | mean <g', P g'> |",
        "|---|---|---|",
        *(
            f"| {r['sampling']} | {r['mean_g_P_m']:.4g} ({r['stderr_g_P_m']:.2g}) | {r['mean_g_P_g']:.4g} |"
            for r in result["rows"]
        ),
        "",
        f"Epochs less i.i.d. (the epochs' term, measured): {result['measured_epoch_term']:.4g} "
        f"(standard error {result['measured_stderr']:.2g}); its model estimate, "
        f"-<g', P g'> / (K - 1) times the first moment's share in the epoch ({result['in_epoch_share']:.3f}): "
        f"{result['estimated_epoch_term']:.4g}.",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "epoch_bias.md").write_text("\n".join(lines) + "\n")
    meta = {"args": asdict(args), "command": " ".join(sys.argv), "commit": commit, "torch": torch.__version__}
    (out / "epoch_bias.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(EpochBiasArguments).parse_args_into_dataclasses()
    main(parsed)
