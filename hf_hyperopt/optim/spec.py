"""Spec strings: a tower written the paper's way, bottom level first.

``"adam(lr=1e-3)/sgd(lr=1e-5)"`` is Adam on the weights whose step size is learned by SGD with step
size 1e-5. Each level is ``name`` or ``name(key=value, ...)``; keys are named as in ``torch.optim``
(``lr``, ``momentum``, ``nesterov``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, and ``alpha`` for
RMSProp's smoothing constant) plus ``learn=lr+beta1`` to choose what the level above learns and, on
a level above the weights, ``trace=0.9`` for the decay of the tangent trace it learns from
(``trace=auto``: one pass through the training data), ``normalize=true`` to learn from the slope
along the update, ``timescale=100`` to shrink its own step size as ``sqrt(100 / t)`` after its
first 100 steps and, on level 1, ``ramp=1e-3`` to start
the weights' learned lr at a step sized by the weights and ``ramp_search=0.3`` to search past that
start while the hypergradient asks for more (see :class:`LevelConfig`).
"""

from __future__ import annotations

import re

from ..levels import RULES
from .config import AUTO_TRACE, LevelConfig, checked_level
from .engine import TowerOptimizer

_LEVEL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def parse_spec(spec: str) -> list[LevelConfig]:
    """Parse a tower spec into level configs, bottom first.

    Raises:
        ValueError: quoting the token that does not parse, and what is allowed there.
    """
    if not isinstance(spec, str):
        raise ValueError(
            f"a tower spec is a string, e.g. 'adam(lr=1e-3)/sgd(lr=1e-5)'; got {type(spec).__name__} {spec!r}"
            + (" (an optimizer's levels above the weights go in its hyper=)" if hasattr(spec, "levels") else "")
        )
    if not spec.strip():
        raise ValueError(f"empty tower spec {spec!r}; expected e.g. 'adam(lr=1e-3)/sgd(lr=1e-5)'")
    levels = []
    for k, text in enumerate(_split_levels(spec)):
        m = _LEVEL.match(text)
        if not m:
            raise ValueError(
                f"cannot parse level {k} {text.strip()!r} of tower spec {spec!r}; expected name or name(key=value, ...)"
            )
        name, body = m.group(1).lower(), m.group(2)
        if name not in RULES:
            raise ValueError(f"unknown optimizer {m.group(1)!r} in tower spec {spec!r}; allowed: {', '.join(RULES)}")
        rule = RULES[name]
        values: dict[str, float] = {}
        learn = None
        trace, ramp, normalize, cosine, ramp_search, timescale = 0.0, 0.0, False, 0.0, 0.0, 0.0
        seen: set[str] = set()
        for item in _split_args(body or ""):
            if "=" not in item:
                raise ValueError(f"{item.strip()!r} in level {k} ({name}) of {spec!r} is not key=value")
            key, _, raw = (s.strip() for s in item.partition("="))
            if key in seen:
                raise ValueError(f"{key!r} is given twice for {name} in tower spec {spec!r}; give each key once")
            seen.add(key)
            allowed = [
                *rule.hyperparameters,
                "learn",
                "trace",
                "ramp",
                "ramp_search",
                "normalize",
                "cosine",
                "timescale",
            ]
            if key not in allowed:
                raise ValueError(
                    f"unknown key {key!r} for {name} in tower spec {spec!r}; allowed: {', '.join(allowed)}"
                )
            if key == "learn":
                try:
                    learn = list(rule.split_learn(raw))
                except ValueError as err:
                    raise ValueError(f"{name} in tower spec {spec!r}: {err}") from None
                continue
            if key == "trace":
                if raw.lower() == AUTO_TRACE:
                    trace = AUTO_TRACE
                elif not _NUMBER.fullmatch(raw):
                    raise ValueError(
                        f"trace={raw!r} for {name} in {spec!r} is neither a decay in [0, 1) nor {AUTO_TRACE!r}"
                    )
                else:
                    trace = float(raw)
                continue
            if key == "normalize":
                normalize = bool(_parse_value(key, raw, "flag", name, spec))
                continue
            if key == "ramp":
                ramp = _parse_value(key, raw, "unit", name, spec)
                continue
            if key == "ramp_search":
                ramp_search = _parse_value(key, raw, "step", name, spec)
                continue
            if key == "cosine":
                cosine = _parse_value(key, raw, "step", name, spec)
                continue
            if key == "timescale":
                timescale = _parse_value(key, raw, "step", name, spec)
                continue
            values[key] = _parse_value(key, raw, rule.hyperparameters[key].kind, name, spec)
        levels.append(
            checked_level(
                k,
                rule,
                values,
                learn,
                trace,
                ramp,
                normalize,
                source=f" of tower spec {spec!r}",
                cosine=cosine,
                ramp_search=ramp_search,
                timescale=timescale,
            )
        )
    return levels


_NUMBER = re.compile(r"[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE | re.ASCII)


def _parse_value(key: str, raw: str, kind: str, name: str, spec: str) -> float:
    if kind == "flag":
        if raw.lower() in _TRUE:
            return 1.0
        if raw.lower() in _FALSE:
            return 0.0
        raise ValueError(f"{key}={raw!r} for {name} in {spec!r} is not a boolean; use true or false")
    # float() also reads '1_0' and non-ASCII digits: a spec holds plain decimal numbers (and inf/nan, refused later).
    if not _NUMBER.fullmatch(raw.strip()):
        raise ValueError(f"{key}={raw!r} for {name} in {spec!r} is not a number")
    return float(raw)


def _split_levels(spec: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in tower spec {spec!r}")
        if ch == "/" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced '(' in tower spec {spec!r}")
    parts.append(cur)
    for i, p in enumerate(parts):
        if not p.strip():
            raise ValueError(f"empty level {i} in tower spec {spec!r}; levels are separated by a single '/'")
    return parts


def _split_args(body: str) -> list[str]:
    return [s for s in body.split(",") if s.strip()] if body.strip() else []


def started_spec(tower: TowerOptimizer) -> str:
    """``tower`` as a spec string with every weight-level value it started from written out.

    :attr:`TowerOptimizer.spec` leaves out values equal to ``torch.optim``'s defaults (it is the
    tower's identity in checkpoints); a reader of a model card or a plot legend wants them all, e.g.
    ``adam(lr=0.001,beta1=0.9,beta2=0.999,eps=1e-08,weight_decay=0.0,learn=lr)/adam(lr=0.05,beta1=0.0,trace=auto,ramp=0.001,normalize=true,ramp_search=0.3,timescale=100)``.
    The levels above the weights are written as given.
    """
    bottom, *above = tower.levels
    parts = [
        f"{name}={_format_value(value, bottom.rule.hyperparameters[name].kind)}"
        for name, value in bottom.full_values().items()
    ]
    if tower.height:
        parts.append("learn=" + "+".join(tower.learned()[0]))
    return "/".join([f"{bottom.rule.name}({','.join(parts)})", *(cfg.to_spec() for cfg in above)])


def _format_value(value: float, kind: str) -> str:
    if kind == "flag":
        return "true" if value else "false"
    return repr(float(value))
