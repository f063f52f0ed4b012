"""The robustness suite: does the reward pay for degenerate rewrites of a good reply?

For every context of a set, a good reply (the contrastive set's warm reply; on mint the
reply the judge rated highest; on iEval the last reply of the bot the person rated
highest) is rewritten by every rewrite of `perm_lite.rewrites.SUITE`, and the suite
reports the share of contexts where the rewrite scores *above* the original, per head
and on the combined score. Any predictor works: the shipped int8 model, another model
directory, a PyTorch checkpoint.

Needs numpy and the readers of `chatbot_data` only (no torch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.rewrites import SUITE, SUITE_NAMES, apply_suite
from perm_lite.scales import PERSPECTIVES

Predictor = Callable[[Sequence[Dialogue]], np.ndarray]  # dialogues -> (n, heads + 1): heads, combined
OUTPUTS = (*PERSPECTIVES, "combined")
TARGET = 0.05  # the bar: every rewrite above the original in at most 5% of contexts


def _seeker_text(d: Dialogue) -> str:
    return d.query or ""


def contrastive_originals() -> list[Dialogue]:
    """The contrastive check set's warm replies in their contexts."""
    from perm_lite.training.chatbot_eval import contrastive_dialogues, load_contrastive

    return [contrastive_dialogues(item)[0] for item in load_contrastive()]


def mint_originals(data_dir: Path, split: str = "test") -> list[Dialogue]:
    """Per mint context of `split`, the reply with the judge's highest aggregated empathy."""
    from perm_lite.training.chatbot_data import read_mint

    best: dict[str, tuple[float, Dialogue]] = {}
    for row in read_mint(Path(data_dir) / "mint"):
        if row["split"] != split:
            continue
        score = float(row["labels"]["aggregated_empathy"])
        if row["context"] not in best or score > best[row["context"]][0]:
            best[row["context"]] = (score, row["dialogue"])
    return [d for _, d in best.values()]


def ieval_originals(data_dir: Path, split: str = "test") -> list[Dialogue]:
    """Per iEval (person, situation) of `split`, the last reply of the bot rated highest."""
    from perm_lite.training.chatbot_data import ieval_dialogues, read_ieval

    best: dict[str, tuple[float, Dialogue]] = {}
    for row in read_ieval(Path(data_dir) / "ieval"):
        if row["split"] != split:
            continue
        turns = ieval_dialogues(row)
        if not turns:
            continue
        score = row["ratings"]["reception"]
        if row["context"] not in best or score > best[row["context"]][0]:
            best[row["context"]] = (score, turns[-1])
    return [d for _, d in best.values()]


def load_sets(data_dir: Path | None, split: str = "test", names: Sequence[str] = ("contrastive", "mint", "ieval")):
    """{set name: originals}; the data sets are skipped without `data_dir`."""
    sets: dict[str, list[Dialogue]] = {}
    for name in names:
        if name == "contrastive":
            sets[name] = contrastive_originals()
        elif data_dir is not None and name == "mint":
            sets[name] = mint_originals(data_dir, split)
        elif data_dir is not None and name == "ieval":
            sets[name] = ieval_originals(data_dir, split)
    return sets


def rewrite_all(originals: Sequence[Dialogue], seed: int = 0) -> tuple[list[Dialogue], list[dict[str, int]]]:
    """All dialogues to score (originals first) and, per context, {rewrite: index}."""
    dialogues = list(originals)
    index: list[dict[str, int]] = []
    for n, d in enumerate(originals):
        at: dict[str, int] = {}
        for name, text in apply_suite(d.response, _seeker_text(d), seed=seed + n).items():
            at[name] = len(dialogues)
            dialogues.append(
                Dialogue(response=text, query=d.query, scenario=d.scenario, persona=d.persona, history=d.history)
            )
        index.append(at)
    return dialogues, index


def suite_rates(
    pred: np.ndarray, n_originals: int, index: list[dict[str, int]], outputs: Sequence[str] = OUTPUTS
) -> dict:
    """Share of contexts where each rewrite scores above the original, per output (the
    columns of `pred`, named by `outputs`; the last is the combined score)."""
    if pred.shape[1] != len(outputs):
        raise ValueError(f"{pred.shape[1]} predicted columns for {len(outputs)} outputs {list(outputs)}")
    rates: dict[str, dict] = {}
    worst = {o: 0.0 for o in outputs}
    for name in SUITE_NAMES:
        pairs = [(n, at[name]) for n, at in enumerate(index) if name in at]
        if not pairs:
            continue
        orig = pred[[n for n, _ in pairs]]
        rew = pred[[j for _, j in pairs]]
        row = {o: round(float(np.mean(rew[:, k] > orig[:, k])), 4) for k, o in enumerate(outputs)}
        row["n"] = len(pairs)
        rates[name] = row
        for o in worst:
            worst[o] = max(worst[o], row[o])
    above_any = np.zeros(n_originals, dtype=bool)
    combined = pred.shape[1] - 1
    for n, at in enumerate(index):
        above_any[n] = any(pred[j, combined] > pred[n, combined] for j in at.values())
    return {
        "n_contexts": n_originals,
        "rates": rates,
        "worst": {o: round(v, 4) for o, v in worst.items()},
        "any_rewrite_above_combined": round(float(above_any.mean()), 4) if n_originals else float("nan"),
        "passes": all(v <= TARGET for v in worst.values()),
    }


def run_suite(
    predict: Predictor, sets: dict[str, list[Dialogue]], seed: int = 0, progress=None, outputs: Sequence[str] = OUTPUTS
) -> dict:
    """{set: suite_rates} for one predictor."""
    out = {}
    for name, originals in sets.items():
        dialogues, index = rewrite_all(originals, seed)
        pred = np.asarray(predict(dialogues), dtype=np.float64)
        out[name] = suite_rates(pred, len(originals), index, outputs)
        if progress:
            progress(name, len(dialogues))
    return out


def to_markdown(report: dict[str, dict]) -> str:
    """One table per set: rewrites as rows, the share above the original per output."""
    lines: list[str] = []
    for set_name, result in report.items():
        outputs = list(result["worst"])
        lines += [
            f"**{set_name}** ({result['n_contexts']} contexts): share of contexts where the rewrite scores above "
            f"the original (target <= {TARGET:.0%}; any rewrite above on combined: "
            f"{result['any_rewrite_above_combined']:.1%})",
            "",
            "| rewrite | n | " + " | ".join(outputs) + " |",
            "|---" * (2 + len(outputs)) + "|",
        ]
        for name, row in result["rates"].items():
            cells = " | ".join(f"**{row[o]:.3f}**" if row[o] > TARGET else f"{row[o]:.3f}" for o in outputs)
            lines.append(f"| {name} | {row['n']} | {cells} |")
        lines.append("| **worst** | | " + " | ".join(f"{result['worst'][o]:.3f}" for o in outputs) + " |")
        lines.append("")
    return "\n".join(lines)


def families() -> dict[str, list[str]]:
    """Rewrite names grouped by family (repetition, cliches, echo, harm, ...)."""
    out: dict[str, list[str]] = defaultdict(list)
    for r in SUITE:
        out[r.family].append(r.name)
    return dict(out)
