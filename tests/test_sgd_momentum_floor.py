"""benchmarks/sgd_momentum_floor.py: its bare ops are torch.optim.SGD's update and the tower's dots; its smoke run works."""

from __future__ import annotations

import torch

from benchmarks import sgd_momentum_floor


def test_bare_ops_step_is_torch_sgd_with_the_dots_a_tower_takes():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(3)]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=True)
    buffers = [[torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]]
    history = [[torch.zeros_like(w) for w in weights]] * 2
    for _ in range(4):
        grads = [torch.randn_like(w) for w in weights]
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        h_lr, h_momentum = sgd_momentum_floor.bare_ops_step(weights, grads, buffers, 0.1, 0.9)
        for h, b in ((h_lr, history[-1]), (h_momentum, history[-2])):
            torch.testing.assert_close(h, torch.stack([(x * g).sum() for x, g in zip(b, grads, strict=True)]))
        history.append([opt.state[p]["momentum_buffer"].clone() for p in ref])
        for b, old in zip(buffers[1], history[-2], strict=True):
            torch.testing.assert_close(b, old)  # the buffer before the step is kept
    for w, b, p in zip(weights, buffers[0], ref, strict=True):
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
