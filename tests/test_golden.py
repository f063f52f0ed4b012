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
    "job-warm": {"resonation": 2.334, "expression": 2.055, "reception": 2.718, "bystander": 45.968, "combined": 0.1975},
    "job-generic": {
        "resonation": 1.799,
        "expression": 1.998,
        "reception": 2.078,
        "bystander": 37.653,
        "combined": 0.0785,
    },
    "job-dismissive": {
        "resonation": 1.307,
        "expression": 1.291,
        "reception": 1.123,
        "bystander": 6.853,
        "combined": -0.2188,
    },
    "grief-chat": {
        "resonation": 2.703,
        "expression": 2.668,
        "reception": 2.86,
        "bystander": 37.794,
        "combined": 0.2372,
    },
    "exam-completion": {
        "resonation": 1.797,
        "expression": 1.635,
        "reception": 2.075,
        "bystander": 11.737,
        "combined": -0.0777,
    },
    "lonely-padded": {
        "resonation": 1.019,
        "expression": 1.254,
        "reception": 1.004,
        "bystander": 1.248,
        "combined": -0.2775,
    },
    "lonely-specific": {
        "resonation": 2.478,
        "expression": 1.955,
        "reception": 2.716,
        "bystander": 48.327,
        "combined": 0.2092,
    },
    "intrusive": {"resonation": 1.8, "expression": 1.837, "reception": 2.03, "bystander": 29.52, "combined": 0.0244},
    "advice-clear": {
        "resonation": 2.134,
        "expression": 2.463,
        "reception": 2.978,
        "bystander": 40.396,
        "combined": 0.1977,
    },
    "no-context": {
        "resonation": 1.797,
        "expression": 2.396,
        "reception": 2.197,
        "bystander": 41.512,
        "combined": 0.1274,
    },
}


@pytest.fixture(scope="module")
def results():
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    return {r.id: r for r in Scorer().score(records)}


def test_default_model_identity():
    scorer = Scorer()
    assert (scorer.model_name, scorer.config.version, scorer.variant) == ("perm-lite-minilm", "3.0.0", "int8")


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
