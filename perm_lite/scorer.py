"""`Scorer`: load a PERM model once, score records in length-sorted batches."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from perm_lite.errors import ModelError
from perm_lite.model_dir import (
    DEFAULT_MODEL,
    ModelConfig,
    load_model_session,
    load_model_tokenizer,
    read_config,
    resolve_model,
)
from perm_lite.records import Dialogue, RecordError, parse_record
from perm_lite.scales import COMBINE_MODES, PERSPECTIVES, bystander_term, empathy_reward
from perm_lite.session import session_provider
from perm_lite.text import Encoding, SpecialTokens, encode_dialogues, pad_batch

Record = Mapping[str, Any] | Dialogue

if TYPE_CHECKING:  # pragma: no cover
    from perm_lite.explain import Explanation


@dataclass(frozen=True)
class Result:
    """Scores for one record. Plain data: `dataclasses.asdict` or `to_dict()` is JSON-ready."""

    scores: dict[str, float]  # resonation/expression/reception on 1-5, bystander on 0-100
    combined: float  # empathy reward (per `combine`) + bystander term
    truncated: bool
    tokens: dict[str, dict[str, int]]  # part -> {"kept": n, "total": n}
    model: str
    model_version: str
    id: str | int | None = None
    raw: dict[str, float] = field(default_factory=dict)  # uncalibrated head outputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _variant_for(config: ModelConfig, variant: str, provider: str) -> str:
    if variant != "auto":
        if variant not in config.variants:
            raise ModelError(f"{config.name} has no variant {variant!r} (it has {', '.join(config.variants)})")
        return variant
    preferred = ("fp16", "fp32", "int8") if provider == "cuda" else ("int8", "fp32", "fp16")
    for name in preferred:
        if name in config.variants:
            return name
    return next(iter(config.variants))


CPU_BATCH_TOKENS = 1024


class Scorer:
    """Scores replies from the four PERM perspectives with a local ONNX model.

    Args:
        model: catalogue name ("default"), a model directory, or "owner/repo@revision".
        provider: "auto" (CUDA when usable, else CPU), "cpu" or "cuda".
        threads: intra-op threads; default = cores available to this process.
        batch_size: most records per inference batch (sorted by length to cut padding).
        max_batch_tokens: most padded tokens (records x longest) per batch; "auto" = 1024 on
            CPU, where small batches keep activations in cache and run fastest (measured in
            benchmarks/RESULTS.md), and no limit on CUDA. None = no limit.
        variant: ONNX variant ("auto": int8 on CPU, fp16/fp32 on CUDA when present).
        combine: "harmonic" (PERM's default), "mean" or "geometric" for the empathy reward.
        weights: optional per-perspective weights for the empathy reward.
        bystander_coef: coefficient of the bystander term `coef * (b/100 - 1)`; 0 disables it.
        cache_dir, revision: where and which revision to fetch a Hub model.
    """

    def __init__(
        self,
        model: str | os.PathLike = "default",
        *,
        provider: str = "auto",
        threads: int | None = None,
        batch_size: int = 32,
        max_batch_tokens: int | str | None = "auto",
        variant: str = "auto",
        combine: str = "harmonic",
        weights: Mapping[str, float] | None = None,
        bystander_coef: float = 0.5,
        cache_dir: str | None = None,
        revision: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {combine!r}; choose one of {', '.join(COMBINE_MODES)}")
        empathy_reward(dict.fromkeys(PERSPECTIVES, 3.0), combine, weights)  # validates weights early
        self.config = read_config(resolve_model(model if str(model) else DEFAULT_MODEL, cache_dir, revision))
        self.tokenizer = load_model_tokenizer(self.config)  # a corrupt file is a one-line ModelError
        self._special = SpecialTokens.from_tokenizer(self.tokenizer)
        requested = "cuda" if provider == "cuda" else "cpu"
        self.variant = _variant_for(self.config, variant, requested)
        self.session = load_model_session(self.config, self.variant, provider, threads)
        if provider == "auto" and variant == "auto" and session_provider(self.session) == "cuda":
            better = _variant_for(self.config, "auto", "cuda")
            if better != self.variant:
                self.variant = better
                self.session = load_model_session(self.config, better, provider, threads)
        self.provider = session_provider(self.session)
        self.batch_size = batch_size
        if max_batch_tokens == "auto":
            max_batch_tokens = None if self.provider == "cuda" else CPU_BATCH_TOKENS
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be a positive integer, 'auto' or None, not {max_batch_tokens!r}")
        self.max_batch_tokens = max_batch_tokens
        self.combine = combine
        self.weights = dict(weights) if weights else None
        self.bystander_coef = bystander_coef

    @property
    def model_name(self) -> str:
        return self.config.name

    # -- scoring -------------------------------------------------------------------------

    def score(self, records: Iterable[Record]) -> list[Result]:
        """Score records (dicts in the input format, or `Dialogue`s); always a list."""
        return self.score_dialogues([_as_dialogue(r, i) for i, r in enumerate(records)])

    def score_one(self, record: Record | None = None, **fields: Any) -> Result:
        """Score one record: `score_one({"query": ..., "response": ...})` or keyword fields."""
        if record is None:
            record = fields
        elif fields:
            raise TypeError("pass either a record or keyword fields, not both")
        return self.score([record])[0]

    def iter_scores(self, records: Iterable[Record], chunk_size: int | None = None) -> Iterator[Result]:
        """Stream results for a large iterable, in input order, holding one chunk in memory."""
        size = chunk_size or self.batch_size * 16
        it = iter(records)
        offset = 0
        while chunk := list(itertools.islice(it, size)):
            yield from self.score_dialogues([_as_dialogue(r, offset + i) for i, r in enumerate(chunk)])
            offset += len(chunk)

    def encode(self, dialogues: Sequence[Dialogue]) -> list[Encoding]:
        return encode_dialogues(dialogues, self.tokenizer, self.config.max_length)

    def raw_scores(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """Raw head outputs (n, 4) in input order; batches are formed from length-sorted records."""
        return run_sorted_batches(self.session, encodings, self._special.pad, self.batch_size, self.max_batch_tokens)

    def score_dialogues(self, dialogues: Sequence[Dialogue]) -> list[Result]:
        """Score already-validated dialogues; results in input order."""
        if not dialogues:
            return []
        encodings = self.encode(dialogues)
        raw = self.raw_scores(encodings)
        calibrated = self.calibrate(raw)
        results = []
        for d, enc, r, s in zip(dialogues, encodings, raw, calibrated):
            scores = {name: round(float(v), 6) for name, v in zip(PERSPECTIVES, s)}
            results.append(
                Result(
                    scores=scores,
                    combined=round(self.combined(scores), 6),
                    truncated=enc.truncated,
                    tokens={k: {"kept": kept, "total": total} for k, (kept, total) in enc.tokens.items()},
                    model=self.config.name,
                    model_version=self.config.version,
                    id=d.id,
                    raw={name: round(float(v), 6) for name, v in zip(PERSPECTIVES, r)},
                )
            )
        return results

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        """Map raw head outputs onto the PERM scales (the model's calibration, else linear 0-1)."""
        out = np.empty_like(raw, dtype=np.float64)
        for j, name in enumerate(PERSPECTIVES):
            low, high = self.config.scales[name]
            cal = self.config.calibration.get(name)
            if cal is not None:
                out[:, j] = cal.apply(raw[:, j].astype(np.float64), low, high)
            else:
                out[:, j] = low + (high - low) * np.clip(raw[:, j], 0.0, 1.0)
        return out

    def explain(self, record: Record, *, context: bool = False) -> Explanation:
        """Why a record scored as it did: each reply sentence's contribution to every
        perspective and the combined score, by occlusion (one batch; see `perm_lite.explain`).
        `context=True` also measures each context turn."""
        from perm_lite.explain import explain

        return explain(self, _as_dialogue(record, 0), context=context)

    def combined(self, scores: Mapping[str, float]) -> float:
        """PERM's reward without the length penalty: empathy reward + bystander term."""
        value = empathy_reward(scores, self.combine, self.weights)
        if self.bystander_coef:
            value += bystander_term(scores["bystander"], self.bystander_coef)
        return value


def sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped shortest first: at most `batch_size` records and, when set, at most
    `max_tokens` padded tokens (records x longest) per batch; a longer record goes alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        grown = len(current) + 1
        if current and (grown > batch_size or (max_tokens is not None and grown * lengths[i] > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def run_sorted_batches(
    session, encodings: Sequence[Encoding], pad_id: int, batch_size: int, max_tokens: int | None = None
) -> np.ndarray:
    """Run an onnxruntime session over length-sorted batches; outputs (n, 4) in input order."""
    names = {i.name for i in session.get_inputs()}
    raw = np.zeros((len(encodings), len(PERSPECTIVES)), dtype=np.float32)
    for idx in sorted_batches([len(e) for e in encodings], batch_size, max_tokens):
        feed = pad_batch([encodings[i] for i in idx], pad_id)
        raw[idx] = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
    return raw


def _as_dialogue(record: Record, index: int) -> Dialogue:
    if isinstance(record, Dialogue):
        return record
    try:
        return parse_record(record)
    except RecordError as exc:
        raise exc.at(f"record {index}") from None
