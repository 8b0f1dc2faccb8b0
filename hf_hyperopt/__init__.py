"""hf_hyperopt: optimizers that learn their own hyperparameters, for PyTorch and Hugging Face.

An implementation of "Gradient Descent: The Ultimate Optimizer" (Chandra et al., NeurIPS 2022).
"""

from .tower import (
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HYPER",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperAdamW",
    "HyperRMSProp",
    "HyperSGD",
    "TowerOptimizer",
    "__version__",
    "parse_spec",
    "tower",
]
