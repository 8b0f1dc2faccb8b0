"""The hyperoptimizer section of the model card that ``Trainer.create_model_card`` writes.

The section names the tower, gives every level's learned hyperparameters at the start and at the end
of training, and shows the trajectory plot. It sits between two HTML comments so that writing the
card again replaces it instead of adding a second copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard

BEGIN = "<!-- hf_hyperopt:begin -->"
END = "<!-- hf_hyperopt:end -->"
TAG = "hf-hyperopt"


def _fmt(value: float | list[float]) -> str:
    if isinstance(value, list):
        if len(value) <= 4:
            return ", ".join(f"{v:.4g}" for v in value)
        return f"{len(value)} values in [{min(value):.3g}, {max(value):.3g}]"
    return f"{value:.4g}"


def hyper_section(
    spec: str,
    scope: str,
    initial: list[dict[str, float | list[float]]],
    final: list[dict[str, float | list[float]]],
    plot: str | None = None,
    steps: int | None = None,
    final_label: str = "final",
    notes: list[str] | None = None,
) -> str:
    """Markdown for the hyperoptimizer section.

    Args:
        spec: the tower, weight level first (``TowerOptimizer.spec``).
        scope: ``shared``, ``group`` or ``tensor``.
        initial: ``hyperparameters()`` before the first step, bottom level first.
        final: ``hyperparameters()`` at the end of training.
        plot: the trajectory image, relative to the card (shown if given).
        steps: the number of optimizer steps taken.
        final_label: the heading of the ``final`` column (e.g. ``step 6 (best checkpoint)``).
        notes: more list items for the section (how the run was resumed, which weights were kept).
    """
    lines = [
        BEGIN,
        "## Hyperoptimizer",
        "",
        "This model was trained with a tower of optimizers that learn their own hyperparameters "
        "([hf_hyperopt](https://arxiv.org/abs/1909.13371): *Gradient Descent: The Ultimate Optimizer*, "
        "Chandra et al., NeurIPS 2022). Level 0 updates the weights; level k+1 learns the hyperparameters "
        "of level k by gradient descent on the training loss; the top level is fixed. A level written with "
        "`timescale=T` steps with its lr times min(1, sqrt(T / t)) at its t-th step; the table gives lr as written "
        "or learned.",
        "",
        f"- Tower (bottom first): `{spec}`",
        f"- Scope of the learned values: `{scope}`",
    ]
    if steps is not None:
        lines.append(f"- Optimizer steps: {steps}")
    lines += [f"- {note}" for note in notes or []]
    lines += ["", f"| level | hyperparameter | initial | {final_label} |", "|---|---|---|---|"]
    for k, (start, end) in enumerate(zip(initial, final, strict=True)):
        for name in end:
            learned = "" if k < len(final) - 1 else " (fixed)"
            lines.append(f"| {k} | {name}{learned} | {_fmt(start.get(name, end[name]))} | {_fmt(end[name])} |")
    if plot:
        lines += ["", f"![Hyperparameter trajectories, every level]({plot})"]
    lines += [END, ""]
    return "\n".join(lines)


def add_hyper_section(card_path: str | os.PathLike, section: str) -> None:
    """Put ``section`` into the model card at ``card_path`` (replacing an earlier one) and tag the card."""
    path = Path(card_path)
    # A new card starts with its metadata: an empty block does not parse, and would be kept as body text.
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\ntags:\n- {TAG}\n---\n")
    text = card.text
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.text = text
    tags = list(card.data.tags or [])
    if TAG not in tags:
        card.data.tags = [*tags, TAG]
    card.save(path)
