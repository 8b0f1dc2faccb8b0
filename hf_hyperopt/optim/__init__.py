"""The tower engine: optimizers that learn their own hyperparameters from hypergradients."""

from .config import SCOPES, LevelConfig
from .engine import TowerOptimizer
from .optimizers import (
    DEFAULT_HYPER,
    OPTIMIZERS,
    HyperAdaGrad,
    HyperAdam,
    HyperAdamW,
    HyperRMSProp,
    HyperSGD,
    UpperLevels,
    tower,
)
from .spec import parse_spec

__all__ = [
    "DEFAULT_HYPER",
    "OPTIMIZERS",
    "SCOPES",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperAdamW",
    "HyperRMSProp",
    "HyperSGD",
    "LevelConfig",
    "TowerOptimizer",
    "UpperLevels",
    "parse_spec",
    "tower",
]
