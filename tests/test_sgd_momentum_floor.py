"""benchmarks/sgd_momentum_floor.py: its bare ops are torch.optim.SGD's update, and its smoke run works."""

from __future__ import annotations

import torch

from benchmarks import sgd_momentum_floor


def test_bare_ops_step_is_torch_sgd_with_the_tangent_a_tower_keeps():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(3)]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=True)
    buf = [torch.zeros_like(w) for w in weights]
    t_momentum = [torch.zeros_like(w) for w in weights]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        old = [b.clone() for b in buf]
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        h_lr, _ = sgd_momentum_floor.bare_ops_step(weights, grads, buf, t_momentum, 0.1, 0.9)
        assert torch.allclose(h_lr, torch.stack([(b * g).sum() for b, g in zip(old, grads, strict=True)]), atol=1e-5)
        for t, b in zip(t_momentum, old, strict=True):
            torch.testing.assert_close(t, -0.1 * b)
    for w, b, p in zip(weights, buf, ref, strict=True):
        torch.testing.assert_close(w, p.detach())
        torch.testing.assert_close(b, opt.state[p]["momentum_buffer"])


def test_quick_run_times_all_three(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        ms = sgd_momentum_floor.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(ms) == {"torch", "tower", "floor"} and all(wall > 0 and cpu >= 0 for wall, cpu in ms.values())
