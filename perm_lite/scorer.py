"""`Scorer`: load a PERM model once, score records in length-sorted batches."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from perm_lite.errors import require_count
from perm_lite.inference import Engine, check_batching
from perm_lite.model_dir import DEFAULT_MODEL, load_model_session, load_model_tokenizer, read_config, resolve_model
from perm_lite.records import Dialogue, RecordError, parse_record
from perm_lite.reward import Reward
from perm_lite.session import OrtProviders
from perm_lite.text import Encoding, SpecialTokens, encode_dialogues

Record = Mapping[str, Any] | Dialogue

if TYPE_CHECKING:  # pragma: no cover
    from perm_lite.explain import Explanation


class _Unset:
    def __repr__(self) -> str:
        return "<the scorer's setting>"


UNSET: Any = _Unset()  # a per-call option left out: the Scorer's own setting applies


@dataclass(frozen=True)
class Result:
    """Scores for one record. Plain data: `dataclasses.asdict` or `to_dict()` is JSON-ready."""

    scores: dict[str, float]  # per head, on its scale (PERM: 1-5, bystander 0-100)
    combined: float  # the model's reward (`Scorer.reward.combined`): empathy + bystander term
    truncated: bool
    tokens: dict[str, dict[str, int]]  # part -> {"kept": n, "total": n}
    model: str
    model_version: str
    id: str | int | None = None
    raw: dict[str, float] = field(default_factory=dict)  # uncalibrated head outputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scorer:
    """Scores replies from a PERM model's perspectives with a local ONNX model.

    Args:
        model: catalogue name ("default"), a model directory, or "owner/repo@revision".
        provider: "auto" (the best provider that runs here: CUDA, else CPU), "cpu", "cuda",
            or any name in the provider table (`perm_lite.providers`).
        providers: an explicit onnxruntime provider list passed through as is (names or
            (name, options) pairs), instead of `provider`.
        threads: intra-op threads; default = cores available to this process.
        batch_size: most records per inference batch (sorted by length to cut padding).
        max_batch_tokens: most padded tokens (records x longest) per batch; "auto" = the
            provider's default (1024 on CPU, where small batches run fastest; none on
            CUDA); None = no limit.
        variant: ONNX variant ("auto": the one the provider prefers, int8 on CPU).
        reward: the reward settings (`perm_lite.reward.Reward`); or give `combine`,
            `weights` and `bystander_coef` for a `Reward` with those.
        combine: "harmonic" (PERM's default), "mean" or "geometric" for the empathy reward.
        weights: optional weights per empathy perspective (checked against the model's).
        bystander_coef: coefficient of the bystander term `coef * (b/high - 1)` (PERM:
            b/100); 0 disables it.
        cache_dir, revision: where and which revision to fetch a Hub model.

    `batch_size` and `max_batch_tokens` are defaults: `score`, `score_dialogues` and
    `raw_scores` take them per call, so a shared Scorer is never reconfigured.
    """

    def __init__(
        self,
        model: str | os.PathLike = "default",
        *,
        provider: str = "auto",
        providers: OrtProviders | None = None,
        threads: int | None = None,
        batch_size: int = 32,
        max_batch_tokens: int | str | None = "auto",
        variant: str = "auto",
        reward: Reward | None = None,
        combine: str | None = None,
        weights: Mapping[str, float] | None = None,
        bystander_coef: float | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
    ) -> None:
        reward = Reward.from_settings(reward, combine=combine, weights=weights, bystander_coef=bystander_coef)
        check_batching(batch_size, None if max_batch_tokens == "auto" else max_batch_tokens)
        self.config = read_config(resolve_model(model if str(model) else DEFAULT_MODEL, cache_dir, revision))
        self.heads = self.config.heads
        self.reward = reward.bind(self.heads)  # a weight the model has no head for fails here
        self.tokenizer = load_model_tokenizer(self.config)  # a corrupt file is a one-line ModelError
        loaded = load_model_session(self.config, variant, provider, threads, providers)
        self.session = loaded.session
        self.variant = loaded.variant
        self.provider_info = loaded.provider
        self.provider = loaded.provider.name
        self.engine = Engine(self.session, SpecialTokens.from_tokenizer(self.tokenizer).pad)
        self.batch_size = batch_size
        self.max_batch_tokens = self._budget(max_batch_tokens)

    @property
    def model_name(self) -> str:
        return self.config.name

    def _budget(self, max_batch_tokens: int | str | None) -> int | None:
        if max_batch_tokens is UNSET:
            return self.max_batch_tokens
        if max_batch_tokens == "auto":
            return self.provider_info.batch_tokens
        return max_batch_tokens  # checked where it is used: __init__ and Engine.run

    # -- scoring -------------------------------------------------------------------------

    def score(
        self, records: Iterable[Record], *, batch_size: int | None = None, max_batch_tokens: Any = UNSET
    ) -> list[Result]:
        """Score records (dicts in the input format, or `Dialogue`s); always a list.
        `batch_size` / `max_batch_tokens` override the Scorer's for this call only."""
        dialogues = [_as_dialogue(r, i) for i, r in enumerate(records)]
        return self.score_dialogues(dialogues, batch_size=batch_size, max_batch_tokens=max_batch_tokens)

    def score_one(self, record: Record | None = None, **fields: Any) -> Result:
        """Score one record: `score_one({"query": ..., "response": ...})` or keyword fields."""
        if record is None:
            record = fields
        elif fields:
            raise TypeError("pass either a record or keyword fields, not both")
        return self.score([record])[0]

    def iter_scores(
        self,
        records: Iterable[Record],
        chunk_size: int | None = None,
        *,
        batch_size: int | None = None,
        max_batch_tokens: Any = UNSET,
    ) -> Iterator[Result]:
        """Stream results for a large iterable, in input order, holding one chunk in memory
        (`chunk_size` records; default 16 batches)."""
        size = require_count(self.batch_size if batch_size is None else batch_size, "batch_size") * 16
        if chunk_size is not None:
            size = require_count(chunk_size, "chunk_size")
        it = iter(records)
        offset = 0
        while chunk := list(itertools.islice(it, size)):
            dialogues = [_as_dialogue(r, offset + i) for i, r in enumerate(chunk)]
            yield from self.score_dialogues(dialogues, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
            offset += len(chunk)

    def encode(self, dialogues: Sequence[Dialogue]) -> list[Encoding]:
        """Render and tokenize dialogues as the model was trained to read them."""
        return encode_dialogues(dialogues, self.tokenizer, self.config.max_length)

    def raw_scores(
        self, encodings: Sequence[Encoding], *, batch_size: int | None = None, max_batch_tokens: Any = UNSET
    ) -> np.ndarray:
        """Raw head outputs (n, heads) in input order; batches are formed from length-sorted records."""
        size = self.batch_size if batch_size is None else batch_size
        return self.engine.run(encodings, size, self._budget(max_batch_tokens))

    def score_dialogues(
        self, dialogues: Sequence[Dialogue], *, batch_size: int | None = None, max_batch_tokens: Any = UNSET
    ) -> list[Result]:
        """Score already-validated dialogues; results in input order."""
        if not dialogues:
            return []
        encodings = self.encode(dialogues)
        raw = self.raw_scores(encodings, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
        return self.results(dialogues, encodings, raw)

    def results(self, dialogues: Sequence[Dialogue], encodings: Sequence[Encoding], raw: np.ndarray) -> list[Result]:
        """`Result`s from raw head outputs: calibration, the reward, token counts (the last
        step of `score_dialogues`)."""
        if not dialogues:
            return []
        names = self.heads.names
        calibrated = self.calibrate(raw)
        results = []
        for d, enc, r, s in zip(dialogues, encodings, raw, calibrated):
            scores = {name: round(float(v), 6) for name, v in zip(names, s)}
            results.append(
                Result(
                    scores=scores,
                    combined=round(self.reward.combined(scores), 6),
                    truncated=enc.truncated,
                    tokens={k: {"kept": kept, "total": total} for k, (kept, total) in enc.tokens.items()},
                    model=self.config.name,
                    model_version=self.config.version,
                    id=d.id,
                    raw={name: round(float(v), 6) for name, v in zip(names, r)},
                )
            )
        return results

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        """Map raw head outputs onto the model's scales (its calibration, else linear 0-1)."""
        out = np.empty_like(raw, dtype=np.float64)
        for j, (name, (low, high)) in enumerate(zip(self.heads.names, self.heads.ranges)):
            cal = self.config.calibration.get(name)
            if cal is not None:
                out[:, j] = cal.apply(raw[:, j].astype(np.float64), low, high)
            else:
                out[:, j] = low + (high - low) * np.clip(raw[:, j], 0.0, 1.0)
        return out

    def explain(self, record: Record, *, context: bool = False, **limits: int) -> Explanation:
        """Why a record scored as it did: each reply sentence's contribution to every
        perspective and the combined score, by occlusion (see `perm_lite.explain`: bounded
        by what the model reads; `limits`: max_sentences, max_turns, chunk_size).
        `context=True` also measures each context turn. Offsets index the record's reply field."""
        from perm_lite.explain import explain

        return explain(self, record, context=context, **limits)


def _as_dialogue(record: Record, index: int) -> Dialogue:
    if isinstance(record, Dialogue):
        return record
    try:
        return parse_record(record)
    except RecordError as exc:
        raise exc.at(f"record {index}") from None
