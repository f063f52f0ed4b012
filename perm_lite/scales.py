"""The PERM scales and score maths: perspectives, ranges and combination of scores."""

from __future__ import annotations

import math
from collections.abc import Mapping

PERSPECTIVES = ("resonation", "expression", "reception", "bystander")
SCALES: dict[str, tuple[float, float]] = {
    "resonation": (1.0, 5.0),
    "expression": (1.0, 5.0),
    "reception": (1.0, 5.0),
    "bystander": (0.0, 100.0),
}
EMPATHY = ("resonation", "expression", "reception")
COMBINE_MODES = ("harmonic", "mean", "geometric")


def empathy_reward(
    scores: Mapping[str, float], mode: str = "harmonic", weights: Mapping[str, float] | None = None
) -> float:
    """Combine resonation, expression and reception (1-5) as in PERM's recipe.

    Each score is normalised as s/5; `mode` is `harmonic`, `mean` (optionally weighted)
    or `geometric`. Weights apply to every mode (weighted harmonic/geometric means).
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode {mode!r}; choose one of {', '.join(COMBINE_MODES)}")
    w = (
        {name: 1.0 for name in EMPATHY}
        if weights is None
        else {name: float(weights.get(name, 0.0)) for name in EMPATHY}
    )
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    total = sum(w.values())
    normalised = {name: scores[name] / 5.0 for name in EMPATHY}
    if mode == "mean":
        return sum(w[n] * normalised[n] for n in EMPATHY) / total
    if mode == "harmonic":
        return total / sum(w[n] / normalised[n] for n in EMPATHY if w[n] > 0)
    return math.exp(sum(w[n] * math.log(normalised[n]) for n in EMPATHY) / total)


def bystander_term(bystander: float, coef: float = 0.5) -> float:
    """PERM's bystander term `coef * (b/100 - 1)`, in -coef..0."""
    return coef * (bystander / 100.0 - 1.0)


def length_penalty(n_tokens: int, limit: int = 768, coef: float = 0.001) -> float:
    """PERM's length penalty `-coef * max(0, n_tokens - limit)`."""
    return -coef * max(0, n_tokens - limit)
