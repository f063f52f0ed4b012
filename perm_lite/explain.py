"""Sentence-level explanations by occlusion: what each sentence of a reply is worth.

The reply is split into sentences; each is removed in turn and the shortened reply is
scored. A sentence's contribution to a perspective is `score(full) - score(without it)`:
positive when the sentence raised the score. Faithful by construction (it is the model's
own output, not a proxy). Context turns can be occluded the same way (`context=True`).

The work is bounded by what the model reads, never by the size of the input:

- only sentences that start inside the part of the reply the model reads (the character
  clip, then the token budget: `visible_chars`) are measured; removing a later one cannot
  change any score, so it is counted in `omitted.sentences_unseen`, not scored. History
  turns the model does not read are counted the same way (`omitted.turns_unseen`);
- at most `max_sentences` sentences (the first) and `max_turns` history turns (the newest)
  are measured; the rest are counted as over the cap;
- the variants are built and scored `chunk_size` at a time, each holding only the text the
  model can read, so memory does not grow with the reply.

Offsets: given a record (a mapping), sentence `start`/`end` index the input field the reply
came from (`Explanation.field`: "response", "completion", or its `--fields` name); given a
`Dialogue`, they index `Dialogue.response` (`field` None).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from dataclasses import field as _field
from typing import Any, Protocol

from perm_lite.errors import OptionError, require_count
from perm_lite.records import _HEADING, Dialogue, RecordError, parse_record
from perm_lite.text import CHARS_PER_TOKEN, clip, render

EMPTY_REPLY = "..."  # what a one-sentence reply is scored as once its sentence is removed
MAX_SENTENCES = 64  # reply sentences measured per record, by default
MAX_TURNS = 64  # history turns measured per record (context=True), by default
CHUNK_SIZE = 32  # variants built and scored together
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")
_NONSPACE = re.compile(r"\S")


class ScoreLike(Protocol):
    """What an explanation reads from a score (`perm_lite.scorer.Result`)."""

    @property
    def scores(self) -> Mapping[str, float]: ...

    @property
    def combined(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


class ScorerLike(Protocol):
    """What occlusion needs from a scorer (`perm_lite.scorer.Scorer`): `config.max_length`,
    `score_dialogues`, and, to bound by tokens as well as characters, `encode` and `tokenizer`."""

    config: Any

    def score_dialogues(self, dialogues: Sequence[Dialogue]) -> Sequence[ScoreLike]: ...


# -- sentences ----------------------------------------------------------------------------


def iter_sentences(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace excluded, lazily."""
    start = 0
    for match in _SENTENCE_END.finditer(text):
        a, b = _strip(text, start, match.start() + len(match.group(0).rstrip()))
        if a < b:
            yield a, b
        start = match.end()
    a, b = _strip(text, start, len(text))
    if a < b:
        yield a, b


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace excluded."""
    return list(iter_sentences(text))


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _without(text: str, span: tuple[int, int], keep: int | None = None) -> str:
    """`text` with the span removed (one space where it was); at most `keep` characters of
    what follows it are kept (the model reads no further)."""
    left = text[: span[0]].rstrip()
    nxt = _NONSPACE.search(text, span[1])
    right = "" if nxt is None else text[nxt.start() : None if keep is None else nxt.start() + keep]
    return f"{left} {right}".strip() or EMPTY_REPLY


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contribution:
    """One sentence (or context turn) and how much each score drops without it."""

    index: int
    text: str
    start: int  # character offsets in the input field (`Explanation.field`); context turns: in that turn
    end: int
    deltas: dict[str, float]  # perspective or "combined" -> score(full) - score(without it)
    part: str = "response"  # "response" or "history:K" / "query" for context turns


@dataclass(frozen=True)
class Omitted:
    """What was not measured: unseen parts cannot change a score (the model does not read
    them); parts over the cap were not measured."""

    sentences_unseen: int = 0
    sentences_over_cap: int = 0
    turns_unseen: int = 0
    turns_over_cap: int = 0


@dataclass(frozen=True)
class Explanation:
    """A scored record and the contribution of each of its sentences. `to_dict()` is JSON-ready."""

    result: ScoreLike
    sentences: tuple[Contribution, ...]
    context: tuple[Contribution, ...] = ()
    field: str | None = None  # the input field sentence offsets index (None: Dialogue.response)
    omitted: Omitted = _field(default_factory=Omitted)

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
            "field": self.field,
            "sentences": [asdict(c) for c in self.sentences],
            "context": [asdict(c) for c in self.context],
            "omitted": asdict(self.omitted),
        }


def _checks(result: ScoreLike) -> tuple[str, ...]:
    return (*result.scores, "combined")


def _value(result: ScoreLike, check: str) -> float:
    return result.combined if check == "combined" else result.scores[check]


def _deltas(full: ScoreLike, other: ScoreLike) -> dict[str, float]:
    return {check: round(_value(full, check) - _value(other, check), 6) for check in _checks(full)}


# -- where the reply came from ------------------------------------------------------------


def response_origin(
    record: Mapping[str, Any], dialogue: Dialogue, field_map: Mapping[str, str] | None = None
) -> tuple[str | None, int]:
    """(input field, offset): where `dialogue.response` (parsed from `record`) starts in the
    field the user gave: "response" (before stripping) or the response section of
    "completion", under its `field_map` name. (None, 0) when it cannot be placed."""
    present = {ours: theirs for ours, theirs in (field_map or {}).items() if theirs in record}
    reply = dialogue.response
    for ours in ("completion", "response"):
        name = present.get(ours, ours)
        raw = record.get(name)
        if not isinstance(raw, str):
            continue
        start = _completion_start(raw) if ours == "completion" else len(raw) - len(raw.lstrip())
        if raw.startswith(reply, start):
            return name, start
        start = raw.find(reply)
        return (name, start) if start >= 0 else (None, 0)
    return None, 0


def _completion_start(completion: str) -> int:
    """Where `records.split_completion`'s response section starts in `completion`."""
    marks = list(_HEADING.finditer(completion))
    for i, mark in enumerate(marks):
        if mark.group(1).lower() == "response":
            stop = marks[i + 1].start() if i + 1 < len(marks) else len(completion)
            section = completion[mark.end() : stop]
            return mark.end() + len(section) - len(section.lstrip())
    return len(completion) - len(completion.lstrip())


# -- what the model reads -----------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    response: int  # characters of dialogue.response the model reads (from its start)
    turns: int  # newest non-empty history turns the model reads (wholly or in part)
    limit: int  # the character budget per part (text.clip)
    history_lengths: tuple[int, ...]  # rendered length of each history turn (0: not rendered)


def _view(scorer: ScorerLike, dialogue: Dialogue) -> _View:
    limit = CHARS_PER_TOKEN * scorer.config.max_length
    rendered = render(dialogue)
    clipped, _ = clip(rendered, limit)
    label = len(rendered.response) - len(dialogue.response)  # "response: "
    seen_response, seen_turns = len(clipped.response), len(clipped.history)
    tokenizer, encode = getattr(scorer, "tokenizer", None), getattr(scorer, "encode", None)
    if tokenizer is not None and encode is not None:
        (encoding,) = encode([dialogue])
        kept, total = encoding.tokens["response"]
        if kept < total:
            offsets = tokenizer.encode(clipped.response, add_special_tokens=False).offsets
            seen_response = offsets[kept - 1][1] if kept else 0
        kept, total = encoding.tokens["history"]
        if kept < total:
            lengths = [len(e.ids) for e in tokenizer.encode_batch(list(clipped.history), add_special_tokens=False)]
            seen_turns, used = 0, 0
            for n in reversed(lengths):  # `text._fit` keeps the newest turns first
                if used >= kept:
                    break
                seen_turns, used = seen_turns + 1, used + n
    lengths = iter(len(turn) for turn in rendered.history)  # render drops empty turns
    history_lengths = tuple(next(lengths) if turn.text else 0 for turn in dialogue.history)
    return _View(max(0, seen_response - label), seen_turns, limit, history_lengths)


def visible_chars(scorer: ScorerLike, dialogue: Dialogue) -> int:
    """Characters at the start of `dialogue.response` the model reads (the character clip,
    then the token budget); a sentence starting at or after this cannot change any score."""
    return _view(scorer, dialogue).response


# -- occlusion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Occlusion:
    """What to measure for one dialogue: the reply sentences and context turns whose removal
    is scored. Holds no variants: `variants(start, stop)` builds them on demand."""

    dialogue: Dialogue
    spans: tuple[tuple[int, int], ...]  # measured reply sentences, in dialogue.response
    turns: tuple[tuple[str, int], ...]  # measured context: ("history:K", K) or ("query", -1)
    omitted: Omitted
    keep: int  # characters after a removed sentence that a variant keeps
    history_lengths: tuple[int, ...] = ()
    field: str | None = None
    offset: int = 0  # where dialogue.response starts in `field`

    def __len__(self) -> int:
        """Variants to score (the full dialogue not included)."""
        return len(self.spans) + len(self.turns)

    def variant(self, i: int) -> Dialogue:
        """The dialogue without sentence i (i < len(spans)), else without context turn
        i - len(spans); history the model cannot read is left out (it changes no score)."""
        d = self.dialogue
        if i < len(self.spans):
            return replace(d, response=_without(d.response, self.spans[i], self.keep), history=self._history_without())
        part, k = self.turns[i - len(self.spans)]
        if part == "query":
            return replace(d, query="", history=self._history_without())
        return replace(d, history=self._history_without(k))

    def variants(self, start: int = 0, stop: int | None = None) -> list[Dialogue]:
        """Variants start..stop (built now; build a chunk at a time)."""
        return [self.variant(i) for i in range(start, min(len(self), len(self) if stop is None else stop))]

    def _history_without(self, k: int = -1) -> tuple:
        """History without turn k (-1: none), from the oldest turn the model could then read."""
        history, used, low = self.dialogue.history, 0, 0
        for j in range(len(history) - 1, -1, -1):
            if j == k:
                continue
            used += self.history_lengths[j]
            if used >= self.keep:  # `text.clip` reads no older turn
                low = j
                break
        return history[low:] if k < 0 else history[low:k] + history[k + 1 :]


def occlusion(
    scorer: ScorerLike,
    dialogue: Dialogue,
    *,
    context: bool = False,
    origin: tuple[str | None, int] = (None, 0),
    max_sentences: int = MAX_SENTENCES,
    max_turns: int = MAX_TURNS,
) -> Occlusion:
    """Plan the occlusion of one dialogue (no variant is built): the first `max_sentences`
    reply sentences the model reads and, with `context`, the newest `max_turns` history
    turns it reads and the seeker's message. `origin`: `response_origin`'s (field, offset)."""
    require_count(max_sentences, "max_sentences")
    require_count(max_turns, "max_turns")
    view = _view(scorer, dialogue)
    spans: list[tuple[int, int]] = []
    unseen = over_cap = 0
    for span in iter_sentences(dialogue.response):
        if span[0] >= view.response:
            unseen += 1
        elif len(spans) < max_sentences:
            spans.append(span)
        else:
            over_cap += 1
    turns: list[tuple[str, int]] = []
    turns_unseen = turns_over_cap = 0
    if context:
        nonempty = [k for k, turn in enumerate(dialogue.history) if turn.text]
        seen = nonempty[len(nonempty) - view.turns :] if view.turns else []
        turns_unseen = len(dialogue.history) - len(seen)
        turns_over_cap = max(0, len(seen) - max_turns)
        turns = [(f"history:{k}", k) for k in seen[turns_over_cap:]]
        if dialogue.query:
            turns.append(("query", -1))
    omitted = Omitted(unseen, over_cap, turns_unseen, turns_over_cap)
    field, offset = origin
    return Occlusion(dialogue, tuple(spans), tuple(turns), omitted, view.limit, view.history_lengths, field, offset)


def assemble(occ: Occlusion, full: ScoreLike, results: Sequence[ScoreLike]) -> Explanation:
    """The explanation from the full dialogue's result and the variants' (in `occ.variant` order)."""
    if len(results) != len(occ):
        raise ValueError(f"{len(results)} results for {len(occ)} variants")
    response, at = occ.dialogue.response, occ.offset
    sentences = tuple(
        Contribution(i, response[a:b], at + a, at + b, _deltas(full, results[i])) for i, (a, b) in enumerate(occ.spans)
    )
    n = len(occ.spans)
    turns = []
    for j, (part, k) in enumerate(occ.turns):
        text = occ.dialogue.query if part == "query" else occ.dialogue.history[k].text
        turns.append(Contribution(j, text, 0, len(text), _deltas(full, results[n + j]), part))
    return Explanation(full, sentences, tuple(turns), occ.field, occ.omitted)


def explain_dialogue(
    scorer: ScorerLike,
    dialogue: Dialogue,
    *,
    context: bool = False,
    source: Mapping[str, Any] | None = None,
    field_map: Mapping[str, str] | None = None,
    full: ScoreLike | None = None,
    max_sentences: int = MAX_SENTENCES,
    max_turns: int = MAX_TURNS,
    chunk_size: int = CHUNK_SIZE,
) -> Explanation:
    """Occlusion explanation of one dialogue, its variants scored `chunk_size` at a time.
    `source`: the record it was parsed from (with `field_map`), so offsets index its field;
    `full`: the dialogue's result when already scored."""
    require_count(chunk_size, "chunk_size")
    origin = response_origin(source, dialogue, field_map) if source is not None else (None, 0)
    occ = occlusion(scorer, dialogue, context=context, origin=origin, max_sentences=max_sentences, max_turns=max_turns)
    if full is None:
        (full,) = scorer.score_dialogues([dialogue])
    results: list[ScoreLike] = []
    for start in range(0, len(occ), chunk_size):
        results.extend(scorer.score_dialogues(occ.variants(start, start + chunk_size)))
    return assemble(occ, full, results)


def explain(
    scorer: ScorerLike,
    record: Mapping[str, Any] | Dialogue,
    *,
    context: bool = False,
    field_map: Mapping[str, str] | None = None,
    max_sentences: int = MAX_SENTENCES,
    max_turns: int = MAX_TURNS,
    chunk_size: int = CHUNK_SIZE,
) -> Explanation:
    """Occlusion explanation of one record: a dict in the input format (offsets then index its
    reply field) or a `Dialogue`. See the module docstring for the bounds."""
    source = None
    if isinstance(record, Dialogue):
        dialogue = record
    else:
        try:
            dialogue = parse_record(record, field_map)
        except RecordError as exc:
            raise exc.at("record 0") from None
        source = record
    return explain_dialogue(
        scorer,
        dialogue,
        context=context,
        source=source,
        field_map=field_map,
        max_sentences=max_sentences,
        max_turns=max_turns,
        chunk_size=chunk_size,
    )
