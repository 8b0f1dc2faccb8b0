"""The evidence scripts (benchmarks/sensitivity.py, benchmarks/paper_table.py) in their --quick mode, offline."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import paper_table, sensitivity, tasks
from benchmarks.tasks import DATA, digits_task, unread_tragedies


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sensitivity_quick_writes_runs_summary_and_plot(tmp_path):
    methods = ["adamw", "prodigy", "gdtuo_adam_sgd", "hyper_adam"]
    args = sensitivity.SensitivityArguments(task="digits", methods=methods, quick=True, out=str(tmp_path))
    sensitivity.main(args)

    runs = _read_csv(tmp_path / "sensitivity_digits.csv")
    for col in ("method", "lr", "seed", "metric", "diverged", "final_lr", "train_loss_last"):
        assert col in runs[0]
    # two sweep points per method in quick mode, one seed
    assert sorted({r["method"] for r in runs}) == sorted(methods)
    assert len(runs) == 2 * len(methods)
    assert {float(r["lr"]) for r in runs if r["method"] == "prodigy"} == {0.1, 1.0}
    assert all(0.0 <= float(r["metric"]) <= 100.0 for r in runs)

    summary = _read_csv(tmp_path / "sensitivity_digits_summary.csv")
    assert {s["method"] for s in summary} == set(methods)
    for col in ("best", "worst", "width_decades", "within_adamw_best", "diverged_runs"):
        assert col in summary[0]
    assert all(float(s["worst"]) <= float(s["best"]) for s in summary)

    data = json.loads((tmp_path / "sensitivity_digits.json").read_text())
    assert data["meta"]["higher_is_better"] is True
    assert len(data["runs"]) == len(runs)
    # where each learned lr went, in the JSON only (the reference's loop records none)
    assert "lr_trajectory" not in runs[0]
    for r in data["runs"]:
        if r["method"] == "gdtuo_adam_sgd":
            assert "lr_trajectory" not in r
            continue
        steps = [s for s, _ in r["lr_trajectory"]]
        assert steps == sorted(steps) and len(steps) >= 2 and r["lr_trajectory"][-1][1] == r["final_lr"]
    tower = [r for r in data["runs"] if r["method"] == "hyper_adam"]
    assert any(len({lr for _, lr in r["lr_trajectory"]}) > 1 for r in tower)
    assert (tmp_path / "sensitivity_digits.md").read_text().startswith("| method |")
    png = (tmp_path / "sensitivity_digits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_merge_writes_one_sweep_and_refuses_overlaps(tmp_path):
    for method in ("adamw", "hyper_adam"):
        args = sensitivity.SensitivityArguments(
            task="digits", methods=[method], quick=True, out=str(tmp_path / method), tag=method
        )
        sensitivity.main(args)
    parts = [tmp_path / m / f"sensitivity_digits_{m}.json" for m in ("adamw", "hyper_adam")]
    rows = sensitivity.merge(parts, tmp_path / "merged", "both")
    assert sorted({r["method"] for r in rows}) == ["adamw", "hyper_adam"]
    data = json.loads((tmp_path / "merged" / "sensitivity_digits_both.json").read_text())
    assert len(data["runs"]) == 4 and [m["file"] for m in data["meta"]["merged_from"]] == [str(p) for p in parts]
    # the tower's row is now measured against AdamW's best, which neither part could do alone
    tower = next(s for s in data["summary"] if s["method"] == "hyper_adam")
    assert tower["worst_vs_adamw_best_pct"] is not None
    assert (tmp_path / "merged" / "sensitivity_digits_both.png").is_file()

    with pytest.raises(ValueError, match="is in both"):
        sensitivity.merge([parts[0], parts[0]], tmp_path / "again", "")
    with pytest.raises(FileNotFoundError, match="no-such.json"):
        sensitivity.merge([parts[0], tmp_path / "no-such.json"], tmp_path / "again", "")

    # A superseded method's runs are dropped; a renamed one takes the registered name and label.
    rows = sensitivity.merge(parts, tmp_path / "m2", "", drop=["adamw"], rename=["hyper_adam=hyper_adam-ramp"])
    assert {(r["method"], r["family"]) for r in rows} == {
        ("hyper_adam-ramp", "tower h1: adam/adam(lr=0.05,normalize=true)")
    }
    # names that hold '=' themselves: NEW is the registered name after one of the '='
    rows = sensitivity.merge(
        parts, tmp_path / "m4", "", drop=["adamw"], rename=["hyper_adam=hyper_adam(ramp_search=0)"]
    )
    assert {r["method"] for r in rows} == {"hyper_adam(ramp_search=0)"}
    # a former default renamed after its spec: the tower's name and label
    old_default = "tower:adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.3,timescale=100)"
    rows = sensitivity.merge(parts, tmp_path / "m5", "", drop=["adamw"], rename=[f"hyper_adam={old_default}"])
    assert {(r["method"], r["family"]) for r in rows} == {
        (old_default, "tower h1: adam/adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.3,timescale=100)")
    }
    with pytest.raises(ValueError, match="is Adam on the weights"):  # AdamW's runs are not a tower's
        sensitivity.merge(parts, tmp_path / "m6", "", drop=["hyper_adam"], rename=[f"adamw={old_default}"])
    with pytest.raises(ValueError, match="--rename 'hyper_adam=nope'"):
        sensitivity.merge(parts, tmp_path / "m3", "", rename=["hyper_adam=nope"])


def test_sensitivity_tower_learns_its_step_size():
    """On the quick digits task the default tower moves lr away from its initial value; AdamW does not."""
    task = digits_task(epochs=4)
    reg = sensitivity.methods_registry()
    tower = sensitivity.run_one(task, reg["hyper_adam"], 1e-4, seed=0)
    plain = sensitivity.run_one(task, reg["adamw"], 1e-4, seed=0)
    assert tower["final_lr"] > 1.05e-4
    assert plain["final_lr"] == pytest.approx(1e-4)


def test_summary_width_counts_decades_within_one_percent():
    rows = []
    for lr, acc in [(1e-4, 50.0), (1e-3, 97.5), (1e-2, 98.0), (1e-1, 97.2)]:
        rows.append(
            {"method": "m", "family": "m", "scale": "lr", "lr": lr, "seed": 0, "metric": acc, "diverged": False}
        )
    for lr, acc in [(1e-4, 90.0), (1e-3, 96.0), (1e-2, 98.0), (1e-1, 10.0)]:
        rows.append(
            {
                "method": "adamw",
                "family": "a",
                "scale": "lr",
                "lr": lr,
                "seed": 0,
                "metric": acc,
                "diverged": lr == 1e-1,
            }
        )
    s = {r["method"]: r for r in sensitivity.summarise(rows, higher=True)}
    assert s["m"]["best"] == 98.0 and s["m"]["worst"] == 50.0
    assert s["m"]["width_decades"] == pytest.approx(2.0)  # 1e-3 .. 1e-1 are within 0.98 of the best
    assert s["m"]["within_adamw_best"] == 3
    assert s["adamw"]["width_decades"] == pytest.approx(0.0)
    assert s["adamw"]["diverged_runs"] == 1


def test_summary_counts_against_the_better_of_constant_and_linear_decay_adamw():
    # Tuned AdamW is the best point of either schedule: here linear decay's 0.40 beats the constant 0.50.
    def row(method, lr, metric):
        return {
            "method": method,
            "family": method,
            "scale": "lr",
            "lr": lr,
            "seed": 0,
            "metric": metric,
            "diverged": False,
        }

    rows = [row("adamw", 1e-3, 0.50), row("adamw", 1e-2, 0.70), row("adamw_linear", 1e-3, 0.40), row("m", 1e-3, 0.44)]
    s = {r["method"]: r for r in sensitivity.summarise(rows, higher=False)}
    assert s["m"]["worst_vs_adamw_best_pct"] == pytest.approx(-10.0)
    assert s["adamw"]["within_adamw_best"] == 0 and s["adamw_linear"]["within_adamw_best"] == 1
    # Higher is better, and only the linear schedule ran: it alone is the baseline.
    rows = [row("adamw_linear", 1e-3, 90.0), row("adamw_linear", 1e-2, 80.0), row("m", 1e-3, 81.0)]
    s = {r["method"]: r for r in sensitivity.summarise(rows, higher=True)}
    assert s["m"]["worst_vs_adamw_best_pct"] == pytest.approx(-10.0)


def test_sensitivity_runs_any_tower_spec_given_as_tower_colon_spec():
    (method,) = sensitivity.resolve_methods(["tower:adam(lr=0.02,ramp=0.001,trace=0.9)"])
    assert method.family == "tower h1: adam/adam(lr=0.02,ramp=0.001,trace=0.9)"
    model = torch.nn.Linear(3, 1)
    opt, scheduler = method.build(model.parameters(), 1e-3, 10)
    assert scheduler is None and opt.spec == "adam(lr=0.001,learn=lr)/adam(lr=0.02,trace=0.9,ramp=0.001)"
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        sensitivity.resolve_methods(["tower:adam(lr=0.02,bogus=1)"])
    # Levels that parse but do not fit together are refused before any task is built, too.
    with pytest.raises(ValueError, match="learn="):
        sensitivity.resolve_methods(["tower:adam(learn=beta1)"])


def test_sensitivity_tower_plus_linear_prefix_multiplies_the_learned_lr_by_a_linear_decay():
    (method,) = sensitivity.resolve_methods(["tower+linear:adagrad(lr=0.3,ramp=0.001)"])
    assert method.family == "tower h1: adam/adagrad(lr=0.3,ramp=0.001), linear decay"
    model = torch.nn.Linear(3, 1)
    opt, scheduler = method.build(model.parameters(), 1e-3, 10)
    assert opt.spec == "adam(lr=0.001,learn=lr)/adagrad(lr=0.3,ramp=0.001)"
    for _ in range(5):
        opt.step()  # no gradients: nothing moves, the schedule still advances
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)


def _top_steps(rule, values: dict[str, float], hypergradient: float, n: int) -> list[float]:
    """The steps a top rule takes on ``n`` constant hypergradients (what it adds to the learned coordinate)."""
    from hf_hyperopt.levels.base import Hyper

    theta = torch.zeros(1)
    state = {k: [v] for k, v in rule.init_state(theta, values).items()}
    hp = Hyper({k: torch.tensor([v]) for k, v in values.items()}, frozenset())
    steps = []
    for t in range(1, n + 1):
        out = rule.update([theta], [torch.tensor([hypergradient])], state, {}, hp, t)
        steps.append(float(out.direction[0][0] * out.scale[0]))
    return steps


def test_experimental_tops_that_slow_down_take_the_steps_their_docstrings_give():
    """``benchmarks/top_levels.py``: on a hypergradient of constant sign and size, ``adamsqrt`` steps
    ``lr min(1, sqrt(t0 / t))`` against it and ``adagradm`` ``lr (1 - beta1^t) / sqrt(t)``."""
    from benchmarks.top_levels import AdaGradMomentumRule, AdamSqrtRule

    values = {"lr": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "t0": 4.0}
    steps = _top_steps(AdamSqrtRule(), values, 2.0, 16)
    assert steps == pytest.approx([-0.05 * min(1.0, math.sqrt(4.0 / t)) for t in range(1, 17)], rel=1e-5)
    steps = _top_steps(AdaGradMomentumRule(), {"lr": 0.3, "beta1": 0.9}, -2.0, 16)
    assert steps == pytest.approx([0.3 * (1 - 0.9**t) / math.sqrt(t) for t in range(1, 17)], rel=1e-5)


def test_the_library_timescale_option_is_the_adamsqrt_top_the_sweeps_measured():
    """``adam(...,timescale=T)`` on the top steps as ``benchmarks/top_levels.py``'s ``adamsqrt(t0=T)``, with the
    default's ramp and search, so the sweeps of ``adamsqrt`` measure the library option."""
    import hf_hyperopt as hh
    from benchmarks import top_levels  # noqa: F401  (registers adamsqrt)

    opts = "ramp=0.001,normalize=true,ramp_search=0.3"
    lrs = {}
    for top in (f"adamsqrt(lr=0.05,t0=5,{opts})", f"adam(lr=0.05,{opts},timescale=5)"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = hh.tower(model.parameters(), f"adam(lr=1e-4)/{top}")
        lrs[top] = []
        for _ in range(60):
            x = torch.randn(32, 8)
            torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            opt.zero_grad()
            lrs[top].append(opt.hyperparameters()[0]["lr"])
    sqrt_top, library = lrs.values()
    assert library == pytest.approx(sqrt_top, rel=1e-4)
    assert max(library) > 10 * library[0]  # the lr did move: the comparison is not of constants


def test_sensitivity_rejects_unknown_method_before_training():
    with pytest.raises(ValueError, match="unknown method 'adamx'"):
        sensitivity.resolve_methods(["adamw", "adamx"])


@pytest.mark.skipif(not (DATA / "shakespeare_lm" / "train.txt").exists(), reason="data/shakespeare_lm not built")
def test_sensitivity_quick_gpt2_reports_perplexity_and_skips_reference(tmp_path):
    args = sensitivity.SensitivityArguments(
        task="gpt2", methods=["adamw", "gdtuo_adam_sgd", "hyper_adam"], quick=True, out=str(tmp_path)
    )
    sensitivity.main(args)
    runs = _read_csv(tmp_path / "sensitivity_gpt2.csv")
    # the reference cannot drive GPT-2's tied embeddings: it is skipped, not reported
    assert {r["method"] for r in runs} == {"adamw", "hyper_adam"}
    assert all(1.0 < float(r["metric"]) < 2000.0 for r in runs)
    data = json.loads((tmp_path / "sensitivity_gpt2.json").read_text())
    assert data["meta"]["higher_is_better"] is False
    summary = {s["method"]: s for s in data["summary"]}
    assert summary["adamw"]["best"] <= summary["adamw"]["worst"]  # perplexity: lower is better


@pytest.mark.skipif(not (DATA / "shakespeare_lm" / "train.txt").exists(), reason="data/shakespeare_lm not built")
def test_the_larger_gpt2_task_is_its_own_setting():
    """gpt2_128x4 is the small GPT-2 at another size, named as its --task so that --merge finds its batch size."""
    task = sensitivity.make_task(sensitivity.SensitivityArguments(task="gpt2_128x4", quick=True))
    config = task.build_model(0).config
    assert (task.name, config.n_embd, config.n_layer, config.n_head) == ("gpt2_128x4", 128, 4, 4)
    assert sensitivity.batch_size_of(task.name, None) == 16


@pytest.mark.skipif(not (DATA / "shakespeare_genre" / "train.csv").exists(), reason="data/ not built")
def test_the_finetuning_gpt2_task_starts_from_pretrained_weights():
    """gpt2_finetune's models start from the pretrained weights (the same for every seed), not a fresh init."""
    from transformers import GPT2LMHeadModel

    task = sensitivity.make_task(sensitivity.SensitivityArguments(task="gpt2_finetune", quick=True))
    a, b = task.build_model(0), task.build_model(1)
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(a.config)  # the init the pretraining started from
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), fresh.parameters(), strict=True))
    assert task.name == "gpt2_finetune" and math.isfinite(task.evaluate(a))
    # no speech it fine-tunes or is scored on is in the pretraining text (Macbeth's all were)
    pretraining = (DATA / "shakespeare_lm" / "train.txt").read_text()
    tune, test = unread_tragedies(pretraining)
    assert tune and test and not set(pretraining.splitlines()) & set((tune + "\n" + test).splitlines())


def test_paper_table_quick_agrees_with_reference(tmp_path):
    args = paper_table.PaperTableArguments(quick=True, out=str(tmp_path))
    paper_table.main(args)
    rows = _read_csv(tmp_path / "paper_table.csv")
    gd = [r for r in rows if r["mode"] == "gdtuo"]
    assert {r["stack"] for r in gd} == {"SGD / SGD", "Adam / SGD(1e-5)", "RMSProp^alpha,gamma / SGD(1e-4)"}
    for r in gd:
        assert float(r["max_weight_diff"]) < 1e-4, r
        assert float(r["max_lr_rel_diff"]) < 1e-4, r
        assert float(r["hf_error_mean"]) == pytest.approx(float(r["ref_error_mean"]), abs=0.5)
    assert any(r["mode"] == "default" for r in rows)
    assert "| stack |" in (tmp_path / "paper_table.md").read_text()


def test_sensitivity_quick_runs_the_mechanic_and_dog_peers(tmp_path):
    pytest.importorskip("mechanic_pytorch")
    pytest.importorskip("dog")
    methods = ["mechanic", "dog", "ldog"]
    args = sensitivity.SensitivityArguments(task="digits", methods=methods, quick=True, out=str(tmp_path))
    rows = sensitivity.main(args)
    # Mechanic sweeps the base AdamW lr, DoG and L-DoG a multiplier of their own step size (natural value 1).
    assert {(r["method"], r["scale"], r["lr"]) for r in rows} == {
        ("mechanic", "lr", 1e-4), ("mechanic", "lr", 1e-2), ("dog", "multiplier", 0.1), ("dog", "multiplier", 1.0),
        ("ldog", "multiplier", 0.1), ("ldog", "multiplier", 1.0),
    }  # fmt: skip
    assert all(r["final_lr"] > 0 and not r["diverged"] for r in rows)
    assert all(0.0 <= r["metric"] <= 100.0 for r in rows)


def test_final_lr_of_ldog_is_the_median_of_its_per_tensor_steps():
    dog = pytest.importorskip("dog")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = dog.LDoG(model.parameters(), lr=1.0)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    etas = sorted(float(e.max()) for e in opt.param_groups[0]["eta"])
    assert len(set(etas)) == 4  # one step size per tensor
    assert sensitivity.final_lr(opt) == pytest.approx((etas[1] + etas[2]) / 2)  # not the largest, nor the first


def test_sensitivity_records_the_commit_its_code_was_loaded_at(tmp_path, monkeypatch):
    # A commit made while a long sweep runs is not the code that ran: the record is the commit at the start.
    trained = []
    run_one = sensitivity.run_one
    monkeypatch.setattr(sensitivity, "run_one", lambda *a: trained.append(1) or run_one(*a))
    monkeypatch.setattr(sensitivity, "git_commit", lambda: "at-end" if trained else "at-start")
    args = sensitivity.SensitivityArguments(task="digits", methods=["adamw"], quick=True, out=str(tmp_path))
    sensitivity.main(args)
    assert json.loads((tmp_path / "sensitivity_digits.json").read_text())["meta"]["commit"] == "at-start"


def test_sampling_iid_draws_with_replacement_and_does_not_merge_with_epochs(tmp_path):
    for sampling in ("epochs", "iid"):
        args = sensitivity.SensitivityArguments(
            task="digits", methods=["adamw"], quick=True, sampling=sampling, out=str(tmp_path / sampling)
        )
        sensitivity.main(args)
        assert tasks.sampling == "epochs"  # the sweep's sampling ends with it
        drawn = torch.cat(list(itertools.islice(tasks.shuffled_batches(10, 5, seed=0, how=sampling), 2))).tolist()
        if sampling == "epochs":
            assert sorted(drawn) == list(range(10))  # every example once an epoch
        else:
            assert len(set(drawn)) < 10  # with replacement: seed 0 repeats an example in its first ten
    with tasks.drawn("iid"):  # a task's batch stream keeps the sampling it was made with
        made = digits_task(epochs=1).batches(0)
    assert tasks.sampling == "epochs"
    drawn = torch.cat([next(made)["y"] for _ in range(6)])
    assert not torch.equal(drawn, torch.cat([b["y"] for b in itertools.islice(digits_task(epochs=1).batches(0), 6)]))
    files = [tmp_path / s / "sensitivity_digits.json" for s in ("epochs", "iid")]
    assert [json.loads(f.read_text())["meta"]["sampling"] for f in files] == ["epochs", "iid"]
    runs = [json.loads(f.read_text())["runs"][0]["train_loss_last"] for f in files]
    assert runs[0] != runs[1]  # the batches differ
    with pytest.raises(ValueError, match="sampling"):
        sensitivity.merge(files, tmp_path / "merged", "")
    with pytest.raises(ValueError, match="--sampling 'shuffle' is not one of epochs, iid"):
        sensitivity.make_task(sensitivity.SensitivityArguments(task="digits", sampling="shuffle"))
    with pytest.raises(ValueError, match="the stream task draws fresh examples"):
        sensitivity.make_task(sensitivity.SensitivityArguments(task="stream", sampling="iid", quick=True))
    with pytest.raises(ValueError, match="--sampling 'shuffle'"), tasks.drawn("shuffle"):
        pass
    assert tasks.sampling == "epochs"


def test_stream_task_draws_fresh_examples_and_has_no_epochs():
    task = tasks.stream_task(steps=45, n_test=16)
    run = sensitivity.train_torch(task, sensitivity.methods_registry()["hyper_adam"], 1e-3, seed=0)
    assert [s for s, _ in run["lr_trajectory"]][-2:] == [44, 45]  # every 2 steps, and the last
    assert task.steps_per_epoch is None and digits_task(epochs=1).steps_per_epoch == 6
    first, second = itertools.islice(task.batches(0), 2)
    assert not torch.equal(first["x"], second["x"])
    model = task.build_model(0)
    assert 0 < task.evaluate(model) < task.chance * 10


def test_epoch_bias_measures_both_samplings(tmp_path):
    from benchmarks import epoch_bias

    args = epoch_bias.EpochBiasArguments(warm_steps=3, epochs=1, burn_in=2, out=str(tmp_path))
    result = epoch_bias.main(args)
    assert [r["sampling"] for r in result["rows"]] == ["epochs", "iid"]
    assert all(r["steps"] == result["steps_per_epoch"] for r in result["rows"])
    assert result["estimated_epoch_term"] < 0 and math.isfinite(result["measured_epoch_term"])
    assert 0 < result["in_epoch_share"] < 1 and "its model estimate" in (tmp_path / "epoch_bias.md").read_text()
    assert tasks.sampling == "epochs"
    with pytest.raises(ValueError, match="--epochs 0: give at least 1"):
        epoch_bias.main(epoch_bias.EpochBiasArguments(epochs=0, out=str(tmp_path)))


def test_epoch_pairs_fits_the_push_per_window(tmp_path):
    from benchmarks import epoch_pairs

    args = epoch_pairs.EpochPairsArguments(steps=24, windows=2, out=str(tmp_path))
    lines = epoch_pairs.main(args)
    assert [w["steps"] for w in lines] == ["0-12", "12-24"]
    assert all(math.isfinite(w["push_b"]) and w["push_stderr"] > 0 and w["pairs"] >= 3 for w in lines)
    rows = json.loads((tmp_path / "epoch_pairs_epochs.json").read_text())["rows"]
    assert [r["position"] for r in rows][:3] == [1, 2, 3] and tasks.sampling == "epochs"
    with pytest.raises(ValueError, match="--steps 3 --windows 2"):
        epoch_pairs.main(epoch_pairs.EpochPairsArguments(steps=3, windows=2, out=str(tmp_path)))


def test_greedy_signal_curved_traces_and_midway_perplexities(tmp_path):
    from benchmarks import greedy_signal

    kw = {"steps": 6, "windows": 2, "plans": ["1e-3"], "out": str(tmp_path)}
    plain = greedy_signal.main(greedy_signal.GreedySignalArguments(**kw, tag="plain"))
    greedy_signal.main(greedy_signal.GreedySignalArguments(**kw, curved=[0.9, 1.0], eval_at=[3], tag="c"))
    (run,) = json.loads((tmp_path / "greedy_signal_gpt2_c.json").read_text())["runs"]
    # Evaluating midway draws no random numbers, and the curvature's extra differentiation changes nothing
    # the run does: its end is the plain run's.
    assert run["perplexity"] == pytest.approx(plain["perplexity"]["1e-3"], rel=1e-6)
    assert math.isfinite(run["perplexity_at"]["3"]) and run["perplexity_at"]["3"] > run["perplexity"]
    assert all(len(p) == len(greedy_signal.TRACES) + 2 for p in run["pulls"])
    assert len(set(run["pulls"][0])) == 1  # every trace holds the one update taken
    assert run["pulls"][-1][-1] != run["pulls"][-1][len(greedy_signal.TRACES) - 1]  # the curvature term counts
    assert "trace 1 with the curvature term" in (tmp_path / "greedy_signal_gpt2_c.md").read_text()
    with pytest.raises(ValueError, match="--eval_at 6: give steps between 1 and"):
        greedy_signal.main(greedy_signal.GreedySignalArguments(**kw, eval_at=[6]))
    with pytest.raises(ValueError, match="--curved 1.5: give decays between 0 and 1"):
        greedy_signal.main(greedy_signal.GreedySignalArguments(**kw, curved=[1.5]))


def test_greedy_signal_keeps_midway_perplexities_of_a_run_that_diverges_later(tmp_path, monkeypatch):
    from dataclasses import replace

    from benchmarks import greedy_signal

    task = greedy_signal.TASK_BUILDERS["gpt2"](6)
    calls = []

    def loss(model, batch):  # the fourth step's loss is not finite
        calls.append(1)
        return task.loss(model, batch) * (math.nan if len(calls) >= 4 else 1.0)

    monkeypatch.setitem(greedy_signal.TASK_BUILDERS, "gpt2", lambda steps: replace(task, loss=loss))
    args = greedy_signal.GreedySignalArguments(steps=6, windows=2, plans=["1e-3"], eval_at=[2, 5], out=str(tmp_path))
    greedy_signal.main(args)
    (run,) = json.loads((tmp_path / "greedy_signal_gpt2.json").read_text())["runs"]
    assert math.isfinite(run["perplexity_at"]["2"]) and run["perplexity_at"]["5"] == math.inf


@pytest.mark.parametrize("mu", [1.0, 0.7])
def test_curved_trace_is_the_derivative_of_the_weights_in_log_lr(mu):
    """The trace is dw_T / d(step k's log(lr)) summed with weights mu^(T-1-k), over T AdamW steps: central
    differences of whole runs whose log(lr)s move by those weights agree, in float64."""
    from benchmarks.curved_trace import CurvedTrace, flat, step_with

    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.sin(x.sum(1, keepdim=True))
    steps, lr = 10, 1e-2

    def run(offset: float) -> tuple[torch.Tensor, CurvedTrace]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        trace = None
        for t in range(steps):
            opt.param_groups[0]["lr"] = lr * math.exp(offset * mu ** (steps - 1 - t))
            rows = slice(16 * (t % 4), 16 * (t % 4) + 16)
            grads = torch.autograd.grad(((model(x[rows]) - y[rows]) ** 2).mean(), params, create_graph=True)
            g = flat(grads)
            hz = trace.hessian_times_z(grads, params) if trace is not None else torch.zeros_like(g)
            update = step_with(opt, params, grads)
            trace = trace or CurvedTrace(mu, g)
            trace.advance_adamw(opt, hz, g, update)
        return flat(params), trace

    _, trace = run(0.0)
    eps = 1e-5
    numeric = (run(eps)[0] - run(-eps)[0]) / (2 * eps)
    assert (trace.z - numeric).norm() < 1e-6 * numeric.norm()


def test_curved_top_learns_the_lr_from_either_trace(tmp_path):
    from benchmarks import curved_top

    args = curved_top.CurvedTopArguments(
        steps=6, signals=["trace:0.99", "curved:1"], tops=[0.1], starts=[1e-4], out=str(tmp_path), tag="t"
    )
    worst = curved_top.main(args)
    runs = json.loads((tmp_path / "curved_top_gpt2_t.json").read_text())["runs"]
    assert [r["signal"] for r in runs] == ["trace:0.99", "curved:1"]
    for r in runs:  # the lr left its start, and the first steps raise it
        assert r["final_lr"] > 1e-4 * 1.01 and math.isfinite(r["perplexity"]) and r["restarts"] == 0
    assert runs[0]["final_lr"] != runs[1]["final_lr"]  # the curvature term changes the signal
    assert set(worst) == {"trace:0.99/0.1", "curved:1/0.1"}
    assert "| curved:1 |" in (tmp_path / "curved_top_gpt2_t.md").read_text()
    for bad in ("trace", "curved:2", "exact:0.9"):
        with pytest.raises(ValueError, match=f"signal '{bad}': give trace:MU or curved:MU"):
            curved_top.main(curved_top.CurvedTopArguments(signals=[bad], out=str(tmp_path)))


def test_greedy_signal_records_each_traces_pull_and_follows_its_plan(tmp_path):
    from benchmarks import greedy_signal

    plans = ["1e-3@3,4e-3", "1e-3"]
    args = greedy_signal.GreedySignalArguments(steps=6, windows=2, plans=plans, out=str(tmp_path), tag="t")
    result = greedy_signal.main(args)
    run, constant = json.loads((tmp_path / "greedy_signal_gpt2_t.json").read_text())["runs"]
    pulls = run["pulls"]
    # The plan switches the lr at step 3: the pulls read at steps 1-3 are the constant run's, the next is not.
    assert pulls[:3] == constant["pulls"][:3] and pulls[3] != constant["pulls"][3]
    assert len(pulls) == 5 and all(len(p) == len(greedy_signal.TRACES) for p in pulls)
    # At the first pull every trace holds the one update taken: the four signals agree exactly.
    assert len(set(pulls[0])) == 1 and all(-1 <= x <= 1 for p in pulls for x in p)
    assert math.isfinite(result["perplexity"]["1e-3@3,4e-3"])
    assert len(result["means"]) == len(plans) * args.windows * len(greedy_signal.TRACES)
    assert "| 1e-3@3,4e-3 |" in (tmp_path / "greedy_signal_gpt2_t.md").read_text()
    assert greedy_signal.parse_plan("1e-2@50,2e-3", 300) == [(0, 1e-2), (50, 2e-3)]
    for bad in ("2e-3@50", "1e-2@50,2e-3@40,1e-3", "1e-2@300,2e-3", "0", "1e-2,2e-3"):
        with pytest.raises(ValueError, match=f"plan '{bad}': give LR or LR@STEPS"):
            greedy_signal.main(greedy_signal.GreedySignalArguments(steps=300, plans=[bad], out=str(tmp_path)))
