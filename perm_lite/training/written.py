"""Hand-written contrast sets: support contexts, each with seven replies of known order.

Written for this project by LLM authors (not drawn from any dataset), in
`perm_lite/training/written/`: `train_*.jsonl` become training pairs (family `written`),
`val.jsonl` is a validation set for choosing between checkpoints. The test-only contrastive
set (`contrastive_set.jsonl`) is a separate file with other situations; nothing here is
ever scored as a test figure.

Each reply kind has a rank: warm, specific replies (long, short, or plainly worded) above
generic sympathy that fits anyone (long or short), above dismissive and off-topic replies.
Short warm replies must beat long generic ones, so the pairs teach specificity, not length.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.scales import PERSPECTIVES

WARM = ("warm", "warm_short", "warm_plain")
GENERIC = ("generic", "generic_short")
BAD = ("dismissive", "offtopic")
KINDS = WARM + GENERIC + BAD
ORDER = (
    [(w, g) for w in WARM for g in GENERIC]
    + [(w, b) for w in WARM for b in BAD]
    + [(g, b) for g in GENERIC for b in BAD]
)


def load_written(split: str, folder=None) -> list[dict]:
    """The records of one split: "train" (every `train_*.jsonl`) or "val" (`val.jsonl`), from
    the package's `written/` folder (or `folder`)."""
    folder = folder or resources.files("perm_lite.training").joinpath("written")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl"))
    wanted = [n for n in names if (n.startswith("train_") if split == "train" else n == f"{split}.jsonl")]
    items: list[dict] = []
    for name in wanted:
        for number, line in enumerate(folder.joinpath(name).read_text("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"written/{name} line {number}: not JSON ({error.msg})") from None
                missing = [k for k in KINDS if not str(item.get("replies", {}).get(k, "")).strip()]
                if missing:
                    raise ValueError(f"written/{name} line {number}: replies {missing} missing or empty")
                items.append(item)
    return items


def dialogues(item: dict) -> list[Dialogue]:
    """The item's seven replies (in `KINDS` order) as dialogues on its conversation."""
    from perm_lite.training.chatbot_eval import contrastive_dialogues

    return contrastive_dialogues(item, KINDS)


def add_written(corpus, split: str = "train", degenerate: int = 2, seed: int = 0) -> int:
    """Add the split's replies (no regression targets) and its ordered pairs on every head:
    pair family `written` for a warm reply above a worse one, `written_floor` for generic
    sympathy above a dismissive or off-topic reply (so a config can weight the bottom of the
    order on its own: stock phrases are negatives elsewhere, dismissal is not). Plus, per
    context, `degenerate` rewrites of its warm replies (`hard_negatives.degenerate_rewrite`:
    an insult inserted, truncation, repetition, echo, ...) that must lose to the reply they
    came from (family `degen_written`), so that what the model learns to pay for in these replies
    cannot be bought back with a degenerate edit. Returns the number of pairs added."""
    import random

    from perm_lite.training.corpus import Example, Pair, _targets
    from perm_lite.training.hard_negatives import degenerate_rewrite

    rng = random.Random(seed + 4099)
    added = 0
    heads = tuple(range(len(PERSPECTIVES)))
    for item in load_written(split):
        group = f"written:{item['id']}"
        index = {
            kind: corpus.add(Example(d, _targets(), "written", group, split, 1.0, f"written:{kind}"))
            for kind, d in zip(KINDS, dialogues(item))
        }
        for better, worse in ORDER:
            family = "written_floor" if better in GENERIC else "written"
            corpus.pairs.append(Pair(index[better], index[worse], heads, f"{family}:{better}>{worse}"))
            added += 1
        for _ in range(degenerate):
            kind = rng.choice(WARM)
            original = corpus.examples[index[kind]].dialogue
            made = degenerate_rewrite(rng, original.response, original.query)
            if made:
                name, text = made
                bad = Dialogue(response=text, query=original.query, history=original.history)
                j = corpus.add(Example(bad, _targets(), "written", group, split, 1.0, f"degen_written:{name}"))
                corpus.pairs.append(Pair(index[kind], j, heads, f"degen_written:{name}"))
                added += 1
    return added


def written_eval(items: list[dict], pred: np.ndarray) -> dict:
    """Per output (the four heads and combined; `pred` rows: items x KINDS): the share of
    contexts where each ordered pair holds, the mean over warm > generic pairs, over
    generic > bad pairs and over all of them."""
    from perm_lite.training.chatbot_eval import OUTPUTS

    scores = pred.reshape(len(items), len(KINDS), -1)
    idx = {k: n for n, k in enumerate(KINDS)}
    rates: dict = {}
    for j, name in enumerate(OUTPUTS):
        s = scores[:, :, j]
        row = {f"{a}>{b}": float(np.mean(s[:, idx[a]] > s[:, idx[b]])) for a, b in ORDER}
        row["mean"] = float(np.mean(list(row.values())))
        row["warm>generic"] = float(np.mean([row[f"{w}>{g}"] for w in WARM for g in GENERIC]))
        row["generic>bad"] = float(np.mean([row[f"{g}>{b}"] for g in GENERIC for b in BAD]))
        rates[name] = {k: round(v, 4) for k, v in row.items()}
    return {"n_contexts": len(items), "rates": rates}


def main(argv: list[str] | None = None) -> None:
    """`python -m perm_lite.training.written MODEL [--split val]`: the ordered-pair rates of a
    model directory (ONNX, calibrated) or a training checkpoint folder (PyTorch, raw heads)."""
    import argparse
    from pathlib import Path

    from perm_lite.training.evaluate import checkpoint_predictor, scorer_predictor

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="a model directory or name, or a checkpoint folder with model.safetensors")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    args = parser.parse_args(argv)
    checkpoint = (Path(args.model) / "model.safetensors").exists()
    predict = checkpoint_predictor(args.model) if checkpoint else scorer_predictor(args.model)
    items = load_written(args.split)
    if not items:
        raise SystemExit(f"no written {args.split} records in perm_lite/training/written/")
    report = written_eval(items, predict([d for item in items for d in dialogues(item)]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
