"""Evaluation against the human labels and the weak-supervision pairs, with two baselines.

For each head and source test split: Pearson and Spearman against the label; for pair
sources (counsel-chat upvotes, weak negatives): within-context pairwise accuracy. Every
model is reported beside two baselines fitted and run in the same call: reply length,
and a TF-IDF ridge regression trained on the same training examples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.scales import PERSPECTIVES
from perm_lite.training.chatbot_eval import (
    LENGTH_MATCH,
    chatbot_evaluation,
    chatbot_markdown,
    length_predictor,
    with_combined,
    words,
)
from perm_lite.training.data import HEAD, Corpus

Predictor = Callable[[Sequence[Dialogue]], np.ndarray]  # dialogues -> (n, 5): heads, combined
PRIMARY = {
    "resonation": ("epitome", "pearson"),
    "expression": ("epitome", "pearson"),
    "reception": ("failedesconv", "pearson"),
    "bystander": ("counselchat", "pair_accuracy"),
}


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    # average ties
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_rank(a), _rank(b))


def fit_tfidf_ridge(corpus: Corpus, alpha: float = 3.0) -> Predictor:
    """TF-IDF (reply and context, word 1-2 grams) + ridge per head, on the training split."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    train = [e for e in corpus.examples if e.split == "train"]
    reply_vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=50_000, sublinear_tf=True)
    context_vec = TfidfVectorizer(ngram_range=(1, 1), min_df=2, max_features=20_000, sublinear_tf=True)
    reply_vec.fit([e.dialogue.response for e in train])
    context_vec.fit([e.dialogue.query for e in train])

    def features(dialogues: Sequence[Dialogue]):
        return hstack(
            [reply_vec.transform([d.response for d in dialogues]), context_vec.transform([d.query for d in dialogues])]
        ).tocsr()

    targets = np.stack([e.targets for e in train])
    # Bystander has no regression label on human data: counsel-chat answers get their
    # within-question upvote percentile (the same signal the model's pairs use).
    byst = targets[:, HEAD["bystander"]].copy()
    for idx, value in _counsel_percentiles(corpus, "train").items():
        byst[train.index(corpus.examples[idx])] = value
    targets[:, HEAD["bystander"]] = byst
    x = features([e.dialogue for e in train])
    models = []
    for j in range(len(PERSPECTIVES)):
        mask = ~np.isnan(targets[:, j])
        models.append(Ridge(alpha=alpha).fit(x[mask], targets[mask, j]))

    def predict(dialogues: Sequence[Dialogue]) -> np.ndarray:
        f = features(dialogues)
        return with_combined(np.stack([m.predict(f) for m in models], axis=1))

    return predict


def _counsel_percentiles(corpus: Corpus, split: str) -> dict[int, float]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(corpus.examples):
        if e.source == "counselchat" and e.kind == "human" and e.split == split:
            groups[e.group].append(i)
    out: dict[int, float] = {}
    wins: dict[int, int] = defaultdict(int)
    for p in corpus.pairs:
        if p.source == "counselchat":
            wins[p.better] += 1
    for members in groups.values():
        if len(members) < 2:
            continue
        for i in members:
            out[i] = 0.5 + 0.5 * wins[i] / (len(members) - 1)
    return out


def evaluate(corpus: Corpus, predictors: dict[str, Predictor], split: str = "test", seed: int = 0) -> dict:
    """Metrics for each predictor on one split: correlations, pair accuracy, length bias."""
    idx = sorted(
        {i for i, e in enumerate(corpus.examples) if e.split == split}
        | {i for p in corpus.pairs if corpus.examples[p.better].split == split for i in (p.better, p.worse)}
    )
    dialogues = [corpus.examples[i].dialogue for i in idx]
    position = {i: k for k, i in enumerate(idx)}
    report: dict = {}
    for name, predict in predictors.items():
        pred = predict(dialogues)
        report[name] = _metrics(corpus, idx, position, pred, split, seed)
    return report


def _metrics(corpus, idx, position, pred, split, seed) -> dict:
    out: dict = {"correlation": {}, "pairs": {}, "length": {}}
    humans = [i for i in idx if corpus.examples[i].kind in ("human", "chatbot")]
    by_source: dict[str, list[int]] = defaultdict(list)
    for i in humans:
        by_source[corpus.examples[i].source].append(i)
    for source, members in sorted(by_source.items()):
        for head, j in HEAD.items():
            labels = np.array([corpus.examples[i].targets[j] for i in members])
            mask = ~np.isnan(labels)
            if mask.sum() < 10:
                continue
            p = pred[[position[i] for i in members]][:, j][mask]
            out["correlation"][f"{head}/{source}"] = {
                "pearson": round(pearson(p, labels[mask]), 4),
                "spearman": round(spearman(p, labels[mask]), 4),
                "n": int(mask.sum()),
            }
    pair_hits: dict[str, list[int]] = defaultdict(list)
    for p in corpus.pairs:
        if corpus.examples[p.better].split != split:
            continue
        b, w = pred[position[p.better]], pred[position[p.worse]]
        for j in p.heads:
            pair_hits[f"{PERSPECTIVES[j]}/{p.source}"].append(int(b[j] > w[j]))
    for key, hits in sorted(pair_hits.items()):
        out["pairs"][key] = {"accuracy": round(float(np.mean(hits)), 4), "n": len(hits)}
    lengths = np.log1p([words(corpus.examples[i].dialogue.response) for i in humans])
    hp = pred[[position[i] for i in humans]]
    for head, j in HEAD.items():
        out["length"][f"{head}/pearson_with_log_words"] = round(pearson(hp[:, j], lengths), 4)
    out["length"].update(_length_matched(corpus, humans, position, pred, seed))
    return out


def _length_matched(corpus, humans, position, pred, seed, max_pairs: int = 4000) -> dict:
    """Accuracy on pairs from one source whose labels differ by >= 0.25 and whose replies'
    word counts are within 25% of each other: length cannot decide these."""
    rng = np.random.default_rng(seed)
    out = {}
    for head, j in HEAD.items():
        items = [i for i in humans if not np.isnan(corpus.examples[i].targets[j])]
        hits = []
        by_source = defaultdict(list)
        for i in items:
            by_source[corpus.examples[i].source].append(i)
        for members in by_source.values():
            if len(members) < 2:
                continue
            a = rng.choice(members, size=min(len(members) * 20, 20000))
            b = rng.choice(members, size=len(a))
            for x, y in zip(a, b):
                ex, ey = corpus.examples[x], corpus.examples[y]
                tx, ty = ex.targets[j], ey.targets[j]
                if abs(tx - ty) < 0.25:
                    continue
                lx, ly = words(ex.dialogue.response), words(ey.dialogue.response)
                if min(lx, ly) < LENGTH_MATCH * max(lx, ly, 1):
                    continue
                better, worse = (x, y) if tx > ty else (y, x)
                hits.append(int(pred[position[better], j] > pred[position[worse], j]))
                if len(hits) >= max_pairs:
                    break
        if hits:
            out[f"{head}/length_matched_pair_accuracy"] = {"accuracy": round(float(np.mean(hits)), 4), "n": len(hits)}
    return out


def primary_verdicts(report: dict, model: str = "perm-lite") -> dict[str, dict]:
    """For each head: the model's primary metric against both baselines."""
    verdicts = {}
    for head, (source, metric) in PRIMARY.items():
        key = f"{head}/{source}"
        if metric == "pair_accuracy":
            scores = {name: r["pairs"].get(key, {}).get("accuracy", float("nan")) for name, r in report.items()}
        else:
            scores = {name: r["correlation"].get(key, {}).get("pearson", float("nan")) for name, r in report.items()}
        verdicts[head] = {
            "source": source,
            "metric": metric,
            **scores,
            "beats_baselines": all(scores[model] > v for n, v in scores.items() if n != model),
        }
    return verdicts


def scorer_predictor(model: str) -> Predictor:
    """The shipped runtime as a predictor: calibrated scores from the int8 ONNX model, and
    the combined score (recipe defaults) as a fifth column."""
    from perm_lite.scorer import Scorer

    scorer = Scorer(model, provider="cpu")

    def predict(dialogues: Sequence[Dialogue]) -> np.ndarray:
        results = scorer.score_dialogues(list(dialogues))
        return np.array([[r.scores[h] for h in PERSPECTIVES] + [r.combined] for r in results])

    return predict


def checkpoint_predictor(folder: str, max_length: int = 384, batch_size: int = 32, device: str = "cpu") -> Predictor:
    """A training checkpoint (`final/` or `checkpoint/`) in PyTorch fp32: raw head outputs on
    the 0-1 target scale plus the combined score computed from them (`with_combined`).
    A `final/` folder carries its encoder config and tokenizer; otherwise the base package's."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from perm_lite.text import encode_dialogues, load_tokenizer, pad_batch
    from perm_lite.training.model import PermRewardModel, base_encoder_dir

    folder_path = Path(folder)
    if (folder_path / "encoder_config.json").exists() and (folder_path / "tokenizer.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text((folder_path / "encoder_config.json").read_text())
            model = PermRewardModel.from_config(Path(tmp))
        tokenizer = load_tokenizer(str(folder_path / "tokenizer.json"))
    else:
        model = PermRewardModel.from_config(base_encoder_dir())
        tokenizer = load_tokenizer(str(base_encoder_dir() / "tokenizer.json"))
    state = load_file(str(folder_path / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.to(device).eval()
    pad_id = tokenizer.token_to_id("[PAD]")

    def predict(dialogues: Sequence[Dialogue]) -> np.ndarray:
        encodings = encode_dialogues(list(dialogues), tokenizer, max_length)
        order = np.argsort([len(e) for e in encodings], kind="stable")
        out = np.zeros((len(encodings), len(PERSPECTIVES)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                arrays = pad_batch([encodings[k] for k in chunk], pad_id)
                batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
                out[chunk] = model(**batch).float().cpu().numpy()
        return with_combined(out)

    return predict


def _announced(name: str, predict: Predictor, progress: Callable[[str], None]) -> Predictor:
    """`predict`, saying before each call how many records it scores (long runs show progress)."""

    def announced(dialogues: Sequence[Dialogue]) -> np.ndarray:
        progress(f"{name}: scoring {len(dialogues)} records")
        return predict(dialogues)

    return announced


def run_evaluation(
    model: str,
    data_dir: str,
    split: str = "test",
    seed: int = 13,
    checkpoints: dict[str, str] | None = None,
    max_length: int = 384,
    chatbot_only: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate a model directory (and any PyTorch checkpoints) beside the length and TF-IDF
    ridge baselines in one run: the older sources' test splits, held-out mint conversations,
    held-out iEval people and the contrastive check set."""
    from perm_lite.training.data import build_corpus

    predictors: dict[str, Predictor] = {}
    if model:
        predictors["perm-lite"] = scorer_predictor(model)
    for name, folder in (checkpoints or {}).items():
        predictors[name] = checkpoint_predictor(folder, max_length)
    predictors["length"] = length_predictor
    if progress:
        predictors = {name: _announced(name, p, progress) for name, p in predictors.items()}
    result = {"split": split, "model": model, "checkpoints": checkpoints or {}}
    if chatbot_only:
        return {**result, "chatbot": chatbot_evaluation(Path(data_dir), predictors, split)}
    corpus = build_corpus(Path(data_dir), seed=seed)
    if progress:
        progress("fitting the tfidf-ridge baseline")
    predictors["tfidf-ridge"] = fit_tfidf_ridge(corpus)
    if progress:
        predictors["tfidf-ridge"] = _announced("tfidf-ridge", predictors["tfidf-ridge"], progress)
    first = next(iter(predictors))
    report = evaluate(corpus, predictors, split=split, seed=seed)
    return {
        "split": split,
        "model": model,
        "checkpoints": checkpoints or {},
        "metrics": report,
        "primary": primary_verdicts(report, first),
        "chatbot": chatbot_evaluation(Path(data_dir), predictors, split),
    }


def to_markdown(result: dict) -> str:
    """Tables for the model card: primary verdicts, correlations, pairs, length bias."""
    if "metrics" not in result:  # --chatbot-only
        return chatbot_markdown(result["chatbot"])
    metrics = result["metrics"]
    names = list(metrics)
    lines = [
        f"Split: `{result['split']}`.",
        "",
        "| head | primary source | metric | " + " | ".join(names) + " | beats both |",
    ]
    lines.append("|---" * (4 + len(names)) + "|")
    for head, v in result["primary"].items():
        cells = " | ".join(f"{v[n]:.3f}" for n in names)
        lines.append(
            f"| {head} | {v['source']} | {v['metric']} | {cells} | {'yes' if v['beats_baselines'] else 'NO'} |"
        )
    lines += ["", "| correlation (Pearson / Spearman) | n | " + " | ".join(names) + " |"]
    lines.append("|---" * (2 + len(names)) + "|")
    for key in metrics[names[0]]["correlation"]:
        n = metrics[names[0]]["correlation"][key]["n"]
        cells = " | ".join(
            f"{metrics[m]['correlation'][key]['pearson']:.3f} / {metrics[m]['correlation'][key]['spearman']:.3f}"
            for m in names
        )
        lines.append(f"| {key} | {n} | {cells} |")
    lines += ["", "| within-context pair accuracy | n | " + " | ".join(names) + " |"]
    lines.append("|---" * (2 + len(names)) + "|")
    for key in metrics[names[0]]["pairs"]:
        n = metrics[names[0]]["pairs"][key]["n"]
        cells = " | ".join(f"{metrics[m]['pairs'][key]['accuracy']:.3f}" for m in names)
        lines.append(f"| {key} | {n} | {cells} |")
    lines += ["", "| length bias | " + " | ".join(names) + " |"]
    lines.append("|---" * (1 + len(names)) + "|")
    for key, value in metrics[names[0]]["length"].items():
        if isinstance(value, dict):
            cells = " | ".join(f"{metrics[m]['length'][key]['accuracy']:.3f} (n={value['n']})" for m in names)
        else:
            cells = " | ".join(f"{metrics[m]['length'][key]:.3f}" for m in names)
        lines.append(f"| {key} | {cells} |")
    if "chatbot" in result:
        lines += ["", chatbot_markdown(result["chatbot"])]
    return "\n".join(lines) + "\n"
