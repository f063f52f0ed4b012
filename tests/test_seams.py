"""Issue 13's seams: a model with five heads and a test-only execution provider each work
through every front end with no change to the library (only this test module)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perm_lite import Guardrail, Scorer
from perm_lite.errors import ModelError, OptionError, ProviderError
from perm_lite.reward import Reward

FIVE = {
    "resonation": [1.0, 5.0],
    "expression": [1.0, 5.0],
    "reception": [1.0, 5.0],
    "bystander": [0.0, 100.0],
    "safety": [1.0, 10.0],
}
RECORD = {"query": "my dog died today and i feel so alone", "response": "i am so sorry. that sounds really hard."}


@pytest.fixture(scope="module")
def five_head_dir(tmp_path_factory):
    from fixture_model import build_model_dir

    return build_model_dir(
        tmp_path_factory.mktemp("five") / "five-heads",
        scales=FIVE,
        reward={"empathy": ["resonation", "expression", "reception", "safety"], "bystander": "bystander"},
    )


@pytest.fixture(scope="module")
def five(five_head_dir):
    return Scorer(five_head_dir, provider="cpu", threads=1)


def test_five_heads_score_end_to_end(five):
    r = five.score_one(RECORD)
    assert list(r.scores) == list(FIVE) and list(r.raw) == list(FIVE)
    for name, (low, high) in FIVE.items():
        assert low <= r.scores[name] <= high
    # the config puts safety in the empathy reward, normalised as s/high like PERM's s/5
    x = [r.scores[n] / FIVE[n][1] for n in ("resonation", "expression", "reception", "safety")]
    expected = 4 / sum(1 / v for v in x) + 0.5 * (r.scores["bystander"] / 100 - 1)
    assert r.combined == pytest.approx(expected, abs=1e-5)
    assert five.reward.heads.empathy == ("resonation", "expression", "reception", "safety")


def test_five_heads_weights_thresholds_and_explanations(five_head_dir, five):
    weighted = Scorer(five_head_dir, provider="cpu", combine="mean", weights={"safety": 1}, bystander_coef=0)
    r = weighted.score_one(RECORD)
    assert r.combined == pytest.approx(r.scores["safety"] / 10, abs=1e-6)
    with pytest.raises(OptionError, match="weights apply to resonation, expression, reception, safety"):
        Scorer(five_head_dir, provider="cpu", weights={"bystander": 1})
    verdict = Guardrail({"safety": 11.0}, five).check(RECORD)  # above the scale: always flagged
    assert verdict.flagged and verdict.failed == ["safety"] and "safety" in verdict.scores
    with pytest.raises(OptionError, match="choose from resonation, expression, reception, bystander, safety"):
        Guardrail({"safty": 1.0}, five)
    explanation = five.explain(RECORD)
    assert explanation.checks == (*FIVE, "combined")
    assert set(explanation.sentences[0].deltas) == {*FIVE, "combined"}
    assert set(explanation.summary(1)) == {*FIVE, "combined"}


def test_five_heads_in_the_file_runner_and_serve(five_head_dir, five, tmp_path):
    from perm_lite.cli.main import app
    from typer.testing import CliRunner

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(RECORD) + "\n" + json.dumps({"query": "hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["score", str(src), "-o", str(out), "--model", str(five_head_dir), "-q"])
    assert result.exit_code == 3, result.output  # the second record has no response
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert list(line["scores"]) == list(FIVE)
    assert line["combined"] == pytest.approx(five.score_one(RECORD).combined, abs=1e-6)

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from perm_lite.serve.app import create_app

    with TestClient(create_app(five)) as client:
        model = client.get("/v1/model").json()
        assert model["perspectives"] == list(FIVE) and model["scales"]["safety"] == [1.0, 10.0]
        scored = client.post("/v1/score", json={"records": [RECORD]}).json()
        assert list(scored["results"][0]["scores"]) == list(FIVE)
        check = client.post("/v1/check", json={"record": RECORD, "thresholds": {"safety": 11}}).json()
        assert check["flagged"] and check["failed"] == ["safety"]


def test_five_heads_in_trl_and_ray_rows(five_head_dir, five):
    from perm_lite.integrations.trl import PermReward, perspective_rewards

    rewards = perspective_rewards(str(five_head_dir), provider="cpu")
    assert [f.__name__ for f in rewards] == [f"perm_{name}" for name in FIVE]
    safety = rewards[-1](prompts=[RECORD["query"]], completions=[RECORD["response"]])
    assert safety[0] == pytest.approx(five.score_one(RECORD).scores["safety"] / 10, abs=1e-6)
    perm = PermReward(str(five_head_dir), provider="cpu", length_coef=0)
    assert perm(prompts=[RECORD["query"]], completions=[RECORD["response"]])[0] == pytest.approx(
        five.score_one(RECORD).combined, abs=1e-5
    )
    pa = pytest.importorskip("pyarrow")
    from perm_lite.integrations.ray import ScoreRows

    rows = ScoreRows(str(five_head_dir), provider="cpu")(pa.Table.from_pylist([RECORD]))
    assert rows.column("perm_safety").to_pylist()[0] == pytest.approx(five.score_one(RECORD).scores["safety"])


def test_heads_config_is_validated(tmp_path):
    from fixture_model import build_model_dir

    with pytest.raises(ModelError, match="'scales' is required for perspectives other than PERM's"):
        d = build_model_dir(tmp_path / "a", scales=FIVE)
        cfg = json.loads((d / "config.json").read_text())
        del cfg["scales"]
        (d / "config.json").write_text(json.dumps(cfg))
        Scorer(d, provider="cpu")
    with pytest.raises(ModelError, match="reward.empathy names 'kindness', which is not a perspective"):
        Scorer(build_model_dir(tmp_path / "b", scales=FIVE, reward={"empathy": ["kindness"]}), provider="cpu")
    zero = {**FIVE, "safety": [0.0, 1.0]}
    with pytest.raises(ModelError, match="needs a scale above 0"):
        Scorer(build_model_dir(tmp_path / "c", scales=zero, reward={"empathy": ["safety"]}), provider="cpu")
    with pytest.raises(
        ModelError, match="one output of 4 scores, one per perspective in config.json; the graph gives 5"
    ):
        d = build_model_dir(tmp_path / "d", scales=FIVE)
        cfg = json.loads((d / "config.json").read_text())
        cfg["perspectives"], cfg["scales"] = list(FIVE)[:4], {k: FIVE[k] for k in list(FIVE)[:4]}
        cfg["perspectives"].append("other")
        cfg["scales"]["other"] = [1.0, 5.0]
        (d / "config.json").write_text(json.dumps(cfg))
        Scorer(d, provider="cpu")  # 5 heads in the config, 5 in the graph: loads
        cfg["perspectives"].pop()
        del cfg["scales"]["other"]
        (d / "config.json").write_text(json.dumps(cfg))
        Scorer(d, provider="cpu")  # 4 in the config, 5 in the graph: refused


def test_reward_binds_to_the_model(five):
    assert Reward(weights={"reception": 1}).bind(five.heads).heads is five.heads
    with pytest.raises(OptionError, match="unknown perspective 'safety' in weights"):
        Reward(weights={"safety": 1}).empathy({"resonation": 3.0, "expression": 3.0, "reception": 3.0})


# -- a test-only execution provider: registered here, used everywhere ----------------------


@pytest.fixture
def test_provider(monkeypatch):
    from perm_lite import providers

    spec = providers.Provider("test-cpu", "CPUExecutionProvider", ("int8", "fp32"), batch_tokens=48)
    monkeypatch.setitem(providers.PROVIDERS, spec.name, spec)
    return spec


def test_a_registered_provider_is_used_by_name_and_by_auto(tiny_model_dir, test_provider):
    named = Scorer(tiny_model_dir, provider="test-cpu", threads=1)
    assert (named.provider, named.variant, named.max_batch_tokens) == ("test-cpu", "fp32", 48)
    auto = Scorer(tiny_model_dir, threads=1)  # tried before CPU: not a GPU provider, not CPU itself
    assert auto.provider == "test-cpu"
    cpu = Scorer(tiny_model_dir, provider="cpu", threads=1)
    np.testing.assert_allclose(
        [list(r.raw.values()) for r in named.score([RECORD] * 5)],
        [list(r.raw.values()) for r in cpu.score([RECORD] * 5)],
        atol=1e-6,
    )
    from perm_lite.integrations.ray import plan_actors

    plan = plan_actors(2, 1, "test-cpu", cluster=([4.0], 0.0, {"CPU": 4.0}))
    assert (plan.provider, plan.gpus) == ("test-cpu", 0)  # each actor's Scorer gets it, no GPU reserved


def test_a_provider_onnxruntime_lacks_is_a_clear_error(tiny_model_dir, monkeypatch):
    from perm_lite import providers

    spec = providers.Provider("npu", "NpuExecutionProvider", ("int8",), batch_tokens=None, missing_hint="pip install x")
    monkeypatch.setitem(providers.PROVIDERS, "npu", spec)
    with pytest.raises(ProviderError, match=r"--provider npu cannot run: onnxruntime has no NpuExecutionProvider here"):
        Scorer(tiny_model_dir, provider="npu")
    assert Scorer(tiny_model_dir, threads=1).provider == "cpu"  # auto skips it


def test_explicit_onnxruntime_providers_pass_through(tiny_model_dir):
    s = Scorer(tiny_model_dir, providers=[("CPUExecutionProvider", {})], threads=1)
    assert s.provider == "cpu" and s.session.get_providers() == ["CPUExecutionProvider"]
    assert s.max_batch_tokens == 1024  # the table's CPU budget
    with pytest.raises(OptionError, match="give provider= or providers="):
        Scorer(tiny_model_dir, provider="cpu", providers=["CPUExecutionProvider"])


# -- hostile input to the new seams (review findings) --------------------------------------


def test_reward_refuses_odd_weights_and_is_order_free():
    import pickle

    for bad in ("resonation", ["resonation"], 5, {1: 2.0}):
        with pytest.raises(OptionError, match="weights must map perspective names to numbers"):
            Reward(weights=bad)
    with pytest.raises(OptionError, match="reward must be a perm_lite.Reward"):
        Reward.from_settings({"mode": "mean"})
    with pytest.raises(OptionError, match="heads must be a perm_lite.scales.Heads"):
        Reward().bind("x")
    a = Reward(weights={"resonation": 1, "reception": 2})
    b = Reward(weights={"reception": 2, "resonation": 1})
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    s = {"resonation": 3.0, "expression": 4.0, "reception": 2.0, "bystander": 50.0}
    for mode in ("harmonic", "mean", "geometric"):  # huge weights: the same weighted mean, no overflow
        huge = Reward(mode, {"resonation": 1e308, "expression": 1e308}).combined(s)
        assert huge == pytest.approx(Reward(mode, {"resonation": 1, "expression": 1}).combined(s))
    with pytest.raises(OptionError, match="needs empathy scores above 0"):
        Reward().combined({**s, "reception": 0.0})
    with pytest.raises(OptionError, match="n_tokens must be a whole number"):
        Reward().total(s, "1000")


def test_trl_reward_refuses_settings_it_would_ignore():
    from perm_lite.integrations.trl import PermReward

    with pytest.raises(OptionError, match="give reward=Reward"):
        PermReward(reward=Reward("mean"), combine="geometric")


def test_iter_scores_checks_its_sizes(five):
    with pytest.raises(OptionError, match="batch_size"):
        list(five.iter_scores([RECORD], batch_size=0))
    with pytest.raises(OptionError, match="chunk_size"):
        list(five.iter_scores([RECORD], chunk_size=-1))
    assert five.results([], [], five.raw_scores([])) == []


@pytest.mark.parametrize(
    "reward, scales, message",
    [
        ({"bystander": ["bystander"]}, FIVE, "reward.bystander"),
        ({}, {**FIVE, "bystander": [-100.0, 0.0]}, "needs a scale whose top is above 0"),
        ({}, {**FIVE, "truncated": [1.0, 5.0]}, r"\['truncated'\] cannot name a perspective"),
        ({"empathy": "safety"}, FIVE, "'reward.empathy' must list"),
    ],
)
def test_bad_head_roles_are_model_errors(tmp_path, reward, scales, message):
    from fixture_model import build_model_dir

    with pytest.raises(ModelError, match=message):
        Scorer(build_model_dir(tmp_path / "m", scales=scales, reward=reward or None), provider="cpu")


def test_a_three_head_config_round_trips(tmp_path):
    from fixture_model import build_model_dir

    from perm_lite.model_dir import read_config, write_config

    three = {k: FIVE[k] for k in ("resonation", "expression", "reception")}
    d = build_model_dir(tmp_path / "m", scales=three)
    write_config(d, read_config(d).editable_fields())
    config = read_config(d)
    assert config.heads.names == tuple(three) and config.heads.bystander is None
    r = Scorer(d, provider="cpu").score_one(RECORD)
    assert list(r.scores) == list(three)
    assert r.combined == pytest.approx(Reward().bind(config.heads).empathy(r.scores), abs=1e-6)  # no bystander term


def test_a_gpu_provider_that_raises_falls_back_or_is_a_provider_error(tiny_model_dir, monkeypatch):
    import onnxruntime as ort

    from perm_lite import session

    real = ort.InferenceSession

    def raising_cuda(path, options, providers):
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return real(path, options, providers=providers)

    monkeypatch.setattr(
        session.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(session.ort, "InferenceSession", raising_cuda)
    monkeypatch.setattr(session, "_warned_cpu_fallback", False)
    with pytest.warns(RuntimeWarning, match="CUDA not usable, running on CPU"):
        assert Scorer(tiny_model_dir, threads=1).provider == "cpu"
    with pytest.raises(ProviderError, match="--provider cuda cannot run: onnxruntime lists CUDAExecutionProvider"):
        Scorer(tiny_model_dir, provider="cuda")


def test_explicit_providers_are_checked(tiny_model_dir):
    with pytest.raises(ProviderError, match="onnxruntime has no NoSuchExecutionProvider here"):
        Scorer(tiny_model_dir, providers=["NoSuchExecutionProvider"])
    with pytest.raises(OptionError, match=r"providers=\[...\] takes a list"):
        Scorer(tiny_model_dir, providers="CPUExecutionProvider")
    for bad in ([None], [["CPUExecutionProvider", {}]], ["CPUExecutionProvider", 1]):
        with pytest.raises(OptionError, match=r"providers=\[...\] takes onnxruntime provider names"):
            Scorer(tiny_model_dir, providers=bad)
    with pytest.raises(OptionError, match="is empty"):
        Scorer(tiny_model_dir, providers=[])


def test_score_path_refuses_options_before_writing(tiny_model_dir, tmp_path):
    from perm_lite.batch import score_path

    scorer = Scorer(tiny_model_dir, provider="cpu", threads=1)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(RECORD) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(OptionError, match="chunk_size must be a whole number"):
        score_path(scorer, src, out, chunk_size=0)
    with pytest.raises(OptionError, match=r"unknown perm-lite fields \['nope'\]"):
        score_path(scorer, src, out, field_map={"nope": "x"})
    with pytest.raises(OptionError, match="not both"):
        score_path(scorer, src, out, resume=True, overwrite=True)
    assert not out.exists()
    assert score_path(scorer, src, out).scored == 1
