"""The training recipe: masked multi-task regression plus within-context ranking.

Seeded and resumable: a checkpoint (safetensors weights + optimizer state + step) is
written every `checkpoint_every` steps and a rerun with the same output folder resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from perm_lite.text import encode_dialogues, load_tokenizer, pad_batch
from perm_lite.training import hard_negatives
from perm_lite.training.data import Corpus, build_corpus, family
from perm_lite.training.model import PermRewardModel, base_encoder_dir

log = logging.getLogger("perm_lite.train")


@dataclass
class TrainConfig:
    data_dir: str = "../shared/data"
    out_dir: str = "runs/perm-lite-minilm"
    max_length: int = 256
    steps: int = 1500
    stop_after: int = 0  # >0: stop after this step, keeping the learning-rate schedule of `steps`
    regression_batch: int = 16
    pair_batch: int = 8
    lr: float = 4e-5
    head_lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    rank_weight: float = 1.0
    rank_scale: float = 5.0
    seed: int = 13
    threads: int = 2
    checkpoint_every: int = 100
    max_examples: int = 0  # >0: subsample (smoke tests)
    bf16: bool = True
    init_from: str = ""  # a previous run's final/ folder: continue from its weights (stage 2)
    init_from_int8: str = ""  # a model directory: continue from its shipped int8 weights, dequantized
    foreign_negatives: float = 0.0  # share of replies given other contexts' sentences as negatives (off: see card)
    topical_negatives: float = 0.35  # share of well-rated replies paired against topic-naming filler ("generic")
    # Generator mix of the degenerate rewrites (hard_negatives.WEIGHTS overridden by name; 0: never drawn).
    degenerate_weights: dict | None = None
    encoder_dir: str = ""  # folder with the encoder's config.json and tokenizer.json (default: the base package)
    device: str = "cpu"  # "cuda" where a GPU is lent (bf16 autocast there too)
    # Adversarial rounds (model 3.0): at these steps, the red team (perm_lite.redteam) searches
    # from training-split replies with the model being trained; what it finds becomes negatives.
    adversarial_at: tuple[int, ...] = ()
    adversarial_contexts: int = 120
    adversarial_budget: int = 200
    weak_share: float = 0.0  # >0: weak-supervision examples get this share of regression draws
    counsel_pair_share: float = 0.0  # >0: counsel-chat pairs get this share of pair draws
    sources: tuple[str, ...] = ()  # empty: data.DEFAULT_SOURCES (all but "written"); else only these
    # Share of the draws per family (pairs: "mint", "ieval", "cf", "weak", "counselchat", "degen", "generic",
    # "written", "written_floor", "degen_written", "redteam"; regression: a source name or "weak"); unnamed
    # families share the rest by size; a family named with 0 is never drawn.
    pair_shares: dict | None = None
    reg_shares: dict | None = None

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        values = json.loads(Path(path).read_text()) if path else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**values)

    def corpus_options(self) -> dict:
        """`data.build_corpus` keyword options of this config: its sources (when named) and
        hard-negative settings. Training and a distilled student build their corpus with it."""
        options = {
            "foreign_negatives": self.foreign_negatives,
            "topical_negatives": self.topical_negatives,
            "degenerate_weights": self.degenerate_weights,
        }
        return options | ({"sources": tuple(self.sources)} if self.sources else {})


class EncodedCorpus:
    """The corpus tokenized once with the runtime's own `encode_dialogues`."""

    def __init__(self, corpus: Corpus, tokenizer, max_length: int, pad_id: int) -> None:
        self.corpus = corpus
        self.encodings = encode_dialogues([e.dialogue for e in corpus.examples], tokenizer, max_length)
        self.targets = np.stack([e.targets for e in corpus.examples])
        self.weights = np.array([e.weight for e in corpus.examples], dtype=np.float32)
        self.pad_id = pad_id

    def batch(self, indices, device: str = "cpu") -> dict[str, torch.Tensor]:
        arrays = pad_batch([self.encodings[i] for i in indices], self.pad_id)
        return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}

    def extend(self, tokenizer, max_length: int, start: int) -> None:
        """Encode the corpus examples added since index `start` (red-team finds)."""
        new = self.corpus.examples[start:]
        self.encodings += encode_dialogues([e.dialogue for e in new], tokenizer, max_length)
        self.targets = np.concatenate([self.targets, np.stack([e.targets for e in new])])
        self.weights = np.concatenate([self.weights, np.array([e.weight for e in new], dtype=np.float32)])


def _reg_family(example) -> str:
    return example.source if example.kind in ("human", "chatbot") else "weak"


def subsample(corpus: Corpus, n: int, seed: int) -> Corpus:
    """About n examples, keeping both ends of every pair that touches one of them."""
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(len(corpus.examples), size=min(n, len(corpus.examples)), replace=False).tolist())
    for p in corpus.pairs:
        if p.better in keep or p.worse in keep:
            keep.update((p.better, p.worse))
    return corpus.subset(keep)


def _shares(flags: list[bool], share: float) -> np.ndarray | None:
    """Sampling probabilities giving the flagged items `share` of the draws (None = uniform)."""
    if share <= 0 or not flags:
        return None
    f = np.asarray(flags, dtype=bool)
    if f.all() or not f.any():
        return None
    p = np.where(f, share / f.sum(), (1 - share) / (~f).sum())
    return p / p.sum()


def family_shares(families: list[str], shares: dict | None) -> np.ndarray | None:
    """Sampling probabilities giving each named family its share of the draws (0: never
    drawn); families not named split what is left in proportion to their size (None = uniform)."""
    if not shares or not families:
        return None
    names, counts = np.unique(families, return_counts=True)
    size = dict(zip(names.tolist(), counts.tolist()))
    named = {f: max(0.0, float(v)) for f, v in shares.items() if f in size}
    rest = max(0.0, 1.0 - sum(named.values()))
    others = sum(n for f, n in size.items() if f not in named)
    per_item = {f: (named[f] / size[f]) if f in named else (rest / others if others else 0.0) for f in size}
    p = np.array([per_item[f] for f in families], dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError(f"every family present has a share of 0: {sorted(size)}")
    return p / p.sum()


def forward_by_length(
    model, data: EncodedCorpus, items: list[int], bf16: bool, tokens: int = 4096, device: str = "cpu"
) -> torch.Tensor:
    """Head outputs for `items` (in order), run as length-sorted sub-batches of at most
    `tokens` padded tokens: a batch mixing 60- and 384-token records pads nothing to 384."""
    order = sorted(range(len(items)), key=lambda k: len(data.encodings[items[k]]))
    chunks: list[list[int]] = [[]]
    for k in order:
        width = len(data.encodings[items[k]])  # sorted: the newest member is the widest
        if chunks[-1] and width * (len(chunks[-1]) + 1) > tokens:
            chunks.append([])
        chunks[-1].append(k)
    outputs = []
    # bf16 autocast: about 3x faster on CPUs with avx512_bf16; weights stay fp32.
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        for chunk in chunks:
            outputs.append(model(**data.batch([items[k] for k in chunk], device)).float())
    out = torch.cat(outputs)
    inverse = torch.empty(len(items), dtype=torch.long, device=out.device)
    inverse[torch.tensor([k for chunk in chunks for k in chunk], device=out.device)] = torch.arange(
        len(items), device=out.device
    )
    return out[inverse]


def losses(model, data: EncodedCorpus, reg_idx, pairs, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    items = list(reg_idx) + [i for p in pairs for i in (p.better, p.worse)]
    tokens = 4096 if cfg.device == "cpu" else 32768
    out = forward_by_length(model, data, items, cfg.bf16, tokens, cfg.device)
    n = len(reg_idx)
    targets = torch.from_numpy(data.targets[reg_idx]).to(out.device)
    mask = ~torch.isnan(targets)
    weights = torch.from_numpy(data.weights[reg_idx]).to(out.device).unsqueeze(1) * mask
    err = (out[:n] - torch.nan_to_num(targets)) ** 2
    mse = (err * weights).sum() / weights.sum().clamp(min=1e-6)
    rank = torch.zeros((), device=out.device)
    if pairs:
        better, worse = out[n::2], out[n + 1 :: 2]
        head_mask = torch.zeros(len(pairs), out.shape[1])
        for k, p in enumerate(pairs):
            head_mask[k, list(p.heads)] = 1.0
        head_mask = head_mask.to(out.device)
        margin = (better - worse) * cfg.rank_scale
        rank = (torch.nn.functional.softplus(-margin) * head_mask).sum() / head_mask.sum()
    total = mse + cfg.rank_weight * rank
    return total, {"mse": mse.item(), "rank": rank.item()}


def _load_int8(model: PermRewardModel, model_dir: Path) -> None:
    """Load the dequantized int8 weights of a shipped model directory into `model`."""
    from perm_lite.model_dir import read_config
    from perm_lite.training.dequantize import state_dict_from_int8

    state = state_dict_from_int8(read_config(model_dir).variant_path("int8"))
    expected = model.state_dict()
    missing = {k for k in set(expected) - set(state) if not k.startswith("encoder.pooler.")}
    missing.discard("encoder.embeddings.position_ids")
    if missing:
        raise ValueError(f"could not rebuild {sorted(missing)[:5]} from {model_dir}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if k in expected}, strict=False)


def torch_score_fn(model, tokenizer, dialogue, cfg: TrainConfig, batch: int = 64):
    """A red-team score function over replies to `dialogue`'s context: the mean of the
    four raw head outputs of the PyTorch model being trained (eval mode, no grad)."""
    from perm_lite.records import Dialogue

    pad_id = tokenizer.token_to_id("[PAD]")

    def score(replies: list[str]) -> list[float]:
        variants = [
            Dialogue(
                response=r,
                query=dialogue.query,
                scenario=dialogue.scenario,
                persona=dialogue.persona,
                history=dialogue.history,
            )
            for r in replies
        ]
        encodings = encode_dialogues(variants, tokenizer, cfg.max_length)
        values: list[float] = []
        with torch.no_grad(), torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.bf16):
            for k in range(0, len(encodings), batch):
                arrays = pad_batch(encodings[k : k + batch], pad_id)
                out = model(**{n: torch.from_numpy(v).to(cfg.device) for n, v in arrays.items()}).float()
                values += out.mean(dim=1).tolist()
        return values

    return score


def adversarial_round(model, corpus: Corpus, tokenizer, cfg: TrainConfig, step: int) -> list[tuple[int, str]]:
    """Run the red team from training-split replies (mint, iEval, contrastive-like human
    sources) with the current model; return (example index, degenerate text) for every
    context where a degenerate candidate came within 0.02 of the original or beat it."""
    import random

    from perm_lite import redteam
    from perm_lite.rewrites import sentences

    model.eval()
    rng = random.Random(cfg.seed * 7 + step)
    pool = [
        i
        for i, e in enumerate(corpus.examples)
        if e.split == "train"
        and e.kind in ("human", "chatbot")
        and len(sentences(e.dialogue.response)) >= 2
        and e.source in ("mint", "ieval", "epitome", "esconv", "condolence", "counselchat")
    ]
    chosen = rng.sample(pool, min(cfg.adversarial_contexts, len(pool)))
    others = [corpus.examples[i].dialogue.response for i in rng.sample(pool, min(300, len(pool)))]
    found: list[tuple[int, str]] = []
    hacked = 0
    started = time.time()
    for n, i in enumerate(chosen):
        d = corpus.examples[i].dialogue
        context = " ".join([t.text for t in d.history if t.role != "supporter"] + [d.query])
        pools = redteam.default_pools(context, d.response, rng.sample(others, 20))
        result = redteam.search(
            torch_score_fn(model, tokenizer, d, cfg),
            d.response,
            context,
            pools,
            budget=cfg.adversarial_budget,
            seed=cfg.seed + step + n,
        )
        hacked += result.hacked
        if result.best_degenerate is not None and result.gain > -0.02:
            found.append((i, result.best_degenerate.text))
    log.info(
        "adversarial round at step %d: %d contexts, degenerate reply above the original in %d (%.1f%%); "
        "%d negatives added (%.0f s)",
        step,
        len(chosen),
        hacked,
        100 * hacked / max(1, len(chosen)),
        len(found),
        time.time() - started,
    )
    return found


def write_checkpoint(model, optimizer, step: int, ckpt: Path) -> None:
    """Weights, optimizer state and step into `ckpt`, written beside it and renamed into
    place: a stop mid-write leaves the previous checkpoint whole."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)


def train(cfg: TrainConfig, corpus: Corpus | None = None) -> Path:
    """Train (or resume) and return the folder holding `model.safetensors`.

    `corpus`: train on these examples instead of building the corpus from `cfg.data_dir`
    (`perm distill` passes judge labels this way)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.FileHandler(out / "train.log"), logging.StreamHandler()],
    )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    base = Path(cfg.encoder_dir) if cfg.encoder_dir else base_encoder_dir()
    tokenizer = load_tokenizer(base / "tokenizer.json")
    if corpus is None:
        corpus = build_corpus(Path(cfg.data_dir), seed=cfg.seed, **cfg.corpus_options())
    if cfg.max_examples:
        corpus = subsample(corpus, cfg.max_examples, cfg.seed)
    data = EncodedCorpus(corpus, tokenizer, cfg.max_length, tokenizer.token_to_id("[PAD]"))
    train_reg = [i for i, e in enumerate(corpus.examples) if e.split == "train" and not np.isnan(e.targets).all()]
    train_pairs = [p for p in corpus.pairs if corpus.examples[p.better].split == "train"]
    log.info(
        "examples %d (regression train %d), pairs train %d", len(corpus.examples), len(train_reg), len(train_pairs)
    )

    # Weights loaded below replace the base encoder's: only its config is needed then.
    fresh = not (cfg.init_from_int8 or cfg.init_from)
    model = PermRewardModel.from_base(base) if fresh else PermRewardModel.from_config(base)
    if cfg.init_from:
        model.load_state_dict(load_file(Path(cfg.init_from) / "model.safetensors"))
        log.info("initialised from %s", cfg.init_from)
    if cfg.init_from_int8:
        _load_int8(model, Path(cfg.init_from_int8))
        log.info("initialised from the int8 weights of %s (dequantized)", cfg.init_from_int8)
    model.to(cfg.device)
    finds_file = out / "redteam_finds.jsonl"  # red-team negatives of earlier rounds (resume re-adds them)
    if finds_file.exists():
        start = len(corpus.examples)
        found = [tuple(json.loads(line)) for line in finds_file.read_text().splitlines() if line.strip()]
        hard_negatives.add_found(corpus, found)
        data.extend(tokenizer, cfg.max_length, start)
        log.info("re-added %d red-team negatives", len(found))

    def samplers():
        pairs = [p for p in corpus.pairs if corpus.examples[p.better].split == "train"]
        reg_p = _shares([corpus.examples[i].kind != "human" for i in train_reg], cfg.weak_share)
        pair_p = _shares([p.source == "counselchat" for p in pairs], cfg.counsel_pair_share)
        if cfg.reg_shares:
            reg_p = family_shares([_reg_family(corpus.examples[i]) for i in train_reg], cfg.reg_shares)
        if cfg.pair_shares:
            pair_p = family_shares([family(p.source) for p in pairs], cfg.pair_shares)
        return pairs, reg_p, pair_p

    train_pairs, reg_p, pair_p = samplers()
    head_params = list(model.heads.parameters())
    head_ids = {id(p) for p in head_params}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": cfg.lr},
            {"params": head_params, "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step = 0
    ckpt = out / "checkpoint"
    if (ckpt / "state.json").exists():
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=cfg.device))
        step = json.loads((ckpt / "state.json").read_text())["step"]
        log.info("resumed from step %d", step)
    model.train()
    started, first_step = time.time(), step
    last = min(cfg.steps, cfg.stop_after) if cfg.stop_after > 0 else cfg.steps
    while step < last:
        rng = np.random.default_rng(cfg.seed * 100_003 + step)  # resumable: one stream per step
        reg = rng.choice(train_reg, size=min(cfg.regression_batch, len(train_reg)), replace=False, p=reg_p).tolist()
        pairs = (
            [
                train_pairs[k]
                for k in rng.choice(
                    len(train_pairs), size=min(cfg.pair_batch, len(train_pairs)), replace=False, p=pair_p
                )
            ]
            if train_pairs and cfg.pair_batch
            else []
        )
        scale = min(1.0, (step + 1) / max(1, cfg.warmup)) * max(
            0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup)
        )
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * min(1.0, scale)
        loss, parts = losses(model, data, reg, pairs, cfg)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step in cfg.adversarial_at:
            start = len(corpus.examples)
            found = adversarial_round(model, corpus, tokenizer, cfg, step)
            with finds_file.open("a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(list(f)) + "\n" for f in found)
            hard_negatives.add_found(corpus, found)
            data.extend(tokenizer, cfg.max_length, start)
            train_pairs, reg_p, pair_p = samplers()
            model.train()
        if step % 10 == 0 or step == last:
            rate = (step - first_step) / max(1e-6, time.time() - started)
            log.info(
                "step %d/%d loss %.4f mse %.4f rank %.4f (%.2f steps/s)",
                step,
                cfg.steps,
                loss.item(),
                parts["mse"],
                parts["rank"],
                rate,
            )
        if step % cfg.checkpoint_every == 0 or step == last:
            write_checkpoint(model, optimizer, step, ckpt)
    final = out / "final"
    final.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, final / "model.safetensors")
    shutil.copy(base / "config.json", final / "encoder_config.json")
    shutil.copy(base / "tokenizer.json", final / "tokenizer.json")
    (final / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log.info("done: %s", final)
    return final
