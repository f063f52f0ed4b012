"""Calibration of raw head outputs onto the PERM scales, fitted on validation data.

Resonation, expression, reception: a monotone piecewise-linear map through binned
(raw, label) means (pool-adjacent-violators for monotonicity, then made strictly
increasing so that order between replies is never lost to ties). Labels are the
validation targets put back on 1-5 (1 + 4 * target).

Bystander has no human label on the 0-100 scale. Its map is a documented anchor, not a
fit: the median raw output of the weak-supervision negatives (dismissive, generic,
mismatched replies) maps to 20, the median of real therapist answers (counsel-chat) to 70.

Soft tails (3.0): beyond the fitted knots, each map approaches the scale's ends along an
exponential that starts with the end segment's slope (`soft_tails`), instead of running
straight into the bound and clipping there; replies worse (or better) than anything seen
in calibration keep their order instead of all sitting on the floor together.
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


TAIL_STEPS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.5)


def soft_tails(knots: dict, low: float, high: float) -> dict:
    """The knots extended at both ends by an exponential approach to `low` and `high`
    that continues the end segment's slope (strictly monotone; within 0.2% of the gap to
    the bound at the last added knot, after which the runtime extrapolates and clips)."""
    xs, ys = list(knots["raw"]), list(knots["score"])
    # Knots the fit pinned at a bound would flatten that end (every worse reply at the
    # floor): drop them, keeping at least two knots, so the tail starts above the bound.
    margin = 0.01 * (high - low)
    while len(xs) > 2 and ys[0] <= low + margin:
        xs, ys = xs[1:], ys[1:]
    while len(xs) > 2 and ys[-1] >= high - margin:
        xs, ys = xs[:-1], ys[:-1]
    if len(xs) < 2:
        return knots
    out_x, out_y = list(xs), list(ys)
    m_left = (ys[1] - ys[0]) / (xs[1] - xs[0])
    gap = ys[0] - low
    if m_left > 0 and gap > 0:
        scale = gap / m_left  # raw units over which the tail falls by a factor e
        for t in TAIL_STEPS:
            out_x.insert(0, xs[0] - t * scale)
            out_y.insert(0, low + gap * float(np.exp(-t)))
    m_right = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    gap = high - ys[-1]
    if m_right > 0 and gap > 0:
        scale = gap / m_right
        for t in TAIL_STEPS:
            out_x.append(xs[-1] + t * scale)
            out_y.append(high - gap * float(np.exp(-t)))
    tailed = dict(knots)
    tailed["raw"] = [round(float(x), 6) for x in out_x]
    tailed["score"] = [round(float(y), 6) for y in out_y]
    tailed["tails"] = "soft"
    return tailed
