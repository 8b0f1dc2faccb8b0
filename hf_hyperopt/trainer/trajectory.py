"""The per-step trajectory file: every optimizer step's hyperparameters, one JSON object a line.

Each line is flat and uses the same keys as the ``Trainer`` logs::

    {"step": 12, "epoch": 0.5, "learning_rate": 5.3e-05, "hyper/0/lr": 5.3e-05, "hyper/1/lr": 0.01}

A line is written, flushed and ``fsync``'d as soon as the step is taken, so a crash loses at most the
step in flight; a torn last line is skipped by :func:`read_trajectory`. On resume from a checkpoint
the lines beyond the resumed step are dropped (they belong to the run that did not reach its next
checkpoint), so the file of a resumed run reads like the file of a run that never stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRAJECTORY_NAME = "hyper_trajectory.jsonl"


def hyper_log_keys(hyperparameters: list[dict[str, float | list[float]]], scope: str) -> dict[str, float]:
    """Flatten :meth:`TowerOptimizer.hyperparameters` into ``hyper/{level}/{name}`` keys.

    Per-group values get ``/group{i}`` appended, per-tensor values ``/tensor{i}``.

    Example:
        ``[{"lr": 1e-3}, {"lr": 0.01}]`` -> ``{"hyper/0/lr": 1e-3, "hyper/1/lr": 0.01}``.
    """
    suffix = "tensor" if scope == "tensor" else "group"
    out: dict[str, float] = {}
    for level, entry in enumerate(hyperparameters):
        for name, value in entry.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    out[f"hyper/{level}/{name}/{suffix}{i}"] = float(v)
            else:
                out[f"hyper/{level}/{name}"] = float(value)
    return out


class TrajectoryWriter:
    """Appends one line per optimizer step to ``path``, durably.

    Args:
        path: the JSON-lines file (``<output_dir>/hyper_trajectory.jsonl`` under the Trainer).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: Any = None

    def start(self, resume_step: int = 0, source: str | os.PathLike | None = None) -> None:
        """Open the file for a run that starts at ``resume_step`` (0: a fresh run).

        A fresh run truncates the file. A resumed run keeps the lines with ``step <= resume_step``,
        taken from ``source`` (the copy saved in the checkpoint) when given and present, else from the
        file already at ``path``.
        """
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step > 0:
            src = Path(source) if source is not None and Path(source).is_file() else self.path
            if src.is_file():
                kept = [r for r in read_trajectory(src) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(_dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

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


def _dumps(record: dict[str, Any]) -> str:
    # JSON has no NaN/Infinity; write them as null so every line stays standard JSON.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, separators=(",", ":"))


def read_trajectory(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a trajectory file, in order; a torn (unparseable) last line is skipped.

    Raises:
        ValueError: if a line other than the last does not parse (the file is not a trajectory).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the step that was being written when the run stopped
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def trajectory_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """The ``hyper/...`` keys present in ``records``, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith("hyper/"):
                seen.setdefault(k, None)
    return list(seen)
