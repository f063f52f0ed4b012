"""`perm distill`: judge labels (from `perm judge`) -> a new perm-lite model directory.

The recipe of the shipped model (masked MSE on 0-1 targets + RankNet on within-context
pairs, the same encoder and input rendering), then the same export, int8 checks and
calibration; the held-out split measures agreement with the judge. Splits are by context
(persona, situation, history, query): two replies to one context never straddle a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np

from perm_lite.jsonl import read_records
from perm_lite.records import RecordError, parse_record
from perm_lite.scales import PERSPECTIVES, SCALES
from perm_lite.training.data import Corpus, Example, Pair, hash_split

log = logging.getLogger("perm_lite.distill")
# A pair needs labels this far apart (1-5 heads; bystander 0-100) to teach an order.
PAIR_GAP = {"resonation": 1, "expression": 1, "reception": 1, "bystander": 10}


def _context_key(dialogue) -> str:
    turns = [f"{t.role}:{t.text}" for t in dialogue.history]
    return json.dumps([dialogue.persona, dialogue.scenario, turns, dialogue.query])


def _target(head: str, value) -> float:
    low, high = SCALES[head]
    if value is None:
        return np.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RecordError(f"label {value!r} is not a number in {low:g}-{high:g}", f"labels.{head}")
    return (float(value) - low) / (high - low)


def load_judge_labels(path: Path) -> tuple[Corpus, dict]:
    """Examples and within-context pairs from a labels JSONL; bad lines are counted and logged."""
    corpus = Corpus()
    skipped: dict[str, int] = {"invalid record": 0, "no labels": 0}
    judges: set[str] = set()
    with open(path, "rb") as fh:
        for parsed in read_records(fh):
            if parsed.dialogue is None:
                skipped["invalid record"] += 1
                log.warning("skipped %s", parsed.error)
                continue
            labels = parsed.record.get("labels")
            try:
                if not isinstance(labels, dict):
                    raise RecordError("missing: every line needs 'labels' (perm judge output)", "labels")
                targets = np.array([_target(h, labels.get(h)) for h in PERSPECTIVES], dtype=np.float32)
                dialogue = parse_record({k: v for k, v in parsed.record.items() if k not in ("labels", "judge")})
            except RecordError as exc:
                skipped["invalid record"] += 1
                log.warning("skipped %s", exc.at(f"line {parsed.line}"))
                continue
            if np.isnan(targets).all():
                skipped["no labels"] += 1
                continue
            judge = parsed.record.get("judge")
            if isinstance(judge, dict) and isinstance(judge.get("model"), str):
                judges.add(judge["model"])
            key = _context_key(dialogue)
            corpus.add(Example(dialogue, targets, "judge", key, hash_split(key)))
    by_context: dict[str, list[int]] = {}
    for i, e in enumerate(corpus.examples):
        by_context.setdefault(e.group, []).append(i)
    for members in by_context.values():
        for a, b in combinations(members, 2):
            ta, tb = corpus.examples[a].targets, corpus.examples[b].targets
            for sign, (better, worse) in ((1, (a, b)), (-1, (b, a))):
                heads = tuple(
                    j
                    for j, h in enumerate(PERSPECTIVES)
                    if not np.isnan(ta[j])
                    and not np.isnan(tb[j])
                    and sign * (ta[j] - tb[j]) * (SCALES[h][1] - SCALES[h][0]) >= PAIR_GAP[h]
                )
                if heads:
                    corpus.pairs.append(Pair(better, worse, heads, "judge"))
    splits = {s: sum(e.split == s for e in corpus.examples) for s in ("train", "val", "test")}
    info = {
        "examples": len(corpus.examples),
        "pairs": len(corpus.pairs),
        "splits": splits,
        "skipped": skipped,
        "judges": sorted(judges),
    }
    for split, n in splits.items():
        if n < 2:
            raise ValueError(
                f"{path}: only {n} labelled records fall in the {split} split (80/10/10 by context); "
                f"label more records (at least ~50 contexts) before distilling"
            )
    return corpus, info


def _pairwise_accuracy(pred: np.ndarray, label: np.ndarray, gap: float) -> tuple[float | None, int]:
    """Share of record pairs (labels at least `gap` apart) that the model orders as the judge does."""
    idx = np.where(~np.isnan(label))[0]
    agree = total = 0
    for a, b in combinations(idx, 2):
        if abs(label[a] - label[b]) >= gap:
            total += 1
            agree += int(np.sign(pred[a] - pred[b]) == np.sign(label[a] - label[b]))
    return (round(agree / total, 4) if total else None), total


def agreement(model_dir: Path, corpus: Corpus, split: str = "test") -> dict:
    """Per head: Pearson and pairwise accuracy of the model's calibrated scores against the judge."""
    from perm_lite.scorer import Scorer

    members = [e for e in corpus.examples if e.split == split]
    results = Scorer(model_dir, provider="cpu").score_dialogues([e.dialogue for e in members])
    out = {}
    for j, head in enumerate(PERSPECTIVES):
        low, high = SCALES[head]
        label = np.array([low + (high - low) * e.targets[j] for e in members])
        pred = np.array([r.scores[head] for r in results])
        mask = ~np.isnan(label)
        pearson = (
            round(float(np.corrcoef(pred[mask], label[mask])[0, 1]), 4)
            if mask.sum() > 2 and np.std(label[mask]) > 0 and np.std(pred[mask]) > 0
            else None
        )
        accuracy, pairs = _pairwise_accuracy(pred, label, PAIR_GAP[head])
        out[head] = {"n": int(mask.sum()), "pearson": pearson, "pairwise_accuracy": accuracy, "pairs": pairs}
    return out


def initial_weights(init: str, folder: Path) -> str:
    """'base': the plain MiniLM encoder; else a model (name or directory) whose int8 weights,
    dequantized, start the student. Returns TrainConfig.init_from."""
    if init == "base":
        return ""
    from safetensors.torch import save_file

    from perm_lite.model_dir import read_config, resolve_model
    from perm_lite.training.dequantize import torch_model_from_int8

    model = torch_model_from_int8(read_config(resolve_model(init)).path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return str(folder)


def distill(
    labels: Path,
    out_dir: Path,
    *,
    run_dir: Path,
    init: str = "default",
    steps: int = 300,
    name: str = "perm-lite-distilled",
    version: str = "0.1.0",
    max_length: int = 256,
    regression_batch: int = 16,
    pair_batch: int = 8,
    lr: float = 3e-5,
    seed: int = 13,
    calibration_records: int = 300,
) -> dict:
    """Train, export, check and evaluate; writes the model directory with its card."""
    from perm_lite.training.build import build_model_dir
    from perm_lite.training.train import TrainConfig, train

    corpus, info = load_judge_labels(labels)
    log.info("labels: %s", info)
    with tempfile.TemporaryDirectory(prefix="perm-distill-init-") as tmp:
        cfg = TrainConfig(
            data_dir="",
            out_dir=str(run_dir),
            max_length=max_length,
            steps=steps,
            regression_batch=regression_batch,
            pair_batch=pair_batch if corpus.pairs else 0,
            lr=lr,
            warmup=max(1, min(100, steps // 10)),
            seed=seed,
            checkpoint_every=max(1, min(100, steps)),
            init_from=initial_weights(init, Path(tmp) / "init"),
        )
        final = train(cfg, corpus)
    digest = hashlib.sha256(Path(labels).read_bytes()).hexdigest()
    extra = {
        "base_model": f"sentence-transformers/all-MiniLM-L6-v2, initialised from {init}",
        "licence": "inherits the terms of your conversations and of the judge model's provider",
        "distilled_from": {"labels": Path(labels).name, "sha256": digest, "judges": info["judges"]},
    }
    report = build_model_dir(
        final,
        out_dir,
        None,
        corpus=corpus,
        extra_config=extra,
        name=name,
        version=version,
        max_length=max_length,
        seed=seed,
        calibration_records=calibration_records,
    )
    report["labels"] = info
    report["agreement_test"] = agreement(out_dir, corpus, "test")
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(name, version, init, steps, labels, digest, report))
    return report


def model_card(name: str, version: str, init: str, steps: int, labels: Path, digest: str, report: dict) -> str:
    info, agree, q = report["labels"], report["agreement_test"], report["quantization"]
    rows = "\n".join(
        f"| {h} | {a['n']} | {a['pearson']} | {a['pairwise_accuracy']} ({a['pairs']} pairs) |" for h, a in agree.items()
    )
    pearson = " / ".join(f"{v:.4f}" for v in q["pearson_int8_vs_fp32"].values())
    return f"""# {name} {version}

A perm-lite model distilled by `perm distill` from PERM-style judge labels (`perm judge`).

## Training data and licence
- Labels: `{labels.name}` (sha256 `{digest[:16]}...`), judge model(s): {", ".join(info["judges"]) or "unknown"}.
- {info["examples"]} labelled records, {info["pairs"]} within-context pairs; splits by context
  (80/10/10): {info["splits"]}; skipped lines: {info["skipped"]}.
- Licence: this model inherits the terms of the conversations it was trained on and of the
  judge provider's output; check both before sharing it.

## Recipe
Encoder all-MiniLM-L6-v2 initialised from `{init}`, {steps} steps of the shipped model's
recipe (masked MSE on 0-1 targets + RankNet on within-context pairs), exported to ONNX and
quantized to int8 as the default model is. Calibration: monotone maps fitted on the
validation split, for all four heads (the judge gives bystander labels on 0-100).

## Agreement with the judge (held-out test split)

| head | labelled records | Pearson | pairwise accuracy |
|---|---|---|---|
{rows}

## Quantization
int8 vs fp32 Pearson per head {pearson}; within-context orderings kept {q["orderings_kept"]}
of {q["orderings_n"]}; a record alone vs in batches moves by at most {q["batch_independence_max_abs_raw"]:.1e}.

## Limits
- It learns the judge's scores, including the judge's biases, on the conversations you gave
  it; agreement above says how well, on held-out contexts of the same kind, nothing more.
- Small label sets give noisy figures: check the number of records and pairs above.
- 256 tokens per record; longer inputs are truncated (reported in every result).
"""
