"""PERM's reward formula, once: the frozen `Reward` every front end uses.

    reward = empathy(resonation, expression, reception) + bystander term [+ length penalty]

`Scorer` reports `combined` (no length penalty: it does not see the policy's tokens);
the TRL reward adds the length penalty with `total`. Weights are checked against the
model's heads when the reward is bound to a model (`Scorer` does it) or first used, so a
misspelt name is an error, never ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any

from perm_lite.errors import OptionError
from perm_lite.scales import PERM_HEADS, Heads

COMBINE_MODES = ("harmonic", "mean", "geometric")


def _number(value: Any, what: str, option: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise OptionError(f"{what} must be a finite number, not {value!r}", option)
    if minimum is not None and value < minimum:
        raise OptionError(f"{what} must be at least {minimum:g}, not {value!r}", option)
    return float(value)


def _checked_weights(weights: Any) -> tuple[tuple[str, float], ...]:
    """Weights as sorted (name, weight) pairs: finite, >= 0, not all zero."""
    try:
        pairs = dict(weights).items()  # a mapping, or the pairs a frozen Reward keeps
        if not all(isinstance(name, str) for name, _ in pairs):
            raise TypeError
    except (TypeError, ValueError):
        message = f"weights must map perspective names to numbers, e.g. {{'reception': 2}}, not {weights!r}"
        raise OptionError(message, "weights") from None
    checked = tuple(sorted((name, _number(w, f"weight of {name}", "weights", 0)) for name, w in pairs))
    if not any(w for _, w in checked):
        raise OptionError("weights must not all be zero", "weights")
    return checked


@dataclass(frozen=True)
class Reward:
    """PERM's reward settings, validated against a model's heads.

    Args:
        mode: "harmonic" (PERM's), "mean" or "geometric" combination of the empathy heads,
            each normalised as s/high (s/5 on PERM's 1-5 scales).
        weights: optional weight per empathy head (weighted means in every mode); a name
            that is not an empathy head of the model is an `OptionError`.
        bystander_coef: coefficient of the bystander term `coef * (b/high - 1)`; 0 disables it.
        length_limit, length_coef: the length penalty `-coef * max(0, n - limit)` that
            `total` adds (n: the policy's tokens); coef 0 disables it.
        heads: the model's heads (`Scorer` binds its model's with `bind`); unbound, PERM's
            four are used and weight names are checked when the reward is first used.
        repetition_coef: defence in depth against repetition, off (0) by default: `total`
            subtracts `coef * repetition_share(text)` (0-1, `perm_lite.rewrites`) when the
            reply's text is given. Not part of PERM; the model itself is trained not to pay
            for repetition (see the model card for its measured effect).
    """

    mode: str = "harmonic"
    weights: Mapping[str, float] | None = None
    bystander_coef: float = 0.5
    length_limit: int = 768
    length_coef: float = 0.001
    heads: Heads | None = field(default=None, repr=False)
    repetition_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in COMBINE_MODES:
            raise OptionError(
                f"unknown combine mode {self.mode!r}; choose one of {', '.join(COMBINE_MODES)}", "combine"
            )
        object.__setattr__(self, "bystander_coef", _number(self.bystander_coef, "bystander_coef", "bystander_coef"))
        object.__setattr__(self, "length_coef", _number(self.length_coef, "length_coef", "length_coef", 0))
        object.__setattr__(
            self, "repetition_coef", _number(self.repetition_coef, "repetition_coef", "repetition_coef", 0)
        )
        if isinstance(self.length_limit, bool) or not isinstance(self.length_limit, int) or self.length_limit < 0:
            raise OptionError(
                f"length_limit must be a whole number of tokens >= 0, not {self.length_limit!r}", "length_limit"
            )
        if self.weights is not None:
            object.__setattr__(self, "weights", _checked_weights(self.weights))  # sorted pairs: hashable
        if self.heads is not None:
            if not isinstance(self.heads, Heads):
                raise OptionError(f"heads must be a perm_lite.scales.Heads, not {type(self.heads).__name__}", "heads")
            self._check_names(self.heads)

    def _check_names(self, heads: Heads) -> None:
        unknown = sorted({name for name, _ in self.weights or ()} - set(heads.empathy))
        if unknown:
            raise OptionError(
                f"unknown perspective {', '.join(map(repr, unknown))} in weights; weights apply to "
                f"{', '.join(heads.empathy)}",
                "weights",
            )

    @property
    def _heads(self) -> Heads:
        if self.heads is None:
            self._check_names(PERM_HEADS)
            return PERM_HEADS
        return self.heads

    @classmethod
    def from_settings(
        cls,
        reward: Reward | None = None,
        *,
        combine: str | None = None,
        weights: Mapping[str, float] | None = None,
        bystander_coef: float | None = None,
        length_limit: int | None = None,
        length_coef: float | None = None,
        repetition_coef: float | None = None,
    ) -> Reward:
        """`reward`, or a Reward with these settings (PERM's defaults for what is None);
        giving both is an `OptionError` (one of them would be ignored)."""
        settings = {
            "combine": combine,
            "weights": weights,
            "bystander_coef": bystander_coef,
            "length_limit": length_limit,
            "length_coef": length_coef,
            "repetition_coef": repetition_coef,
        }
        given = [k for k, v in settings.items() if v is not None]
        if reward is not None:
            if not isinstance(reward, Reward):
                raise OptionError(f"reward must be a perm_lite.Reward, not {type(reward).__name__}", "reward")
            if given:
                raise OptionError(f"give reward=Reward(...) or {', '.join(given)}, not both", given[0])
            return reward
        defaults = cls()
        return cls(
            defaults.mode if combine is None else combine,
            weights,
            defaults.bystander_coef if bystander_coef is None else bystander_coef,
            defaults.length_limit if length_limit is None else length_limit,
            defaults.length_coef if length_coef is None else length_coef,
            repetition_coef=defaults.repetition_coef if repetition_coef is None else repetition_coef,
        )

    def bind(self, heads: Heads) -> Reward:
        """The same settings for a model with these heads; a weight naming a perspective
        that is not one of its empathy heads is an `OptionError`."""
        return self if heads == self.heads else replace(self, heads=heads)

    def weight_map(self) -> dict[str, float]:
        """Weight per empathy head (1 each without weights), scaled so the largest is 1
        (weighted means do not change; huge weights cannot overflow)."""
        given = dict(self.weights or ())
        top = max(given.values(), default=1.0)
        return {name: given.get(name, 0.0) / top if self.weights else 1.0 for name in self._heads.empathy}

    def empathy(self, scores: Mapping[str, float]) -> float:
        """The empathy reward: the `mode` mean of the empathy heads, each as s/high."""
        w = self.weight_map()
        total = sum(w.values())
        x = {name: self._heads.normalise(name, scores[name]) for name in w}
        if self.mode != "mean" and any(x[n] <= 0 for n in w if w[n] > 0):
            raise OptionError(f"the {self.mode} mean needs empathy scores above 0, got {dict(scores)}", "scores")
        if self.mode == "mean":
            return sum(w[n] * x[n] for n in w) / total
        if self.mode == "harmonic":
            return total / sum(w[n] / x[n] for n in w if w[n] > 0)
        return math.exp(sum(w[n] * math.log(x[n]) for n in w if w[n] > 0) / total)

    def bystander_term(self, scores: Mapping[str, float]) -> float:
        """`coef * (b/high - 1)`, in -coef..0 (0 when the model has no bystander head)."""
        name = self._heads.bystander
        if not self.bystander_coef or name is None:
            return 0.0
        return self.bystander_coef * (self._heads.normalise(name, scores[name]) - 1.0)

    def combined(self, scores: Mapping[str, float]) -> float:
        """Empathy reward + bystander term: the `combined` score every result carries."""
        return self.empathy(scores) + self.bystander_term(scores)

    def length_penalty(self, n_tokens: int) -> float:
        """`-coef * max(0, n_tokens - limit)`."""
        return -self.length_coef * max(0, n_tokens - self.length_limit)

    def repetition_penalty(self, text: str) -> float:
        """`-repetition_coef * repetition_share(text)` (0 when the coefficient is 0)."""
        if not self.repetition_coef:
            return 0.0
        from perm_lite.rewrites import repetition_share

        return -self.repetition_coef * repetition_share(text)

    def total(self, scores: Mapping[str, float], n_tokens: int | None = None, text: str | None = None) -> float:
        """`combined` plus the length penalty when `n_tokens` is given (PERM's RL reward),
        plus the repetition penalty when `repetition_coef` is set and the reply's `text` given."""
        if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0):
            raise OptionError(f"n_tokens must be a whole number of tokens >= 0, not {n_tokens!r}", "n_tokens")
        if text is not None and not isinstance(text, str):
            raise OptionError(f"text must be the reply as a string, not {type(text).__name__}", "text")
        value = self.combined(scores)
        if self.length_coef and n_tokens is not None:
            value += self.length_penalty(n_tokens)
        if self.repetition_coef and text is not None:
            value += self.repetition_penalty(text)
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "weights": dict(self.weights) if self.weights else None,
            "bystander_coef": self.bystander_coef,
            "length_limit": self.length_limit,
            "length_coef": self.length_coef,
            "repetition_coef": self.repetition_coef,
            "empathy": list(self._heads.empathy),
            "bystander": self._heads.bystander,
        }
