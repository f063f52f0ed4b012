"""PERM's four judge prompts, written for perm-lite from the method's description.

One chat request per perspective, as in PERM (arXiv 2601.10532): resonation judges the
analysis (the response when there is none); expression, reception and bystander judge the
response. Each prompt asks for a short reason and then the score in a fixed, parseable
form. The benchmarks count these prompts' tokens; `perm judge` sends them.
"""

from __future__ import annotations

from perm_lite.errors import OptionError
from perm_lite.records import Dialogue

JUDGE_TEMPERATURE = 0.3  # the original work's judge: gpt-4o-mini at this temperature

_SYSTEM = (
    "You are an expert rater of emotional-support conversations, trained in counselling "
    "psychology and Empathy Cycle theory. Rate exactly what you are asked to rate, on the "
    "scale given, using the rubric's anchors. Be strict: most replies are not excellent."
)

_RUBRICS = {
    "resonation": (
        "Perspective: the SUPPORTER's inner understanding (resonation). Judge the supporter's "
        "analysis of the seeker: has the supporter entered the seeker's own frame of reference? "
        "Beyond naming the emotion, does it grasp the causes, mixed or hidden feelings, and why "
        "this matters to this person's values and identity?\n"
        "1 = misreads the seeker or contradicts the facts given\n"
        "2 = labels only the obvious emotion\n"
        "3 = accurate on the explicit emotion and its cause\n"
        "4 = integrates subtle or conflicting cues\n"
        "5 = reconstructs the seeker's inner world and the need behind it",
        "Score (1-5)",
    ),
    "expression": (
        "Perspective: the SUPPORTER's communication (expression). Judge HOW the support is said "
        "in the response, not whether its advice is right.\n"
        "1 = robotic, list-like or cold\n"
        '2 = polite but generic filler ("it is valid to feel...")\n'
        "3 = natural, direct, human tone\n"
        "4 = tone calibrated to this person; feels like a close friend\n"
        "5 = precise, vivid, memorable wording",
        "Score (1-5)",
    ),
    "reception": (
        "Perspective: the SEEKER (reception). Put yourself in the seeker's place, with their "
        "persona and situation, and judge how receiving this response would feel.\n"
        "1 = intrusive, dismissive, or ignores what I said\n"
        "2 = correct but emotionally inert\n"
        "3 = genuine warmth; relief for the feeling I stated\n"
        "4 = meets the need underneath what I said, with a useful way forward\n"
        "5 = deeply moved and grateful; I want to keep talking",
        "Score (1-5)",
    ),
    "bystander": (
        "Perspective: a NEUTRAL BYSTANDER reading the exchange. Emotional expressiveness alone "
        "must not raise the score. Give five parts, each 0-20:\n"
        "- content effectiveness: does it actually help with the problem?\n"
        "- logical structure and clarity\n"
        "- communication efficiency: padding, repetition and verbosity lower it\n"
        "- objectivity: fair, no unfounded assumptions or judgement\n"
        "- accuracy and verifiability of any claims or advice\n"
        "Total = the sum of the five parts (0-100).",
        "Content: <0-20>\nStructure: <0-20>\nEfficiency: <0-20>\nObjectivity: <0-20>\nAccuracy: <0-20>\nTotal (0-100)",
    ),
}


def _conversation(dialogue: Dialogue) -> str:
    parts = []
    if dialogue.persona:
        parts.append(f"Seeker's persona: {dialogue.persona}")
    if dialogue.scenario:
        parts.append(f"Situation: {dialogue.scenario}")
    for turn in dialogue.history:
        parts.append(f"{turn.role.capitalize()}: {turn.text}")
    if dialogue.query:
        parts.append(f"Seeker: {dialogue.query}")
    return "\n".join(parts)


def judge_messages(dialogue: Dialogue, perspective: str) -> list[dict[str, str]]:
    """The chat messages of one perspective's judge call for one record."""
    if perspective not in _RUBRICS:
        raise OptionError(f"unknown perspective {perspective!r}; choose one of {', '.join(_RUBRICS)}")
    rubric, score_line = _RUBRICS[perspective]
    if perspective == "resonation":
        judged = f"Supporter's analysis of the seeker:\n{dialogue.analysis or dialogue.response}"
    else:
        judged = f"Supporter's response:\n{dialogue.response}"
    user = (
        f"{rubric}\n\n## Conversation\n{_conversation(dialogue)}\n\n## To rate\n{judged}\n\n"
        f"Answer in exactly this form:\nReason: <one or two sentences>\n{score_line}: <integer>"
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


PERSPECTIVE_ORDER = tuple(_RUBRICS)
