"""Redraw the hyperparameter trajectories of one or several HyperTrainer runs, overlaid.

Each run's ``output_dir`` holds ``hyper_trajectory.jsonl`` (one line per optimizer step); give the
folders or the files. Commands (from the repository root)::

    # one run: redraw its plot
    python scripts/plot_trajectories.py runs/minilm_adam --out runs/minilm_adam/hyper_trajectories.png

    # several runs overlaid, with labels
    python scripts/plot_trajectories.py runs/lr1e-5 runs/lr1e-3 runs/lr1e-1 \\
        --labels "lr 1e-5" "lr 1e-3" "lr 1e-1" --out results/trajectories.png --title "MiniLM, hyper_adam"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hf_hyperopt.trainer import TRAJECTORY_NAME, plot_trajectories
from hf_hyperopt.trainer.callback import PLOT_NAME


def resolve(run: str) -> Path:
    """A run folder (holding ``hyper_trajectory.jsonl``) or the trajectory file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / TRAJECTORY_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{run}: no trajectory file (expected a run folder holding {TRAJECTORY_NAME}, or the file)"
        )
    return path


def main(argv: list[str] | None = None) -> Path:
    args = make_parser().parse_args(argv)
    runs = [resolve(r) for r in args.runs]
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):  # a folder: the file a run's own plot is named
        out = out / PLOT_NAME
    out = plot_trajectories(runs, out, labels=args.labels, title=args.title)
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help=f"run folders (holding {TRAJECTORY_NAME}) or trajectory files")
    parser.add_argument("--out", default=PLOT_NAME, help=f"the PNG to write, or a folder to write {PLOT_NAME} in")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    parser.add_argument("--title", default=None, help="the figure's title")
    return parser


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
