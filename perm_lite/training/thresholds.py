"""Guardrail thresholds derived from held-out judge labels instead of picked by hand.

A mint reply is *unacceptable* when the LLM judge's aggregated empathy is below
`UNACCEPTABLE_BELOW` (3 on 1-5: more dismissing, self-oriented or unsolicited advice than
validation and understanding). `pick_threshold` chooses each check's threshold on the
validation conversations for a target recall of unacceptable replies; precision, recall and
the share of acceptable replies flagged are then measured on the test conversations.

    python -m perm_lite.training.thresholds --data ../shared/data \
        -o models/perm-lite-minilm/guardrail_thresholds.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perm_lite.guardrail import pick_threshold
from perm_lite.scorer import Scorer
from perm_lite.training.chatbot_data import read_mint

UNACCEPTABLE_BELOW = 3.0
CHECKS = ("reception", "combined")


def _records(rows: list[dict]) -> list[dict]:
    return [
        {
            "messages": row["messages"],
            "response": row["response"],
            "acceptable": row["labels"]["aggregated_empathy"] >= UNACCEPTABLE_BELOW,
        }
        for row in rows
    ]


def derive_thresholds(data_dir: Path, model: str = "default", target_recall: float = 0.8) -> dict:
    """Thresholds for each check, picked on mint validation, measured on mint test."""
    scorer = Scorer(model, provider="cpu")
    rows = read_mint(Path(data_dir) / "mint")
    val = _records([r for r in rows if r["split"] == "val"])
    test = _records([r for r in rows if r["split"] == "test"])
    test_results = scorer.score([{k: v for k, v in r.items() if k != "acceptable"} for r in test])
    out: dict = {
        "model": scorer.model_name,
        "version": scorer.config.version,
        "label": f"unacceptable = mint judge aggregated_empathy < {UNACCEPTABLE_BELOW}",
        "target_recall": target_recall,
        "val": {"n": len(val), "unacceptable": sum(not r["acceptable"] for r in val)},
        "test": {"n": len(test), "unacceptable": sum(not r["acceptable"] for r in test)},
        "checks": {},
    }
    for check in CHECKS:
        choice = pick_threshold(val, check, target_recall=target_recall, scorer=scorer)
        threshold = round(choice.threshold, 3)
        values = [r.combined if check == "combined" else r.scores[check] for r in test_results]
        flagged = [v < threshold for v in values]
        bad = [not r["acceptable"] for r in test]
        hits = sum(f and b for f, b in zip(flagged, bad))
        out["checks"][check] = {
            "threshold": threshold,
            "val_precision": round(choice.precision, 3),
            "val_recall": round(choice.recall, 3),
            "test_precision": round(hits / max(1, sum(flagged)), 3),
            "test_recall": round(hits / max(1, sum(bad)), 3),
            "test_acceptable_flagged": round(
                sum(f and not b for f, b in zip(flagged, bad)) / max(1, sum(not b for b in bad)), 3
            ),
        }
    return out


def main() -> None:  # pragma: no cover - exercised by the model card's command
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Data folder in the layout of ../shared/data.")
    parser.add_argument("--model", default="default")
    parser.add_argument("--target-recall", type=float, default=0.8)
    parser.add_argument("-o", "--output", help="Write the JSON here (else stdout).")
    args = parser.parse_args()
    result = json.dumps(derive_thresholds(Path(args.data), args.model, args.target_recall), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(result)
    else:
        print(result, end="")


if __name__ == "__main__":  # pragma: no cover
    main()
