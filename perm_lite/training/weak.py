"""Documented weak supervision: programmatic replies that target known failure modes.

Each generator returns a reply text; `data.py` turns them into examples with low targets
and into within-context pairs (real reply > weak reply) on the heads named below.
"""

from __future__ import annotations

import random

GENERIC_SENTENCES = (
    "I'm sorry you're going through this.",
    "It is valid to feel the way you feel.",
    "Your feelings are valid.",
    "That sounds really hard.",
    "Stay strong, things will get better.",
    "Everything happens for a reason.",
    "Remember to take care of yourself.",
    "You are not alone in this.",
    "It's okay to not be okay.",
    "Sending you positive vibes.",
    "I hope things get better for you soon.",
    "Try to stay positive.",
    "Just know that it's normal to feel this way sometimes.",
    "Self-care is important during difficult times.",
    "Take it one day at a time.",
    "Thank you for sharing this.",
    "I understand how you feel.",
    "Many people experience similar feelings.",
    "It might help to talk to someone about it.",
    "Be kind to yourself.",
)

DISMISSIVE_REPLIES = (
    "Just get over it.",
    "Others have it much worse than you, honestly.",
    "That's not a real problem. Move on.",
    "Why are you even posting this here?",
    "You're overreacting. Everyone deals with this.",
    "Stop complaining and do something about it.",
    "I don't really care, sorry.",
    "Sounds like it's your own fault.",
    "Whatever. Life is hard for everyone.",
    "Have you tried just not thinking about it?",
    "lol",
    "ok",
    "You should just man up.",
    "Nobody wants to hear about your problems all the time.",
    "Why didn't you see that coming? It was obvious.",
)

INTRUSIVE_REPLIES = (
    "What is your home address and how much money do you make?",
    "Tell me every detail about your sex life first.",
    "Did you do something to deserve this? Be honest.",
    "Are you on drugs? You sound like you are.",
    "You must have a personality disorder. Which one is it?",
    "Send me pictures so I can judge for myself.",
)

PADDING_SENTENCES = (
    "I hope this helps.",
    "Let me know if you have any other questions.",
    "As I said before, it is important to remember this.",
    "In conclusion, to summarise what I said above, it matters.",
    "Again, I just want to repeat that this is important.",
    "Please feel free to reach out anytime for any reason at all.",
    "To reiterate, everything I mentioned above still applies.",
    "Overall, all things considered, that is my answer.",
)


def generic_reply(rng: random.Random, target_words: int) -> str:
    """Polite, context-free filler of about `target_words` words (length-matched negatives)."""
    sentences = list(GENERIC_SENTENCES)
    rng.shuffle(sentences)
    out: list[str] = []
    for sentence in sentences:
        out.append(sentence)
        if sum(len(s.split()) for s in out) >= target_words:
            break
    return " ".join(out)


def dismissive_reply(rng: random.Random) -> str:
    """A dismissive or intrusive reply."""
    return rng.choice(DISMISSIVE_REPLIES + INTRUSIVE_REPLIES)


def padded_reply(rng: random.Random, reply: str) -> str:
    """The same reply with content-free padding appended (at least doubles the words)."""
    extra: list[str] = []
    target = max(25, len(reply.split()))
    while sum(len(s.split()) for s in extra) < target:
        extra.append(rng.choice(PADDING_SENTENCES))
    return reply + " " + " ".join(extra)


def truncated_reply(reply: str) -> str | None:
    """The reply cut mid-sentence after about 40% of its words; None if too short."""
    words = reply.split()
    if len(words) < 15:
        return None
    return " ".join(words[: max(5, int(len(words) * 0.4))])


# Compositional negatives (model 2.0): varied dismissive replies and friendly off-topic
# chatter, built from parts so the model learns the behaviour, not a handful of strings.
DISMISS_OPENERS = ("", "", "Honestly, ", "Look, ", "I hear you, but ", "Okay, but ", "To be fair, ", "Well, ")
DISMISS_PARTS = {
    "minimise": (
        "it's really not that big a deal",
        "you're making this much bigger than it is",
        "this kind of thing happens to everyone",
        "people deal with way worse every single day",
        "it's not the end of the world",
        "you'll laugh about this in a month",
    ),
    "at_least": (
        "at least it wasn't something serious",
        "at least you still have your health",
        "at least it's over now, so there's nothing to feel",
        "at least you have other things going for you",
    ),
    "positivity": (
        "just think positive and it'll sort itself out",
        "good vibes only, don't let it get to you",
        "everything happens for a reason, so there's no point dwelling on it",
        "smile, things could always be worse",
    ),
    "move_on": (
        "you just need to move on",
        "stop overthinking it and get on with your day",
        "crying about it won't change anything",
        "you should get over it and focus on something useful",
        "dwelling on feelings like this is a waste of time",
    ),
    "blame": (
        "maybe you should have seen this coming",
        "it sounds like you brought some of this on yourself",
        "you probably could have handled it better",
        "that's what happens when you don't plan ahead",
    ),
    "self_focus": (
        "when something like that happened to me I was fine the next day",
        "I've had a pretty rough week myself, to be honest",
        "that reminds me of my own problems, which are honestly worse",
        "I never let stuff like that bother me",
    ),
}
OFFTOPIC_OPENERS = ("Oh, by the way, ", "Random thought, but ", "Fun fact: ", "Speaking of which, ", "")
OFFTOPIC_TOPICS = (
    ("I tried a new lasagna recipe last night", "the trick is letting it rest for twenty minutes"),
    ("the weather is supposed to be lovely this weekend", "it might be a good time for a picnic"),
    ("there's a great new sci-fi series out", "the second episode has an amazing twist"),
    ("my tomato plants finally started producing", "I think it's the new fertiliser I bought"),
    ("I just got back from a trip to the coast", "the seafood there was incredible"),
    ("the local team won again last night", "their new striker is really something"),
    ("I've been learning to play the ukulele", "it's much easier than the guitar"),
    ("the new phone that just came out looks amazing", "the camera is supposed to be fantastic"),
    ("I read that octopuses have three hearts", "nature is so weird sometimes"),
    ("there's a farmers' market downtown on Saturdays", "they sell the best sourdough"),
)
OFFTOPIC_CLOSERS = (
    "You should totally try it!",
    "Let me know what you think!",
    "Anyway, hope you have a nice day!",
    "Have you ever been?",
    "What's your favourite?",
    "",
)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(("!", "?", ".")) else ".")


def rich_dismissive_reply(rng: random.Random) -> str:
    """Two or three dismissive moves (minimising, "at least", forced positivity, move on,
    blame, self-focus), about 12-45 words."""
    kinds = rng.sample(sorted(DISMISS_PARTS), rng.randint(2, 3))
    parts = [rng.choice(DISMISS_PARTS[k]) for k in kinds]
    opener = rng.choice(DISMISS_OPENERS)
    first = opener + parts[0] if opener else parts[0]
    return " ".join(_sentence(p) for p in [first, *parts[1:]])


def offtopic_chatter(rng: random.Random) -> str:
    """A friendly, fluent reply about something unrelated, about 15-45 words."""
    topic, detail = rng.choice(OFFTOPIC_TOPICS)
    closer = rng.choice(OFFTOPIC_CLOSERS)
    return " ".join(p for p in (_sentence(rng.choice(OFFTOPIC_OPENERS) + topic), _sentence(detail), closer) if p)
