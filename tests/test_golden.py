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
    "job-warm": {"resonation": 2.278, "expression": 1.818, "reception": 2.417, "bystander": 60.169, "combined": 0.2286},
    "job-generic": {
        "resonation": 1.574,
        "expression": 1.602,
        "reception": 1.339,
        "bystander": 13.064,
        "combined": -0.1356,
    },
    "job-dismissive": {
        "resonation": 1.818,
        "expression": 1.65,
        "reception": 2.063,
        "bystander": 51.893,
        "combined": 0.1251,
    },
    "grief-chat": {
        "resonation": 2.079,
        "expression": 1.994,
        "reception": 3.021,
        "bystander": 74.104,
        "combined": 0.3273,
    },
    "exam-completion": {
        "resonation": 2.383,
        "expression": 1.896,
        "reception": 3.1,
        "bystander": 68.366,
        "combined": 0.3144,
    },
    "lonely-padded": {
        "resonation": 1.579,
        "expression": 1.612,
        "reception": 1.455,
        "bystander": 0.0,
        "combined": -0.1908,
    },
    "lonely-specific": {
        "resonation": 2.386,
        "expression": 1.798,
        "reception": 3.38,
        "bystander": 94.305,
        "combined": 0.4435,
    },
    "intrusive": {
        "resonation": 1.585,
        "expression": 1.615,
        "reception": 1.778,
        "bystander": 13.54,
        "combined": -0.1013,
    },
    "advice-clear": {
        "resonation": 1.83,
        "expression": 1.706,
        "reception": 2.582,
        "bystander": 40.767,
        "combined": 0.0987,
    },
    "no-context": {
        "resonation": 1.584,
        "expression": 1.619,
        "reception": 1.997,
        "bystander": 37.51,
        "combined": 0.0305,
    },
}


@pytest.fixture(scope="module")
def results():
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    return {r.id: r for r in Scorer().score(records)}


def test_default_model_identity():
    scorer = Scorer()
    assert (scorer.model_name, scorer.config.version, scorer.variant) == ("perm-lite-minilm", "1.0.0", "int8")


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
