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
    "job-warm": {"resonation": 2.181, "expression": 1.827, "reception": 2.41, "bystander": 60.725, "combined": 0.2259},
    "job-generic": {
        "resonation": 1.594,
        "expression": 1.589,
        "reception": 1.329,
        "bystander": 13.196,
        "combined": -0.1354,
    },
    "job-dismissive": {
        "resonation": 1.774,
        "expression": 1.632,
        "reception": 1.972,
        "bystander": 51.025,
        "combined": 0.1115,
    },
    "grief-chat": {
        "resonation": 2.033,
        "expression": 2.01,
        "reception": 3.068,
        "bystander": 73.396,
        "combined": 0.3232,
    },
    "exam-completion": {
        "resonation": 2.374,
        "expression": 1.943,
        "reception": 3.078,
        "bystander": 68.17,
        "combined": 0.3167,
    },
    "lonely-padded": {
        "resonation": 1.598,
        "expression": 1.603,
        "reception": 1.381,
        "bystander": 0.0,
        "combined": -0.196,
    },
    "lonely-specific": {
        "resonation": 2.384,
        "expression": 1.749,
        "reception": 3.097,
        "bystander": 88.175,
        "combined": 0.3975,
    },
    "intrusive": {
        "resonation": 1.605,
        "expression": 1.607,
        "reception": 1.706,
        "bystander": 12.424,
        "combined": -0.1103,
    },
    "advice-clear": {
        "resonation": 1.868,
        "expression": 1.756,
        "reception": 2.787,
        "bystander": 43.06,
        "combined": 0.1252,
    },
    "no-context": {
        "resonation": 1.604,
        "expression": 1.61,
        "reception": 1.802,
        "bystander": 33.368,
        "combined": 0.0003,
    },
}


@pytest.fixture(scope="module")
def results():
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    return {r.id: r for r in Scorer().score(records)}


def test_default_model_identity():
    scorer = Scorer()
    assert (scorer.model_name, scorer.config.version, scorer.variant) == ("perm-lite-minilm", "1.1.0", "int8")


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
