"""The Hugging Face ``Trainer`` integration: tower optimizers from ``TrainingArguments``, with trajectories."""

from .arguments import ALL_OPTIMIZERS, HYPER_OPTIMIZERS, HyperOptimizerNames, HyperTrainingArguments
from .model_card import add_hyper_section, hyper_section
from .plotting import plot_trajectories
from .trainer import HyperTrainer, hyper_optimizer_cls_and_kwargs, unwrap_tower
from .trajectory import TRAJECTORY_NAME, TrajectoryWriter, hyper_log_keys, read_trajectory

__all__ = [
    "ALL_OPTIMIZERS",
    "HYPER_OPTIMIZERS",
    "TRAJECTORY_NAME",
    "HyperOptimizerNames",
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
