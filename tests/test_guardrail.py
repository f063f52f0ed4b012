"""The guardrail: verdicts from real scores, on_fail choices, async checks, threshold picking."""

import asyncio
import json
from pathlib import Path

import pytest

from perm_lite import Scorer
from perm_lite.guardrail import Guardrail, GuardrailFailed, pick_threshold

EXAMPLES = [
    json.loads(x) for x in (Path(__file__).parents[1] / "examples" / "dialogues.jsonl").read_text().splitlines()
]
BY_ID = {r["id"]: r for r in EXAMPLES}
QUERY = BY_ID["job-warm"]["query"]
WARM, GENERIC, DISMISSIVE = (BY_ID[f"job-{k}"]["response"] for k in ("warm", "generic", "dismissive"))


@pytest.fixture(scope="module")
def scorer():
    return Scorer()


@pytest.fixture(scope="module")
def scores(scorer):
    results = scorer.score([{"query": QUERY, "response": r} for r in (WARM, GENERIC, DISMISSIVE)])
    return {name: r for name, r in zip(("warm", "generic", "dismissive"), results)}


def test_verdict_names_each_check_under_its_threshold(scorer, scores):
    s = scores["warm"]
    guard = Guardrail({"reception": s.scores["reception"] + 0.01, "bystander": s.scores["bystander"] - 1}, scorer)
    verdict = guard.check({"query": QUERY, "response": WARM})
    assert verdict.flagged and verdict.failed == ["reception"]
    # scored alone here, in a batch in the fixture: equal to the 6th decimal (batch composition)
    assert verdict.scores == pytest.approx(s.scores, abs=1e-5) and verdict.combined == pytest.approx(
        s.combined, abs=1e-5
    )
    assert verdict.response == WARM and verdict.latency_ms > 0 and verdict.history == []
    relaxed = Guardrail({"reception": s.scores["reception"] - 0.01, "combined": s.combined - 0.01}, scorer)
    assert not relaxed.check({"query": QUERY, "response": WARM}).flagged
    assert json.loads(json.dumps(verdict.to_dict()))["failed"] == ["reception"]


def test_raise_carries_the_verdict(scorer, scores):
    guard = Guardrail({"combined": scores["warm"].combined + 1}, scorer, on_fail="raise")
    with pytest.raises(GuardrailFailed, match="combined under threshold") as info:
        guard.check({"query": QUERY, "response": WARM})
    assert info.value.verdict.failed == ["combined"]


def test_regenerate_returns_the_first_passing_draft_with_history(scorer, scores):
    bar = (scores["warm"].combined + max(scores["generic"].combined, scores["dismissive"].combined)) / 2
    drafts = iter([GENERIC, WARM, DISMISSIVE])
    calls = []

    def regenerate(record, verdict):
        calls.append((record["response"], verdict.failed))
        return next(drafts)

    guard = Guardrail({"combined": bar}, scorer, on_fail="regenerate", regenerate=regenerate, max_attempts=5)
    verdict = guard.check({"query": QUERY, "response": DISMISSIVE})
    assert not verdict.flagged and verdict.response == WARM and verdict.attempt == 3
    assert [v.response for v in verdict.history] == [DISMISSIVE, GENERIC]
    assert calls == [(DISMISSIVE, ["combined"]), (GENERIC, ["combined"])]


def test_regenerate_stops_at_max_attempts_and_returns_the_best_failure(scorer, scores):
    calls = []

    def regenerate(record, verdict):
        calls.append(1)
        return GENERIC if len(calls) == 1 else DISMISSIVE

    guard = Guardrail({"combined": 10.0}, scorer, on_fail="regenerate", regenerate=regenerate, max_attempts=3)
    verdict = guard.check({"query": QUERY, "response": DISMISSIVE})
    assert len(calls) == 2 and verdict.flagged and len(verdict.history) == 2
    best = max((scores["generic"], scores["dismissive"]), key=lambda r: r.combined)
    assert verdict.combined == pytest.approx(best.combined)


def test_async_check_matches_sync(scorer):
    guard = Guardrail({"reception": 2.0}, scorer)
    record = {"query": QUERY, "response": GENERIC}
    assert asyncio.run(guard.acheck(record)).scores == pytest.approx(guard.check(record).scores)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresholds": {}}, "at least one threshold"),
        ({"thresholds": {"warmth": 3}}, "unknown threshold warmth"),
        ({"thresholds": {"reception": 3}, "on_fail": "retry"}, "unknown on_fail"),
        ({"thresholds": {"reception": 3}, "on_fail": "regenerate"}, "needs regenerate="),
    ],
)
def test_configuration_errors(scorer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Guardrail(scorer=scorer, **kwargs)


def labelled():
    rows = []
    for r in EXAMPLES:
        kind = r["id"].rsplit("-", 1)[-1]
        rows.append({k: v for k, v in r.items() if k != "id"} | {"acceptable": kind not in ("generic", "dismissive")})
    return rows


def test_pick_threshold_meets_the_target_and_is_the_tightest(scorer):
    rows = labelled()
    values = [r.combined for r in scorer.score([{k: v for k, v in r.items() if k != "acceptable"} for r in rows])]
    bad = [not r["acceptable"] for r in rows]
    choice = pick_threshold(rows, "combined", target_recall=1.0, scorer=scorer)
    assert choice.recall == 1.0 and choice.n == len(rows)
    assert all(v < choice.threshold for v, b in zip(values, bad) if b)  # every bad reply flagged
    worst_bad = max(v for v, b in zip(values, bad) if b)
    assert choice.threshold == pytest.approx(min(v for v in values if v > worst_bad))  # the lowest that does it

    def precision(t):
        flagged = [b for v, b in zip(values, bad) if v < t]
        return sum(flagged) / len(flagged) if flagged else None

    strict = pick_threshold(rows, "combined", target_precision=0.5, scorer=scorer)
    assert strict.precision == pytest.approx(precision(strict.threshold)) and strict.precision >= 0.5
    higher = [v for v in values if v > strict.threshold] + [max(values) + 1e-6]
    assert all(precision(t) < 0.5 for t in higher)  # the highest threshold that keeps the precision


def test_pick_threshold_errors(scorer):
    rows = labelled()
    with pytest.raises(ValueError, match="exactly one of"):
        pick_threshold(rows, scorer=scorer)
    with pytest.raises(ValueError, match="record 2: field 'acceptable' must be true or false"):
        pick_threshold([rows[0], {**rows[1], "acceptable": "yes"}], target_recall=0.9, scorer=scorer)
    with pytest.raises(ValueError, match="both acceptable and unacceptable"):
        pick_threshold([r for r in rows if r["acceptable"]], target_recall=0.9, scorer=scorer)


def test_example_chatbot_runs_and_sends_only_passing_replies():
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "examples" / "guardrail_chatbot.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.count("you> ") == 2 and out.count("bot> ") == 2
    assert "[rejected draft 1" in out and "FLAGGED" not in out
