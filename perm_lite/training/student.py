"""The fast tier: a shallower student distilled from a teacher checkpoint.

    python -m perm_lite.training.student --teacher runs/X/final --out runs/fast \
        [--layers 0,2,4] [--steps 1500] [--labels 24000] [--data ../shared/data]

1. The student starts as the teacher with some encoder layers dropped (`--layers` keeps
   those, default every other one): embeddings, kept layers and heads are copied.
2. Its targets are the teacher's raw head outputs (PyTorch fp32) on training-split inputs
   of the corpus: real replies, counterfactuals, the behaviour ladders and the degenerate
   rewrites, so the student learns the teacher's robustness, not only its top. Inputs are
   drawn pair first (both ends of a training pair), then single examples, with the family
   shares of the teacher's own training config (`--uniform`: every input alike); nothing
   from the validation or test splits. Labels are cached in the output folder (`labels.npz`).
3. Loss: MSE to the teacher on every head, plus RankNet on the sampled pairs in the
   teacher's order (pairs the teacher separates by at least `--min-gap`).
4. Checkpoints every `--checkpoint-every` steps with the optimizer state; a rerun with the
   same output folder resumes. `final/` is a checkpoint folder `perm export` takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("perm_lite.student")


def shallow_copy(teacher, keep: list[int]):
    """A new model with the teacher's embeddings, the encoder layers `keep` and its heads."""
    import copy

    import torch

    n = teacher.encoder.config.num_hidden_layers
    if not keep or any(k < 0 or k >= n for k in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"--layers must name distinct layers in 0..{n - 1}, got {keep}")
    student = copy.deepcopy(teacher)
    student.encoder.encoder.layer = torch.nn.ModuleList([student.encoder.encoder.layer[k] for k in keep])
    student.encoder.config.num_hidden_layers = len(keep)
    return student


def weighted_order(families: list[str], shares: dict | None, rng: np.random.Generator) -> np.ndarray:
    """A random order of the items, drawn without replacement with each family's share of the
    draws (`train.family_shares`; uniform without shares): taking the first k of it samples k."""
    from perm_lite.training.train import family_shares

    p = family_shares(families, shares)
    if p is None:
        return rng.permutation(len(families))
    keys = np.log(rng.random(len(families))) / np.maximum(p, 1e-300)  # Efraimidis-Spirakis
    return np.argsort(-keys, kind="stable")


def choose_inputs(
    corpus, n_labels: int, seed: int, pair_shares: dict | None = None, reg_shares: dict | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Training-split example indices to label (both ends of sampled pairs first, then
    single examples) and the sampled pairs, as (a, b) example indices. With the teacher's
    `pair_shares` / `reg_shares` (its training config), pairs and single examples are drawn
    with the same family shares the teacher was trained with, so small sources (EPITOME,
    counsel-chat) are not drowned by tens of thousands of generated negatives."""
    from perm_lite.training.data import family

    rng = np.random.default_rng(seed)
    train = [i for i, e in enumerate(corpus.examples) if e.split == "train"]
    pairs = [
        (p.better, p.worse, family(p.source))
        for p in corpus.pairs
        if corpus.examples[p.better].split == "train" and corpus.examples[p.worse].split == "train"
    ]
    chosen: dict[int, None] = {}
    kept_pairs = []
    for k in weighted_order([f for _, _, f in pairs], pair_shares, rng):
        if len(chosen) >= n_labels * 2 // 3:
            break
        a, b, _ = pairs[k]
        chosen[a] = chosen[b] = None
        kept_pairs.append((a, b))
    single_family = [
        e.source if e.kind in ("human", "chatbot") else family(e.kind) for e in (corpus.examples[i] for i in train)
    ]
    for k in weighted_order(single_family, reg_shares, rng):
        if len(chosen) >= n_labels:
            break
        chosen[train[k]] = None
    return list(chosen), kept_pairs


def teacher_labels(teacher, data, items: list[int], cache: Path, bf16: bool) -> np.ndarray:
    """Raw head outputs of the teacher for `items` (cached in `cache`)."""
    import torch

    from perm_lite.training.train import forward_by_length

    if cache.exists():
        with np.load(cache) as saved:
            if saved["items"].tolist() == items:
                log.info("teacher labels from %s", cache)
                return saved["labels"]
    started = time.time()
    out = []
    step = 2048
    with torch.no_grad():
        for start in range(0, len(items), step):
            out.append(forward_by_length(teacher, data, items[start : start + step], bf16).numpy())
            done = min(len(items), start + step)
            rate = done / max(1e-6, time.time() - started)
            log.info("teacher labels %d/%d (%.0f records/s)", done, len(items), rate)
    labels = np.concatenate(out).astype(np.float32)
    np.savez(cache, items=np.array(items), labels=labels)
    return labels


def distil(
    teacher_dir: Path,
    out: Path,
    data_dir: Path,
    layers: list[int],
    steps: int = 1500,
    n_labels: int = 24000,
    batch: int = 32,
    lr: float = 1e-4,
    rank_weight: float = 1.0,
    rank_scale: float = 5.0,
    min_gap: float = 0.02,
    max_length: int = 384,
    seed: int = 0,
    checkpoint_every: int = 100,
    bf16: bool = True,
    threads: int = 0,
    balanced: bool = True,
) -> Path:
    """Distil `teacher_dir` into a student keeping `layers`; returns `out/final`.
    `balanced`: draw inputs with the teacher's family shares (its `train_config.json`)."""
    import torch
    from safetensors.torch import load_file, save_file

    from perm_lite.text import load_tokenizer
    from perm_lite.training.data import build_corpus
    from perm_lite.training.export import load_checkpoint
    from perm_lite.training.train import EncodedCorpus, TrainConfig, forward_by_length, write_checkpoint

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_checkpoint(teacher_dir)
    tokenizer = load_tokenizer(str(teacher_dir / "tokenizer.json"))
    # The teacher's own training config: the student's corpus is built as the teacher's was
    # (sources, hard-negative mix) and, `balanced`, its inputs drawn with the teacher's shares.
    trained = teacher_dir / "train_config.json"
    teacher_config = TrainConfig.from_file(trained) if trained.exists() else TrainConfig()
    corpus = build_corpus(data_dir, seed=13, **teacher_config.corpus_options())
    pair_shares, reg_shares = (teacher_config.pair_shares, teacher_config.reg_shares) if balanced else (None, None)
    items, pairs = choose_inputs(corpus, n_labels, seed, pair_shares, reg_shares)
    data = EncodedCorpus(corpus, tokenizer, max_length, tokenizer.token_to_id("[PAD]"))
    log.info("teacher %s: %d inputs to label, %d pairs", teacher_dir, len(items), len(pairs))
    labels = teacher_labels(teacher, data, items, out / "labels.npz", bf16)
    row = {i: k for k, i in enumerate(items)}
    pairs = [(a, b) for a, b in pairs if np.abs(labels[row[a]] - labels[row[b]]).max() >= min_gap]

    student = shallow_copy(teacher, layers)
    del teacher
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    step = 0
    ckpt = out / "checkpoint"
    if (ckpt / "state.json").exists():
        student.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        step = json.loads((ckpt / "state.json").read_text())["step"]
        log.info("resumed at step %d", step)
    rng = np.random.default_rng(seed + step)
    student.train()
    started, first = time.time(), step
    target = torch.from_numpy(labels)
    while step < steps:
        warm = min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * warm
        chosen_pairs = [pairs[k] for k in rng.choice(len(pairs), batch // 4, replace=False)] if pairs else []
        singles = rng.choice(len(items), batch - 2 * len(chosen_pairs), replace=False).tolist()
        batch_items = [items[k] for k in singles] + [i for ab in chosen_pairs for i in ab]
        pred = forward_by_length(student, data, batch_items, bf16)
        goal = target[[row[i] for i in batch_items]]
        loss = ((pred - goal) ** 2).mean()
        if chosen_pairs and rank_weight:
            n = len(singles)
            a, b = pred[n::2], pred[n + 1 :: 2]
            ta, tb = goal[n::2], goal[n + 1 :: 2]
            sign = torch.sign(ta - tb)
            mask = (ta - tb).abs() >= min_gap
            rank = torch.nn.functional.softplus(-rank_scale * sign * (a - b))
            loss = loss + rank_weight * (rank * mask).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0 or step == steps:
            rate = (step - first) / max(1e-6, time.time() - started)
            log.info("step %d/%d loss %.5f (%.2f steps/s)", step, steps, loss.item(), rate)
        if step % checkpoint_every == 0 or step == steps:
            write_checkpoint(student, optimizer, step, ckpt)
    final = out / "final"
    _save(student, final, teacher_dir, save_file)
    (final / "student.json").write_text(
        json.dumps({"teacher": str(teacher_dir), "layers": layers, "steps": steps, "labels": len(items)}, indent=1)
    )
    return final


def _save(model, folder: Path, teacher_dir: Path, save_file) -> None:
    """The final folder `perm export` reads: weights, the student's encoder config, tokenizer."""
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        staging = Path(tmp) / folder.name
        staging.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
        (staging / "encoder_config.json").write_text(model.encoder.config.to_json_string())
        shutil.copy(teacher_dir / "tokenizer.json", staging / "tokenizer.json")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint folder (final/)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", default=Path("../shared/data"), type=Path)
    parser.add_argument("--layers", default="", help="encoder layers to keep, e.g. 0,2,4 (default: every other)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--labels", type=int, default=24000, help="training inputs the teacher labels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--uniform", action="store_true", help="draw inputs uniformly, not with the teacher's shares")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = json.loads((args.teacher / "encoder_config.json").read_text())
    n = int(config["num_hidden_layers"])
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(0, n, 2))
    final = distil(
        args.teacher,
        args.out,
        args.data,
        layers,
        steps=args.steps,
        n_labels=args.labels,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
        balanced=not args.uniform,
    )
    print(final)


if __name__ == "__main__":
    main()
