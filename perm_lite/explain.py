"""Sentence-level explanations by occlusion: what each sentence of a reply is worth.

The reply is split into sentences; each is removed in turn and the shortened replies are
scored with the full one in a single batch. A sentence's contribution to a perspective is
`score(full) - score(without it)`: positive when the sentence raised the score. Faithful by
construction (it is the model's own output, not a proxy), and it costs about one batch.
Context turns can be occluded the same way (`context=True`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from perm_lite.errors import OptionError
from perm_lite.records import Dialogue

if TYPE_CHECKING:  # pragma: no cover
    from perm_lite.scorer import Result, Scorer

EMPTY_REPLY = "..."  # what a one-sentence reply is scored as once its sentence is removed
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace excluded."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.start() + len(match.group(0).rstrip())
        if text[start:end].strip():
            spans.append(_strip(text, start, end))
        start = match.end()
    if text[start:].strip():
        spans.append(_strip(text, start, len(text)))
    return spans


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _without(text: str, span: tuple[int, int]) -> str:
    out = (text[: span[0]] + " " + text[span[1] :]).strip()
    return re.sub(r"[ \t]{2,}", " ", out) or EMPTY_REPLY


@dataclass(frozen=True)
class Contribution:
    """One sentence (or context turn) and how much each score drops without it."""

    index: int
    text: str
    start: int  # character offsets in the response (context turns: in that turn)
    end: int
    deltas: dict[str, float]  # perspective or "combined" -> score(full) - score(without it)
    part: str = "response"  # "response" or "history:K" / "query" for context turns


@dataclass(frozen=True)
class Explanation:
    """A scored record and the contribution of each of its sentences. `to_dict()` is JSON-ready."""

    result: Result
    sentences: tuple[Contribution, ...]
    context: tuple[Contribution, ...] = ()

    @property
    def checks(self) -> tuple[str, ...]:
        """What contributions are measured on: the model's perspectives and "combined"."""
        return _checks(self.result)

    def top(self, check: str = "combined", k: int = 3, helped: bool = True) -> list[Contribution]:
        """The k sentences that raised (`helped=True`) or lowered the `check` score most."""
        if check not in self.checks:
            raise OptionError(f"unknown check {check!r}; choose from {', '.join(self.checks)}")
        ranked = sorted(self.sentences, key=lambda c: c.deltas[check], reverse=helped)
        return [c for c in ranked if (c.deltas[check] > 0 if helped else c.deltas[check] < 0)][:k]

    def most_harmful(self, check: str = "combined") -> Contribution | None:
        """The sentence whose removal would raise `check` most (None if none would)."""
        worst = self.top(check, k=1, helped=False)
        return worst[0] if worst else None

    def summary(self, k: int = 2) -> dict[str, list[dict[str, Any]]]:
        """Per check, the k sentences that moved it most (either way), largest first:
        `[{"sentence", "delta"}]` (the `explain` field of `perm score --explain`)."""
        out = {}
        for check in self.checks:
            ranked = sorted(self.sentences, key=lambda c: abs(c.deltas[check]), reverse=True)[:k]
            out[check] = [{"sentence": c.text, "delta": c.deltas[check]} for c in ranked if c.deltas[check] != 0]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result.to_dict(),
            "sentences": [asdict(c) for c in self.sentences],
            "context": [asdict(c) for c in self.context],
        }


def _checks(result: Result) -> tuple[str, ...]:
    return (*result.scores, "combined")


def _value(result: Result, check: str) -> float:
    return result.combined if check == "combined" else result.scores[check]


def _deltas(full: Result, other: Result) -> dict[str, float]:
    return {check: round(_value(full, check) - _value(other, check), 6) for check in _checks(full)}


@dataclass(frozen=True)
class Occlusion:
    """The variants of one dialogue to score (full first) and what each one left out."""

    dialogue: Dialogue
    variants: tuple[Dialogue, ...]
    spans: tuple[tuple[int, int], ...]
    context_parts: tuple[tuple[str, str], ...]


def occlusion(dialogue: Dialogue, *, context: bool = False) -> Occlusion:
    """The full dialogue, then one variant per reply sentence removed (and per context turn)."""
    spans = tuple(split_sentences(dialogue.response))
    variants = [dialogue] + [replace(dialogue, response=_without(dialogue.response, s)) for s in spans]
    context_parts: list[tuple[str, str]] = []
    if context:
        for k, turn in enumerate(dialogue.history):
            variants.append(replace(dialogue, history=dialogue.history[:k] + dialogue.history[k + 1 :]))
            context_parts.append((f"history:{k}", turn.text))
        if dialogue.query:
            variants.append(replace(dialogue, query=""))
            context_parts.append(("query", dialogue.query))
    return Occlusion(dialogue, tuple(variants), spans, tuple(context_parts))


def assemble(occ: Occlusion, results: list[Result]) -> Explanation:
    """The explanation from the variants' results (in `occ.variants` order)."""
    full, response = results[0], occ.dialogue.response
    sentences = tuple(
        Contribution(i, response[a:b], a, b, _deltas(full, results[1 + i])) for i, (a, b) in enumerate(occ.spans)
    )
    offset = 1 + len(occ.spans)
    turns = tuple(
        Contribution(k, text, 0, len(text), _deltas(full, results[offset + k]), part)
        for k, (part, text) in enumerate(occ.context_parts)
    )
    return Explanation(full, sentences, turns)


def explain_dialogue(scorer: Scorer, dialogue: Dialogue, *, context: bool = False) -> Explanation:
    """Occlusion explanation of one dialogue: all variants scored in one call."""
    occ = occlusion(dialogue, context=context)
    return assemble(occ, scorer.score_dialogues(list(occ.variants)))


def explain(scorer: Scorer, record: Mapping[str, Any] | Dialogue, *, context: bool = False) -> Explanation:
    """Occlusion explanation of one record (a dict in the input format or a `Dialogue`)."""
    from perm_lite.records import parse_record

    dialogue = record if isinstance(record, Dialogue) else parse_record(record)
    return explain_dialogue(scorer, dialogue, context=context)
