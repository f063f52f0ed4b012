"""PERM rewards for TRL's GRPOTrainer: the combined reward and one callable per perspective.

    from perm_lite.integrations.trl import perm_reward, perspective_rewards
    trainer = GRPOTrainer(model=..., reward_funcs=[perm_reward()], ...)

Each callable follows GRPOTrainer's `reward_funcs` contract: keyword arguments `prompts`,
`completions`, `completion_ids` and every dataset column; it returns one float or None per
completion. None means "no reward for this sample" (TRL ignores it for that function) and
a warning on the `perm_lite` logger says why; it is never replaced by a batch mean.

Context comes from PERM's dataset columns (`persona`, `scenario`, `query`) when the
dataset has a `query` column, else from the prompt (a string, or chat messages whose last
user turn is the seeker's message). Completions are strings or chat message lists; a
`# Analysis` / `# Response` completion is split as in PERM. The model loads once per
process and is shared by every callable made here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from perm_lite.errors import OptionError, require_count
from perm_lite.records import RecordError, parse_record, split_completion
from perm_lite.reward import Reward
from perm_lite.scorer import Result, Scorer

log = logging.getLogger("perm_lite")
RewardFunc = Callable[..., list[float | None]]

_SCORERS: dict[tuple, Scorer] = {}
_LOCK = threading.Lock()


def shared_scorer(model: str = "default", provider: str = "auto", threads: int | None = None) -> Scorer:
    """One Scorer per (model, provider, threads) per process."""
    key = (str(model), provider, threads)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = Scorer(model, provider=provider, threads=threads)
        return _SCORERS[key]


def _text_of(completion: Any) -> str:
    """A completion as text: a string, or the assistant content of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
        parts = [m.get("content") for m in completion if m.get("role", "assistant") == "assistant"]
        if not parts or not all(isinstance(p, str) for p in parts):
            raise RecordError("chat completion has no assistant message with string content", "completions")
        return "\n".join(parts)
    raise RecordError(f"expected a string or a list of messages, got {type(completion).__name__}", "completions")


def _column(kwargs: Mapping[str, Any], name: str, i: int) -> Any:
    values = kwargs.get(name)
    return values[i] if isinstance(values, Sequence) and not isinstance(values, str) and i < len(values) else None


def build_record(prompt: Any, completion: Any, columns: Mapping[str, Any], i: int) -> dict[str, Any]:
    """The perm-lite input record of completion i (raises RecordError when it cannot be built)."""
    record: dict[str, Any] = {"completion": _text_of(completion)}
    if columns.get("query") is not None:
        for name in ("persona", "scenario", "query"):
            value = _column(columns, name, i)
            if value is not None:
                record[name] = value
    elif isinstance(prompt, str):
        record["query"] = prompt
    elif isinstance(prompt, Sequence):
        record["messages"] = [dict(m) for m in prompt]
    elif prompt is not None:
        raise RecordError(f"expected a string or chat messages, got {type(prompt).__name__}", "prompts")
    return record


class _PermRewardBase:
    def __init__(self, model: str, provider: str, threads: int | None, batch_size: int) -> None:
        require_count(batch_size, "batch_size")
        self.model, self.provider, self.threads, self.batch_size = model, provider, threads, batch_size

    @property
    def scorer(self) -> Scorer:
        """The process-wide Scorer of this model (loaded on first use, shared, never reconfigured)."""
        return shared_scorer(self.model, self.provider, self.threads)

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        """GRPOTrainer's reward_funcs call: one float or None per completion."""
        if completions is None:
            raise TypeError(f"{self.__name__}: completions is required")
        results = self._results(prompts, completions, columns)
        return [
            None if result is None else self._value(result, i, completions[i], completion_ids)
            for i, result in enumerate(results)
        ]

    def _value(self, result: Result, i: int, completion: Any, completion_ids: Sequence[Sequence[int]] | None) -> float:
        raise NotImplementedError

    def _results(
        self, prompts: Sequence[Any] | None, completions: Sequence[Any], columns: Mapping[str, Any]
    ) -> list[Result | None]:
        scorer = self.scorer
        dialogues, where = [], []
        for i, completion in enumerate(completions):
            prompt = prompts[i] if prompts is not None and i < len(prompts) else None
            try:
                dialogues.append(parse_record(build_record(prompt, completion, columns, i)))
                where.append(i)
            except RecordError as exc:
                log.warning("%s: completion %d gets no reward: %s", self.__name__, i, exc)
        out: list[Result | None] = [None] * len(completions)
        if dialogues:  # this callable's batch size, for this call only: the shared scorer is untouched
            for i, result in zip(where, scorer.score_dialogues(dialogues, batch_size=self.batch_size)):
                out[i] = result
        return out


class PermReward(_PermRewardBase):
    """PERM's combined reward: empathy combination + bystander term + length penalty
    (`perm_lite.reward.Reward.total`, the formula every front end shares).

    Args:
        combine: "harmonic" (the recipe's), "mean" or "geometric" over the model's empathy
            perspectives (PERM: resonation, expression, reception) normalised as s/5.
        weights: optional per-perspective weights for the empathy combination, checked
            against the model's perspectives (loads the model).
        bystander_coef: coefficient of `coef * (b/100 - 1)`; 0 disables the term.
        length_limit, length_coef: `-coef * max(0, n - limit)`, n counted in the policy's
            tokens (`completion_ids`, which GRPOTrainer passes; or `tokenizer`); coef 0
            disables it.
        repetition_coef: optional defence in depth (off by default): subtract
            `coef * repetition_share(reply)` (`perm_lite.Reward.repetition_penalty`).
        reward: a `Reward` instead of the four settings above.
        tokenizer: a callable text -> token count, used only when `completion_ids` is absent.
    """

    def __init__(
        self,
        model: str = "default",
        *,
        combine: str | None = None,
        weights: Mapping[str, float] | None = None,
        bystander_coef: float | None = None,
        length_limit: int | None = None,
        length_coef: float | None = None,
        repetition_coef: float | None = None,
        reward: Reward | None = None,
        tokenizer: Callable[[str], int] | None = None,
        provider: str = "auto",
        threads: int | None = None,
        batch_size: int = 32,
        name: str = "perm",
    ) -> None:
        super().__init__(model, provider, threads, batch_size)
        reward = Reward.from_settings(  # fails fast; PERM's defaults (harmonic, 0.5, 768, 0.001)
            reward,
            combine=combine,
            weights=weights,
            bystander_coef=bystander_coef,
            length_limit=length_limit,
            length_coef=length_coef,
            repetition_coef=repetition_coef,
        )
        self.settings = reward.bind(self.scorer.heads)  # weights checked against the model's heads
        self.tokenizer = tokenizer
        self.__name__ = name

    def reward(self, scores: Mapping[str, float], n_tokens: int | None, text: str | None = None) -> float:
        """The reward for one set of calibrated scores, a completion length and (for the
        optional repetition term) the reply's text."""
        return self.settings.total(scores, n_tokens, text)

    def _value(self, result: Result, i: int, completion: Any, completion_ids: Sequence[Sequence[int]] | None) -> float:
        text = split_completion(_text_of(completion))[1] if self.settings.repetition_coef else None
        return self.reward(result.scores, self._length(i, completion, completion_ids), text)

    def _length(self, i: int, completion: Any, completion_ids: Sequence[Sequence[int]] | None) -> int | None:
        if not self.settings.length_coef:
            return None
        if completion_ids is not None:
            return len(completion_ids[i])
        if self.tokenizer is not None:
            return self.tokenizer(_text_of(completion))
        raise TypeError(
            f"{self.__name__}: the length penalty needs completion_ids (GRPOTrainer passes them) or a "
            "tokenizer=callable; pass length_coef=0 to disable it"
        )


class PerspectiveReward(_PermRewardBase):
    """One perspective's calibrated score as a reward (its scale: PERM 1-5, bystander 0-100),
    optionally rescaled to 0-1 with `normalise=True` (s/high: s/5, b/100). The name is
    checked against the model's perspectives (loads the model)."""

    def __init__(
        self,
        perspective: str,
        model: str = "default",
        *,
        normalise: bool = True,
        provider: str = "auto",
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(model, provider, threads, batch_size)
        heads = self.scorer.heads
        if perspective not in heads.names:
            raise OptionError(f"unknown perspective {perspective!r}; choose one of {', '.join(heads.names)}")
        self.perspective, self.normalise = perspective, normalise
        self.__name__ = f"perm_{perspective}"

    def _value(self, result: Result, i: int, completion: Any, completion_ids: Sequence[Sequence[int]] | None) -> float:
        value = result.scores[self.perspective]
        return self.scorer.heads.normalise(self.perspective, value) if self.normalise else value


def perm_reward(model: str = "default", **options: Any) -> PermReward:
    """PERM's combined reward for `GRPOTrainer(reward_funcs=...)` (options: see PermReward)."""
    return PermReward(model, **options)


def perspective_rewards(model: str = "default", **options: Any) -> list[PerspectiveReward]:
    """One callable per perspective of the model, `perm_<name>` (PERM: `perm_resonation`,
    `perm_expression`, `perm_reception`, `perm_bystander`), for multi-objective training
    (use `reward_weights` to mix them)."""
    keys = {k: options[k] for k in ("provider", "threads") if k in options}
    heads = shared_scorer(model, **keys).heads
    return [PerspectiveReward(p, model, **options) for p in heads.names]
