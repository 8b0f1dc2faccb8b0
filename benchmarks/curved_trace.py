"""The exact tangent of AdamW's weights in log(lr), for the hypergradient measurements (issue 10, item 2).

The engine's trace (``trace=``) sums the updates and leaves out how a change of the weights changes the
next gradients; this one keeps it, at the cost of a Hessian-vector product a step, so that the
benchmarks can tell the cheap signal's bias from the exact hypergradient's. ``tests/test_evidence.py``
checks it against finite differences of whole runs.
"""

from __future__ import annotations

import torch


def flat(tensors) -> torch.Tensor:
    """The tensors, detached, as one vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def step_with(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads) -> torch.Tensor:
    """``opt``'s step with the gradients ``grads`` (taken by ``torch.autograd.grad``); the update it made."""
    for p, d in zip(params, grads, strict=True):
        p.grad = d.detach()
    before = flat(params)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return flat(params) - before


class CurvedTrace:
    """``dw_t / d log(lr)`` with the curvature term, decayed by ``mu`` a step, through AdamW's moments: the
    derivative of the weights when step k's log(lr) moves by ``mu^(t-1-k)`` (``mu = 1``: a constant lr since
    the start; ``mu < 1``: an lr held over the last ~1/(1 - mu) steps).

    The weights' tangent ``Z`` moves the next gradient by ``H Z`` (a Hessian-vector product), which moves the
    moments' tangents and so the update's: ``Z <- mu (Z - lr dU/dtheta) + (w_{t+1} - w_t)``, the moments'
    tangents decayed alike. The engine's trace, and ``greedy_signal``'s ``TRACES``, keep only the last term.
    """

    def __init__(self, mu: float, like: torch.Tensor):
        self.mu = mu
        self.z, self.zm, self.zv = (torch.zeros_like(like) for _ in range(3))

    def advance(self, hz: torch.Tensor, g: torch.Tensor, adam: dict, lr: float, update: torch.Tensor) -> None:
        """After AdamW's step: ``hz`` the Hessian times ``z`` at the step's weights, ``g`` the step's gradient,
        ``adam`` the moments after the step (``m``, ``v``, ``step``, ``betas``, ``eps``)."""
        (b1, b2), t = adam["betas"], adam["step"]
        self.zm = b1 * self.zm + (1 - b1) * hz
        self.zv = b2 * self.zv + (1 - b2) * 2 * g * hz
        m_hat, root = adam["m"] / (1 - b1**t), (adam["v"] / (1 - b2**t)).sqrt()
        denom = root + adam["eps"]
        dv = torch.where(root > 0, self.zv / (1 - b2**t) / (2 * root).clamp_min(torch.finfo(root.dtype).tiny), 0.0)
        du = self.zm / (1 - b1**t) / denom - m_hat * dv / denom**2
        self.z = self.mu * (self.z - lr * du) + update
        self.zm, self.zv = self.mu * self.zm, self.mu * self.zv

    def hessian_times_z(self, grads: tuple[torch.Tensor, ...], params: list[torch.Tensor]) -> torch.Tensor:
        """``H z`` at the weights the gradients ``grads`` (taken with ``create_graph=True``) were taken at."""
        z = [v.view_as(p) for v, p in zip(self.z.split([p.numel() for p in params]), params, strict=True)]
        return flat(torch.autograd.grad(grads, params, grad_outputs=z, retain_graph=True))

    def advance_adamw(
        self, opt: torch.optim.Optimizer, hz: torch.Tensor, g: torch.Tensor, update: torch.Tensor
    ) -> None:
        """:meth:`advance` after ``opt``'s step (AdamW over one param group, no weight decay), with its moments."""
        group = opt.param_groups[0]
        state = [opt.state[p] for p in group["params"]]
        adam = {"m": flat(s["exp_avg"] for s in state), "v": flat(s["exp_avg_sq"] for s in state),
                "step": float(state[0]["step"]), "betas": group["betas"], "eps": group["eps"]}  # fmt: skip
        self.advance(hz, g, adam, group["lr"], update)
