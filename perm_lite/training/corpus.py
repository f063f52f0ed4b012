"""The corpus types every training loader shares: examples, within-context pairs, targets
on 0-1 per head (NaN = no label), and the hash split. A module of its own so that the
loaders (data, chatbot_data, counterfactual, hard_negatives) import it in one direction
and `data.build_corpus` imports the loaders, with no cycle between them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.scales import PERSPECTIVES

HEAD = {name: i for i, name in enumerate(PERSPECTIVES)}
NAN = float("nan")


@dataclass
class Example:
    dialogue: Dialogue
    targets: np.ndarray  # shape (4,), NaN = no label
    source: str
    group: str  # context id: splits and pairs never cross it
    split: str
    weight: float = 1.0
    kind: str = "human"  # "chatbot", or the weak-supervision / counterfactual generator's name
    meta: dict = field(default_factory=dict)  # source-specific facts (mint variant, judge labels, ...)


@dataclass
class Pair:
    better: int  # index into the example list
    worse: int
    heads: tuple[int, ...]
    source: str


@dataclass
class Corpus:
    examples: list[Example] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)

    def add(self, example: Example) -> int:
        self.examples.append(example)
        return len(self.examples) - 1

    def subset(self, keep: set[int]) -> Corpus:
        """The examples at `keep` (in order) and the pairs with both ends kept."""
        order = sorted(keep)
        remap = {old: new for new, old in enumerate(order)}
        out = Corpus([self.examples[i] for i in order])
        out.pairs = [
            Pair(remap[p.better], remap[p.worse], p.heads, p.source)
            for p in self.pairs
            if p.better in remap and p.worse in remap
        ]
        return out


def empathy_ratings(targets: np.ndarray) -> np.ndarray:
    """An example's rated resonation and reception targets (unrated heads left out)."""
    values = targets[[HEAD["resonation"], HEAD["reception"]]]
    return values[~np.isnan(values)]


def _targets(**values: float) -> np.ndarray:
    t = np.full(len(PERSPECTIVES), NAN, dtype=np.float32)
    for name, value in values.items():
        t[HEAD[name]] = value
    return t


def hash_split(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")
