"""Optimizer levels: each module states one update rule once, as multi-tensor maths."""

from .adagrad import AdaGradRule
from .adam import AdamRule, AdamWRule
from .base import HyperSpec, Rule
from .rmsprop import RMSPropRule
from .sgd import SGDRule

RULES: dict[str, type[Rule]] = {r.name: r for r in (SGDRule, AdamRule, AdamWRule, AdaGradRule, RMSPropRule)}

__all__ = ["RULES", "AdaGradRule", "AdamRule", "AdamWRule", "HyperSpec", "RMSPropRule", "Rule", "SGDRule"]
