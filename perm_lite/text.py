"""Rendering a `Dialogue` into model input and tokenizing it: the one source of truth.

Training and inference both call `encode_dialogues`, so the model always sees the same
layout: `[CLS] context [SEP] reply [SEP]`, where the context is (oldest first) persona,
scenario, earlier turns and the seeker's last message, and the reply is the analysis
followed by the response. Truncation keeps the response whole where it can and drops the
oldest context first; every encoding reports what it kept.

Before tokenizing, each text is cut to `CHARS_PER_TOKEN * max_length` characters (the
history as a whole too, newest turns kept), so a record's cost is bounded however long
its fields are: far more than any tokenizer needs to fill `max_length` tokens from real
text. A cut is reported like token truncation (`Encoding.truncated`, `clipped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from perm_lite.errors import ModelError, OptionError
from perm_lite.records import Dialogue

TEMPLATE_VERSION = "perm-input-v1"
PARTS = ("response", "analysis", "query", "persona", "scenario", "history")
CHARS_PER_TOKEN = 16  # character budget per token of max_length, applied before tokenizing


@dataclass(frozen=True)
class RenderedDialogue:
    """Text pieces of one dialogue, before tokenization."""

    response: str
    analysis: str
    query: str
    persona: str
    scenario: str
    history: tuple[str, ...]  # oldest first


def render(dialogue: Dialogue) -> RenderedDialogue:
    """Render a dialogue into labelled text pieces (template `perm-input-v1`)."""

    def labelled(label: str, text: str) -> str:
        return f"{label}: {text}" if text else ""

    return RenderedDialogue(
        response=labelled("response", dialogue.response),
        analysis=labelled("analysis", dialogue.analysis),
        query=labelled("seeker", dialogue.query),
        persona=labelled("persona", dialogue.persona),
        scenario=labelled("situation", dialogue.scenario),
        history=tuple(labelled(t.role, t.text) for t in dialogue.history if t.text),
    )


@dataclass(frozen=True)
class Encoding:
    """Token ids for one record plus what truncation kept, per part (kept, total)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    tokens: dict[str, tuple[int, int]]
    clipped: frozenset[str] = frozenset()  # parts cut by the character budget before tokenizing

    @property
    def truncated(self) -> bool:
        return bool(self.clipped) or any(kept < total for kept, total in self.tokens.values())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class SpecialTokens:
    cls: int
    sep: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialTokens:
        ids = {name: tokenizer.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        missing = [name for name, value in ids.items() if value is None]
        if missing:
            raise ModelError(f"tokenizer lacks special tokens {missing}; perm-lite expects a BERT-style vocabulary")
        return cls(ids["[CLS]"], ids["[SEP]"], ids["[PAD]"])


def load_tokenizer(path: str) -> Tokenizer:
    """Load a `tokenizer.json` with its built-in truncation and padding switched off."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def clip(rendered: RenderedDialogue, limit: int) -> tuple[RenderedDialogue, frozenset[str]]:
    """Cut each part to `limit` characters before tokenizing, keeping what truncation would
    keep: the start of the response, analysis, persona and scenario, the end of the
    seeker's message, and the newest history turns (`limit` characters for all of them)."""
    clipped: set[str] = set()

    def head(name: str, text: str) -> str:
        if len(text) <= limit:
            return text
        clipped.add(name)
        return text[:limit]

    query = rendered.query
    if len(query) > limit:
        clipped.add("query")
        query = query[-limit:]
    history: list[str] = []  # newest first, reversed below
    left = limit
    for turn in reversed(rendered.history):
        if left <= 0:
            clipped.add("history")
            break
        if len(turn) > left:
            clipped.add("history")
            turn = turn[-left:]
        history.append(turn)
        left -= len(turn)
    history.reverse()
    out = RenderedDialogue(
        response=head("response", rendered.response),
        analysis=head("analysis", rendered.analysis),
        query=query,
        persona=head("persona", rendered.persona),
        scenario=head("scenario", rendered.scenario),
        history=tuple(history),
    )
    return (out, frozenset(clipped)) if clipped else (rendered, frozenset())


def _fit(rendered: RenderedDialogue, ids: dict[str, list[int]], history: list[list[int]], budget: int):
    """Decide how many tokens each part keeps. Returns (kept ids per part, history kept)."""
    lengths = {name: len(ids[name]) for name in ids}
    history_total = sum(len(h) for h in history)
    context_total = lengths["query"] + lengths["persona"] + lengths["scenario"] + history_total
    # The response is kept whole unless that leaves the context less than a quarter.
    context_reserve = min(context_total, budget // 4)
    keep_response = min(lengths["response"], budget - context_reserve)
    left = budget - keep_response
    keep_query = min(lengths["query"], left)
    left -= keep_query
    keep_analysis = min(lengths["analysis"], left)
    left -= keep_analysis
    keep_persona = min(lengths["persona"], left)
    left -= keep_persona
    keep_scenario = min(lengths["scenario"], left)
    left -= keep_scenario
    kept_history: list[list[int]] = []
    for turn in reversed(history):  # newest first; the oldest are dropped first
        if left <= 0:
            break
        piece = turn[-left:] if len(turn) > left else turn
        kept_history.insert(0, piece)
        left -= len(piece)
    kept = {
        "response": ids["response"][:keep_response],
        "analysis": ids["analysis"][:keep_analysis],
        # The end of the seeker's message is the newest part of it.
        "query": ids["query"][len(ids["query"]) - keep_query :] if keep_query else [],
        "persona": ids["persona"][:keep_persona],
        "scenario": ids["scenario"][:keep_scenario],
    }
    return kept, kept_history


def encode_dialogues(dialogues: Sequence[Dialogue], tokenizer: Tokenizer, max_length: int) -> list[Encoding]:
    """Render and tokenize dialogues for a cross-encoder with `max_length` tokens."""
    if max_length < 16:
        raise OptionError("max_length must be at least 16")
    special = SpecialTokens.from_tokenizer(tokenizer)
    clipped_parts = [clip(render(d), CHARS_PER_TOKEN * max_length) for d in dialogues]
    rendered = [r for r, _ in clipped_parts]
    texts: list[str] = []
    for r in rendered:
        texts.extend([r.response, r.analysis, r.query, r.persona, r.scenario, *r.history])
    flat = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []
    budget = max_length - 3
    out: list[Encoding] = []
    pos = 0
    for r, (_, clipped) in zip(rendered, clipped_parts):
        ids = dict(zip(PARTS[:5], flat[pos : pos + 5]))
        history = flat[pos + 5 : pos + 5 + len(r.history)]
        pos += 5 + len(r.history)
        kept, kept_history = _fit(r, ids, history, budget)
        context = kept["persona"] + kept["scenario"] + [t for h in kept_history for t in h] + kept["query"]
        reply = kept["analysis"] + kept["response"]
        input_ids = [special.cls, *context, special.sep, *reply, special.sep]
        types = [0] * (len(context) + 2) + [1] * (len(reply) + 1)
        tokens = {name: (len(kept[name]), len(ids[name])) for name in kept}
        tokens["history"] = (sum(len(h) for h in kept_history), sum(len(h) for h in history))
        out.append(Encoding(np.asarray(input_ids, dtype=np.int64), np.asarray(types, dtype=np.int64), tokens, clipped))
    return out


def pad_batch(encodings: Sequence[Encoding], pad_id: int) -> dict[str, np.ndarray]:
    """Pad encodings to the longest one: input_ids, attention_mask, token_type_ids."""
    width = max(len(e) for e in encodings)
    n = len(encodings)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for i, e in enumerate(encodings):
        length = len(e)
        input_ids[i, :length] = e.input_ids
        attention[i, :length] = 1
        types[i, :length] = e.token_type_ids
    return {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": types}
