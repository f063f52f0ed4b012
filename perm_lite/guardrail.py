"""Check a draft reply before it is sent: thresholds on PERM scores, a moderation-style verdict.

    guard = Guardrail(thresholds={"reception": 2.5, "combined": 0.3})
    verdict = guard.check({"query": user_message, "response": draft})
    if verdict.flagged: ...

`on_fail` chooses what a failing draft does: "return" the verdict (default), "raise"
`GuardrailFailed`, or "regenerate": call `regenerate(record, verdict)` for a new draft up
to `max_attempts` times and return the best draft's verdict with every attempt in
`history`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from perm_lite.errors import OptionError, PermError
from perm_lite.explain import Explanation, explain_dialogue
from perm_lite.records import parse_record
from perm_lite.scorer import Result, Scorer

ON_FAIL = ("return", "raise", "regenerate")


@dataclass
class Verdict:
    """The outcome of one check. `failed` names each score under its threshold."""

    flagged: bool
    failed: list[str]
    scores: dict[str, float]
    combined: float
    response: str
    latency_ms: float
    attempt: int = 1
    history: list[Verdict] = field(default_factory=list)  # earlier attempts (regenerate only)
    # When flagged: the reply sentence whose removal would raise the first failing score
    # most (`culprit()`); delta < 0 is how much that sentence lowered the score (None when
    # no measured sentence lowered it). Bounded like every explanation (`perm_lite.explain`).
    culprit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "history"}
        out["history"] = [v.to_dict() for v in self.history]
        return out


class GuardrailFailed(PermError):
    """Raised by `on_fail="raise"`; carries the verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"reply flagged: {', '.join(verdict.failed)} under threshold")
        self.verdict = verdict


def _validate_thresholds(thresholds: Mapping[str, float], checks: Sequence[str]) -> dict[str, float]:
    """Thresholds as floats; each names one of `checks` (a model's heads and "combined")."""
    if not thresholds:
        raise OptionError("give at least one threshold, e.g. {'reception': 2.5} or {'combined': 0.3}")
    unknown = sorted(map(str, set(thresholds) - set(checks)))
    if unknown:
        raise OptionError(f"unknown threshold {', '.join(unknown)}; choose from {', '.join(checks)}")
    out = {}
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise OptionError(f"threshold {name} must be a finite number, not {value!r}", "thresholds")
        out[name] = float(value)
    return out


def culprit(explanation: Explanation, check: str) -> dict[str, Any] | None:
    """The measured sentence that lowered `check` most: {"check", "sentence", "start", "end"
    (offsets in the input field `field`), "field", "delta", "unmeasured" (sentences the model
    reads that the cap left unmeasured)}; None when no measured sentence lowered it."""
    worst = explanation.most_harmful(check)
    if worst is None:
        return None
    return {
        "check": check,
        "sentence": worst.text,
        "start": worst.start,
        "end": worst.end,
        "field": explanation.field,
        "delta": worst.deltas[check],
        "unmeasured": explanation.omitted.sentences_over_cap,
    }


class Guardrail:
    """Flags a reply whose score is below any configured threshold.

    Args:
        thresholds: minimum score per perspective (1-5; bystander 0-100) and/or "combined".
        scorer: a Scorer to share (default: the embedded model, loaded once here).
        on_fail: "return", "raise" or "regenerate".
        regenerate: `(record, verdict) -> new reply text`, needed for "regenerate".
        max_attempts: drafts tried in total with "regenerate" (first one included).
    """

    def __init__(
        self,
        thresholds: Mapping[str, float],
        scorer: Scorer | None = None,
        *,
        on_fail: str = "return",
        regenerate: Callable[[Mapping[str, Any], Verdict], str] | None = None,
        max_attempts: int = 3,
    ) -> None:
        if on_fail not in ON_FAIL:
            raise OptionError(f"unknown on_fail {on_fail!r}; choose one of {', '.join(ON_FAIL)}")
        if on_fail == "regenerate" and regenerate is None:
            raise OptionError("on_fail='regenerate' needs regenerate=callable(record, verdict) -> new reply")
        if max_attempts < 1:
            raise OptionError("max_attempts must be at least 1")
        self.scorer = scorer or Scorer()
        self.thresholds = _validate_thresholds(thresholds, self.scorer.heads.checks)
        self.on_fail, self.regenerate, self.max_attempts = on_fail, regenerate, max_attempts

    def verdict(self, result: Result, response: str, latency_ms: float, attempt: int = 1) -> Verdict:
        """The verdict for an already computed Result."""
        values = {**result.scores, "combined": result.combined}
        failed = [name for name, minimum in self.thresholds.items() if values[name] < minimum]
        return Verdict(bool(failed), failed, dict(result.scores), result.combined, response, latency_ms, attempt)

    def _score(self, record: Mapping[str, Any], attempt: int) -> Verdict:
        started = time.perf_counter()
        dialogue = parse_record(record)
        (result,) = self.scorer.score_dialogues([dialogue])
        verdict = self.verdict(result, dialogue.response, (time.perf_counter() - started) * 1000, attempt)
        if verdict.flagged:  # bounded like every explanation (perm_lite.explain); the full reply is scored once
            explanation = explain_dialogue(self.scorer, dialogue, source=record, full=result)
            verdict.culprit = culprit(explanation, verdict.failed[0])
        return verdict

    def check(self, record: Mapping[str, Any]) -> Verdict:
        """Score one record (a perm-lite input object) and apply `on_fail`."""
        verdict = self._score(record, 1)
        if verdict.flagged and self.on_fail == "regenerate":
            verdict = self._regenerate(record, verdict)
        if verdict.flagged and self.on_fail == "raise":
            raise GuardrailFailed(verdict)
        return verdict

    def _regenerate(self, record: Mapping[str, Any], first: Verdict) -> Verdict:
        attempts = [first]
        current = dict(record)
        while attempts[-1].flagged and len(attempts) < self.max_attempts:
            new_reply = self.regenerate(current, attempts[-1])
            current = {k: v for k, v in current.items() if k != "completion"} | {"response": new_reply}
            attempts.append(self._score(current, len(attempts) + 1))
        passed = [v for v in attempts if not v.flagged]
        best = passed[0] if passed else max(attempts, key=lambda v: (-len(v.failed), v.combined))
        best.history = [v for v in attempts if v is not best]
        return best

    async def acheck(self, record: Mapping[str, Any]) -> Verdict:
        """`check` without blocking the event loop (runs in a worker thread)."""
        return await asyncio.to_thread(self.check, record)


@dataclass(frozen=True)
class ThresholdChoice:
    check: str
    threshold: float
    precision: float  # of flagging: flagged records that are really bad
    recall: float  # bad records that get flagged
    flagged: int
    n: int


def pick_threshold(
    records: Iterable[Mapping[str, Any]],
    check: str = "combined",
    *,
    label: str = "acceptable",
    target_precision: float | None = None,
    target_recall: float | None = None,
    scorer: Scorer | None = None,
) -> ThresholdChoice:
    """Choose the threshold for one check from labelled records.

    Each record is a perm-lite input with a boolean `label` field (True = fine to send).
    Flagging means score < threshold. With `target_recall`, the lowest threshold that
    flags at least that share of bad replies; with `target_precision`, the highest
    threshold whose flags are at least that precise. Raises OptionError (a ValueError) when no threshold
    reaches the target.
    """
    scorer = scorer or Scorer()
    if check not in scorer.heads.checks:
        raise OptionError(f"unknown check {check!r}; choose from {', '.join(scorer.heads.checks)}")
    if (target_precision is None) == (target_recall is None):
        raise OptionError("give exactly one of target_precision or target_recall")
    rows = list(records)
    labels = []
    for i, record in enumerate(rows):
        value = record.get(label)
        if not isinstance(value, bool):
            raise OptionError(f"record {i + 1}: field {label!r} must be true or false, got {value!r}")
        labels.append(value)
    if all(labels) or not any(labels):
        raise OptionError(f"the labelled file needs both acceptable and unacceptable replies (field {label!r})")
    results = scorer.score([{k: v for k, v in r.items() if k != label} for r in rows])
    values = [r.combined if check == "combined" else r.scores[check] for r in results]
    choices = _sweep(values, labels, check)
    if target_recall is not None:
        ok = [c for c in choices if c.recall >= target_recall]
        if not ok:
            raise OptionError(f"no threshold on {check} reaches recall {target_recall}")
        return min(ok, key=lambda c: c.threshold)
    ok = [c for c in choices if c.flagged and c.precision >= target_precision]
    if not ok:
        raise OptionError(f"no threshold on {check} reaches precision {target_precision}")
    return max(ok, key=lambda c: c.threshold)


def _sweep(values: Sequence[float], acceptable: Sequence[bool], check: str) -> list[ThresholdChoice]:
    """One candidate per distinct score: flag everything strictly below it (and one above all)."""
    bad_total = sum(not a for a in acceptable)
    candidates = sorted(set(values)) + [max(values) + 1e-6]
    out = []
    for t in candidates:
        flagged = [not a for v, a in zip(values, acceptable) if v < t]
        hits = sum(flagged)
        precision = hits / len(flagged) if flagged else 1.0
        out.append(ThresholdChoice(check, float(t), precision, hits / bad_total, len(flagged), len(values)))
    return out
