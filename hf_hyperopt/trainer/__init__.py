"""The Hugging Face ``Trainer`` integration: tower optimizers from ``TrainingArguments``, with trajectories.

``trajectory``, ``plotting`` and ``model_card`` do not import ``transformers``; the names that need it
(``HyperTrainer``, ``HyperTrainingArguments``, ``HyperCallback``, ...) are loaded on first use, so that redrawing a plot
does not pay for importing the ``Trainer``.
"""

from importlib import import_module

from .model_card import add_hyper_section, hyper_section
from .plotting import plot_trajectories
from .trajectory import TRAJECTORY_NAME, TrajectoryWriter, hyper_log_keys, read_trajectory

_LAZY = {
    "ALL_OPTIMIZERS": "arguments",
    "HYPER_OPTIMIZERS": "arguments",
    "HyperOptimizerNames": "arguments",
    "HyperSettings": "arguments",
    "HyperTrainingArguments": "arguments",
    "HyperCallback": "callback",
    "HyperTrainer": "trainer",
    "hyper_optimizer_cls_and_kwargs": "trainer",
    "unwrap_tower": "trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_OPTIMIZERS",
    "HYPER_OPTIMIZERS",
    "TRAJECTORY_NAME",
    "HyperCallback",
    "HyperOptimizerNames",
    "HyperSettings",
    "HyperTrainer",
    "HyperTrainingArguments",
    "TrajectoryWriter",
    "add_hyper_section",
    "hyper_log_keys",
    "hyper_optimizer_cls_and_kwargs",
    "hyper_section",
    "plot_trajectories",
    "read_trajectory",
    "unwrap_tower",
]
