"""Occlusion explanations: sentence splitting, faithfulness, JSON round trip, guardrail culprit."""

import json
import re

import pytest

from perm_lite import Explanation, Guardrail, Scorer
from perm_lite.explain import EMPTY_REPLY, split_sentences

REPLY = (
    "I'm so sorry about your dad. Pull yourself together, life goes on! "
    "What do you miss most about him?\nTake your time."
)
RECORD = {
    "messages": [
        {"role": "user", "content": "My dad died last week."},
        {"role": "assistant", "content": "I'm so sorry."},
        {"role": "user", "content": "I keep thinking I should have called him more."},
    ],
    "response": REPLY,
}


def test_split_sentences_spans():
    spans = split_sentences(REPLY)
    assert [REPLY[a:b] for a, b in spans] == [
        "I'm so sorry about your dad.",
        "Pull yourself together, life goes on!",
        "What do you miss most about him?",
        "Take your time.",
    ]
    assert split_sentences("no end mark") == [(0, 11)]
    assert split_sentences("   ") == []


@pytest.fixture(scope="module")
def default_scorer():
    return Scorer(provider="cpu")


def test_removing_a_sentence_moves_the_score_by_the_reported_amount(default_scorer):
    explanation = default_scorer.explain(RECORD)
    assert isinstance(explanation, Explanation)
    assert len(explanation.sentences) == 4
    full = default_scorer.score([RECORD])[0]
    assert explanation.result.combined == pytest.approx(full.combined, abs=1e-6)
    top = explanation.top("combined", k=1, helped=True) or explanation.top("combined", k=1, helped=False)
    sentence = top[0]
    shortened = re.sub(r"[ \t]{2,}", " ", (REPLY[: sentence.start] + " " + REPLY[sentence.end :]).strip())
    without = default_scorer.score([{**RECORD, "response": shortened}])[0]
    assert full.combined - without.combined == pytest.approx(sentence.deltas["combined"], abs=1e-4)
    for head in ("resonation", "expression", "reception", "bystander"):
        assert full.scores[head] - without.scores[head] == pytest.approx(sentence.deltas[head], abs=1e-3)


def test_explanation_is_json_ready_and_ranks_consistently(default_scorer):
    explanation = default_scorer.explain(RECORD, context=True)
    data = json.loads(json.dumps(explanation.to_dict()))
    assert [s["text"] for s in data["sentences"]][1] == "Pull yourself together, life goes on!"
    assert [c["part"] for c in data["context"]] == ["history:0", "history:1", "query"]
    helped = explanation.top("reception", k=4)
    assert all(a.deltas["reception"] >= b.deltas["reception"] for a, b in zip(helped, helped[1:]))
    assert all(c.deltas["reception"] > 0 for c in helped)
    with pytest.raises(ValueError, match="unknown check"):
        explanation.top("warmth")


def test_one_sentence_reply_is_compared_with_an_empty_placeholder(default_scorer):
    explanation = default_scorer.explain({"query": "I failed my exam.", "response": "ok"})
    placeholder = default_scorer.score([{"query": "I failed my exam.", "response": EMPTY_REPLY}])[0]
    (only,) = explanation.sentences
    assert only.deltas["combined"] == pytest.approx(explanation.result.combined - placeholder.combined, abs=1e-6)


def test_guardrail_names_the_sentence_that_hurt_most(default_scorer):
    guard = Guardrail({"combined": 10.0}, scorer=default_scorer)  # always fails
    verdict = guard.check(RECORD)
    assert verdict.flagged and verdict.failed == ["combined"]
    explanation = default_scorer.explain(RECORD)
    worst = explanation.most_harmful("combined")
    if worst is None:
        assert verdict.culprit is None
    else:
        assert verdict.culprit["sentence"] == worst.text
        assert verdict.culprit["delta"] == pytest.approx(worst.deltas["combined"], abs=1e-6)
        assert verdict.culprit["delta"] < 0
    passing = Guardrail({"combined": -10.0}, scorer=default_scorer).check(RECORD)
    assert not passing.flagged and passing.culprit is None


def test_cli_explain_score_explain_and_report(tmp_path):
    from perm_lite.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({**RECORD, "id": "a"}) + "\n" + "{broken\n" + json.dumps({"response": "Fine."}) + "\n")
    out = tmp_path / "explained.jsonl"
    res = runner.invoke(app, ["explain", str(src), "-o", str(out)])
    assert res.exit_code == 3, res.output  # one record skipped
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3] and rows[0]["id"] == "a"
    assert len(rows[0]["sentences"]) == 4
    # never the input, never an existing file without --overwrite
    assert runner.invoke(app, ["explain", str(src), "-o", str(src)]).exit_code == 2
    assert runner.invoke(app, ["explain", str(src), "-o", str(out)]).exit_code == 2

    scored = tmp_path / "scored.jsonl"
    res = runner.invoke(app, ["score", str(src), "-o", str(scored), "--explain", "2"])
    assert res.exit_code == 3, res.output
    first = json.loads(scored.read_text().splitlines()[0])
    assert set(first["explain"]) == {"resonation", "expression", "reception", "bystander", "combined"}
    assert 1 <= len(first["explain"]["combined"]) <= 2
    deltas = [abs(s["delta"]) for s in first["explain"]["combined"]]
    assert deltas == sorted(deltas, reverse=True)

    page = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(scored), "-o", str(page), "--by", "id"])
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert "<td>2</td><td>0</td><td>1</td><td>0</td>" in html  # 2 scored, 1 error in scored.jsonl.errors.jsonl
    assert runner.invoke(app, ["report", str(scored), "-o", str(page)]).exit_code == 2  # exists
