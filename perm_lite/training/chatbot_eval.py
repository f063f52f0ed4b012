"""Validity on chatbot replies: held-out mint conversations, held-out iEval people and the
project's own contrastive check set, each beside the reply-length baseline.

A predictor maps dialogues to an (n, 5) array: the four heads and the combined score.
Pair accuracy counts a pair as won when the better reply scores strictly higher; ties
count half (a constant predictor scores 0.5).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from importlib import resources
from itertools import combinations
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue, Turn
from perm_lite.reward import Reward
from perm_lite.scales import PERSPECTIVES
from perm_lite.training.chatbot_data import MINT_QUESTIONS, ieval_dialogues, read_ieval, read_mint

Predictor = Callable[[Sequence[Dialogue]], np.ndarray]
OUTPUTS = (*PERSPECTIVES, "combined")
NEGATIVE_QUESTIONS = ("advice_giving", "self_oriented", "dismissing_emotions")
CONTRASTIVE_KINDS = ("warm", "generic", "dismissive", "offtopic", "padded")
LENGTH_MATCH = 0.75  # "length-matched": the shorter reply has at least 75% of the longer's words


def words(text: str) -> int:
    return len(text.split())


def _won(better: float, worse: float) -> float:
    return 1.0 if better > worse else (0.5 if better == worse else 0.0)


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _acc(hits: list[float]) -> dict:
    return {"accuracy": round(float(np.mean(hits)), 4) if hits else float("nan"), "n": len(hits)}


def with_combined(heads: np.ndarray, scale: str = "unit") -> np.ndarray:
    """Append PERM's combined score (harmonic, bystander coef 0.5) to raw head outputs.

    `unit`: outputs on the training targets' 0-1 scale (PyTorch checkpoints, ridge);
    the 1-5 and 0-100 scales are recovered as 1 + 4t and 100t, clipped."""
    t = np.clip(heads, 0.0, 1.0)
    reward = Reward()
    combined = [
        reward.combined(
            {"resonation": 1 + 4 * r, "expression": 1 + 4 * e, "reception": 1 + 4 * c, "bystander": 100 * b}
        )
        for r, e, c, b in t[:, :4]
    ]
    return np.concatenate([heads[:, :4], np.array(combined)[:, None]], axis=1)


def length_predictor(dialogues: Sequence[Dialogue]) -> np.ndarray:
    n = np.log1p([words(d.response) for d in dialogues])
    return np.repeat(n[:, None], len(OUTPUTS), axis=1)


# --- mint --------------------------------------------------------------------------------


def _size_pair(a: str, b: str) -> bool:
    """Same method at the two model sizes (e.g. ..._Qwen3-1.7B vs ..._Qwen3-4B)."""
    ma, _, sa = a.rpartition("_")
    mb, _, sb = b.rpartition("_")
    return bool(ma) and ma == mb and sa != sb


def mint_eval(rows: list[dict], pred: np.ndarray, min_gap: float = 0.5) -> dict:
    """Pair accuracy per output against the judge's aggregated empathy (all pairs,
    length-matched pairs, same-method two-size pairs), per question, and Pearson per question."""
    by_context: dict[str, list[int]] = defaultdict(list)
    for k, row in enumerate(rows):
        by_context[row["context"]].append(k)
    out: dict = {"n_replies": len(rows), "n_contexts": len(by_context), "aggregated": {}, "questions": {}}
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    q_hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for members in by_context.values():
        for a, b in combinations(members, 2):
            la, lb = rows[a]["labels"], rows[b]["labels"]
            gap = la["aggregated_empathy"] - lb["aggregated_empathy"]
            wa, wb = words(rows[a]["response"]), words(rows[b]["response"])
            if abs(gap) >= min_gap:
                better, worse = (a, b) if gap > 0 else (b, a)
                subsets = ["all"]
                if min(wa, wb) >= LENGTH_MATCH * max(wa, wb):
                    subsets.append("length_matched")
                if _size_pair(rows[a]["variant"], rows[b]["variant"]):
                    subsets.append("same_method_two_sizes")
                for j, name in enumerate(OUTPUTS):
                    won = _won(pred[better, j], pred[worse, j])
                    for subset in subsets:
                        hits[subset][name].append(won)
            for q in MINT_QUESTIONS[:-1]:
                qg = la[q] - lb[q]
                if abs(qg) < 1:
                    continue
                if q in NEGATIVE_QUESTIONS:
                    qg = -qg
                better, worse = (a, b) if qg > 0 else (b, a)
                for j, name in enumerate(OUTPUTS):
                    q_hits[q][name].append(_won(pred[better, j], pred[worse, j]))
    for subset, per_output in hits.items():
        out["aggregated"][subset] = {name: _acc(h) for name, h in per_output.items()}
    for q in MINT_QUESTIONS:
        sign = -1.0 if q in NEGATIVE_QUESTIONS else 1.0
        labels = sign * np.array([row["labels"][q] for row in rows], dtype=float)
        out["questions"][q] = {
            "pearson": {name: round(_pearson(pred[:, j], labels), 4) for j, name in enumerate(OUTPUTS)},
            "pairs": {name: _acc(h) for name, h in q_hits.get(q, {}).items()},
        }
    return out


# --- iEval -------------------------------------------------------------------------------


def ieval_eval(rows: list[dict], turn_pred: list[np.ndarray], min_gap: float = 0.5) -> dict:
    """Bot-level scores (mean over a bot's replies) compared within one person and
    situation, on the person's own ratings: reception = mean(EU, ER), and each head's label."""
    bot_pred = np.stack([p.mean(0) for p in turn_pred])
    lengths = [np.mean([words(d.response) for d in ieval_dialogues(r)]) for r in rows]
    by_context: dict[str, list[int]] = defaultdict(list)
    for k, row in enumerate(rows):
        by_context[row["context"]].append(k)
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for members in by_context.values():
        for a, b in combinations(members, 2):
            for label in ("reception", "resonation", "expression", "bystander"):
                gap = rows[a]["ratings"][label] - rows[b]["ratings"][label]
                if abs(gap) < min_gap:
                    continue
                better, worse = (a, b) if gap > 0 else (b, a)
                subsets = [label]
                if label == "reception" and min(lengths[a], lengths[b]) >= LENGTH_MATCH * max(lengths[a], lengths[b]):
                    subsets.append("reception_length_matched")
                for j, name in enumerate(OUTPUTS):
                    won = _won(bot_pred[better, j], bot_pred[worse, j])
                    for subset in subsets:
                        hits[subset][name].append(won)
    return {
        "n_conversations": len(rows),
        "n_people": len({r["person"] for r in rows}),
        "pairs": {subset: {name: _acc(h) for name, h in per.items()} for subset, per in hits.items()},
    }


# --- the contrastive check set -----------------------------------------------------------


def load_contrastive(path: Path | None = None) -> list[dict]:
    """The project's own check set: support contexts, each with five replies of known order."""
    if path is None:
        text = resources.files("perm_lite.training").joinpath("contrastive_set.jsonl").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def contrastive_dialogues(item: dict, kinds: Sequence[str] = CONTRASTIVE_KINDS) -> list[Dialogue]:
    """The item's replies of `kinds` (in that order) as dialogues on its conversation
    (`messages`: user = seeker, assistant = supporter, the last one the seeker's)."""
    turns = [Turn("seeker" if m["role"] == "user" else "supporter", m["content"]) for m in item["messages"]]
    return [Dialogue(response=item["replies"][kind], query=turns[-1].text, history=tuple(turns[:-1])) for kind in kinds]


def contrastive_eval(items: list[dict], pred: np.ndarray) -> dict:
    """Rates at which each output orders the replies as a person would: warm above each other
    kind; dismissive and off-topic below generic; warm above all four at once."""
    k = len(CONTRASTIVE_KINDS)
    scores = pred.reshape(len(items), k, -1)
    idx = {kind: n for n, kind in enumerate(CONTRASTIVE_KINDS)}
    checks = [("warm", other) for other in CONTRASTIVE_KINDS[1:]] + [
        ("generic", "dismissive"),
        ("generic", "offtopic"),
    ]
    out: dict = {"n_contexts": len(items), "rates": {}}
    for j, name in enumerate(OUTPUTS):
        s = scores[:, :, j]
        row = {f"{a}>{b}": round(float(np.mean(s[:, idx[a]] > s[:, idx[b]])), 4) for a, b in checks}
        row["warm>all"] = round(float(np.mean((s[:, :1] > s[:, 1:]).all(axis=1))), 4)
        out["rates"][name] = row
    return out


# --- one run -----------------------------------------------------------------------------


def chatbot_evaluation(data_dir: Path, predictors: dict[str, Predictor], split: str = "test") -> dict:
    """mint and iEval held-out splits plus the contrastive set, for every predictor."""
    mint = [r for r in read_mint(Path(data_dir) / "mint") if r["split"] == split]
    ieval = [r for r in read_ieval(Path(data_dir) / "ieval") if r["split"] == split]
    items = load_contrastive()
    ieval_turns = [ieval_dialogues(r) for r in ieval]
    flat = [d for turns in ieval_turns for d in turns]
    report: dict = {}
    for name, predict in predictors.items():
        mint_pred = predict([r["dialogue"] for r in mint])
        flat_pred = predict(flat)
        per_row, start = [], 0
        for turns in ieval_turns:
            per_row.append(flat_pred[start : start + len(turns)])
            start += len(turns)
        contrast = predict([d for item in items for d in contrastive_dialogues(item)])
        report[name] = {
            "mint": mint_eval(mint, mint_pred),
            "ieval": ieval_eval(ieval, per_row),
            "contrastive": contrastive_eval(items, contrast),
        }
    return report


def _cell(value: dict | float) -> str:
    if isinstance(value, dict):
        v = value.get("accuracy", float("nan"))
        return "-" if v != v else f"{v:.3f}"
    return "-" if value != value or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pair_rows(report: dict, names: list[str], table: Callable[[dict], dict]) -> list[str]:
    """One row per pair subset: n, then reception and combined accuracy for each model."""
    rows = []
    for subset, per in table(report[names[0]]).items():
        cells = " | ".join(_cell(table(report[m])[subset][o]) for m in names for o in ("reception", "combined"))
        rows.append(f"| {subset} | {per['combined']['n']} | {cells} |")
    return rows


def chatbot_markdown(report: dict) -> str:
    """Model-card tables: mint pairs, mint questions, iEval pairs, contrastive rates."""
    names = list(report)
    first = report[names[0]]
    lines = ["### mint, held-out conversations (judge: aggregated empathy; pairs differing by >= 0.5)", ""]
    header = "| pairs | n | " + " | ".join(f"{m}: {o}" for m in names for o in ("reception", "combined")) + " |"
    lines += [header, "|---" * (2 + 2 * len(names)) + "|"]
    lines += _pair_rows(report, names, lambda r: r["mint"]["aggregated"])
    lines += [
        "",
        "| judge question (oriented: higher = more empathic) | pair n | "
        + " | ".join(f"{m} pairs (reception / combined)" for m in names)
        + " | "
        + " | ".join(f"{m} Pearson (combined)" for m in names)
        + " |",
    ]
    lines.append("|---" * (2 + 2 * len(names)) + "|")
    for q, v in first["mint"]["questions"].items():
        if not v["pairs"]:
            continue
        n = v["pairs"].get("combined", {}).get("n", 0)
        pair_cells = []
        for m in names:
            pairs = report[m]["mint"]["questions"][q]["pairs"]
            if not pairs:
                pair_cells.append("-")
                continue
            pair_cells.append(f"{_cell(pairs['reception'])} / {_cell(pairs['combined'])}")
        pearson_cells = [_cell(report[m]["mint"]["questions"][q]["pearson"]["combined"]) for m in names]
        lines.append(f"| {q} | {n} | " + " | ".join(pair_cells) + " | " + " | ".join(pearson_cells) + " |")
    lines += ["", "### iEval, held-out people (bot vs bot, same person and situation, person's own ratings)", ""]
    lines += [header.replace("| pairs |", "| label |"), "|---" * (2 + 2 * len(names)) + "|"]
    lines += _pair_rows(report, names, lambda r: r["ieval"]["pairs"])
    lines += [
        "",
        f"### Contrastive check set ({first['contrastive']['n_contexts']} contexts, written for perm-lite)",
        "",
    ]
    checks = list(first["contrastive"]["rates"]["combined"])
    lines += ["| model: output | " + " | ".join(checks) + " |", "|---" * (1 + len(checks)) + "|"]
    for m in names:
        for o in OUTPUTS:
            rates = report[m]["contrastive"]["rates"][o]
            lines.append(f"| {m}: {o} | " + " | ".join(f"{rates[c]:.3f}" for c in checks) + " |")
    return "\n".join(lines) + "\n"
