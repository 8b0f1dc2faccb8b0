"""The trajectory file, its plot, the plotting script and the model card section (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hf_hyperopt.trainer import TrajectoryWriter, add_hyper_section, hyper_log_keys, hyper_section, read_trajectory
from hf_hyperopt.trainer.callback import PLOT_NAME
from hf_hyperopt.trainer.plotting import plot_trajectories

ROOT = Path(__file__).resolve().parents[1]


def records(n: int, lr0: float = 1e-3, factor: float = 1.1) -> list[dict]:
    return [{"step": s, "learning_rate": lr0 * factor**s, "hyper/0/lr": lr0 * factor**s, "hyper/1/lr": 0.01}
            for s in range(1, n + 1)]  # fmt: skip


def test_hyper_log_keys_per_scope():
    assert hyper_log_keys([{"lr": 1e-3, "beta1": 0.9}, {"lr": 0.01}], "shared") == {
        "hyper/0/lr": 1e-3,
        "hyper/0/beta1": 0.9,
        "hyper/1/lr": 0.01,
    }
    assert hyper_log_keys([{"lr": [1e-3, 2e-3]}, {"lr": 0.01}], "group") == {
        "hyper/0/lr/group0": 1e-3,
        "hyper/0/lr/group1": 2e-3,
        "hyper/1/lr": 0.01,
    }
    assert "hyper/0/lr/tensor1" in hyper_log_keys([{"lr": [1e-3, 2e-3]}, {"lr": 0.01}], "tensor")


def test_writer_is_durable_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    w = TrajectoryWriter(path)
    w.start()
    for r in records(3):
        w.write(r)
    # Each line is on disk as soon as write returns, before close.
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    w.close()
    with open(path, "a") as f:
        f.write('{"step":4,"hyper/0/l')  # a crash in the middle of a line
    assert [r["step"] for r in read_trajectory(path)] == [1, 2, 3]
    path.write_text('{"step":1}\nnot json\n{"step":3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_trajectory(path)


def test_writer_resume_keeps_steps_up_to_the_checkpoint(tmp_path):
    path, ckpt = tmp_path / "run.jsonl", tmp_path / "ckpt.jsonl"
    for p, n in ((path, 7), (ckpt, 4)):
        w = TrajectoryWriter(p)
        w.start()
        for r in records(n):
            w.write(r)
        w.close()
    w = TrajectoryWriter(path)
    w.start(resume_step=4)  # the run's own file, cut back
    w.write(records(5)[-1])
    w.close()
    assert [r["step"] for r in read_trajectory(path)] == [1, 2, 3, 4, 5]
    (tmp_path / "elsewhere").mkdir()
    w = TrajectoryWriter(tmp_path / "elsewhere" / "run.jsonl")
    w.start(resume_step=3, source=ckpt)  # a new folder, from the checkpoint's copy
    w.close()
    assert read_trajectory(tmp_path / "elsewhere" / "run.jsonl") == records(3)
    w = TrajectoryWriter(path)
    w.start()  # a fresh run truncates
    w.close()
    assert read_trajectory(path) == []


def test_plot_overlays_runs_and_refuses_bad_input(tmp_path):
    a, b = tmp_path / "a" / "hyper_trajectory.jsonl", tmp_path / "b" / "hyper_trajectory.jsonl"
    for p, recs in ((a, records(20)), (b, records(20, lr0=1e-5, factor=1.3))):
        p.parent.mkdir()
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = plot_trajectories([a, b], tmp_path / "both.png", title="two runs")
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_trajectories([a], tmp_path / "x.png", labels=["x", "y"])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_trajectories([[{"step": 1, "loss": 1.0}]], tmp_path / "x.png")
    # a file with no readable record is named, not silently left out; an out without a suffix is the PNG written
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.warns(UserWarning, match="bad.jsonl holds no readable trajectory record"):
        out = plot_trajectories([a, bad], tmp_path / "noext")
    assert out == tmp_path / "noext.png" and out.is_file()


def test_plot_script_redraws_several_runs(tmp_path, capsys):
    for name, lr0 in (("r1", 1e-3), ("r2", 1e-4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hyper_trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(5, lr0)))
    # The script's main() takes the command line, so this is the command run in-process (no second
    # interpreter start: importing torch again would dominate the test).
    spec = importlib.util.spec_from_file_location("plot_trajectories", ROOT / "scripts" / "plot_trajectories.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cmp.png"
    script.main([str(tmp_path / "r1"), str(tmp_path / "r2" / "hyper_trajectory.jsonl"), "--labels", "one", "two",
                 "--out", str(out)])  # fmt: skip
    assert "2 runs" in capsys.readouterr().out and out.stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="no trajectory file"):
        script.main([str(tmp_path / "nope")])
    # --out a folder writes the run plot's name in it (it wrote <folder>.png beside it)
    (tmp_path / "plots").mkdir()
    assert script.main([str(tmp_path / "r1"), "--out", str(tmp_path / "plots")]) == tmp_path / "plots" / PLOT_NAME
    # records that parse but are not trajectory records: one error naming the line (was a bare TypeError)
    for line in ("null", "[1, 2]", '{"loss": 1.0}', '{"step": 1, "hyper/0/lr": "0.1"}'):
        (tmp_path / "r1" / "hyper_trajectory.jsonl").write_text(line + "\n" + line + "\n")
        with pytest.raises(ValueError, match="line 1 is not a trajectory record"):
            script.main([str(tmp_path / "r1")])


def test_model_card_section_is_written_once_and_tagged(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n---\n\n# my model\n")
    initial = [{"lr": 1e-3}, {"lr": 0.01}]
    section = hyper_section("adam(lr=0.001)/adam(lr=0.01)", "shared", initial, [{"lr": 2.5e-3}, {"lr": 0.01}],
                            plot="hyper_trajectories.png", steps=30)  # fmt: skip
    add_hyper_section(card, section)
    add_hyper_section(card, section.replace("0.0025", "0.0031"))
    text = card.read_text()
    assert text.count("## Hyperoptimizer") == 1 and "# my model" in text
    assert "`adam(lr=0.001)/adam(lr=0.01)`" in text and "| 0 | lr | 0.001 | 0.0031 |" in text and "0.0025" not in text
    assert "| 1 | lr (fixed) | 0.01 | 0.01 |" in text and "](hyper_trajectories.png)" in text
    assert "- hf-hyperopt" in text and "- generated_from_trainer" in text


def test_a_new_model_card_starts_with_its_metadata_and_nothing_else(tmp_path):
    """Without a README.md yet, the card began '---\\ntags: ...\\n---\\n---\\n---': the empty metadata block it
    was built from did not parse and was kept as body text (two horizontal rules on the Hub)."""
    from huggingface_hub import ModelCard

    card = tmp_path / "README.md"
    add_hyper_section(card, hyper_section("sgd(lr=0.1)/sgd(lr=0.01)", "shared", [{"lr": 0.1}, {"lr": 0.01}],
                                          [{"lr": 0.2}, {"lr": 0.01}]))  # fmt: skip
    text = card.read_text()
    assert text.startswith("---\ntags:\n- hf-hyperopt\n---\n") and text.count("---\n") == 2
    loaded = ModelCard.load(card)
    assert loaded.data.tags == ["hf-hyperopt"] and loaded.text.lstrip().startswith("<!-- hf_hyperopt:begin -->")
