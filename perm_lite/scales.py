"""A model's heads: their names, scales and roles in the reward (PERM's four by default)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# PERM's perspectives and scales: the heads of a model whose config does not say otherwise.
PERSPECTIVES = ("resonation", "expression", "reception", "bystander")
SCALES: dict[str, tuple[float, float]] = {
    "resonation": (1.0, 5.0),
    "expression": (1.0, 5.0),
    "reception": (1.0, 5.0),
    "bystander": (0.0, 100.0),
}
EMPATHY = ("resonation", "expression", "reception")
BYSTANDER = "bystander"


@dataclass(frozen=True)
class Heads:
    """What a model's outputs are, in output order, and how the reward uses them.

    `empathy`: the heads combined into the empathy reward (each normalised as s/high);
    `bystander`: the head of the bystander term, or None. Read from the model's
    `config.json` (`perspectives`, `scales`, `reward`), so a model with other heads needs
    no code change.
    """

    names: tuple[str, ...]
    ranges: tuple[tuple[float, float], ...]  # (low, high) per name, same order
    empathy: tuple[str, ...]
    bystander: str | None

    @classmethod
    def from_scales(
        cls, scales: Mapping[str, tuple[float, float]], empathy: tuple[str, ...], bystander: str | None
    ) -> Heads:
        return cls(tuple(scales), tuple(tuple(map(float, v)) for v in scales.values()), empathy, bystander)

    @property
    def scales(self) -> dict[str, tuple[float, float]]:
        return dict(zip(self.names, self.ranges))

    @property
    def checks(self) -> tuple[str, ...]:
        """What thresholds and explanations may name: every head and "combined"."""
        return (*self.names, "combined")

    def scale(self, name: str) -> tuple[float, float]:
        return self.ranges[self.names.index(name)]

    def normalise(self, name: str, value: float) -> float:
        """A score on 0-1 as PERM normalises it: s/high (s/5 on 1-5, b/100 on 0-100)."""
        return value / self.scale(name)[1]


PERM_HEADS = Heads.from_scales(SCALES, EMPATHY, BYSTANDER)
