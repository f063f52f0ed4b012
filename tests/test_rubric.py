"""PERM's four judge prompts (used by the benchmarks' cost count)."""

import pytest

from perm_lite.records import Dialogue, Turn
from perm_lite.rubric import PERSPECTIVE_ORDER, judge_messages

DIALOGUE = Dialogue(
    response="That sounds exhausting. What part weighs on you most?",
    analysis="She feels guilty for resting.",
    persona="nurse, 34",
    scenario="night shifts",
    query="I can't switch off after work.",
    history=(Turn("seeker", "Hi."), Turn("supporter", "Hello, how are you?")),
)


def test_four_perspectives_in_perm_order():
    assert PERSPECTIVE_ORDER == ("resonation", "expression", "reception", "bystander")


def test_resonation_judges_the_analysis_the_others_the_response():
    resonation = judge_messages(DIALOGUE, "resonation")[1]["content"]
    assert "She feels guilty for resting." in resonation and DIALOGUE.response not in resonation
    for perspective in ("expression", "reception", "bystander"):
        text = judge_messages(DIALOGUE, perspective)[1]["content"]
        assert DIALOGUE.response in text and "Supporter's analysis" not in text


def test_resonation_falls_back_to_the_response_without_analysis():
    bare = Dialogue(response="I hear you.", query="Rough day.")
    assert "I hear you." in judge_messages(bare, "resonation")[1]["content"]


def test_prompt_carries_context_and_a_parseable_answer_form():
    messages = judge_messages(DIALOGUE, "bystander")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    for text in ("nurse, 34", "night shifts", "Seeker: Hi.", "Supporter: Hello, how are you?", "Seeker: I can't"):
        assert text in user
    for part in ("Content:", "Structure:", "Efficiency:", "Objectivity:", "Accuracy:", "Total (0-100):"):
        assert part in user
    assert user.rstrip().endswith("Total (0-100): <integer>")
    assert judge_messages(DIALOGUE, "reception")[1]["content"].rstrip().endswith("Score (1-5): <integer>")


def test_unknown_perspective_is_refused():
    with pytest.raises(ValueError, match="unknown perspective 'empathy'"):
        judge_messages(DIALOGUE, "empathy")
