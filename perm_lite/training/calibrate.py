"""Calibration of raw head outputs onto the PERM scales, fitted on validation data.

Resonation, expression, reception: a monotone piecewise-linear map through binned
(raw, label) means (pool-adjacent-violators for monotonicity, then made strictly
increasing so that order between replies is never lost to ties). Labels are the
validation targets put back on 1-5 (1 + 4 * target).

Bystander has no human label on the 0-100 scale. Its map is a documented anchor, not a
fit: the median raw output of the weak-supervision negatives (dismissive, generic,
mismatched replies) maps to 20, the median of real therapist answers (counsel-chat) to 70.
"""

from __future__ import annotations

import numpy as np


def _pava(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Isotonic (non-decreasing) fit by pool-adjacent-violators."""
    blocks = [[v, w, 1] for v, w in zip(values.tolist(), weights.tolist())]
    i = 0
    while i < len(blocks) - 1:
        if blocks[i][0] > blocks[i + 1][0]:
            v1, w1, n1 = blocks[i]
            v2, w2, n2 = blocks.pop(i + 1)
            blocks[i] = [(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
            i = max(i - 1, 0)
        else:
            i += 1
    return np.concatenate([[v] * n for v, _, n in blocks])


def fit_monotone(raw: np.ndarray, label: np.ndarray, low: float, high: float, bins: int = 12) -> dict:
    """Knots {raw, score} of a strictly increasing map from raw outputs to the label scale."""
    order = np.argsort(raw)
    raw, label = raw[order], label[order]
    groups = [g for g in np.array_split(np.arange(len(raw)), min(bins, len(raw))) if len(g)]
    xs = np.array([raw[g].mean() for g in groups])
    ys = _pava(np.array([label[g].mean() for g in groups]), np.array([len(g) for g in groups], dtype=float))
    step = (high - low) * 1e-3
    ys = np.clip(ys, low, high)
    for k in range(1, len(ys)):  # strictly increasing: no ties between replies
        ys[k] = max(ys[k], ys[k - 1] + step)
    if ys[-1] > high:  # pushed past the top: shift the tail back down, keeping the steps
        ys[-1] = high
        for k in range(len(ys) - 2, -1, -1):
            ys[k] = min(ys[k], ys[k + 1] - step)
    keep = np.concatenate([[True], np.diff(xs) > 1e-6])
    return {"raw": [round(float(x), 6) for x in xs[keep]], "score": [round(float(y), 4) for y in ys[keep]]}


def anchor_bystander(weak_raw: np.ndarray, real_raw: np.ndarray) -> dict:
    """Two-point anchor: median weak negative -> 20, median real expert answer -> 70.

    A head that does not separate the two (an undertrained smoke model) gets a plain
    spread instead: the 5th and 95th percentiles of all outputs -> 5 and 95, flagged.
    """
    a, b = float(np.median(weak_raw)), float(np.median(real_raw))
    if b > a:
        return {"raw": [round(a, 6), round(b, 6)], "score": [20.0, 70.0], "method": "anchor"}
    lo, hi = np.percentile(np.concatenate([weak_raw, real_raw]), [5, 95])
    hi = max(float(hi), float(lo) + 1e-6)
    return {"raw": [round(float(lo), 6), round(hi, 6)], "score": [5.0, 95.0], "method": "fallback-percentile"}
