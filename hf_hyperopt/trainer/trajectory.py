"""The per-step trajectory file: every optimizer step's hyperparameters, one JSON object a line.

Each line is flat and uses the same keys as the ``Trainer`` logs::

    {"step": 12, "learning_rate": 5.3e-05, "hyper/0/lr": 5.3e-05, "hyper/1/lr": 0.01}

A line is written, flushed and ``fsync``'d as soon as the step is taken, so a crash loses at most the
step in flight; a torn last line is skipped by :func:`read_trajectory`. On resume from a checkpoint
the lines beyond the resumed step are dropped (they belong to the run that did not reach its next
checkpoint), so the file of a resumed run reads like the file of a run that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

TRAJECTORY_NAME = "hyper_trajectory.jsonl"


def hyper_log_keys(
    hyperparameters: list[dict[str, float | list[float]]], scope: str, skip: Collection[int] = ()
) -> dict[str, float]:
    """Flatten :meth:`TowerOptimizer.hyperparameters` into ``hyper/{level}/{name}`` keys.

    Per-group values get ``/group{i}`` appended, per-tensor values ``/tensor{i}``. ``skip`` (scope ``group``):
    param groups left out, those without parameters (:func:`empty_groups`), whose values move no weight.

    Example:
        ``[{"lr": 1e-3}, {"lr": 0.01}]`` -> ``{"hyper/0/lr": 1e-3, "hyper/1/lr": 0.01}``.
    """
    suffix = "tensor" if scope == "tensor" else "group"
    skipped = frozenset(skip) if scope == "group" else frozenset()
    out: dict[str, float] = {}
    for level, entry in enumerate(hyperparameters):
        for name, value in entry.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if i not in skipped:
                        out[f"hyper/{level}/{name}/{suffix}{i}"] = float(v)
            else:
                out[f"hyper/{level}/{name}"] = float(value)
    return out


def empty_groups(tower: Any) -> frozenset[int]:
    """The tower's param groups that hold no parameters, in scope ``group`` (e.g. the no-decay group of a LoRA
    model without trainable biases or norms): each still has an lr, which moves no weight, so the logs, the
    trajectory and the model card leave it out."""
    if tower.scope != "group":
        return frozenset()
    return frozenset(i for i, group in enumerate(tower.param_groups) if not group["params"])


def without_empty_groups(
    hyperparameters: list[dict[str, float | list[float]]], empty: Collection[int]
) -> list[dict[str, float | list[float]]]:
    """``hyperparameters`` (scope ``group``) without the per-group values of the groups in ``empty``."""
    return [
        {
            name: [v for i, v in enumerate(value) if i not in empty] if isinstance(value, list) else value
            for name, value in entry.items()
        }
        for entry in hyperparameters
    ]


class TrajectoryWriter:
    """Appends one line per optimizer step to ``path``, durably.

    Args:
        path: the JSON-lines file (``<output_dir>/hyper_trajectory.jsonl`` under the Trainer).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: Any = None

    def start(
        self, resume_step: int = 0, source: str | os.PathLike | None = None, resumed: dict[str, float] | None = None
    ) -> None:
        """Open the file for a run that starts at ``resume_step`` (0: a fresh run).

        A fresh run truncates the file. A resumed run keeps the lines with ``step <= resume_step``,
        taken from ``source`` (the copy saved in the checkpoint) when given and present, else from the
        file already at ``path`` if its line at ``resume_step`` holds the ``resumed`` values (the
        restored tower's ``hyper/*``): otherwise that file is another run's.
        """
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._resumed_records(resume_step, source, resumed) if resume_step > 0 else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(_dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def _resumed_records(
        self, resume_step: int, source: str | os.PathLike | None, resumed: dict[str, float] | None = None
    ) -> list[dict[str, Any]]:
        """Steps ``1..resume_step`` from the checkpoint's copy, else from the run's own file; warns about gaps.

        The trajectory is a record, not training state: a damaged or missing copy does not stop the
        resume. Unreadable lines are dropped and the steps that could not be found are named.
        """
        wanted = set(range(1, resume_step + 1))
        best: tuple[Path, list[dict[str, Any]], list[int], list[str]] | None = None
        for src in ([Path(source)] if source is not None else []) + [self.path]:
            if not src.is_file():
                continue
            records, problems = salvage_trajectory(src)
            kept = [r for r in records if r["step"] <= resume_step]
            if src == self.path and src != (Path(source) if source is not None else None) and resumed:
                last = next((r for r in kept if r["step"] == resume_step), None)
                if last is not None and not _same_values(last, resumed):
                    warnings.warn(
                        f"resuming at step {resume_step}: {self.path} is not this checkpoint's trajectory (its step "
                        f"{resume_step} holds other learned values), so it is not kept",
                        stacklevel=3,
                    )
                    continue
            missing = sorted(wanted - {r["step"] for r in kept})
            if best is None or len(missing) < len(best[2]):
                best = (src, kept, missing, problems)
            if not missing and not problems:
                break
        if best is None:
            warnings.warn(
                f"resuming at step {resume_step} without a trajectory file (neither {source} nor {self.path} "
                f"exists): {self.path} starts at step {resume_step + 1}",
                stacklevel=3,
            )
            return []
        src, kept, missing, problems = best
        if missing or problems:
            warnings.warn(
                f"resuming at step {resume_step} from the trajectory {src}: "
                + "; ".join(problems + ([f"steps {_ranges(missing)} are missing"] if missing else []))
                + f"; {self.path} keeps the {len(kept)} readable step(s)",
                stacklevel=3,
            )
        return kept

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line, flushed and fsync'd before returning."""
        if self._file is None:
            self.start()
        self._file.write(_dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()


def _same_values(record: dict[str, Any], values: dict[str, float]) -> bool:
    """Whether ``record`` holds ``values`` (``hyper/*`` keys), to float32's precision."""
    return all(
        isinstance(record.get(key), (int, float))
        and not isinstance(record[key], bool)
        and math.isclose(record[key], v, rel_tol=1e-6, abs_tol=0.0)
        for key, v in values.items()
    )


def _dumps(record: dict[str, Any]) -> str:
    # JSON has no NaN/Infinity; write them as null so every line stays standard JSON.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, separators=(",", ":"))


def read_trajectory(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a trajectory file, in order; a torn (unparseable) last line is skipped.

    Raises:
        ValueError: if a line other than the last does not parse, or a line is not a record of numbers
            (or nulls) with a whole ``step`` (the file is not a trajectory).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the step that was being written when the run stopped
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        numbers = isinstance(record, dict) and all(  # null: a value that was not finite (_dumps)
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in record.values()
        )
        if not (numbers and isinstance(record.get("step"), int)):
            raise ValueError(
                f"{path}: line {i + 1} is not a trajectory record (an object of numbers or nulls with a whole "
                f"'step'): {line[:80]!r}"
            )
        records.append(record)
    return records


def salvage_trajectory(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable record of a trajectory file, and a description of each line that is not one.

    Unlike :func:`read_trajectory`, a damaged line anywhere is skipped rather than refused: this is
    for carrying a run's history over a resume, where a damaged record should cost that record only.
    """
    try:
        lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        return [], [f"{path} cannot be read ({e.strerror or e})"]
    records, bad = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(i + 1)
    return records, ([f"line(s) {_ranges(bad)} of {path} are not trajectory records and are dropped"] if bad else [])


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    for n in numbers:
        if out and n == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def trajectory_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """The ``hyper/...`` keys present in ``records``, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith("hyper/"):
                seen.setdefault(k, None)
    return list(seen)
