"""hf_hyperopt: optimizers that learn their own hyperparameters, for PyTorch and Hugging Face.

An implementation of "Gradient Descent: The Ultimate Optimizer" (Chandra et al., NeurIPS 2022).
"""

from .optim import (
    DEFAULT_HYPER,
    HyperAdaGrad,
    HyperAdam,
    HyperAdamW,
    HyperRMSProp,
    HyperSGD,
    TowerOptimizer,
    parse_spec,
    tower,
)
from .unwrap import unwrap

__version__ = "0.1.0"

# The Trainer integration imports transformers, which takes seconds: load it on first use so that
# `import hf_hyperopt` stays light for plain PyTorch users.
_TRAINER_EXPORTS = ("HyperCallback", "HyperTrainer", "HyperTrainingArguments")


def __getattr__(name: str):
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_HYPER",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperAdamW",
    "HyperCallback",
    "HyperRMSProp",
    "HyperSGD",
    "HyperTrainer",
    "HyperTrainingArguments",
    "TowerOptimizer",
    "__version__",
    "parse_spec",
    "tower",
    "unwrap",
]
