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
