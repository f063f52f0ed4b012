"""A chatbot loop that checks every draft reply with perm-lite before sending it.

    python examples/guardrail_chatbot.py             # scripted conversation
    python examples/guardrail_chatbot.py --interactive

STAND-IN GENERATOR: `draft_reply` below is NOT a language model. It picks canned replies,
worst first, so that the guardrail has something to reject. Replace it with your model's
generate call; everything else stays as it is.
"""

from __future__ import annotations

import argparse

from perm_lite.guardrail import Guardrail, Verdict

CANNED = [  # stand-in drafts, from worst to best
    "Lots of people go through that. Just move on.",
    "I'm sorry you're going through this. Your feelings are valid. Stay strong.",
    "That sounds really painful, and it makes sense that it's sitting heavily with you. "
    "What part of it is hardest right now?",
]


def draft_reply(user_message: str, attempt: int) -> str:
    """STAND-IN for a real generator: canned drafts, worst first."""
    return CANNED[min(attempt, len(CANNED) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interactive", action="store_true")
    args = parser.parse_args()

    attempts = {"n": 0}

    def regenerate(record: dict, verdict: Verdict) -> str:
        attempts["n"] += 1
        return draft_reply(record.get("query", ""), attempts["n"])

    guard = Guardrail(
        thresholds={"combined": 0.05},
        on_fail="regenerate",
        regenerate=regenerate,
        max_attempts=3,
    )
    script = ["My dog died this morning and the house feels so empty.", "I keep expecting to hear her at the door."]
    messages = iter(script) if not args.interactive else iter(lambda: input("you> "), "")
    history: list[dict[str, str]] = []
    for user_message in messages:
        attempts["n"] = 0
        record = {"messages": history + [{"role": "user", "content": user_message}], "response": draft_reply("", 0)}
        verdict = guard.check(record)
        if not args.interactive:
            print(f"you> {user_message}")
        for earlier in verdict.history:
            print(
                f"  [rejected draft {earlier.attempt}: {', '.join(earlier.failed) or 'passed'} "
                f"(combined {earlier.combined:.2f})] {earlier.response}"
            )
        status = "FLAGGED, best of attempts" if verdict.flagged else "passed"
        print(
            f"bot> {verdict.response}\n  [{status}; combined {verdict.combined:.2f}; "
            f"reception {verdict.scores['reception']:.2f}; {verdict.latency_ms:.1f} ms]"
        )
        history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": verdict.response}]


if __name__ == "__main__":
    main()
