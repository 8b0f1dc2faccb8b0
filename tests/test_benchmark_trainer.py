"""benchmarks/benchmark_trainer.py in its --quick mode: the table it writes, timings and peak memory."""

from __future__ import annotations

import csv
import math

import torch

from benchmarks import benchmark_trainer


def test_quick_run_times_both_trainers_and_measures_their_peak_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        benchmark_trainer.main(["--quick", "--out", str(tmp_path), "--memory_repeats", "1"])
    finally:
        torch.set_num_threads(threads)

    with (tmp_path / "benchmark_trainer.csv").open() as f:
        rows = {r["optim"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"adamw_torch", "hyper_adam"}
    for r in rows.values():
        assert float(r["median_ms"]) > 0
        # Training holds at least the weights and their gradients: a peak below that was not the training's.
        assert float(r["peak_rss_mb"]) > 2 * 86, r
        assert math.isfinite(float(r["rss_extra_buffers"]))
    assert float(rows["adamw_torch"]["rss_extra_buffers"]) == 0.0
    table = (tmp_path / "benchmark_trainer.md").read_text()
    assert "peak RSS MB" in table and "| hyper_adam | HyperTrainer |" in table
