"""The fault suite: each fault is one row of a table, and each row asserts what happens and what is kept.

docs/failures.md lists the same faults with their outcome. The sections:

- state dicts handed to ``TowerOptimizer.load_state_dict`` (other shapes, NaN, another dtype, ...);
- a step that raises, and NaN / inf in the gradients or the loss;
- damaged checkpoints of a ``HyperTrainer`` run (``optimizer.pt``, ``hyper_trajectory.jsonl``),
  a checkpoint save that fails halfway, a read-only or full output folder;
- SIGKILL at random moments of a run that checkpoints every step;
- bad arguments (a tower spec with a key given twice, a negative weight decay).

The bad inputs of ``scripts/finetune.py`` are the rows of ``BAD_DATA`` in ``test_finetune.py``.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from state_compare import same_state
from tiny_models import tiny_bert

import hf_hyperopt as hh
from hf_hyperopt.optim import engine
from hf_hyperopt.trainer import HyperTrainer, HyperTrainingArguments, read_trajectory
from hf_hyperopt.trainer.resume import TowerNotRestoredWarning

SPEC = "adam(lr=0.01)/adam(lr=0.01)"


# ------------------------------------------------------------------------------------------ state dicts
def _trained(make_mlp, batches, spec: str = SPEC, width: int = 8, steps: int = 2):
    model = make_mlp(width=width)
    opt = hh.tower(model.parameters(), spec)
    for x, y in batches(steps):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _set(path: str, value: float):
    """A fault that writes ``value`` into the saved tensor at ``path`` (``theta.0``, ``state.0.exp_avg``, ...)."""

    def apply(sd):
        if path.startswith("state."):
            node = sd
            for key in path.split("."):
                node = node[int(key) if key.isdigit() else key]
        else:
            node = sd["param_groups"][0]["hyper_tower"]["state." + path]
        node.view(-1)[0] = value
        return sd

    return apply


def _other_shapes(sd, make_mlp, batches):
    return _trained(make_mlp, batches, width=6)[1].state_dict()


def _more_learned_values(sd, make_mlp, batches):
    tower = sd["param_groups"][0]["hyper_tower"]
    tower["state.theta.0"] = torch.cat([tower["state.theta.0"], tower["state.theta.0"]])
    return sd


def _fewer_params(sd, make_mlp, batches):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    return sd


def _steps(level0, *upper):
    """A fault that replaces the saved step counts."""

    def apply(sd, *_):
        sd["param_groups"][0]["hyper_tower"]["state.step"] = [level0, *upper]
        return sd

    return apply


# fault -> (how the saved state dict is damaged, what the error says)
STATE_DICT_FAULTS = {
    "from a model with other shapes": (_other_shapes, "has shape"),
    "one parameter fewer": (_fewer_params, "has 3 parameter"),
    "nan learned lr": (lambda sd, *_: _set("theta.0", math.nan)(sd), "learned values of level 0 holds 1 non-finite"),
    "inf upper-level state": (lambda sd, *_: _set("upper_state.0.exp_avg", math.inf)(sd), "upper_state 'exp_avg'"),
    "nan weight state": (lambda sd, *_: _set("state.0.exp_avg_sq", math.nan)(sd), "state 'exp_avg_sq' of parameter 0"),
    "inf tangent": (lambda sd, *_: _set("state.1.hypertangent_lr", math.inf)(sd), "hypertangent_lr"),
    "more learned values than the tower has": (_more_learned_values, "holds 2 learned value(s), this tower learns 1"),
    "step counts for fewer parameters": (_steps([2, 2, 2], 2), "hold 3 entries, one per parameter"),
    "negative step count": (_steps([2, 2, -1, 2], 2), "step count of parameter 2 is -1"),
    "fractional step count": (_steps([2, 2, 2, 2], 2.5), "step count of level 1 is 2.5, not a whole number"),
    # entries missing or out of their range: each loaded before and failed mid-step or trained on NaN
    "a state entry missing": (lambda sd, *_: _drop(sd, 0, "exp_avg"), "has no 'exp_avg'"),
    "a tangent missing": (lambda sd, *_: _drop(sd, 1, "hypertangent_lr"), "has no 'hypertangent_lr'"),
    "negative second moment": (lambda sd, *_: _set("state.0.exp_avg_sq", -1.0)(sd), "holds negative values"),
    "nan group lr": (lambda sd, *_: _group(sd, lr=math.nan), "param group 0: level 0 (adam): lr=nan is not finite"),
    "group betas not a pair": (lambda sd, *_: _group(sd, betas=(0.9,)), "betas=(0.9,) must be a pair"),
    "inf initial lr": (lambda sd, *_: _group(sd, initial_lr=math.inf), "initial_lr=inf must be a finite number"),
    "learned lr past its bound": (lambda sd, *_: _set("theta.0", 1e9)(sd), "learned lr of level 0 holds a coordinate"),
}


def _drop(sd, param: int, entry: str):
    del sd["state"][param][entry]
    return sd


def _group(sd, **values):
    sd["param_groups"][0].update(values)
    return sd


@pytest.mark.parametrize("fault", list(STATE_DICT_FAULTS))
def test_damaged_state_dict_is_refused_and_changes_nothing(fault, make_mlp, batches):
    damage, message = STATE_DICT_FAULTS[fault]
    model, opt = _trained(make_mlp, batches)
    bad = damage(copy.deepcopy(opt.state_dict()), make_mlp, batches)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="state_dict") as err:
        opt.load_state_dict(bad)
    assert message in str(err.value)
    assert same_state(opt.state_dict(), before)
    x, y = batches(3)[-1]
    F.mse_loss(model(x), y).backward()
    opt.step()  # the optimizer still trains, and its learned values are finite
    assert all(math.isfinite(v) for level in opt.hyperparameters() for v in level.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_of_another_dtype_is_cast_like_torch_optim(make_mlp, batches, float64):
    model64, opt64 = _trained(make_mlp, batches)
    saved = copy.deepcopy(opt64.state_dict())
    torch.set_default_dtype(torch.float32)
    model = make_mlp()
    opt = hh.tower(model.parameters(), SPEC)
    opt.load_state_dict(saved)
    ts = opt._tower_state
    assert all(t.dtype == torch.float32 for t in ts.theta)
    assert all(v.dtype == torch.float32 for d in ts.upper_state for v in d.values())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point())
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(opt64.hyperparameters()[0]["lr"], rel=1e-6)
    x, y = (t.float() for t in batches(3)[-1])
    F.mse_loss(model(x), y).backward()
    opt.step()
    assert all(t.dtype == torch.float32 for t in opt._tower_state.theta)


def test_a_step_that_raises_leaves_the_tower_as_it_was(make_mlp, batches, monkeypatch):
    model, opt = _trained(make_mlp, batches)
    x, y = batches(3)[-1]
    F.mse_loss(model(x), y).backward()
    hyper, weights = opt.hyperparameters(), [p.clone() for p in model.parameters()]
    ts = opt._tower_state
    steps, upper = (ts.weight_steps, ts.level_steps), copy.deepcopy(ts.upper_state)

    def fail(opt, ts):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine, "step_weights", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert opt.hyperparameters() == hyper and (ts.weight_steps, ts.level_steps) == steps
    assert same_state(ts.upper_state, upper)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    monkeypatch.undo()
    opt.step()  # and it steps normally afterwards
    assert (ts.weight_steps, ts.level_steps) == ([s + 1 for s in steps[0]], [s + 1 for s in steps[1]])


def _nan_grad(model, x, y, value):
    F.mse_loss(model(x), y).backward()
    next(model.parameters()).grad.view(-1)[0] = value


def _nan_loss(model, x, y, value):
    (F.mse_loss(model(x), y) * value).backward()


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", [_nan_grad, _nan_loss], ids=["grad", "loss"])
def test_nonfinite_gradient_or_loss_keeps_the_learned_values(where, value, make_mlp, batches):
    model, opt = _trained(make_mlp, batches)
    before = opt.hyperparameters()
    x, y = batches(3)[-1]
    where(model, x, y, value)
    opt.step()
    # The learned values skip this step (and count it); the weights take it, as with torch.optim.
    assert opt.hyperparameters() == before and opt.skipped_hyper_updates()[0] >= 1


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: hh.parse_spec("adam(lr=1e-3,lr=1e-2)"), "'lr' is given twice"),
        (lambda: hh.parse_spec("adam(learn=lr,learn=lr+beta1)/sgd"), "'learn' is given twice"),
        (lambda: HyperTrainingArguments("o", optim="hyper_adam", weight_decay=-0.1), "--weight_decay -0.1"),
        (lambda: HyperTrainingArguments("o", optim="hyper_sgd", weight_decay=math.inf), "finite weight_decay >= 0"),
    ],
    ids=["spec key twice", "spec learn twice", "negative weight decay", "infinite weight decay"],
)
def test_bad_arguments_are_refused_before_anything_is_built(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)


# ------------------------------------------------------------------------------------- Trainer checkpoints
def _data(n: int = 40):  # 5 steps an epoch: the 4-step run ends mid-epoch
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 32, (n, 8), generator=g)
    return [{"input_ids": x[i], "labels": (x[i, 0] <= 16).long()} for i in range(n)]


def _args(out: Path, **kw) -> HyperTrainingArguments:
    base = {"output_dir": str(out), "report_to": "none", "optim": "hyper_adam", "learning_rate": 3e-3,
            "hyper_tower": "adam(lr=0.01)", "per_device_train_batch_size": 8, "max_steps": 4, "logging_steps": 1,
            "save_strategy": "steps", "save_steps": 2, "disable_tqdm": True, "dataloader_pin_memory": False,
            "seed": 0}  # fmt: skip
    return HyperTrainingArguments(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4: the reference every resume is compared with."""
    out = tmp_path_factory.mktemp("full")
    trainer = HyperTrainer(model=tiny_bert(), args=_args(out), train_dataset=_data())
    trainer.train()
    torch.save([p.detach().clone() for p in trainer.model.parameters()], out / "weights.pt")
    return out


def _resume(full_run: Path, out: Path, damage=None, checkpoint: str = "checkpoint-2") -> HyperTrainer:
    """Copy ``full_run``'s trajectory and checkpoint into ``out``, damage them, and resume from the checkpoint."""
    shutil.copytree(full_run / checkpoint, out / checkpoint)
    shutil.copyfile(full_run / "hyper_trajectory.jsonl", out / "hyper_trajectory.jsonl")
    if damage is not None:
        damage(out, out / checkpoint)
    trainer = HyperTrainer(model=tiny_bert(seed=1), args=_args(out), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(out / checkpoint))
    return trainer


def _assert_like_the_full_run(trainer: HyperTrainer, full_run: Path) -> None:
    ref = torch.load(full_run / "weights.pt")
    assert all(torch.equal(a, b) for a, b in zip(ref, trainer.model.parameters(), strict=True))


def _truncate(name: str, keep: float = 0.5):
    def damage(out, ckpt):
        path = ckpt / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return damage


def _overwrite_start(name: str):
    def damage(out, ckpt):
        data = bytearray((ckpt / name).read_bytes())
        data[:64] = b"\x00garbage" * 8
        (ckpt / name).write_bytes(bytes(data))

    return damage


def _nan_in_saved_tower(out, ckpt):
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    sd["param_groups"][0]["hyper_tower"]["state.theta.0"].fill_(math.nan)
    torch.save(sd, ckpt / "optimizer.pt")


def _saved_by_another_tower(out, ckpt):
    """A checkpoint of a run started with another upper level (an earlier default, say)."""
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    entry = sd["param_groups"][0]["hyper_tower"]
    entry["spec"] += "/sgd(lr=1e-05)"  # one level more
    torch.save(sd, ckpt / "optimizer.pt")


def _saved_by_adamw(out, ckpt):
    """A checkpoint of a run trained with torch's AdamW (--optim adamw_torch), resumed with a tower."""
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for group in sd["param_groups"]:
        group.pop("hyper_tower", None)
    torch.save(sd, ckpt / "optimizer.pt")


# fault -> (damage, the error raised and what it says)
UNREADABLE_CHECKPOINTS = {
    "optimizer.pt of torch's AdamW": (
        _saved_by_adamw,
        ValueError,
        r"holds a standard optimizer's state.*resume it with that --optim",  # not: an earlier checkpoint
    ),
    "optimizer.pt of another tower": (
        _saved_by_another_tower,
        ValueError,
        r"different tower.*start it with the tower the checkpoint names",  # not: an earlier checkpoint
    ),
    "optimizer.pt truncated": (_truncate("optimizer.pt"), RuntimeError, "cannot resume from"),
    "optimizer.pt corrupt": (_overwrite_start("optimizer.pt"), RuntimeError, "cannot resume from"),
    "optimizer.pt with a NaN learned lr": (_nan_in_saved_tower, ValueError, "non-finite"),
}


def test_only_a_checkpoint_without_a_tower_is_called_a_standard_optimizers(tmp_path):
    from hf_hyperopt.trainer.resume import unreadable_checkpoint

    group = {"params": [0], "lr": 1e-3}
    for name, groups, said in (
        ("adamw", [group], "holds a standard optimizer's state"),
        ("damaged", [{**group, "hyper_tower": {"scope": "shared"}}], "resume from an earlier checkpoint"),
    ):
        (tmp_path / name).mkdir()
        torch.save({"state": {}, "param_groups": groups}, tmp_path / name / "optimizer.pt")
        assert said in str(unreadable_checkpoint(str(tmp_path / name), ValueError("no 'tower' entry")))


@pytest.mark.parametrize("fault", list(UNREADABLE_CHECKPOINTS))
def test_unreadable_optimizer_state_stops_the_resume_and_keeps_everything(fault, full_run, tmp_path):
    damage, error, message = UNREADABLE_CHECKPOINTS[fault]
    trajectory = (full_run / "hyper_trajectory.jsonl").read_bytes()
    with pytest.raises(error, match=message) as err:
        _resume(full_run, tmp_path, damage)
    assert "checkpoint-2" in str(err.value)
    assert (tmp_path / "hyper_trajectory.jsonl").read_bytes() == trajectory  # nothing overwritten
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing trained


def test_a_tower_checkpoint_resumed_with_a_standard_optim_is_one_error(full_run, tmp_path):
    """torch.optim read the tower's state dict as its own and failed inside (KeyError: 'step')."""
    shutil.copytree(full_run / "checkpoint-2", tmp_path / "checkpoint-2")
    args = _args(tmp_path, optim="adamw_torch", hyper_tower=None)
    trainer = HyperTrainer(model=tiny_bert(seed=1), args=args, train_dataset=_data())
    with pytest.raises(
        ValueError, match=r"with --optim adamw_torch: its optimizer state is that of a tower optimizer \(adam"
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing trained


def test_missing_optimizer_state_warns_what_is_lost_and_the_card_says_so(full_run, tmp_path):
    def drop(out, ckpt):
        (ckpt / "optimizer.pt").unlink()

    with pytest.warns(
        TowerNotRestoredWarning, match=r"restarts from its initial hyperparameters \(.*lr=0\.003.*at step 2"
    ):
        trainer = _resume(full_run, tmp_path, drop)
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "Resumed at step 2 from a checkpoint without the optimizer state" in card


def _garbage_line(out, ckpt):
    for folder in (out, ckpt):
        lines = (folder / "hyper_trajectory.jsonl").read_text().splitlines(keepends=True)
        lines[0] = "this is not json\n"
        (folder / "hyper_trajectory.jsonl").write_text("".join(lines))


# fault -> (damage, steps of the resumed trajectory that match the full run, what the warning says or None)
TRAJECTORY_FAULTS = {
    "missing in the checkpoint": (lambda o, c: (c / "hyper_trajectory.jsonl").unlink(), [1, 2, 3, 4], None),
    "torn in the checkpoint": (lambda o, c: _truncate("hyper_trajectory.jsonl", 0.7)(o, c), [1, 2, 3, 4], None),
    "missing everywhere": (
        lambda o, c: [(f / "hyper_trajectory.jsonl").unlink() for f in (o, c)],
        [3, 4],
        "without a trajectory file",
    ),
    "a corrupt line everywhere": (_garbage_line, [2, 3, 4], "line(s) 1 of"),
    # the output folder holds another run's trajectory: its steps must not be spliced in (they were)
    "another run's in the output folder, none in the checkpoint": (
        lambda o, c: [(c / "hyper_trajectory.jsonl").unlink(), _another_runs_trajectory(o)],
        [3, 4],
        "is not this checkpoint's trajectory",
    ),
}


def _another_runs_trajectory(folder: Path) -> None:
    records = read_trajectory(folder / "hyper_trajectory.jsonl")
    lines = [json.dumps({**r, "hyper/0/lr": 2 * r["hyper/0/lr"]}) + "\n" for r in records]
    (folder / "hyper_trajectory.jsonl").write_text("".join(lines))


@pytest.mark.parametrize("fault", list(TRAJECTORY_FAULTS))
def test_damaged_trajectory_costs_only_the_damaged_records(fault, full_run, tmp_path):
    damage, steps, message = TRAJECTORY_FAULTS[fault]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _resume(full_run, tmp_path, damage)
    said = [str(w.message) for w in caught if "trajectory" in str(w.message)]
    assert (message is None and not said) or any(message in s for s in said)
    _assert_like_the_full_run(trainer, full_run)  # the trajectory is a record: training is unaffected
    ref = {r["step"]: r for r in read_trajectory(full_run / "hyper_trajectory.jsonl")}
    assert read_trajectory(tmp_path / "hyper_trajectory.jsonl") == [ref[s] for s in steps]


def test_save_that_fails_halfway_resumes_from_the_last_complete_checkpoint(full_run, tmp_path, monkeypatch):
    save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        HyperTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=_data()).train()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint-4").is_dir()  # half-written: weights, no optimizer, no trainer state
    with pytest.warns(UserWarning, match="checkpoint-4 .* is incomplete"):
        trainer = HyperTrainer(model=tiny_bert(seed=1), args=_args(tmp_path), train_dataset=_data())
        trainer.train(resume_from_checkpoint=True)
    _assert_like_the_full_run(trainer, full_run)
    assert read_trajectory(tmp_path / "hyper_trajectory.jsonl") == read_trajectory(full_run / "hyper_trajectory.jsonl")


def test_resume_with_only_incomplete_checkpoints_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hi')  # torn
    trainer = HyperTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=_data())
    with pytest.raises(ValueError, match="no complete checkpoint to resume from .* checkpoint-3"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0 and not (tmp_path / "hyper_trajectory.jsonl").exists()
    # the same checkpoint named by its path: the file is named (it was a bare JSONDecodeError)
    with pytest.raises(ValueError, match="checkpoint-3: trainer_state.json does not read"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    with pytest.raises(ValueError, match="checkpoint-30: it is not a folder"):  # a typo, not a torn save
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    assert trainer.state.global_step == 0 and not (tmp_path / "hyper_trajectory.jsonl").exists()


def test_full_disk_while_writing_the_trajectory_stops_and_loses_no_step(full_run, tmp_path, monkeypatch):
    from hf_hyperopt.trainer.trajectory import TrajectoryWriter

    write = TrajectoryWriter.write

    def full_disk(self, record):
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        write(self, record)

    monkeypatch.setattr(TrajectoryWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        HyperTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=_data()).train()
    monkeypatch.undo()
    assert [r["step"] for r in read_trajectory(tmp_path / "hyper_trajectory.jsonl")] == [1, 2]
    trainer = HyperTrainer(model=tiny_bert(seed=1), args=_args(tmp_path), train_dataset=_data())
    trainer.train(resume_from_checkpoint=True)
    _assert_like_the_full_run(trainer, full_run)


def test_read_only_output_dir_stops_before_the_first_step(tmp_path, monkeypatch):
    import hf_hyperopt.trainer.trajectory as trajectory

    def read_only(path, mode="r", *a, **kw):
        if "r" not in mode:
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(trajectory, "open", read_only, raising=False)
    trainer = HyperTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=_data())
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(PermissionError, match="hyper_trajectory.jsonl"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters(), strict=True))


def test_card_reports_the_hyperparameters_of_the_best_checkpoint(tmp_path):
    kw = {"max_steps": 6, "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "load_best_model_at_end": True,
          "metric_for_best_model": "loss", "greater_is_better": True}  # fmt: skip
    # greater_is_better on a loss: the best checkpoint is the worst one, so it is not the last step.
    trainer = HyperTrainer(model=tiny_bert(), args=_args(tmp_path, **kw), train_dataset=_data(),
                           eval_dataset=_data(16))  # fmt: skip
    trainer.train()
    best = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
    assert best != 6
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    at_best = {r["step"]: r for r in read_trajectory(tmp_path / "hyper_trajectory.jsonl")}[best]["hyper/0/lr"]
    assert f"| level | hyperparameter | initial | step {best} (best checkpoint) |" in card
    assert f"| 0 | lr | 0.003 | {at_best:.4g} |" in card
    assert f"{trainer.tower.hyperparameters()[0]['lr']:.4g} |" not in card


# ----------------------------------------------------------------------------------------------- SIGKILL
KILLS = 5


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """Five SIGKILLs at random moments (mid-step, mid-save) of a run that checkpoints every step.

    After each kill the run restarts with ``resume_from_checkpoint=True``. At the end every trajectory
    line parses, and the weights, the learned values and the trajectory equal an uninterrupted run's.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "hf_hyperopt.trainer.trainer", "kill_worker"])
    import kill_worker

    def start(out: Path):
        p = ctx.Process(target=kill_worker.run, args=(str(out),))
        p.start()
        return p

    def steps_done(out: Path) -> int:
        path = out / "hyper_trajectory.jsonl"
        return len(path.read_bytes().splitlines()) if path.is_file() else 0

    ref = start(tmp_path / "ref")
    ref.join(120)
    assert ref.exitcode == 0
    rng = random.Random(0)
    out = tmp_path / "killed"
    for _ in range(KILLS):
        p = start(out)
        target = min(steps_done(out), kill_worker.STEPS - 3) + rng.randint(1, 2)
        deadline = time.monotonic() + 60
        while steps_done(out) < target and p.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))  # anywhere in the next step: its forward, backward, save
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        read_trajectory(out / "hyper_trajectory.jsonl")  # every line but a torn last one parses
    assert not (out / "final.pt").exists()
    p = start(out)
    p.join(120)
    assert p.exitcode == 0
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(out / "final.pt")
    assert a["hyper"] == b["hyper"]
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert read_trajectory(out / "hyper_trajectory.jsonl") == read_trajectory(
        tmp_path / "ref" / "hyper_trajectory.jsonl"
    )


def test_resume_from_the_last_checkpoint_of_a_finished_run_takes_no_step(full_run, tmp_path):
    # Killed after its last checkpoint and before returning: a restart must not train one step more.
    trainer = _resume(full_run, tmp_path, checkpoint="checkpoint-4")
    assert trainer.state.global_step == 4
    _assert_like_the_full_run(trainer, full_run)
    assert read_trajectory(tmp_path / "hyper_trajectory.jsonl") == read_trajectory(full_run / "hyper_trajectory.jsonl")


def test_a_trajectory_line_that_is_not_a_number_does_not_stop_the_resume(tmp_path):
    """The output folder's file is compared with the restored values: a null (a non-finite value as written)
    or a string there means another run's file, not an error."""
    from hf_hyperopt.trainer.trajectory import TrajectoryWriter

    path = tmp_path / "hyper_trajectory.jsonl"
    path.write_text('{"step": 1, "hyper/0/lr": 0.001}\n{"step": 2, "hyper/0/lr": null}\n')
    writer = TrajectoryWriter(path)
    with pytest.warns(UserWarning, match="is not this checkpoint's trajectory"):
        writer.start(resume_step=2, source=tmp_path / "missing.jsonl", resumed={"hyper/0/lr": 1e-3})
    writer.close()
    assert read_trajectory(path) == []
