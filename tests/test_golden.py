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
    "job-warm": {"resonation": 2.312, "expression": 2.239, "reception": 2.808, "bystander": 55.447, "combined": 0.2629},
    "job-generic": {
        "resonation": 1.876,
        "expression": 1.938,
        "reception": 1.947,
        "bystander": 33.356,
        "combined": 0.0508,
    },
    "job-dismissive": {
        "resonation": 1.221,
        "expression": 1.297,
        "reception": 1.264,
        "bystander": 7.139,
        "combined": -0.2123,
    },
    "grief-chat": {
        "resonation": 2.887,
        "expression": 2.967,
        "reception": 3.234,
        "bystander": 48.81,
        "combined": 0.3485,
    },
    "exam-completion": {
        "resonation": 2.072,
        "expression": 1.92,
        "reception": 2.515,
        "bystander": 34.662,
        "combined": 0.1015,
    },
    "lonely-padded": {
        "resonation": 1.017,
        "expression": 1.286,
        "reception": 1.052,
        "bystander": 1.301,
        "combined": -0.2722,
    },
    "lonely-specific": {
        "resonation": 2.19,
        "expression": 1.742,
        "reception": 2.474,
        "bystander": 38.14,
        "combined": 0.1089,
    },
    "intrusive": {
        "resonation": 1.925,
        "expression": 1.786,
        "reception": 2.023,
        "bystander": 32.967,
        "combined": 0.0461,
    },
    "advice-clear": {
        "resonation": 2.198,
        "expression": 2.509,
        "reception": 3.135,
        "bystander": 45.566,
        "combined": 0.2395,
    },
    "no-context": {
        "resonation": 1.762,
        "expression": 2.173,
        "reception": 1.979,
        "bystander": 34.749,
        "combined": 0.0651,
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
