"""Golden scores of the shipped default model on examples/dialogues.jsonl.

Regenerate only when the model changes on purpose (and say so in the model card).
int8 kernels differ slightly between CPU families, hence the tolerances.
"""

import json
from pathlib import Path

import pytest

from perm_lite import Scorer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dialogues.jsonl"
GOLDEN = {
    "job-warm": {"resonation": 2.433, "expression": 2.265, "reception": 3.087, "bystander": 53.702, "combined": 0.2785},
    "job-generic": {
        "resonation": 2.016,
        "expression": 1.912,
        "reception": 2.089,
        "bystander": 30.482,
        "combined": 0.053,
    },
    "job-dismissive": {
        "resonation": 1.01,
        "expression": 1.261,
        "reception": 1.054,
        "bystander": 2.536,
        "combined": -0.2677,
    },
    "grief-chat": {
        "resonation": 2.926,
        "expression": 3.158,
        "reception": 3.179,
        "bystander": 45.334,
        "combined": 0.3433,
    },
    "exam-completion": {
        "resonation": 2.018,
        "expression": 1.775,
        "reception": 2.3,
        "bystander": 21.486,
        "combined": 0.0091,
    },
    "lonely-padded": {
        "resonation": 1.003,
        "expression": 1.255,
        "reception": 1.019,
        "bystander": 1.269,
        "combined": -0.2775,
    },
    "lonely-specific": {
        "resonation": 2.247,
        "expression": 1.808,
        "reception": 2.571,
        "bystander": 40.187,
        "combined": 0.1335,
    },
    "intrusive": {
        "resonation": 2.017,
        "expression": 1.815,
        "reception": 2.196,
        "bystander": 32.327,
        "combined": 0.0611,
    },
    "advice-clear": {
        "resonation": 2.281,
        "expression": 2.564,
        "reception": 3.132,
        "bystander": 47.128,
        "combined": 0.2584,
    },
    "no-context": {
        "resonation": 1.807,
        "expression": 2.514,
        "reception": 2.202,
        "bystander": 35.159,
        "combined": 0.1027,
    },
}


@pytest.fixture(scope="module")
def results():
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    return {r.id: r for r in Scorer().score(records)}


def test_default_model_identity():
    scorer = Scorer()
    assert (scorer.model_name, scorer.config.version, scorer.variant) == ("perm-lite-minilm", "3.1.0", "int8")


@pytest.mark.parametrize("record_id", sorted(GOLDEN))
def test_golden_scores(results, record_id):
    got, want = results[record_id], GOLDEN[record_id]
    for head in ("resonation", "expression", "reception"):
        assert got.scores[head] == pytest.approx(want[head], abs=0.03), head
    assert got.scores["bystander"] == pytest.approx(want["bystander"], abs=0.75)
    assert got.combined == pytest.approx(want["combined"], abs=0.01)


def test_orderings_within_one_context(results):
    for head in ("resonation", "reception"):
        assert results["job-warm"].scores[head] > results["job-generic"].scores[head]
        assert results["job-warm"].scores[head] > results["job-dismissive"].scores[head]
    assert results["job-warm"].combined > max(results["job-generic"].combined, results["job-dismissive"].combined)
    assert results["lonely-specific"].scores["bystander"] > results["lonely-padded"].scores["bystander"]
    assert results["advice-clear"].combined > results["intrusive"].combined
