"""A plain Accelerate training loop with a tower optimizer: no Trainer, nothing hidden.

The tower is an ordinary ``torch.optim.Optimizer``, so ``accelerator.prepare`` takes it like any other.
The prepared optimizer steps the tower but does not forward its other methods; ``hf_hyperopt.unwrap``
returns the tower inside, to read what it has learned::

    python examples/accelerate_loop.py
    accelerate launch examples/accelerate_loop.py --steps 200    # several processes: same code

(Several processes need a multi-process Accelerate config: GPUs, or on CPU ``accelerate launch --multi_gpu
--num_processes 2`` or ``torchrun --nproc_per_node 2``; ``accelerate launch --cpu`` runs one.)
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

import hf_hyperopt


def make_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    """A noisy linear-tanh regression problem: 8 inputs, 1 target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def main(steps: int = 100, lr: float = 1e-4, batch_size: int = 32, seed: int = 0) -> dict:
    """Train a small MLP for ``steps`` steps; return the final loss and the learned step size."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    # Adam on the weights; its step size is learned by the default level above (DEFAULT_HYPER).
    optimizer = hf_hyperopt.HyperAdam(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(make_data(), batch_size=batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tower = hf_hyperopt.unwrap(optimizer)  # the HyperAdam that `optimizer` steps
    # The default's trace spans one pass through the data: the optimizer steps of an epoch (of this
    # process's shard), or the whole run where that is shorter. The Trainer integration does this itself.
    tower.set_horizon(min(len(loader), steps))

    step, loss = 0, torch.tensor(float("nan"))
    while step < steps:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 25 == 0 or step == steps:
                accelerator.print(f"step {step:4d}  loss {loss.item():.4f}  lr {tower.hyperparameters()[0]['lr']:.3g}")
            if step == steps:
                break
    return {"loss": loss.item(), "lr": tower.hyperparameters()[0]["lr"], "initial_lr": lr}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4, help="the initial step size of the weight level")
    parser.add_argument("--batch_size", type=int, default=32)
    main(**vars(parser.parse_args()))
