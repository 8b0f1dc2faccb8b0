"""A plot of every level's hyperparameter trajectories, for one run or several overlaid.

One panel per learned hyperparameter (``hyper/0/lr``, ``hyper/0/beta1``, ``hyper/1/lr``, ...); the
per-group or per-tensor copies of a hyperparameter share its panel. Step sizes (``lr``, ``eps``,
``weight_decay``) span orders of magnitude and are drawn on a log scale; rates (betas, momentum,
``alpha``) on a linear one. The weight level's effective step size (``learning_rate``: the learned
``lr`` times the schedule's factor) is drawn dashed in the ``hyper/0/lr`` panel when it differs.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .trajectory import read_trajectory, trajectory_keys

_STEP_NAMES = ("lr", "eps", "weight_decay")
_COPY = re.compile(r"/(group|tensor)\d+$")


def _wrap(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` characters, broken after spaces, commas and slashes (a spec
    string has no spaces, and a break at a hyphen would split ``1e-08``)."""
    lines = [""]
    for piece in re.split(r"(?<=[ ,/])", text):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines)


def _panel(key: str) -> str:
    return _COPY.sub("", key)


def plot_trajectories(
    runs: Sequence[str | os.PathLike | list[dict[str, Any]]],
    out: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the trajectories of one or several runs and save the figure as ``out`` (PNG).

    Args:
        runs: trajectory files (``hyper_trajectory.jsonl``) or lists of their records.
        out: the image to write.
        labels: one legend label per run; by default the name of the folder holding each file.
        title: the figure's title.

    Returns:
        The path written.

    Raises:
        ValueError: if ``runs`` is empty, ``labels`` has the wrong length, or no run holds any
            ``hyper/...`` value.
    """
    # A bare Figure draws with Agg and touches no pyplot state, so a training run inside a notebook
    # neither changes the user's backend nor leaves figures open.
    import matplotlib
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot_trajectories needs at least one run")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    records = [read_trajectory(r) if isinstance(r, str | os.PathLike) else list(r) for r in runs]
    for run, recs in zip(runs, records, strict=True):
        if isinstance(run, str | os.PathLike) and not recs:
            warnings.warn(f"{run} holds no readable trajectory record; it is left out of the plot", stacklevel=2)
    if labels is None:
        labels = [
            Path(r).resolve().parent.name if isinstance(r, str | os.PathLike) else f"run {i}"
            for i, r in enumerate(runs)
        ]
    panels: dict[str, None] = {}
    for recs in records:
        for key in trajectory_keys(recs):
            panels.setdefault(_panel(key), None)
    if not panels:
        raise ValueError("no hyper/... values in the given runs: nothing to plot")
    names = list(panels)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, names, strict=False):
        for i, (recs, label) in enumerate(zip(records, labels, strict=True)):
            color = colors[i % len(colors)]
            keys = [k for k in trajectory_keys(recs) if _panel(k) == panel]
            for j, key in enumerate(keys):
                pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                if len(keys) == 1:
                    legend = label
                elif len(keys) <= 4:  # a few groups: one legend entry each
                    legend = f"{label} ({key.rsplit('/', 1)[-1]})"
                else:  # one per group or tensor: a single entry
                    kind = "groups" if "/group" in key else "tensors"
                    legend = f"{label} ({len(keys)} {kind})" if j == 0 else None
                ax.plot(xs, ys, color=color, alpha=1.0 if len(keys) == 1 else 0.6, lw=1.4, label=legend,
                        ls=("-", ":", "-.", "--")[j % 4] if len(keys) <= 4 else "-")  # fmt: skip
            if panel == "hyper/0/lr":
                pts = [(r["step"], r["learning_rate"]) for r in recs if r.get("learning_rate") is not None]
                # learning_rate is param group 0's: compare with its learned value in any scope.
                learned = [
                    r.get("hyper/0/lr", r.get("hyper/0/lr/group0", r.get("hyper/0/lr/tensor0")))
                    for r in recs
                    if r.get("learning_rate") is not None
                ]
                if pts and any(
                    v is None or not math.isclose(p[1], v, rel_tol=1e-6) for p, v in zip(pts, learned, strict=True)
                ):
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, color=color, ls="--", lw=1.0, label=f"{label} (with schedule)")
        name = panel.rsplit("/", 1)[-1]
        if name in _STEP_NAMES:
            ax.set_yscale("log")
        level = panel.split("/")[1]
        ax.set_title(f"level {level}: {name}")
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if title:  # a tower's spec runs to a hundred characters and more: wrapped to the figure's width
        fig.suptitle(_wrap(title, 50 * cols), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    if not out.suffix:  # what matplotlib writes, so that the path returned is the file
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
