"""Calibration fitting, metrics and weak-supervision generators (no torch needed)."""

import random

import numpy as np
import pytest

from perm_lite.model_dir import Calibration
from perm_lite.training import weak
from perm_lite.training.calibrate import anchor_bystander, fit_monotone
from perm_lite.training.evaluate import pearson, spearman


def test_fit_monotone_is_strictly_increasing_and_on_scale():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=500)
    label = np.clip(3 + raw + rng.normal(scale=0.8, size=500), 1, 5)
    knots = fit_monotone(raw, label, 1.0, 5.0)
    assert np.all(np.diff(knots["raw"]) > 0) and np.all(np.diff(knots["score"]) > 0)
    assert 1.0 <= min(knots["score"]) and max(knots["score"]) <= 5.0
    cal = Calibration(tuple(knots["raw"]), tuple(knots["score"]))
    mapped = cal.apply(np.sort(raw), 1.0, 5.0)
    assert np.all(np.diff(mapped) >= 0)
    # Calibrated scores track the label level: mean absolute error below the label's spread.
    assert np.mean(np.abs(cal.apply(raw, 1.0, 5.0) - label)) < np.std(label)


def test_fit_monotone_pools_violators():
    raw = np.arange(8, dtype=float)
    label = np.array([1, 3, 2, 2, 4, 4, 5, 5], dtype=float)
    knots = fit_monotone(raw, label, 1.0, 5.0, bins=8)
    assert knots["score"][1] == pytest.approx(7 / 3, abs=1e-3)  # 3, 2, 2 pooled
    assert np.all(np.diff(knots["score"]) > 0)


def test_bystander_anchor_and_fallback():
    assert anchor_bystander(np.array([0.0, 0.2]), np.array([0.8, 1.0])) == {
        "raw": [0.1, 0.9],
        "score": [20.0, 70.0],
        "method": "anchor",
    }
    fallback = anchor_bystander(np.array([0.5, 0.6]), np.array([0.1, 0.2]))
    assert fallback["method"] == "fallback-percentile" and fallback["score"] == [5.0, 95.0]


def test_metrics_match_definitions():
    a = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    b = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert spearman(a, b) == pytest.approx(0.8)
    assert np.isnan(pearson(a, np.ones(5)))


def test_weak_generators():
    rng = random.Random(0)
    generic = weak.generic_reply(rng, 20)
    assert len(generic.split()) >= 20
    leftover = generic
    for sentence in weak.GENERIC_SENTENCES:
        leftover = leftover.replace(sentence, "")
    assert leftover.strip() == ""  # made only of the documented filler sentences
    reply = "I hear how hard this week has been for you."
    padded = weak.padded_reply(rng, reply)
    assert padded.startswith(reply) and len(padded.split()) >= 2 * len(reply.split())
    assert weak.truncated_reply("too short") is None
    long = " ".join(f"w{i}" for i in range(40))
    assert weak.truncated_reply(long) == " ".join(f"w{i}" for i in range(16))
