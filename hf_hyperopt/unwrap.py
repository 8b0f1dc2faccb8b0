"""Finding the tower inside the wrappers that training libraries put around an optimizer.

``accelerator.prepare(opt)`` returns an ``AcceleratedOptimizer``, and the ``Trainer`` keeps that
wrapper in ``trainer.optimizer``. The wrapper steps the tower but does not forward its other methods
(``hyperparameters()``, ``learned()``, ``skipped_hyper_updates()``, ...), so reach the tower with
:func:`unwrap`::

    model, opt, loader = accelerator.prepare(model, HyperAdam(model.parameters(), lr=1e-3), loader)
    ...
    hf_hyperopt.unwrap(opt).hyperparameters()

The object returned is the very tower that the wrapper steps, so what it reports is always current.
"""

from __future__ import annotations

from typing import Any

from .optim import TowerOptimizer

# Wrappers nest (Accelerate's around a LOMO or schedule wrapper, ...) but never deeply; the bound
# guards against an object whose ``optimizer`` attribute points back at itself.
_MAX_DEPTH = 8


def find_tower(optimizer: Any) -> TowerOptimizer | None:
    """The tower inside ``optimizer`` (following ``.optimizer`` through wrappers), or ``None``."""
    for _ in range(_MAX_DEPTH + 1):
        if optimizer is None or isinstance(optimizer, TowerOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def unwrap(optimizer: Any) -> TowerOptimizer:
    """The tower optimizer inside ``optimizer``, which may be the tower itself or a wrapper around it.

    Args:
        optimizer: a :class:`~hf_hyperopt.TowerOptimizer` (``HyperAdam(...)``, ``tower(...)``), or a
            wrapper holding one in ``.optimizer`` (``accelerate``'s ``AcceleratedOptimizer``, the
            ``Trainer``'s ``trainer.optimizer``).

    Returns:
        The tower, whose ``hyperparameters()``, ``learned()``, ``spec``, ... describe the run.

    Raises:
        ValueError: if there is no tower inside ``optimizer``, naming what was found instead.
    """
    found = find_tower(optimizer)
    if found is None:
        chain, inner = [], optimizer
        for _ in range(_MAX_DEPTH + 1):
            if inner is None:
                break
            chain.append(type(inner).__name__)
            inner = getattr(inner, "optimizer", None)
        raise ValueError(
            f"no tower optimizer inside {' -> '.join(chain) or 'None'}; unwrap() takes a HyperSGD/HyperAdam/... "
            "(or hf_hyperopt.tower(...)) or a wrapper around one, such as Accelerate's prepared optimizer"
        )
    return found
