"""Loaders for the chatbot-reply sources: mint (LLM-judge scores) and iEval (seeker ratings).

Design (the model card repeats it). Targets are on 0-1 as everywhere else: (x - 1) / 4.

mint (`mint/mint_judged_replies.jsonl`, MIT): ~23 replies per context, each scored 1-5 by
gpt-oss-120b on six questions.
- resonation <- `demonstrating_understanding`
- expression <- mean(`validating_emotions`, 6 - `dismissing_emotions`)
- reception  <- `aggregated_empathy` (the judge's overall empathy)
- bystander  <- no label (the judge asked nothing about clarity or efficiency)
- pairs: every two replies to one context whose judge score on a head differs by at
  least 0.5 (1 point on the integer questions), on that head.
- split: deterministic hash of `conversation_id` (70/10/20), so a conversation's turns
  never span two splits.

iEval (`ieval/ieval_data.json`, CC BY 4.0): 4 chatbots per person and situation, 3
exchanges each, rated by the person who chatted (1-5, whole conversation).
- resonation <- `EU` (understood my emotions), expression <- `ER` (responded to my emotions
  appropriately), reception <- mean(EU, ER) (the paper's "empathetic"), bystander <-
  mean(`A`, `S`) (paid attention; made sense given my inputs).
- Every bot turn is an example carrying its conversation's rating (weight 0.3: one rating
  for three replies is a weak per-turn label); pairs: the same turn of two bots rated by the
  same person in the same situation, on each head whose ratings differ by >= 1.
- Bot text is detokenized ("that ' s great !" -> "that's great!") so a bot's tokenizer
  style cannot stand in for its quality.
- split: deterministic hash of the participant (`part`), 70/10/20.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from perm_lite.records import Dialogue, Turn
from perm_lite.scales import PERSPECTIVES

MINT_QUESTIONS = (
    "validating_emotions",
    "encouraging_elaboration",
    "demonstrating_understanding",
    "advice_giving",
    "self_oriented",
    "dismissing_emotions",
    "aggregated_empathy",
)
BOTS = ("Pink", "Purple", "Yellow", "Green")


def grouped_split(key: str) -> str:
    """70/10/20 train/val/test by a hash of the group key (deterministic, platform-free)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 20
    return "train" if bucket < 14 else ("val" if bucket < 16 else "test")


def _unit(score: float) -> float:
    return (float(score) - 1.0) / 4.0


def mint_head_scores(labels: dict) -> dict[str, float]:
    """The judge's six questions mapped onto the three supporter/seeker heads, 1-5."""
    return {
        "resonation": float(labels["demonstrating_understanding"]),
        "expression": (float(labels["validating_emotions"]) + 6.0 - float(labels["dismissing_emotions"])) / 2,
        "reception": float(labels["aggregated_empathy"]),
    }


def _history(messages: list[dict]) -> tuple[str, tuple[Turn, ...]]:
    """OpenAI-format messages -> (last seeker message, earlier turns)."""
    turns = [
        Turn("seeker" if m["role"] == "user" else "supporter", (m.get("content") or "").strip())
        for m in messages
        if m.get("role") in ("user", "assistant")
    ]
    if not turns or turns[-1].role != "seeker":
        raise ValueError("a mint context must end with the seeker's message")
    return turns[-1].text, tuple(turns[:-1])


def read_mint(folder: Path) -> list[dict]:
    """Rows of `mint_judged_replies.jsonl` with a `dialogue`, a `context` key and `split`."""
    rows = []
    with open(Path(folder) / "mint_judged_replies.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            response = (row.get("response") or "").strip()
            if not response:
                continue
            query, history = _history(row["messages"])
            row["dialogue"] = Dialogue(response=response, query=query, history=history)
            row["context"] = f"mint:{row['conversation_id']}:{row['turn_index']}"
            row["split"] = grouped_split(f"mint:{row['conversation_id']}")
            rows.append(row)
    return rows


_SPACED = [
    (re.compile(r"\s+([.,!?;:%)])"), r"\1"),
    (re.compile(r"([(])\s+"), r"\1"),
    (re.compile(r"\s*'\s*(s|t|re|ve|m|ll|d)\b", re.IGNORECASE), r"'\1"),
    (re.compile(r"\s+n't\b"), "n't"),
    (re.compile(r"\s{2,}"), " "),
]


def detokenize(text: str) -> str:
    """Undo the space-separated punctuation some iEval bots print."""
    for pattern, repl in _SPACED:
        text = pattern.sub(repl, text)
    return text.strip()


def read_ieval(folder: Path) -> list[dict]:
    """One row per (participant, valence, bot): turns, 1-5 head ratings, split."""
    with open(Path(folder) / "ieval_data.json", encoding="utf-8") as fh:
        data = json.load(fh)
    rows = []
    for task in data:
        person = f"ieval:{task['part']}"
        for valence in ("positive", "negative"):
            block = task.get(valence) or {}
            for bot in BOTS:
                chat = block.get(bot)
                if not chat:
                    continue
                lines = [ln[2:].strip() if ln.startswith("- ") else ln.strip() for ln in chat["chat_log"].split("\n")]
                turns = [
                    Turn("seeker" if k % 2 == 0 else "supporter", line if k % 2 == 0 else detokenize(line))
                    for k, line in enumerate(lines)
                    if line
                ]
                ratings = {
                    "resonation": float(chat["EU"]),
                    "expression": float(chat["ER"]),
                    "reception": (float(chat["EU"]) + float(chat["ER"])) / 2,
                    "bystander": (float(chat["A"]) + float(chat["S"])) / 2,
                }
                rows.append(
                    {
                        "person": person,
                        "context": f"{person}:{valence}",
                        "bot": bot,
                        "scenario": (block.get("prompt") or "").strip(),
                        "turns": turns,
                        "ratings": ratings,
                        "rating_rank": chat.get("Rating"),
                        "split": grouped_split(person),
                    }
                )
    return rows


def ieval_dialogues(row: dict) -> list[Dialogue]:
    """Each bot reply in one iEval conversation, with the conversation so far as context."""
    out = []
    turns = row["turns"]
    for k, turn in enumerate(turns):
        if turn.role == "supporter" and k >= 1 and turns[k - 1].role == "seeker":
            out.append(Dialogue(response=turn.text, query=turns[k - 1].text, history=tuple(turns[: k - 1])))
    return out


def add_mint(corpus, folder: Path, min_gap: float = 0.5) -> None:
    """mint replies as regression examples and within-context judge pairs (see module doc)."""
    from perm_lite.training.corpus import HEAD, Example, Pair, _targets

    by_context: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for row in read_mint(folder):
        scores = mint_head_scores(row["labels"])
        example = Example(
            row["dialogue"],
            _targets(**{h: _unit(v) for h, v in scores.items()}),
            "mint",
            row["context"],
            row["split"],
            kind="human" if row["variant"] == "gold" else "chatbot",
        )
        example.meta = {"variant": row["variant"], "labels": row["labels"], "conversation": row["conversation_id"]}
        by_context[row["context"]].append((corpus.add(example), scores))
    for members in by_context.values():
        for (i, si), (j, sj) in combinations(members, 2):
            for head in ("resonation", "expression", "reception"):
                gap = si[head] - sj[head]
                if abs(gap) >= min_gap:
                    better, worse = (i, j) if gap > 0 else (j, i)
                    corpus.pairs.append(Pair(better, worse, (HEAD[head],), "mint"))


def add_ieval(corpus, folder: Path, weight: float = 0.3, min_gap: float = 1.0) -> None:
    """iEval bot turns as weak regression examples and same-turn bot pairs (module doc)."""
    from perm_lite.training.corpus import HEAD, Example, Pair, _targets

    by_context: dict[str, list[tuple[list[int], dict]]] = defaultdict(list)
    for row in read_ieval(folder):
        targets = _targets(**{h: _unit(v) for h, v in row["ratings"].items()})
        indices = []
        for dialogue in ieval_dialogues(row):
            example = Example(dialogue, targets, "ieval", row["context"], row["split"], weight=weight, kind="chatbot")
            example.meta = {"bot": row["bot"], "person": row["person"]}
            indices.append(corpus.add(example))
        by_context[row["context"]].append((indices, row["ratings"]))
    for bots in by_context.values():
        for (ti, ri), (tj, rj) in combinations(bots, 2):
            heads = {h: ri[h] - rj[h] for h in PERSPECTIVES if abs(ri[h] - rj[h]) >= min_gap}
            for head, gap in heads.items():
                for a, b in zip(ti, tj):
                    better, worse = (a, b) if gap > 0 else (b, a)
                    corpus.pairs.append(Pair(better, worse, (HEAD[head],), "ieval"))
