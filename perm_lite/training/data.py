"""Loaders that map the public ratings onto the four PERM heads.

Design (the model card repeats it):
- chatbot replies (chatbot_data.py): mint (LLM-judge scores on ~23 replies per context)
  and iEval (the seeker's own ratings of four chatbots) on all heads they label, with
  within-context ranking pairs; these are the sources closest to what users score.
- resonation  <- EPITOME interpretations (weight 0.7) and explorations (0.3), levels 0-2
- expression  <- EPITOME emotional reactions (0-2); condolence empathy rating (1-5)
- reception   <- FailedESConv per-turn seeker feedback (1-5); condolence rating (1-5);
                 ESConv seeker survey `empathy` (1-5, one rating per dialogue, weight 0.3)
- bystander   <- counsel-chat within-question upvote order (pairs only, no absolute label)
- all heads   <- weak supervision (weak.py): a reply from another context, generic filler,
                 dismissive or intrusive replies, padding, truncated replies; and
                 counterfactual pairs with a known direction (counterfactual.py).
Every target is normalised to 0-1 (level/2 or (rating-1)/4); a head without a label is
NaN and masked out of the loss. Splits are the published ones where they exist, else a
deterministic hash of the context id (80/10/10; mint by conversation and iEval by person,
70/10/20), so one context never spans two splits.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue, Turn
from perm_lite.scales import PERSPECTIVES
from perm_lite.training import chatbot_data, counterfactual, hard_negatives, weak, written
from perm_lite.training.corpus import HEAD, NAN, Corpus, Example, Pair, _targets, hash_split  # noqa: F401 (re-exported)


def _clean(text: str) -> str:
    return html.unescape(text or "").replace("\r", "").strip()


def load_epitome(folder: Path) -> list[Example]:
    levels: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    texts: dict[tuple[str, str], tuple[str, str]] = {}
    for tag, name in (("er", "emotional-reactions"), ("ip", "interpretations"), ("ex", "explorations")):
        with open(folder / f"{name}-reddit.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                key = (row["sp_id"], row["rp_id"])
                levels[key][tag] = int(row["level"])
                texts[key] = (_clean(row["seeker_post"]), _clean(row["response_post"]))
    out = []
    for key, lv in levels.items():
        post, reply = texts[key]
        if not reply:
            continue
        values: dict[str, float] = {}
        if "ip" in lv and "ex" in lv:
            values["resonation"] = 0.7 * lv["ip"] / 2 + 0.3 * lv["ex"] / 2
        if "er" in lv:
            values["expression"] = lv["er"] / 2
        group = f"epitome:{key[0]}"
        out.append(
            Example(Dialogue(response=reply, query=post), _targets(**values), "epitome", group, hash_split(group))
        )
    return out


def load_condolence(folder: Path) -> list[Example]:
    """Published splits; a post that appears in two of them keeps only its earliest copy
    (train before val before test), so no seeker post spans two splits."""
    rows: list[tuple[str, str, str, float]] = []
    for split, name in (("train", "train"), ("val", "val"), ("test", "test")):
        with open(folder / f"{name}.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                post, reply = _clean(row["target"]), _clean(row["observer"])
                if reply:
                    rows.append((split, post, reply, (float(row["rating"]) - 1) / 4))
    first_split: dict[str, str] = {}
    for split, post, _, _ in rows:
        first_split.setdefault(post, split)
    out = []
    for split, post, reply, rating in rows:
        if first_split[post] != split:
            continue
        group = "condolence:" + hashlib.sha256(post.encode()).hexdigest()[:16]
        out.append(
            Example(
                Dialogue(response=reply, query=post),
                _targets(expression=rating, reception=rating),
                "condolence",
                group,
                split,
            )
        )
    return out


def _merge_runs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    for role, text in turns:
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + " " + text)
        else:
            merged.append((role, text))
    return merged


def _dialogue_at(turns: list[tuple[str, str]], reply_index: int, scenario: str) -> Dialogue:
    """The supporter turn at `reply_index` answering the seeker turn just before it."""
    history = [Turn(role, text) for role, text in turns[: reply_index - 1]]
    return Dialogue(
        response=turns[reply_index][1],
        query=turns[reply_index - 1][1],
        scenario=scenario,
        history=tuple(history),
    )


def load_esconv(folder: Path, turns_per_dialogue: int = 3, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        with open(folder / f"esconv_hf_{name}.json", encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                d = json.loads(line)
                empathy = d.get("survey_score", {}).get("seeker", {}).get("empathy")
                if empathy in (None, ""):
                    continue
                turns = _merge_runs(
                    [("seeker" if t["speaker"] == "usr" else "supporter", _clean(t["text"])) for t in d["dialog"]]
                )
                candidates = [i for i, (role, _) in enumerate(turns) if role == "supporter" and i >= 1]
                if not candidates:
                    continue
                group = f"esconv:{split}:{n}"
                for i in sorted(rng.sample(candidates, min(turns_per_dialogue, len(candidates)))):
                    out.append(
                        Example(
                            _dialogue_at(turns, i, _clean(d.get("situation", ""))),
                            _targets(reception=(float(empathy) - 1) / 4),
                            "esconv",
                            group,
                            split,
                            weight=0.3,
                        )
                    )
    return out


def load_failed_esconv(folder: Path) -> list[Example]:
    with open(folder / "FailedESConv.json", encoding="utf-8") as fh:
        dialogues = json.load(fh)
    out = []
    for n, d in enumerate(dialogues):
        group = f"failedesconv:{n}"
        split = hash_split(group)
        raw = d["dialog"]
        turns: list[tuple[str, str]] = []
        for t in raw:
            role = "seeker" if t["speaker"] == "speaker" else "supporter"
            feedback = (t.get("annotation") or {}).get("feedback")
            text = _clean(t["content"])
            # Feedback on a seeker turn rates the supporter turns just before it.
            if role == "seeker" and feedback and turns and turns[-1][0] == "supporter":
                merged = _merge_runs(turns)
                if len(merged) >= 2 and merged[-2][0] == "seeker":
                    out.append(
                        Example(
                            _dialogue_at(merged, len(merged) - 1, _clean(d.get("situation", ""))),
                            _targets(reception=(float(feedback) - 1) / 4),
                            "failedesconv",
                            group,
                            split,
                        )
                    )
            turns.append((role, text))
    return out


def load_counsel_chat(folder: Path, corpus: Corpus) -> None:
    """Answers to one question, ordered by upvotes, become bystander pairs."""
    by_question: dict[str, list[dict]] = defaultdict(list)
    with open(folder / "20200325_counsel_chat.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if _clean(row["answerText"]):
                by_question[row["questionID"]].append(row)
    for qid, rows in by_question.items():
        title, text = _clean(rows[0]["questionTitle"]), _clean(rows[0]["questionText"])
        query = f"{title} {text}".strip()
        group = f"counselchat:{qid}"
        split = {"val": "val"}.get(rows[0]["split"], rows[0]["split"])
        indices = [
            corpus.add(
                Example(
                    Dialogue(response=_clean(r["answerText"]), query=query),
                    _targets(),
                    "counselchat",
                    group,
                    split,
                )
            )
            for r in rows
        ]
        votes = [int(r["upvotes"] or 0) for r in rows]
        for a in range(len(rows)):
            for b in range(len(rows)):
                if votes[a] > votes[b]:
                    corpus.pairs.append(Pair(indices[a], indices[b], (HEAD["bystander"],), "counselchat"))


ALL = tuple(range(len(PERSPECTIVES)))
NO_BYSTANDER = (HEAD["resonation"], HEAD["expression"], HEAD["reception"])


def add_weak_supervision(corpus: Corpus, seed: int = 0) -> None:
    """One weak variant per human example (see weak.py); pairs stay inside a context."""
    rng = random.Random(seed)
    humans = [i for i, e in enumerate(corpus.examples) if e.kind in ("human", "chatbot")]
    by_source: dict[str, list[int]] = defaultdict(list)
    for i in humans:
        by_source[(corpus.examples[i].source, corpus.examples[i].split)].append(i)
    low = dict(resonation=0.0, expression=0.0, reception=0.0, bystander=0.1)
    for i in humans:
        real = corpus.examples[i]
        d = real.dialogue
        kind = rng.choice(("mismatched", "generic", "dismissive", "padded", "truncated"))
        reply, targets, heads = None, _targets(), ALL
        if kind == "mismatched":
            pool = by_source[(real.source, real.split)]
            other = corpus.examples[rng.choice(pool)]
            if other.group != real.group:
                reply = other.dialogue.response
                targets = _targets(resonation=0.0, reception=0.0, bystander=0.15)
        elif kind == "generic":
            reply = weak.generic_reply(rng, len(d.response.split()))
            targets = _targets(resonation=0.25, expression=0.25, reception=0.25, bystander=0.3)
            heads = NO_BYSTANDER + (HEAD["bystander"],)
        elif kind == "dismissive":
            reply = weak.dismissive_reply(rng)
            targets = _targets(**low)
        elif kind == "padded":
            reply = weak.padded_reply(rng, d.response)
            heads = (HEAD["bystander"],)
        else:
            reply = weak.truncated_reply(d.response)
            heads = (HEAD["bystander"], HEAD["reception"])
        if reply is None:
            continue
        variant = Dialogue(response=reply, query=d.query, scenario=d.scenario, persona=d.persona, history=d.history)
        j = corpus.add(Example(variant, targets, real.source, real.group, real.split, 0.5, kind))
        # A generic or mismatched reply only loses to a real reply that was rated above
        # the bottom of the scale; a dismissive, padded or truncated one always loses.
        rated = real.targets[list(NO_BYSTANDER)]
        if kind == "generic" and not np.nanmax(np.append(rated, 0.5)) > 0.25:
            continue
        corpus.pairs.append(Pair(i, j, heads, f"weak:{kind}"))


SOURCES = (
    "epitome",
    "condolence",
    "esconv",
    "failedesconv",
    "counselchat",
    "mint",
    "ieval",
    "weak",
    "counterfactual",
    "degenerate",
    "written",
)
# What a build loads unless told otherwise: every source but the hand-written contrast pairs,
# which cost agreement with iEval's people when trained on (candidate 3.1b in the model card).
DEFAULT_SOURCES = tuple(s for s in SOURCES if s != "written")


def build_corpus(
    data_dir: Path,
    seed: int = 0,
    sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    foreign_negatives: float = 0.0,
    topical_negatives: float = 0.35,
    degenerate_weights: dict | None = None,
) -> Corpus:
    """Load the named sources under `data_dir` (the layout of ../shared/data).

    `weak` adds the weak-supervision variants, `counterfactual` the counterfactual pairs
    (counterfactual.py) and `degenerate` the hard negatives against reward hacking
    (hard_negatives.py, training split only) of the loaded sources, `written` the project's
    hand-written contrast pairs (written.py, its training files only); a source left out is absent from every split
    (leave-one-source-out runs). `foreign_negatives`, `topical_negatives`, `degenerate_weights`: the
    `foreign` and `topical` shares and the generator `weights` of `hard_negatives.add_hard_negatives`."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown training sources {sorted(unknown)}; choose from {list(SOURCES)}")
    data_dir = Path(data_dir)
    corpus = Corpus()
    loaders = {
        "epitome": lambda: load_epitome(data_dir / "epitome"),
        "condolence": lambda: load_condolence(data_dir / "condolence"),
        "esconv": lambda: load_esconv(data_dir / "esconv", seed=seed),
        "failedesconv": lambda: load_failed_esconv(data_dir / "esconv"),
    }
    for name, load in loaders.items():
        if name in sources:
            corpus.examples.extend(load())
    if "counselchat" in sources:
        load_counsel_chat(data_dir / "counsel-chat", corpus)
    if "mint" in sources:
        chatbot_data.add_mint(corpus, data_dir / "mint")
    if "ieval" in sources:
        chatbot_data.add_ieval(corpus, data_dir / "ieval")
    if "weak" in sources:
        add_weak_supervision(corpus, seed=seed)
    if "counterfactual" in sources:
        counterfactual.add_counterfactuals(corpus, data_dir, seed=seed, with_epitome="epitome" in sources)
    if "degenerate" in sources:
        hard_negatives.add_hard_negatives(
            corpus, seed=seed, foreign=foreign_negatives, topical=topical_negatives, weights=degenerate_weights
        )
    if "written" in sources:
        written.add_written(corpus, "train", seed=seed)
    return corpus


def family(source: str) -> str:
    """The sampling family of a pair source or example kind: `weak:generic` -> `weak`."""
    return source.split(":", 1)[0]
