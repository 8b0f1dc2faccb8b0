"""benchmarks/benchmark_optimizer.py in its --quick mode: the tables and files it writes (never its timings)."""

from __future__ import annotations

import csv

import pytest
import torch

import hf_hyperopt
from benchmarks import benchmark_optimizer


@pytest.fixture(autouse=True)
def _offline_restore_threads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_csv_and_markdown_with_expected_columns(tmp_path, capsys, monkeypatch):
    # The commit recorded is the one the code was loaded at, not one made while the benchmark ran.
    timed = []
    step_benchmark = benchmark_optimizer.optimizer_step_benchmark
    monkeypatch.setattr(
        benchmark_optimizer, "optimizer_step_benchmark", lambda *a: timed.append(1) or step_benchmark(*a)
    )
    monkeypatch.setattr(benchmark_optimizer, "git_commit", lambda root: "at-end" if timed else "at-start")
    out = benchmark_optimizer.main(["--quick", "--output-dir", str(tmp_path)])

    with (tmp_path / "benchmark_optimizer.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert set(benchmark_optimizer.OPT_COLUMNS) <= columns
    assert set(benchmark_optimizer.TRAIN_COLUMNS) <= columns

    opt_rows = [r for r in rows if r["benchmark"] == "optimizer_step"]
    train_rows = [r for r in rows if r["benchmark"] == "train_step"]
    assert [r["method"] for r in opt_rows] == list(benchmark_optimizer.OPT_METHODS)
    assert [r["method"] for r in train_rows] == list(benchmark_optimizer.TRAIN_METHODS)
    assert len(out["optimizer_step"]) == len(opt_rows) and len(out["train_step"]) == len(train_rows)
    # Every method ran (a failure would leave its timing empty and say "error" in the target column).
    for r in opt_rows + train_rows:
        assert float(r["wall_ms"]) > 0 and float(r["cpu_ms"]) >= 0, r
    assert float(next(r for r in opt_rows if r["method"] == "torch AdamW")["wall_vs_adamw"]) == 1.0
    assert {int(r["height"]) for r in opt_rows} == {0, 1, 2, 3, 4}

    md = (tmp_path / "benchmark_optimizer.md").read_text()
    assert "## Optimizer step" in md and "## Training step" in md
    header = "| " + " | ".join(c for c in benchmark_optimizer.OPT_COLUMNS if c != "benchmark") + " |"
    assert header in md
    assert "| " + " | ".join(c for c in benchmark_optimizer.TRAIN_COLUMNS if c != "benchmark") + " |" in md
    assert "at-start (" in md and "at-end" not in md
    # The table is printed too.
    assert header in capsys.readouterr().out


def test_state_bytes_are_exact_and_count_shared_storage_once():
    w = torch.nn.Parameter(torch.zeros(10, 10))
    w.grad = torch.ones(10, 10)
    adamw = torch.optim.AdamW([w], foreach=True)
    adamw.step()
    # exp_avg and exp_avg_sq (400 bytes each) and the float32 step count.
    assert benchmark_optimizer.state_bytes(adamw) == 2 * 400 + 4

    class Fake:
        def __init__(self):
            flat = torch.zeros(200)
            # two views of one 800-byte storage and an unrelated 40-byte tensor
            self.state = {0: {"a": flat[:100], "b": flat[100:]}, 1: {"c": torch.zeros(10)}}

    assert benchmark_optimizer.state_bytes(Fake()) == 800 + 40

    # A tower that learns lr holds AdamW's two moments plus at least one tangent buffer, never the
    # parameter or its gradient.
    tower = hf_hyperopt.tower([w], "adam(lr=0.001)/sgd(lr=1e-05)")
    tower.step()
    assert benchmark_optimizer.state_bytes(tower) >= 3 * 400


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--opt-reps=0"):
        benchmark_optimizer.main(["--opt-reps", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--warmup=0"):
        benchmark_optimizer.main(["--warmup", "0", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_peak_bytes_counts_temporaries_alive_together():
    x = torch.zeros(1000, 1000)  # 4 MB, allocated before the measurement: not counted

    def two_temporaries():
        y = x + 1  # 4 MB
        z = y * 2  # 4 MB more while y is alive
        del y
        return z.sum()

    peak = benchmark_optimizer.peak_bytes(two_temporaries)
    assert 8_000_000 <= peak < 9_000_000
