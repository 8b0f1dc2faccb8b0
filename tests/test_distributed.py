"""Distributed training: the same hyperparameters on every rank, equal to the single-process run.

Each launch runs ``tests/dist_workers/*.py`` with ``torch.distributed.run --nproc_per_node 2`` (gloo,
CPU) and compares what every rank wrote: the learned hyperparameters of every level after each of 20
steps. The ranks must agree exactly; against a single process that trains on the same global batches
they must agree within 1e-5 relative. Launches are shared by the tests of one module (``scope="module"``)
to keep the suite around a minute and a half on two cores.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_hyperopt as hh

WORKERS = Path(__file__).parent / "dist_workers"
STEPS = 20
RTOL = 1e-5
ADAM2 = "adam(lr=1e-3)/adam(lr=1e-2)"
# Momentum SGD with two SGD levels above it; the hyper step sizes are large enough that level 1 moves
# (3 -> about 0.92 in 20 steps), so a wrong hypergradient at level 1 would show.
SGD3 = "sgd(lr=0.1,momentum=0.9)/sgd(lr=3)/sgd(lr=1e3)"
SGD_HELD = "sgd(lr=0.1,momentum=0.9,learn=lr+momentum)/adam(lr=1e-2)"
# The default upper level: the ramp's probe, its search (whose state is an int64 entry) and the norms
# both take are in the reduction and the checkpoint. On a fixed batch the search doubles the lr from
# step 3 to step 11, so the checkpoint at step 10 is taken mid-search.
DEFAULT = "adam(lr=1e-3)/" + hh.DEFAULT_HYPER["default"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )


def single(script: str, args: list[str], cwd: Path) -> None:
    _run([sys.executable, str(WORKERS / script), *args], cwd)


def torchrun(script: str, args: list[str], cwd: Path) -> None:
    # --standalone: a rendezvous on localhost with a free port, so parallel test runs do not collide.
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKERS / script), *args], cwd)  # fmt: skip


def read_ranks(prefix: Path, world: int = 2) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(world)]


def flat(records: list[dict]) -> list[float]:
    """Every level's every hyperparameter at every step, in a fixed order."""
    out: list[float] = []
    for rec in records:
        for level in rec["hyper"]:
            for name in sorted(level):
                v = level[name]
                out.extend(v if isinstance(v, list) else [v])
    return out


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True))


def moved(records: list[dict]) -> bool:
    """Some learned hyperparameter left its initial value (so the comparison is not trivial)."""
    first, last = flat(records[:1]), flat(records[-1:])
    return max_rel(last, first) > 1e-3


# ---------------------------------------------------------------------------------------- tower runs
CASES = [
    {"name": "ddp_adam", "wrap": "ddp", "spec": ADAM2},
    {"name": "ddp_sgd3", "wrap": "ddp", "spec": SGD3},
    {"name": "fsdp_adam", "wrap": "fsdp", "spec": ADAM2, "save_at": 10, "ckpt_format": "torch"},
    {"name": "fsdp_adam_dcp", "wrap": "fsdp", "spec": ADAM2, "save_at": 10, "ckpt_format": "dcp"},
    {"name": "fsdp_sgd3", "wrap": "fsdp", "spec": SGD3, "save_at": 10, "ckpt_format": "full"},
    # SGD holds both tangents in its momentum buffers, which swap places every step.
    {"name": "fsdp_sgd_held", "wrap": "fsdp", "spec": SGD_HELD, "save_at": 10, "ckpt_format": "dcp"},
    {
        "name": "fsdp_default",
        "wrap": "fsdp",
        "spec": DEFAULT,
        "fixed_batch": True,
        "record_search": True,
        "save_at": 10,
        "ckpt_format": "dcp",
    },
    {"name": "fsdp_tensor", "wrap": "fsdp", "spec": "adam(lr=1e-3,learn=lr+beta1)/adam(lr=1e-2)", "scope": "tensor"},
    {"name": "hsdp_adam", "wrap": "hsdp", "spec": ADAM2},
    {"name": "fsdp_no_reduce", "wrap": "fsdp", "spec": ADAM2, "no_reduce": True},
    {"name": "fsdp_mixed", "wrap": "fsdp_first_layer_only", "spec": ADAM2, "steps": 1},
]
SAME_AS_SINGLE = [
    "ddp_adam", "ddp_sgd3", "fsdp_adam", "fsdp_adam_dcp", "fsdp_sgd3", "fsdp_sgd_held", "fsdp_default", "fsdp_tensor",
    "hsdp_adam",
]  # fmt: skip
RESUMED = ["fsdp_adam", "fsdp_adam_dcp", "fsdp_sgd3", "fsdp_sgd_held", "fsdp_default"]


@pytest.fixture(scope="module")
def tower_runs(tmp_path_factory) -> dict:
    """One single-process reference run, one 2-rank run of every case, one 2-rank resume from step 10."""
    d = tmp_path_factory.mktemp("tower")
    cases = [dict(c, ckpt=str(d / f"ckpt_{c['name']}")) if "save_at" in c else c for c in CASES]
    (d / "cases.json").write_text(json.dumps(cases))
    ref_cases = [
        {k: v for k, v in c.items() if k not in ("save_at", "ckpt")} for c in cases if c["name"] in SAME_AS_SINGLE
    ]
    (d / "ref_cases.json").write_text(json.dumps(ref_cases))
    resume = [dict(c, resume=c["ckpt"], save_at=None) for c in cases if c["name"] in RESUMED]
    (d / "resume_cases.json").write_text(json.dumps(resume))
    single("tower_worker.py", ["--cases", "ref_cases.json", "--out", "ref"], d)
    torchrun("tower_worker.py", ["--cases", "cases.json", "--out", "dist"], d)
    torchrun("tower_worker.py", ["--cases", "resume_cases.json", "--out", "resumed"], d)
    return {
        "ref": read_ranks(d / "ref", 1)[0]["cases"],
        "ranks": [r["cases"] for r in read_ranks(d / "dist")],
        "resumed": [r["cases"] for r in read_ranks(d / "resumed")],
    }


@pytest.mark.parametrize("name", SAME_AS_SINGLE)
def test_every_level_is_identical_on_both_ranks_and_matches_one_process(tower_runs, name):
    r0, r1 = (ranks[name]["records"] for ranks in tower_runs["ranks"])
    ref = tower_runs["ref"][name]["records"]
    assert [r["step"] for r in r0] == list(range(1, STEPS + 1))
    assert moved(ref)
    assert flat(r0) == flat(r1)  # exactly: every rank applies the same update to the same numbers
    assert max_rel(flat(r0), flat(ref)) < RTOL
    # The weights follow too (the checksum is over the full, gathered parameters).
    assert max_rel([r["checksum"] for r in r0], [r["checksum"] for r in ref]) < RTOL


def test_the_default_case_resumes_mid_search(tower_runs):
    """The fsdp_default case exercises the search: the lr doubles at every step from 3 to 10 (its checkpoint)."""
    lrs = [r["hyper"][0]["lr"] for r in tower_runs["ref"]["fsdp_default"]["records"]]
    assert all(b == pytest.approx(2 * a) for a, b in zip(lrs[1:9], lrs[2:10], strict=True))  # steps 2..10


def test_the_search_judges_global_sums_on_every_rank(tower_runs):
    """What the search compares (the lr's hypergradient against the cosine margin of the two norms) is
    the single process's on both ranks: norms summed over one shard each would loosen the margin."""
    ref = tower_runs["ref"]["fsdp_default"]["judged"]
    assert len(ref) >= 8  # judged at every step of the search, and at the step that ends it
    for ranks in tower_runs["ranks"]:
        judged = ranks["fsdp_default"]["judged"]
        assert len(judged) == len(ref)
        for got, want in zip(judged, ref, strict=True):
            assert got == pytest.approx(want, rel=1e-5)


def test_every_level_of_a_three_level_tower_moves_and_is_compared(tower_runs):
    ref = tower_runs["ref"]["fsdp_sgd3"]["records"]
    assert len(ref[-1]["hyper"]) == 3
    assert ref[-1]["hyper"][1]["lr"] < 0.5 * ref[0]["hyper"][1]["lr"]  # level 1 learned, not just level 0


@pytest.mark.parametrize("name", ["ddp_adam", "ddp_sgd3"])
def test_under_ddp_the_optimizer_issues_no_collective(tower_runs, name):
    for ranks in tower_runs["ranks"]:
        assert ranks[name]["collectives_per_step"] == [0] * STEPS


@pytest.mark.parametrize(("name", "floats"), [("fsdp_adam", 1), ("hsdp_adam", 1), ("fsdp_tensor", 12)])
def test_under_fsdp2_one_small_all_reduce_per_step(tower_runs, name, floats):
    for ranks in tower_runs["ranks"]:
        assert ranks[name]["collectives_per_step"] == [1] * STEPS
        # shared scope: one float (lr); tensor scope: 6 tensors x (lr, beta1)
        assert ranks[name]["reduced_floats"] == floats


def test_under_fsdp2_the_optimizer_state_is_sharded_like_the_parameters(tower_runs):
    ranks = [r["fsdp_adam"] for r in tower_runs["ranks"]]
    for r in ranks:
        # 6 parameters x (exp_avg, exp_avg_sq, hypertangent_lr), all DTensors
        assert r["state_tensors"] == r["state_dtensors"] == 18
    assert sum(r["state_local_numel"] for r in ranks) == ranks[0]["state_global_numel"]
    assert all(r["state_local_numel"] < r["state_global_numel"] for r in ranks)


def test_without_the_all_reduce_fsdp2_ranks_drift_apart(tower_runs):
    """The control: with the reduction removed, each rank learns from its own shard and they differ."""
    r0, r1 = (ranks["fsdp_no_reduce"]["records"] for ranks in tower_runs["ranks"])
    assert flat(r0) != flat(r1)
    assert max_rel(flat(r0), flat(tower_runs["ref"]["fsdp_adam"]["records"])) > 1e-3


def test_parameters_sharded_in_different_ways_are_refused(tower_runs):
    for ranks in tower_runs["ranks"]:
        assert ranks["fsdp_mixed"]["error_at"] == "construction"  # before any step
        err = ranks["fsdp_mixed"]["error"]
        assert err.startswith("ValueError") and "sharded the same way" in err and "fully_shard" in err


@pytest.mark.parametrize("name", RESUMED)
def test_fsdp2_checkpoint_resumes_to_the_same_trajectory(tower_runs, name):
    for uninterrupted, resumed in zip(tower_runs["ranks"], tower_runs["resumed"], strict=True):
        full = uninterrupted[name]["records"]
        after = resumed[name]["records"]
        assert [r["step"] for r in after] == list(range(11, STEPS + 1))
        assert after == full[10:]  # hyperparameters of every level and the weights, exactly


# ---------------------------------------------------------------------------------------- HyperTrainer
# FSDP2 for the Trainer on CPU: Accelerate's FSDP plugin needs GPUs, so the model is sharded by
# transformers itself at load time (transformers >= 5.x: ``from_pretrained(distributed_config=...)``).
HAS_DISTRIBUTED_LOADING = importlib.util.find_spec("transformers.distributed") is not None


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> dict:
    from tiny_models import tiny_bert

    d = tmp_path_factory.mktemp("trainer")
    tiny_bert(dropout=0.0).save_pretrained(d / "tiny_bert")
    single("trainer_worker.py", ["--out", "ref", "--batch", "8", "--output-dir", "out_ref"], d)
    torchrun("trainer_worker.py", ["--out", "ddp", "--batch", "4", "--wrap", "ddp", "--output-dir", "out_ddp"], d)
    runs = {"ref": read_ranks(d / "ref", 1)[0], "ddp": read_ranks(d / "ddp"), "dir": d}
    if HAS_DISTRIBUTED_LOADING:
        torchrun("trainer_worker.py", ["--out", "fsdp", "--batch", "4", "--wrap", "fsdp", "--model-dir", "tiny_bert",
                                       "--output-dir", "out_fsdp"], d)  # fmt: skip
        runs["fsdp"] = read_ranks(d / "fsdp")
    return runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_hypertrainer_on_two_ranks_matches_one_process(trainer_runs, mode):
    if mode not in trainer_runs:
        pytest.skip("this transformers has no from_pretrained(distributed_config=...) (FSDP2 loading)")
    ref = trainer_runs["ref"]["records"]
    r0, r1 = trainer_runs[mode]
    assert r0["distributed_type"] == "DistributedType.MULTI_CPU" and r0["world"] == 2
    # DDP keeps plain parameters; the FSDP2 model holds every parameter as a sharded DTensor.
    assert (r0["dtensor_params"] > 0) == (mode == "fsdp")
    assert len(ref) == len(r0["records"]) == STEPS
    assert moved(ref)
    assert flat(r0["records"]) == flat(r1["records"])
    assert max_rel(flat(r0["records"]), flat(ref)) < RTOL


def test_hypertrainer_rank_zero_writes_the_trajectory(trainer_runs):
    lines = (trainer_runs["dir"] / "out_ddp" / "hyper_trajectory.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))


# ---------------------------------------------------------------------------------------- in process
def _tiny() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)) for _ in range(6)]


def _train(model, opt, data):
    for x, y in data:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_tower_survives_the_distributed_checkpoint_state_dict_api():
    """get/set_optimizer_state_dict (what Accelerate and the Trainer use for FSDP2) keep only "state" and
    "param_groups"; the tower rides in the first group, so a resumed run continues the same trajectory."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, data = _tiny()
    opt = hh.tower(model.parameters(), ADAM2)
    _train(model, opt, data[:3])
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt))  # its state tensors are the live ones
    assert set(sd) == {"state", "param_groups"}
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, data[3:])
    expected = opt.hyperparameters()

    model2, _ = _tiny()
    model2.load_state_dict(saved_model)
    opt2 = hh.tower(model2.parameters(), ADAM2)
    # A fresh optimizer: the API first runs a zero-lr step to create state, which must not break the tower.
    set_optimizer_state_dict(model2, opt2, sd)
    assert "hyper_tower" not in opt2.param_groups[0]
    _train(model2, opt2, data[3:])
    assert opt2.hyperparameters() == expected


def test_dcp_checkpoint_with_one_step_count_loads(tmp_path):
    """A DCP checkpoint written when the tower kept one step count loads into the template of a fresh
    optimizer (what Accelerate does): DCP refuses a template key the checkpoint lacks, so the per-tensor
    counts live under the tower's existing ``step`` key rather than in new ``state[i]["step"]`` keys."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, data = _tiny()
    opt = hh.tower(model.parameters(), ADAM2)
    _train(model, opt, data[:3])
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    steps = sd["param_groups"][0]["hyper_tower"]["state.step"]
    assert steps == [[3] * 4, 3]
    steps[0] = 3  # the old layout
    dcp.save({"optim": sd}, checkpoint_id=tmp_path)
    _train(model, opt, data[3:])

    model2, _ = _tiny()
    model2.load_state_dict(saved_model)
    opt2 = hh.tower(model2.parameters(), ADAM2)
    template = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(model2, opt2, template["optim"])
    assert (opt2._tower_state.weight_steps, opt2._tower_state.level_steps) == ([3] * 4, [3])
    _train(model2, opt2, data[3:])
    assert opt2.hyperparameters() == opt.hyperparameters()


def test_state_dict_without_a_tower_anywhere_is_refused():
    model, data = _tiny()
    opt = hh.tower(model.parameters(), ADAM2)
    _train(model, opt, data[:1])
    sd = opt.state_dict()
    del sd["param_groups"][0]["hyper_tower"]
    with pytest.raises(ValueError, match="no 'tower' entry"):
        hh.tower(model.parameters(), ADAM2).load_state_dict(sd)
