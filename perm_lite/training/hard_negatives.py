"""Hard negatives against reward hacking (model 3.0): degenerate rewrites must lose.

For real replies of the *training* split only, a randomised generator writes degenerate
rewrites (repetition of a sentence or of the whole reply, stock sympathy appended,
stuffed or repeated, the seeker echoed back, a harmful sentence slipped in, keyword
lists, truncation, shouting and emoji spam, and compositions of two of these) and adds
the pair "original > rewrite" on every head. The generator is deliberately broader than
`perm_lite.rewrites.SUITE` (random sentence, position, count, pool and composition) and
draws stock phrases from `TRAIN_CLICHES` and weak.py's generic sentences, never from the
suite's `EVAL_CLICHES`, so the robustness suite measures transfer, not recall.

Stock sympathy repeated many times also gets low regression targets (like generic
filler), and a single polite generic reply beats the same reply repeated: the bottom of
the scale is ordered too, not only the top.

Two more families answer what 3.0.0's red team and contrastive set found:
- `foreign` (off by default, `foreign=0.4` to draw it): one to three warm sentences lifted
  from *other* contexts' training replies inserted into the reply (3.0.0's red team won
  every context this way). Measured in the 3.1 candidate (see the model card): the model
  could not tell another context's specific sentence from this context's own, learnt to
  distrust specific, warm sentences in general and ranked warm replies below generic ones
  (contrastive warm > generic 0.646 -> 0.458); kept for experiments, not for training;
- `topical_generic`: a well-rated real reply beats polite filler of about its length that
  only names the seeker's topic ("I'm so sorry about the divorce. Grief is different for
  everyone..."). 3.0.0 learnt "shorter is safer" from the degenerate negatives and
  preferred such replies to warm, specific ones; these pairs make the short, safe filler
  lose to the longer specific reply. Their own pair family, `generic`, so a config gives
  them a share of the draws (`pair_shares["generic"]`, `topical_negatives` for how many).
"""

from __future__ import annotations

import random
import re

from perm_lite.records import Dialogue
from perm_lite.rewrites import EVAL_CLICHES, TRAIN_CLICHES, keywords, norm, sentences
from perm_lite.training import weak
from perm_lite.training.corpus import empathy_ratings

# Stock phrases for negatives: never one of the suite's (weak.py's generic sentences share
# "Your feelings are valid." with EVAL_CLICHES; 3.0.0's runs still drew it, see the card).
STOCK = tuple(s for s in TRAIN_CLICHES + weak.GENERIC_SENTENCES if norm(s) not in {norm(c) for c in EVAL_CLICHES})
HARMFUL = (
    "You're being way too sensitive about this.",
    "Honestly, nobody cares that much.",
    "That's kind of embarrassing, to be honest.",
    "Crying over this makes you look weak.",
    "You probably deserved some of it.",
    "Grow up and deal with it.",
    "That's a dumb reason to be upset.",
    "You always make everything about yourself.",
    "People like you never learn.",
    "Stop whining.",
    "It's your own fault, really.",
    "Looking unprofessional like that is on you.",
)
INSULT_SUBJECTS = (
    "You sound",
    "Honestly, you come across as",
    "Frankly you're being",
    "You seem",
    "That makes you look",
)
INSULT_WORDS = (
    "pathetic",
    "ridiculous",
    "needy",
    "so dramatic",
    "annoying",
    "immature",
    "clueless",
    "a mess",
    "lazy",
    "spoiled",
    "weak",
    "exhausting",
)
INSULT_OTHER = (
    "No wonder {} avoid you.",
    "Maybe {} are right about you.",
    "I can see why {} got fed up.",
    "Honestly {} probably deserved better than you.",
)
WHO = ("people", "your friends", "they", "your family", "your coworkers")


def insult_sentence(rng: random.Random) -> str:
    """A compositional insult (subject + judgement, or a jab about others)."""
    if rng.random() < 0.5:
        return f"{rng.choice(INSULT_SUBJECTS)} {rng.choice(INSULT_WORDS)}{rng.choice(('.', '.', '!', ', honestly.'))}"
    return rng.choice(INSULT_OTHER).format(rng.choice(WHO))


EMOJI = ("❤", "💕", "🥺", "🙌", "👍", "😔", "🌈", "💪", "🌸", "😊", "🫂", "⭐")
SEPARATORS = (", ", " ", "; ", " - ", "\n", " / ")


def _repeat_one(rng: random.Random, reply: str, seeker: str) -> str | None:
    parts = sentences(reply)
    if not parts:
        return None
    s = rng.choice(parts)
    k = rng.choice((2, 2, 3, 4, 5, 8, 12, 20, 30, 45, 60))
    where = rng.random()
    if where < 0.4:
        return " ".join([s] * k)
    if where < 0.7:
        return reply.strip() + " " + " ".join([s] * (k - 1))
    return " ".join([s] * (k - 1)) + " " + reply.strip()


def _repeat_in_place(rng: random.Random, reply: str, seeker: str) -> str | None:
    """One or two of the reply's sentences written twice where they stand (or the copy moved
    to the end), sometimes with another sentence dropped: the small edits a search finds."""
    parts = sentences(reply)
    if len(parts) < 2:
        return None
    out = list(parts)
    for at in sorted(rng.sample(range(len(parts)), min(len(parts), rng.choice((1, 1, 1, 2)))), reverse=True):
        if rng.random() < 0.7:
            out.insert(at + 1, parts[at])
        else:
            out.append(parts[at])
    if len(parts) >= 3 and rng.random() < 0.3:
        once = [k for k, s in enumerate(out) if out.count(s) == 1]
        if once:
            del out[rng.choice(once)]
    return " ".join(out)


def _repeat_reply(rng: random.Random, reply: str, seeker: str) -> str | None:
    k = rng.choice((2, 2, 3, 4))
    glue = rng.choice((" ", " ", "\n\n", " As I said, ", " Again: "))
    return glue.join([reply.strip()] * k)


def _stock_added(rng: random.Random, reply: str, seeker: str) -> str | None:
    n = rng.randint(1, 8)
    phrases = rng.sample(STOCK, n)
    mode = rng.random()
    if mode < 0.4:
        return reply.strip() + " " + " ".join(phrases)
    if mode < 0.6:
        return " ".join(phrases) + " " + reply.strip()
    if mode < 0.8:
        block = " ".join(phrases[: rng.randint(1, 3)])
        return reply.strip() + " " + " ".join([block] * rng.randint(2, 6))
    out: list[str] = []
    for s in sentences(reply):
        out += [s, rng.choice(STOCK)]
    return " ".join(out)


def _echo(rng: random.Random, reply: str, seeker: str) -> str | None:
    if len(seeker.split()) < 4:
        return None
    mode = rng.random()
    if mode < 0.3:
        return seeker.strip()
    if mode < 0.55:
        return rng.choice(("You said: ", "So ", "I hear that ", "")) + seeker.strip() + " " + reply.strip()
    if mode < 0.8:
        return reply.strip() + " " + rng.choice(("You said ", "Remember: ", "")) + seeker.strip()
    parts = sentences(seeker)
    return " ".join(parts * rng.randint(2, 3)) if parts else None


def _harm(rng: random.Random, reply: str, seeker: str) -> str | None:
    parts = sentences(reply)
    at = rng.randint(0, len(parts))
    pool = HARMFUL + tuple(weak._sentence(p) for ps in weak.DISMISS_PARTS.values() for p in ps)
    harm = insult_sentence(rng) if rng.random() < 0.4 else rng.choice(pool)
    return " ".join(parts[:at] + [harm] + parts[at:])


def _keyword_list(rng: random.Random, reply: str, seeker: str) -> str | None:
    words = keywords(seeker + " " + reply, limit=rng.randint(5, 20))
    words += rng.sample(["empathy", "support", "feelings", "validation", "care", "listening", "hope", "love"], 3)
    if len(words) < 4:
        return None
    rng.shuffle(words)
    text = rng.choice(SEPARATORS).join(words)
    return "#" + " #".join(words) if rng.random() < 0.15 else text


def _truncate(rng: random.Random, reply: str, seeker: str) -> str | None:
    """Cut mid-sentence (never at a sentence end): 25-80% of the words, trailing stop removed."""
    words = reply.split()
    if len(words) < 8:
        return None
    cut = words[: max(3, int(len(words) * rng.uniform(0.25, 0.8)))]
    while len(cut) > 3 and cut[-1].endswith((".", "!", "?")):
        cut = cut[:-1]
    return " ".join(cut).rstrip(".!?,;")


def _noise(rng: random.Random, reply: str, seeker: str) -> str | None:
    mode = rng.random()
    if mode < 0.35:
        return re.sub(r"[.!?]+(\s|$)", lambda m: "!" * rng.randint(1, 5) + m.group(1), reply.strip().upper())
    if mode < 0.7:
        spam = "".join(rng.choice(EMOJI) + rng.choice(("", " ")) for _ in range(rng.randint(5, 50)))
        return (reply.strip() + " " + spam) if rng.random() < 0.7 else (spam + " " + reply.strip())
    words = reply.split()
    if len(words) < 4:
        return None
    at = rng.randrange(len(words))
    return " ".join(words[:at] + [words[at]] * rng.randint(4, 15) + words[at + 1 :])


def _stutter(rng: random.Random, reply: str, seeker: str) -> str | None:
    """A word (or a two-word phrase) repeated 2-15 times, at one to three places."""
    words = reply.split()
    if len(words) < 4:
        return None
    for _ in range(rng.choice((1, 1, 2, 3))):
        at = rng.randrange(len(words) - 1)
        span = words[at : at + rng.choice((1, 1, 2))]
        words = words[:at] + span * rng.randint(2, 15) + words[at + len(span) :]
    return " ".join(words)


GENERATORS = {
    "repeat_sentence": _repeat_one,
    "repeat_reply": _repeat_reply,
    "stock_added": _stock_added,
    "echo": _echo,
    "harm": _harm,
    "keyword_list": _keyword_list,
    "truncated": _truncate,
    "noise": _noise,
    "stutter": _stutter,
    "repeat_in_place": _repeat_in_place,
}
WEIGHTS = {
    "repeat_sentence": 3,
    "repeat_reply": 2,
    "stock_added": 3,
    "echo": 2,
    "harm": 3,
    "keyword_list": 1,
    "truncated": 3,
    "noise": 1,
    "stutter": 2,
    "repeat_in_place": 0,  # opt-in (`degenerate_weights`): 0 keeps 3.0's recipes drawing as they did
}


def foreign_inserted(rng: random.Random, reply: str, foreign: list[str]) -> str | None:
    """The reply with 1-3 sentences from other contexts' replies inserted (mostly appended,
    sometimes prepended or between sentences; now and then one of them written twice)."""
    parts = sentences(reply)
    if not parts or not foreign:
        return None
    extra = rng.sample(foreign, min(len(foreign), rng.choice((1, 1, 2, 2, 3))))
    if rng.random() < 0.15:
        extra = extra + [extra[0]]
    mode = rng.random()
    if mode < 0.5:
        out = parts + extra
    elif mode < 0.7:
        out = extra + parts
    else:
        out = list(parts)
        for s in extra:
            out.insert(rng.randint(0, len(out)), s)
    return " ".join(out)


TOPIC_OPENERS = (
    "I'm so sorry about {}.",
    "Dealing with {} sounds really hard.",
    "I'm sorry to hear about {}.",
    "{} can be so difficult.",
    "It sounds like {} has been a lot.",
    "That must be hard, with {}.",
)


def topical_generic(rng: random.Random, seeker: str, target_words: int) -> str | None:
    """Polite filler of about `target_words` words that only names the seeker's topic."""
    topic = [w for w in keywords(seeker, limit=10) if len(w) >= 5][:3]
    if not topic:
        return None
    name = " and ".join(rng.sample(topic, min(len(topic), rng.choice((1, 1, 2)))))
    opener = rng.choice(TOPIC_OPENERS).format(f"the {name}" if rng.random() < 0.5 else name)
    opener = opener[0].upper() + opener[1:]
    return opener + " " + weak.generic_reply(rng, max(8, target_words - len(opener.split())))


def generator_weights(overrides: dict | None = None) -> dict[str, float]:
    """`WEIGHTS` with `overrides` applied (a generator named with 0 is never drawn)."""
    if not overrides:
        return dict(WEIGHTS)
    unknown = set(overrides) - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown degenerate generators {sorted(unknown)}; choose from {sorted(GENERATORS)}")
    weights = WEIGHTS | {name: float(w) for name, w in overrides.items()}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"degenerate generator weights must be >= 0 with one above 0, got {weights}")
    return weights


def degenerate_rewrite(
    rng: random.Random, reply: str, seeker: str, weights: dict[str, float] | None = None
) -> tuple[str, str] | None:
    """(generator name, rewritten reply); a second generator is composed in 25% of draws.
    `weights`: each generator's chance (default `WEIGHTS`)."""
    weights = weights or WEIGHTS
    names = list(GENERATORS)
    name = rng.choices(names, weights=[weights[n] for n in names])[0]
    text = GENERATORS[name](rng, reply, seeker)
    if text and rng.random() < 0.25:
        others = [n for n in names if n not in ("truncated", name) and weights[n] > 0]
        second = rng.choice(others) if others else None
        more = GENERATORS[second](rng, text, seeker) if second else None
        if more:
            text, name = more, f"{name}+{second}"
    if not text or text.strip() == reply.strip():
        return None
    return name, text


def repeated_stock(rng: random.Random) -> tuple[str, str]:
    """(a short stock reply, the same reply repeated 3-60 times)."""
    once = " ".join(rng.sample(STOCK, rng.randint(1, 3)))
    return once, " ".join([once] * rng.choice((3, 5, 10, 20, 30, 60)))


def add_hard_negatives(
    corpus,
    seed: int = 0,
    per_source: int = 2500,
    sources: tuple[str, ...] = (),
    foreign: float = 0.0,
    topical: float = 0.35,
    weights: dict | None = None,
) -> None:
    """Pairs "original > degenerate rewrite" (every head) for training-split real replies,
    and "single stock reply > the same repeated" plus "real reply > stock repeated" with
    low regression targets for the repeated stock replies. With probability `foreign` per
    reply, "original > original with other contexts' sentences"; with `topical` (well-rated
    replies only), "original > topic-naming filler of about its length". `weights`: the
    generator mix (`generator_weights`). Nothing from val/test."""
    from perm_lite.training.corpus import Example, Pair, _targets

    rng = random.Random(seed + 7919)
    mix = generator_weights(weights)
    heads = tuple(range(4))
    by_source: dict[str, list[int]] = {}
    for n, e in enumerate(corpus.examples):
        if e.kind in ("human", "chatbot") and e.split == "train" and (not sources or e.source in sources):
            if len(e.dialogue.response.split()) >= 3:
                by_source.setdefault(e.source, []).append(n)
    # Sentences of well-rated training replies, by context group, for `foreign` insertions.
    foreign_pool: list[tuple[str, str]] = []
    for members in by_source.values() if foreign > 0 else ():
        for i in members:
            e = corpus.examples[i]
            if _well_rated(e.targets):
                foreign_pool += [(e.group, s) for s in sentences(e.dialogue.response) if 5 <= len(s.split()) <= 40]
    for _source, members in sorted(by_source.items()):
        for i in rng.sample(members, min(per_source, len(members))):
            real = corpus.examples[i]
            d = real.dialogue

            def add(text: str, kind: str, targets, d=d, real=real) -> int:
                v = Dialogue(response=text, query=d.query, scenario=d.scenario, persona=d.persona, history=d.history)
                return corpus.add(Example(v, targets, real.source, real.group, real.split, 0.5, kind))

            made = degenerate_rewrite(rng, d.response, d.query, mix)
            if made:
                name, text = made
                corpus.pairs.append(Pair(i, add(text, f"degen:{name}", _targets()), heads, f"degen:{name}"))
            if rng.random() < 0.25:
                once, many = repeated_stock(rng)
                low = _targets(resonation=0.15, expression=0.2, reception=0.15, bystander=0.15)
                j_once = add(once, "degen:stock_once", _targets())
                j_many = add(many, "degen:stock_repeated", low)
                corpus.pairs.append(Pair(j_once, j_many, heads, "degen:stock_once>repeated"))
                if not (empathy_ratings(real.targets) <= 0.25).all():
                    corpus.pairs.append(Pair(i, j_many, heads, "degen:real>stock_repeated"))
            if foreign_pool and rng.random() < foreign:
                picks = [s for g, s in rng.sample(foreign_pool, min(12, len(foreign_pool))) if g != real.group]
                text = foreign_inserted(rng, d.response, picks[:3])
                if text:
                    corpus.pairs.append(Pair(i, add(text, "degen:foreign", _targets()), heads, "degen:foreign"))
            if _well_rated(real.targets) and rng.random() < topical:
                words = len(d.response.split())
                filler = topical_generic(rng, d.query, int(words * rng.uniform(0.5, 1.1)))
                if filler:
                    low = _targets(resonation=0.25, expression=0.3, reception=0.25, bystander=0.3)
                    j = add(filler, "generic:topical_filler", low)
                    corpus.pairs.append(Pair(i, j, heads, "generic:real>topical_generic"))


def _well_rated(targets) -> bool:
    """Resonation or reception rated and every rated one of them at or above 0.5."""
    rated = empathy_ratings(targets)
    return bool(len(rated)) and bool((rated >= 0.5).all())


def add_found(corpus, found: list[tuple[int, str]], kind: str = "redteam:found") -> int:
    """Add red-team finds (index of the original example, degenerate text) as negatives.

    Their own pair family (`redteam`), so a config gives them a share of the draws
    (`pair_shares["redteam"]`): a few hundred finds among 40,000 generated negatives
    are otherwise never drawn (3.0.0's rounds changed little for that reason)."""
    from perm_lite.training.corpus import Example, Pair, _targets

    added = 0
    for i, text in found:
        real = corpus.examples[i]
        d = real.dialogue
        v = Dialogue(response=text, query=d.query, scenario=d.scenario, persona=d.persona, history=d.history)
        j = corpus.add(Example(v, _targets(), real.source, real.group, real.split, 0.5, kind))
        corpus.pairs.append(Pair(i, j, tuple(range(4)), kind))
        added += 1
    return added
