"""The exact tangent of AdamW's weights in log(lr), for the hypergradient measurements (issue 10, item 2).

The engine's trace (``trace=``) sums the updates and leaves out how a change of the weights changes the
next gradients; this one keeps it, at the cost of a Hessian-vector product a step, so that the
benchmarks can tell the cheap signal's bias from the exact hypergradient's. ``tests/test_evidence.py``
checks it against finite differences of whole runs.
"""

from __future__ import annotations

import torch


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
