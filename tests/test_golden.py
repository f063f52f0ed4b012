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
    "job-warm": {"resonation": 2.2, "expression": 1.898, "reception": 2.454, "bystander": 32.034, "combined": 0.0921},
    "job-generic": {
        "resonation": 1.34,
        "expression": 1.588,
        "reception": 1.495,
        "bystander": 4.713,
        "combined": -0.183,
    },
    "job-dismissive": {
        "resonation": 1.152,
        "expression": 1.341,
        "reception": 1.194,
        "bystander": 0.0,
        "combined": -0.2552,
    },
    "grief-chat": {
        "resonation": 2.818,
        "expression": 2.301,
        "reception": 2.661,
        "bystander": 53.899,
        "combined": 0.2844,
    },
    "exam-completion": {
        "resonation": 1.851,
        "expression": 1.693,
        "reception": 2.17,
        "bystander": 12.155,
        "combined": -0.0623,
    },
    "lonely-padded": {"resonation": 1.0, "expression": 1.109, "reception": 1.0, "bystander": 0.0, "combined": -0.2932},
    "lonely-specific": {
        "resonation": 2.479,
        "expression": 1.834,
        "reception": 2.421,
        "bystander": 61.304,
        "combined": 0.2471,
    },
    "intrusive": {
        "resonation": 1.61,
        "expression": 1.472,
        "reception": 1.659,
        "bystander": 26.577,
        "combined": -0.0518,
    },
    "advice-clear": {
        "resonation": 1.959,
        "expression": 1.924,
        "reception": 2.512,
        "bystander": 16.402,
        "combined": 0.0021,
    },
    "no-context": {
        "resonation": 1.695,
        "expression": 2.058,
        "reception": 1.919,
        "bystander": 42.788,
        "combined": 0.0896,
    },
}


@pytest.fixture(scope="module")
def results():
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    return {r.id: r for r in Scorer().score(records)}


def test_default_model_identity():
    scorer = Scorer()
    assert (scorer.model_name, scorer.config.version, scorer.variant) == ("perm-lite-minilm", "2.0.0", "int8")


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
