"""perm-lite as a TRL reward: the call GRPOTrainer makes, PERM's formula, and a real GRPO step."""

import logging

import pytest

from perm_lite import Scorer
from perm_lite.integrations import trl as perm_trl
from perm_lite.integrations.trl import PermReward, perm_reward, perspective_rewards
from perm_lite.scales import PERSPECTIVES

COLUMNS = {
    "persona": ["teacher, 41", "student"],
    "scenario": ["burnout before exams", ""],
    "query": ["I can't face another week of marking.", "My best friend stopped talking to me."],
}
COMPLETIONS = [
    "# Analysis\nShe is exhausted and feels trapped.\n"
    "# Response\nThat sounds draining. What would one lighter evening look like?",
    "That hurts. Do you know what changed between you?",
]


class FakeState:  # GRPOTrainer passes its TrainerState and two logging hooks as extra keywords
    global_step = 3


def grpo_call(func, prompts=None, completions=COMPLETIONS, completion_ids=None, **columns):
    """The exact keyword call of GRPOTrainer._calculate_rewards."""
    return func(
        prompts=prompts or ["p0", "p1"],
        completions=completions,
        completion_ids=completion_ids or [[1] * 10, [1] * 900],
        **(columns or COLUMNS),
        trainer_state=FakeState(),
        log_extra=lambda *a, **k: None,
        log_metric=lambda *a, **k: None,
    )


def test_formula_against_hand_computed_values():
    reward = PermReward(bystander_coef=0.5, length_limit=768, length_coef=0.001)
    scores = {"resonation": 4.0, "expression": 2.0, "reception": 5.0, "bystander": 80.0}
    harmonic = 3 / (1 / 0.8 + 1 / 0.4 + 1 / 1.0)  # 0.631579
    assert reward.reward(scores, 800) == pytest.approx(harmonic - 0.1 - 0.032, abs=1e-9)
    assert reward.reward(scores, 700) == pytest.approx(harmonic - 0.1, abs=1e-9)  # under the limit
    mean = PermReward(combine="mean", bystander_coef=0, length_coef=0)
    assert mean.reward(scores, 5000) == pytest.approx((0.8 + 0.4 + 1.0) / 3)
    weighted = PermReward(combine="mean", weights={"resonation": 1, "expression": 0, "reception": 3}, bystander_coef=0)
    assert weighted.reward(scores, None) == pytest.approx((0.8 + 3 * 1.0) / 4)
    geometric = PermReward(combine="geometric", bystander_coef=1.0, length_coef=0)
    assert geometric.reward(scores, None) == pytest.approx((0.8 * 0.4 * 1.0) ** (1 / 3) - 0.2)


def test_grpo_call_returns_perm_reward_of_the_model_scores():
    reward = perm_reward()
    out = grpo_call(reward)
    assert len(out) == 2 and all(isinstance(x, float) for x in out)
    scorer = Scorer()
    expected_records = [
        {
            "persona": "teacher, 41",
            "scenario": "burnout before exams",
            "query": COLUMNS["query"][0],
            "completion": COMPLETIONS[0],
        },
        {"persona": "student", "scenario": "", "query": COLUMNS["query"][1], "completion": COMPLETIONS[1]},
    ]
    results = scorer.score(expected_records)
    assert out[0] == pytest.approx(reward.reward(results[0].scores, 10), abs=1e-6)
    assert out[1] == pytest.approx(reward.reward(results[1].scores, 900), abs=1e-6)
    assert out[1] - reward.reward(results[1].scores, 0) == pytest.approx(-0.001 * (900 - 768))


def test_chat_prompts_and_completions():
    prompts = [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": COLUMNS["query"][0]}],
        [{"role": "user", "content": COLUMNS["query"][1]}],
    ]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    reward = perm_reward(length_coef=0)
    chat = reward(prompts=prompts, completions=completions, completion_ids=None)
    plain = reward(prompts=COLUMNS["query"], completions=COMPLETIONS, completion_ids=None)
    assert chat == pytest.approx(plain, abs=1e-6)  # system turns are not model input


def test_unscorable_completion_gets_none_and_a_logged_reason(caplog):
    completions = [COMPLETIONS[0], "# Analysis\nonly thoughts\n# Response\n   ", 42]
    with caplog.at_level(logging.WARNING, logger="perm_lite"):
        out = grpo_call(
            perm_reward(),
            completions=completions,
            completion_ids=[[1]] * 3,
            **{k: v + [v[0]] for k, v in COLUMNS.items()},
        )
    assert out[0] == pytest.approx(grpo_call(perm_reward())[0])  # neighbours do not change it
    assert out[1] is None and out[2] is None
    assert "perm: completion 1 gets no reward" in caplog.text and "'# Response' section is empty" in caplog.text
    assert "perm: completion 2 gets no reward" in caplog.text


def test_length_penalty_needs_policy_tokens():
    reward = perm_reward()
    with pytest.raises(TypeError, match="completion_ids"):
        reward(prompts=["hi"], completions=["hello there"])
    counted = perm_reward(tokenizer=lambda text: 1000)
    assert counted(prompts=["hi"], completions=["hello there"])[0] == pytest.approx(
        perm_reward(length_coef=0)(prompts=["hi"], completions=["hello there"])[0] - 0.232
    )


def test_one_callable_per_perspective_with_readable_names():
    funcs = perspective_rewards()
    assert [f.__name__ for f in funcs] == [f"perm_{p}" for p in PERSPECTIVES]
    result = Scorer().score([{"query": COLUMNS["query"][1], "response": COMPLETIONS[1]}])[0]
    values = [f(prompts=COLUMNS["query"][1:], completions=COMPLETIONS[1:])[0] for f in funcs]
    assert values[:3] == pytest.approx([result.scores[p] / 5 for p in PERSPECTIVES[:3]], abs=1e-6)
    assert values[3] == pytest.approx(result.scores["bystander"] / 100, abs=1e-6)
    with pytest.raises(ValueError, match="unknown perspective"):
        perm_trl.PerspectiveReward("warmth")
    with pytest.raises(ValueError, match="unknown combine mode"):
        perm_reward(combine="max")


def test_model_loads_once_per_process(monkeypatch):
    perm_trl._SCORERS.clear()
    made = []
    real = perm_trl.Scorer

    def counting(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(perm_trl, "Scorer", counting)
    funcs = [perm_reward(length_coef=0), *perspective_rewards()]
    for f in funcs:
        f(prompts=["hi"], completions=["hello"])
        f(prompts=["hi"], completions=["hello"])
    assert len(made) == 1
