"""Guardrail thresholds derived from held-out labels instead of picked by hand.

Thresholds must hold on long and short replies alike (model 3.0; 2.0's reception 3.09 was
derived on long mint replies only and flagged warm two-sentence replies). They are chosen
on *validation* material of both kinds:

- mint validation conversations: a reply is *unacceptable* when the LLM judge's
  aggregated empathy is below `UNACCEPTABLE_BELOW` (3 on 1-5), else acceptable;
- short replies: for every iEval validation conversation, the replies of the bot the
  person rated highest (acceptable when rated >= 4 on mean(EU, ER)) and, in the same
  context, a dismissive reply and friendly off-topic chatter written by weak.py's
  compositional generators (unacceptable).

`choose` takes the highest threshold that flags at most `max_flagged` of the acceptable
replies of either kind, lowered to the lowest one that still reaches `target_recall`
when that flags fewer (so a threshold is never stricter than it needs to be). The test
figures are then measured on the mint test conversations and on the contrastive check
set (warm replies should pass; dismissive and off-topic ones should be flagged); neither
is used to choose.

    python -m perm_lite.training.thresholds --data ../shared/data \\
        -o models/perm-lite-minilm/guardrail_thresholds.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.scorer import Scorer
from perm_lite.training.chatbot_data import ieval_dialogues, read_ieval, read_mint

UNACCEPTABLE_BELOW = 3.0
GOOD_IEVAL_AT_LEAST = 4.0
CHECKS = ("reception", "combined")


def _value(result, check: str) -> float:
    return result.combined if check == "combined" else result.scores[check]


def mint_material(rows: list[dict]) -> tuple[list[Dialogue], list[bool]]:
    """mint replies and whether each is acceptable to the judge."""
    return [r["dialogue"] for r in rows], [r["labels"]["aggregated_empathy"] >= UNACCEPTABLE_BELOW for r in rows]


def short_material(rows: list[dict], seed: int = 0) -> tuple[list[Dialogue], list[bool]]:
    """Short replies: the best-rated iEval bot's turns (acceptable) and, per context, a
    dismissive and an off-topic reply (unacceptable)."""
    from perm_lite.training import weak

    rng = random.Random(seed)
    best: dict[str, dict] = {}
    for row in rows:
        if row["context"] not in best or row["ratings"]["reception"] > best[row["context"]]["ratings"]["reception"]:
            best[row["context"]] = row
    dialogues: list[Dialogue] = []
    labels: list[bool] = []
    for row in best.values():
        if row["ratings"]["reception"] < GOOD_IEVAL_AT_LEAST:
            continue
        for d in ieval_dialogues(row):
            dialogues.append(d)
            labels.append(True)
            for text in (weak.rich_dismissive_reply(rng), weak.offtopic_chatter(rng)):
                dialogues.append(Dialogue(response=text, query=d.query, history=d.history))
                labels.append(False)
    return dialogues, labels


def contrastive_material() -> tuple[list[Dialogue], list[str]]:
    from perm_lite.training.chatbot_eval import CONTRASTIVE_KINDS, contrastive_dialogues, load_contrastive

    dialogues, kinds = [], []
    for item in load_contrastive():
        dialogues += contrastive_dialogues(item)
        kinds += list(CONTRASTIVE_KINDS)
    return dialogues, kinds


def _rates(values: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    flagged = values < threshold
    bad = ~labels
    return {
        "n": int(len(values)),
        "unacceptable": int(bad.sum()),
        "recall": round(float((flagged & bad).sum() / max(1, bad.sum())), 3),
        "precision": round(float((flagged & bad).sum() / max(1, flagged.sum())), 3),
        "acceptable_flagged": round(float((flagged & ~bad).sum() / max(1, (~bad).sum())), 3),
    }


def choose(groups: list[tuple[np.ndarray, np.ndarray]], target_recall: float, max_flagged: float) -> float:
    """The threshold (flag when score < threshold) for several groups of (values, acceptable)."""
    candidates = np.unique(np.concatenate([v for v, _ in groups]))
    candidates = np.concatenate([candidates, [candidates[-1] + 1e-6]])

    def worst_flagged(t: float) -> float:
        return max(float((v[a] < t).mean()) if a.any() else 0.0 for v, a in groups)

    def worst_recall(t: float) -> float:
        return min(float((v[~a] < t).mean()) if (~a).any() else 1.0 for v, a in groups)

    allowed = [t for t in candidates if worst_flagged(t) <= max_flagged]
    top = max(allowed) if allowed else float(candidates[0])
    enough = [t for t in candidates if t <= top and worst_recall(t) >= target_recall]
    return float(min(enough)) if enough else top


def derive_thresholds(
    data_dir: Path, model: str = "default", target_recall: float = 0.8, max_flagged: float = 0.15, progress=None
) -> dict:
    """Thresholds for each check, chosen on validation material, measured on test and the
    contrastive set."""
    scorer = Scorer(model, provider="cpu")
    mint = read_mint(Path(data_dir) / "mint")
    ieval = read_ieval(Path(data_dir) / "ieval")

    def score(dialogues: list[Dialogue], what: str) -> list:
        if progress:
            progress(f"scoring {len(dialogues)} {what}")
        return scorer.score_dialogues(dialogues)

    sets = {
        "mint_val": mint_material([r for r in mint if r["split"] == "val"]),
        "short_val": short_material([r for r in ieval if r["split"] == "val"]),
        "mint_test": mint_material([r for r in mint if r["split"] == "test"]),
        "short_test": short_material([r for r in ieval if r["split"] == "test"], seed=1),
    }
    results = {name: (score(d, name), np.array(labels)) for name, (d, labels) in sets.items()}
    c_dialogues, kinds = contrastive_material()
    c_results = score(c_dialogues, "contrastive replies")
    out: dict = {
        "model": scorer.model_name,
        "version": scorer.config.version,
        "label": (
            f"mint: unacceptable = judge aggregated_empathy < {UNACCEPTABLE_BELOW}; short: best-rated iEval bot "
            f"(>= {GOOD_IEVAL_AT_LEAST}) acceptable, generated dismissive and off-topic replies unacceptable"
        ),
        "chosen_on": ["mint_val", "short_val"],
        "target_recall": target_recall,
        "max_acceptable_flagged": max_flagged,
        "checks": {},
    }
    for check in CHECKS:
        values = {name: np.array([_value(r, check) for r in res]) for name, (res, _) in results.items()}
        groups = [(values[n], results[n][1]) for n in ("mint_val", "short_val")]
        threshold = round(choose(groups, target_recall, max_flagged), 3)
        entry: dict = {"threshold": threshold}
        for name in sets:
            entry[name] = _rates(values[name], results[name][1], threshold)
        cv = np.array([_value(r, check) for r in c_results])
        kinds_arr = np.array(kinds)
        entry["contrastive"] = {
            kind: round(float((cv[kinds_arr == kind] < threshold).mean()), 3) for kind in dict.fromkeys(kinds)
        }
        entry["contrastive_note"] = "share of each kind flagged (warm should pass; dismissive, off-topic flagged)"
        out["checks"][check] = entry
    return out


def main() -> None:  # pragma: no cover - exercised by the model card's command
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Data folder in the layout of ../shared/data.")
    parser.add_argument("--model", default="default")
    parser.add_argument("--target-recall", type=float, default=0.8)
    parser.add_argument("--max-flagged", type=float, default=0.15, help="Most acceptable replies flagged (per kind).")
    parser.add_argument("-o", "--output", help="Write the JSON here (else stdout).")
    args = parser.parse_args()
    if not (Path(args.data) / "mint").is_dir() or not (Path(args.data) / "ieval").is_dir():
        parser.error(f"--data {args.data} needs mint/ and ieval/ folders (the layout of ../shared/data)")
    result = derive_thresholds(
        Path(args.data),
        args.model,
        args.target_recall,
        args.max_flagged,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"thresholds written to {args.output}", file=sys.stderr)
    else:
        print(text, end="")


if __name__ == "__main__":  # pragma: no cover
    main()
