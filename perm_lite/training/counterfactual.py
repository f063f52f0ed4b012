"""Counterfactual pairs with a known direction: behaviours, not styles.

Each generator edits one real reply and yields a pair "original > edited" inside the same
context, so the model learns what the edit removed or added, whatever the writer's style:
- `removed:<mechanism>`: EPITOME rationale spans (the words raters marked as the emotional
  reaction, interpretation or exploration) deleted from a reply rated >= 1 on that
  mechanism. Emotional reaction -> expression, reception; interpretation and exploration
  -> resonation, reception.
- `dismissive_inserted`: a dismissive or self-focused sentence inserted into a well-rated
  reply (longer, but worse: all four heads).
- `padded`: content-free filler and restated sentences appended (at least doubles the
  words; all four heads: padding is not empathy, and the bystander rubric penalises it).
- `offtopic`: a reply to another conversation of the same source (all heads but expression,
  whose rubric is about how a thing is said).
- behaviour ladders (`behaviour_ladder`): for a context, a polite generic reply, a varied
  dismissive one and friendly off-topic chatter (weak.py's compositional generators);
  pairs real > generic > dismissive and real > generic > off-topic on every head. Polite
  filler is poor support, but a reply that dismisses or ignores the seeker is worse.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from perm_lite.records import Dialogue
from perm_lite.training import weak

SELF_FOCUSED = (
    "Anyway, that reminds me of my own week, which was honestly much worse.",
    "I went through something like this once and I got over it in a day.",
    "Honestly I have my own problems to deal with right now.",
    "Let me tell you about what happened to me instead.",
)
DISMISSIVE = (
    "But honestly, you are probably overreacting a bit.",
    "Still, lots of people have it much worse than you.",
    "At least it is not a real tragedy, so try not to dwell on it.",
    "You just need to stop thinking about it so much.",
    "Try to look on the bright side and move on.",
    "It is really not that big of a deal.",
    "Everyone goes through this, so it is nothing special.",
    "Maybe you brought some of this on yourself.",
)
MECHANISMS = {
    "emotional-reactions": ("expression", "reception"),
    "interpretations": ("resonation", "reception"),
    "explorations": ("resonation", "reception"),
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def remove_spans(reply: str, spans: list[str]) -> str | None:
    """The reply without the rationale spans; None when nothing (or almost nothing) is left."""
    out = reply
    removed = False
    for span in sorted({s.strip() for s in spans if len(s.strip()) >= 3}, key=len, reverse=True):
        if span in out:
            out = out.replace(span, " ")
            removed = True
    out = re.sub(r"\s{2,}", " ", out).strip(" ,;")
    if not removed or len(out.split()) < 3 or out == reply:
        return None
    return out


def epitome_removals(folder: Path) -> list[tuple[str, str, str, str, str]]:
    """(seeker post, reply, reply with the span removed, mechanism, pair key) for every
    EPITOME reply rated >= 1 on a mechanism whose rationale can be cut out."""
    out = []
    for mechanism in MECHANISMS:
        with open(Path(folder) / f"{mechanism}-reddit.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if int(row["level"]) < 1 or not row["rationales"].strip():
                    continue
                reply = row["response_post"].replace("\r", "").strip()
                edited = remove_spans(reply, row["rationales"].split("|"))
                if edited:
                    out.append((row["seeker_post"], reply, edited, mechanism, row["sp_id"]))
    return out


def insert_sentence(rng: random.Random, reply: str, pool: tuple[str, ...]) -> str:
    """The reply with one sentence from `pool` inserted at a sentence boundary."""
    sentences = _SENTENCE.split(reply.strip())
    at = rng.randint(1, max(1, len(sentences)))
    return " ".join(sentences[:at] + [rng.choice(pool)] + sentences[at:])


def pad(rng: random.Random, reply: str) -> str:
    """Filler and restatements appended until the reply has at least doubled."""
    sentences = [s for s in _SENTENCE.split(reply.strip()) if s]
    extra: list[str] = []
    target = max(30, len(reply.split()))
    while sum(len(s.split()) for s in extra) < target:
        if sentences and rng.random() < 0.3:
            extra.append(
                "As I said, "
                + sentences[rng.randrange(len(sentences))][:1].lower()
                + sentences[rng.randrange(len(sentences))][1:]
            )
        else:
            extra.append(rng.choice(weak.PADDING_SENTENCES + weak.GENERIC_SENTENCES[:6]))
    return reply + " " + " ".join(extra)


def add_counterfactuals(
    corpus, data_dir: Path, seed: int = 0, per_source: int = 1500, with_epitome: bool = True
) -> None:
    """Counterfactual examples and pairs for EPITOME removals and for mint/iEval/EPITOME
    replies (insertions, padding, off-topic); at most `per_source` per generator and source."""
    from perm_lite.training.corpus import HEAD, Example, Pair, _targets, hash_split

    rng = random.Random(seed)
    all_heads = tuple(range(len(HEAD)))

    def add_pair(real: Example, text: str, heads: tuple[int, ...], kind: str, i: int | None = None) -> None:
        d = real.dialogue
        edited = Dialogue(response=text, query=d.query, scenario=d.scenario, persona=d.persona, history=d.history)
        if i is None:  # the original is not in the corpus yet (EPITOME removals)
            i = corpus.add(Example(d, _targets(), real.source, real.group, real.split, 0.0, "counterfactual-original"))
        j = corpus.add(Example(edited, _targets(), real.source, real.group, real.split, 0.0, kind))
        corpus.pairs.append(Pair(i, j, heads, f"cf:{kind}"))

    ladder_sources = ("mint", "ieval", "epitome", "esconv", "condolence", "failedesconv")
    candidates = [
        n for n, e in enumerate(corpus.examples) if e.kind in ("human", "chatbot") and e.source in ladder_sources
    ]
    for i in rng.sample(candidates, min(per_source * 2, len(candidates))):
        behaviour_ladder(corpus, i, rng)

    removals = epitome_removals(Path(data_dir) / "epitome") if with_epitome else []
    rng.shuffle(removals)
    for post, reply, edited, mechanism, key in removals[: per_source * 2]:
        group = f"epitome:{key}"
        real = Example(Dialogue(response=reply, query=post.strip()), _targets(), "epitome", group, hash_split(group))
        add_pair(real, edited, tuple(HEAD[h] for h in MECHANISMS[mechanism]), f"removed:{mechanism}")

    good: dict[str, list[int]] = {}
    for n, e in enumerate(corpus.examples):
        if e.kind not in ("human", "chatbot") or e.source not in ("mint", "ieval", "epitome"):
            continue
        t = e.targets[HEAD["reception"]] if e.source != "epitome" else e.targets[HEAD["expression"]]
        if t == t and t >= 0.5:  # not NaN, upper half of the scale
            good.setdefault(e.source, []).append(n)
    for _source, members in sorted(good.items()):
        sample = rng.sample(members, min(per_source, len(members)))
        for k, i in enumerate(sample):
            real = corpus.examples[i]
            choice = k % 3
            if choice == 0:
                text = insert_sentence(rng, real.dialogue.response, DISMISSIVE + SELF_FOCUSED)
                add_pair(real, text, all_heads, "dismissive_inserted", i)
            elif choice == 1:
                add_pair(real, pad(rng, real.dialogue.response), all_heads, "padded", i)
            else:
                other = corpus.examples[rng.choice(members)]
                # another conversation (mint: conversation id; iEval: person), same split
                if other.group.split(":")[:2] != real.group.split(":")[:2] and other.split == real.split:
                    heads = tuple(HEAD[h] for h in ("resonation", "reception", "bystander"))
                    add_pair(real, other.dialogue.response, heads, "offtopic", i)


def behaviour_ladder(corpus, i: int, rng: random.Random) -> None:
    """Generic, dismissive and off-topic replies to example i's context, with the pairs
    real > generic > {dismissive, off-topic} on every head (see the module doc)."""
    from perm_lite.training.corpus import HEAD, Example, Pair, _targets, empathy_ratings

    real = corpus.examples[i]
    d = real.dialogue
    heads = tuple(range(len(HEAD)))

    def add(text: str, kind: str, targets) -> int:
        variant = Dialogue(response=text, query=d.query, scenario=d.scenario, persona=d.persona, history=d.history)
        return corpus.add(Example(variant, targets, real.source, real.group, real.split, 0.5, kind))

    generic = add(
        weak.generic_reply(rng, rng.randint(15, 45)),
        "ladder:generic",
        _targets(resonation=0.25, expression=0.25, reception=0.25, bystander=0.3),
    )
    dismissive = add(
        weak.rich_dismissive_reply(rng),
        "ladder:dismissive",
        _targets(resonation=0.0, expression=0.05, reception=0.0, bystander=0.1),
    )
    offtopic = add(
        weak.offtopic_chatter(rng),
        "ladder:offtopic",
        _targets(resonation=0.0, expression=0.1, reception=0.0, bystander=0.05),
    )
    if not (empathy_ratings(real.targets) <= 0.25).all():  # the real reply is rated above the bottom
        corpus.pairs.append(Pair(i, generic, heads, "cf:ladder_real>generic"))
    corpus.pairs.append(Pair(i, dismissive, heads, "cf:ladder_real>dismissive"))
    corpus.pairs.append(Pair(i, offtopic, heads, "cf:ladder_real>offtopic"))
    corpus.pairs.append(Pair(generic, dismissive, heads, "cf:ladder_generic>dismissive"))
    corpus.pairs.append(Pair(generic, offtopic, heads, "cf:ladder_generic>offtopic"))
