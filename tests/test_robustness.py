"""The degenerate rewrites, the degeneracy check, the robustness suite, the red team, the
hard negatives and the optional repetition term of the reward."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perm_lite import Reward, redteam
from perm_lite.records import Dialogue
from perm_lite.rewrites import (
    EVAL_CLICHES,
    SUITE_NAMES,
    TRAIN_CLICHES,
    apply_suite,
    degeneracy,
    norm,
    repetition_share,
    sentences,
)

REPLY = (
    "Eight years is a huge part of your life, so of course this hit hard. "
    "Being let go on a video call makes it feel even colder. "
    "What has the first day after been like for you?"
)
SEEKER = "I got laid off today after eight years and they told me on a five minute video call."


def test_every_rewrite_applies_and_differs():
    out = apply_suite(REPLY, SEEKER, seed=3)
    assert set(out) == set(SUITE_NAMES)
    assert all(text.strip() != REPLY for text in out.values())
    first = sentences(REPLY)[0]
    assert out["sentence_x30"] == " ".join([first] * 30)
    assert out["reply_x2"] == f"{REPLY} {REPLY}"
    assert out["echo_seeker"] == SEEKER
    assert out["shouting"].startswith("EIGHT YEARS") and "!!!" in out["shouting"]
    assert not out["truncated_mid_sentence"].endswith((".", "!", "?"))
    assert "," in out["keyword_list"] and "." not in out["keyword_list"]


def test_rewrites_are_seeded():
    assert apply_suite(REPLY, SEEKER, seed=5) == apply_suite(REPLY, SEEKER, seed=5)
    assert (
        apply_suite(REPLY, SEEKER, seed=5)["cliches_appended_4"]
        != apply_suite(REPLY, SEEKER, seed=6)["cliches_appended_4"]
    )


def test_rewrites_that_cannot_apply_are_left_out():
    out = apply_suite("Okay.", "", seed=0)
    assert "echo_seeker" not in out and "truncated_mid_sentence" not in out and "word_stutter" not in out


def test_cliche_pools_are_disjoint():
    assert not {norm(s) for s in EVAL_CLICHES} & {norm(s) for s in TRAIN_CLICHES}


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        (f"{REPLY} {REPLY}", "repeated sentence"),
        ("That sounds hard. " * 5, "repeated sentence"),
        (REPLY + " I hear you. I understand.", "no new content"),
        (SEEKER + " " + REPLY, "echoes the context"),
        (REPLY.replace("huge", "huge huge huge huge"), "word run"),
    ],
)
def test_degenerate_candidates_are_named(candidate, reason):
    found = degeneracy(candidate, REPLY, SEEKER)
    assert found.degenerate
    assert any(r.startswith(reason) for r in found.reasons), found.reasons


@pytest.mark.parametrize(
    "candidate",
    [
        REPLY,
        " ".join(sentences(REPLY)[1:]),  # a deletion
        " ".join(reversed(sentences(REPLY))),  # a new order
        REPLY + " I'm here for you.",  # one inserted sentence is an edit
    ],
)
def test_edits_are_not_degenerate(candidate):
    assert not degeneracy(candidate, REPLY, SEEKER).degenerate


def test_repetition_share():
    assert repetition_share(REPLY) == 0.0
    assert repetition_share(f"{REPLY} {REPLY}") == pytest.approx(0.5)
    assert repetition_share("That sounds hard. " * 10) == pytest.approx(0.9)
    assert repetition_share("") == 0.0


def test_reward_repetition_term_is_off_by_default_and_measured_when_on():
    scores = {"resonation": 4.0, "expression": 4.0, "reception": 4.0, "bystander": 80.0}
    plain = Reward()
    assert plain.repetition_coef == 0.0
    assert plain.total(scores, None, "That sounds hard. " * 30) == plain.combined(scores)
    on = Reward(repetition_coef=0.5)
    assert on.total(scores, None, REPLY) == pytest.approx(on.combined(scores))
    assert on.total(scores, None, f"{REPLY} {REPLY}") == pytest.approx(on.combined(scores) - 0.25)
    assert on.total(scores) == pytest.approx(on.combined(scores))  # no text, no term
    assert on.to_dict()["repetition_coef"] == 0.5


def test_reward_repetition_term_is_validated():
    from perm_lite.errors import OptionError

    with pytest.raises(OptionError, match="repetition_coef"):
        Reward(repetition_coef=-1)
    with pytest.raises(OptionError, match="text"):
        Reward(repetition_coef=1).total({"resonation": 4, "expression": 4, "reception": 4, "bystander": 50}, None, 3)
    with pytest.raises(OptionError, match="not both"):
        Reward.from_settings(Reward(), repetition_coef=0.5)
    assert Reward.from_settings(repetition_coef=0.25).repetition_coef == 0.25


def _length_reward(replies: list[str]) -> list[float]:
    """A reward that pays for words: the kind the red team must break."""
    return [float(len(r.split())) for r in replies]


def _repetition_averse(replies: list[str]) -> list[float]:
    """Pays for words but takes everything off for repetition or imported material."""
    return [
        len(r.split()) * (1.0 - repetition_share(r)) - 100 * degeneracy(r, REPLY, SEEKER).degenerate for r in replies
    ]


def test_redteam_breaks_a_length_reward_within_budget():
    calls = []

    def score(replies):
        calls.append(len(replies))
        return _length_reward(replies)

    result = redteam.search(score, REPLY, SEEKER, budget=120, seed=1)
    assert result.hacked
    assert result.best_degenerate.score > result.original_score
    assert result.best_degenerate.degeneracy.degenerate
    assert result.calls == sum(calls) <= 120


def test_redteam_finds_no_hack_in_a_reward_that_refuses_them():
    result = redteam.search(_repetition_averse, REPLY, SEEKER, budget=150, seed=2)
    assert not result.hacked
    assert result.gain < 0


def test_redteam_budget_and_options_are_checked():
    from perm_lite.errors import OptionError

    with pytest.raises(OptionError, match="budget"):
        redteam.search(_length_reward, REPLY, SEEKER, budget=1)
    huge = "Hi. " * 200_000  # candidates never grow past the caps: the search ends, bounded
    result = redteam.search(_length_reward, huge, "", budget=50, seed=0)
    assert result.calls <= 50
    assert all(len(h) for h in [result.best.text])


def test_redteam_run_with_a_scorer(scorer):
    dialogues = [
        Dialogue(response=REPLY, query=SEEKER),
        Dialogue(response="I am so sorry. That sounds really hard. What happened today?", query="My dog died today."),
    ]
    ticks = []
    report = redteam.run(scorer, dialogues, budget=30, seed=0, progress=ticks.append, model_name="tiny")
    assert len(report.results) == 2 and ticks == [1, 1]
    assert report.calls <= 60
    assert 0.0 <= report.hack_rate <= 1.0
    for d, r in zip(dialogues, report.results):
        assert r.original_score == pytest.approx(scorer.score_dialogues([d])[0].combined)
    from perm_lite.errors import OptionError

    with pytest.raises(OptionError, match="objective"):
        redteam.run(scorer, dialogues, budget=10, objective="empathy")
    head = redteam.run(scorer, dialogues[:1], budget=10, objective="reception")
    assert head.results[0].original_score == pytest.approx(scorer.score_dialogues(dialogues[:1])[0].scores["reception"])


def test_redteam_reports_escape_input(scorer):
    from perm_lite import redteam_report

    nasty = Dialogue(response="<script>alert(1)</script> Sorry. \x1b[31mred\x1b[0m.", query="<b>hi</b> help")
    report = redteam.run(scorer, [nasty], budget=10, seed=0)
    page = redteam_report.to_html(report)
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    text = redteam_report.to_text(report)
    assert "\x1b" not in text and "\\x1b" in text
    data = redteam_report.to_json(report)
    assert data["contexts"] == 1 and json.dumps(data)


def test_suite_rates_count_rewrites_above_the_original():
    from perm_lite.training import robustness

    originals = [
        Dialogue(response=REPLY, query=SEEKER),
        Dialogue(response="Sorry. That is hard. Tell me more.", query="x"),
    ]
    dialogues, index = robustness.rewrite_all(originals, seed=0)
    assert len(dialogues) == 2 + sum(len(i) for i in index)
    # a "model" whose every output is the word count: longer rewrites win, shorter lose
    words = np.array([[len(d.response.split())] * 5 for d in dialogues], dtype=float)
    result = robustness.suite_rates(words, 2, index)
    assert result["rates"]["reply_x2"]["combined"] == 1.0
    assert result["rates"]["truncated_mid_sentence"]["combined"] == 0.0
    assert result["worst"]["combined"] == 1.0 and not result["passes"]
    with pytest.raises(ValueError, match="columns"):
        robustness.suite_rates(words[:, :3], 2, index)
    table = robustness.to_markdown({"toy": result})
    assert "| reply_x2 | 2 | **1.000**" in table


def test_hard_negatives_are_training_split_only_and_lose():
    from perm_lite.training.data import Corpus, Example, _targets
    from perm_lite.training.hard_negatives import add_hard_negatives, degenerate_rewrite

    corpus = Corpus()
    for k, split in enumerate(["train"] * 30 + ["val"] * 5 + ["test"] * 5):
        corpus.add(
            Example(
                Dialogue(response=REPLY, query=SEEKER), _targets(reception=0.8), "mint", f"g{k}", split, kind="chatbot"
            )
        )
    add_hard_negatives(corpus, seed=1)
    assert corpus.pairs
    for p in corpus.pairs:
        assert corpus.examples[p.worse].split == "train" and corpus.examples[p.better].split == "train"
        assert p.heads == (0, 1, 2, 3) and p.source.startswith(("degen:", "generic:"))
    rng = random.Random(0)
    kinds = {degenerate_rewrite(rng, REPLY, SEEKER)[0].split("+")[0] for _ in range(300)}
    assert kinds >= {
        "repeat_sentence",
        "repeat_reply",
        "stock_added",
        "echo",
        "harm",
        "keyword_list",
        "truncated",
        "noise",
        "stutter",
    }
    from perm_lite.training.hard_negatives import STOCK

    assert not {norm(s) for s in STOCK} & {norm(c) for c in EVAL_CLICHES}  # the suite's phrases stay unseen


def test_degenerate_generator_weights_choose_the_mix():
    """A config's `degenerate_weights` overrides the generator mix by name; 0 is never drawn."""
    from perm_lite.rewrites import sentences
    from perm_lite.training.data import Corpus, Example, _targets
    from perm_lite.training.hard_negatives import WEIGHTS, add_hard_negatives, degenerate_rewrite, generator_weights

    assert generator_weights() == WEIGHTS and generator_weights(None) is not WEIGHTS
    only = {name: 0 for name in WEIGHTS} | {"stutter": 1}
    corpus = Corpus()
    for k in range(40):
        example = Example(Dialogue(response=REPLY, query=SEEKER), _targets(reception=0.8), "mint", f"g{k}", "train")
        corpus.add(example)
    add_hard_negatives(corpus, seed=3, weights=only, topical=0.0)
    degen = {p.source.split("+")[0] for p in corpus.pairs if "stock" not in p.source}
    assert degen == {"degen:stutter"}
    in_place = generator_weights({"repeat_in_place": 1, "stutter": 0})
    rng = random.Random(4)
    for _ in range(50):
        made = degenerate_rewrite(rng, REPLY, SEEKER, {n: 0 for n in WEIGHTS} | {"repeat_in_place": 1})
        assert made and made[0] == "repeat_in_place"  # nothing else to compose with
        said = sentences(made[1])
        assert len(said) > len(set(said)) and set(said) <= set(sentences(REPLY))
    assert in_place["stutter"] == 0 and WEIGHTS["repeat_in_place"] == 0  # opt-in: old recipes draw as before
    with pytest.raises(ValueError, match="unknown degenerate generators \\['stuter'\\]"):
        generator_weights({"stuter": 2})
    with pytest.raises(ValueError, match="one above 0"):
        generator_weights(dict.fromkeys(WEIGHTS, 0))


def test_foreign_and_topical_generic_negatives():
    """Other contexts' sentences inserted (opt-in) and topic-naming filler: both lose."""
    from perm_lite.rewrites import sentences
    from perm_lite.training.data import Corpus, Example, _targets
    from perm_lite.training.hard_negatives import add_hard_negatives, foreign_inserted, topical_generic

    corpus = Corpus()
    for k in range(40):
        reply = f"Your cat number {k} sounds like a real friend to you. Eight years of work number {k} matter a lot."
        corpus.add(Example(Dialogue(response=reply, query=SEEKER), _targets(reception=0.8), "mint", f"g{k}", "train"))
    corpus.add(Example(Dialogue(response=REPLY, query=SEEKER), _targets(reception=0.1), "mint", "low", "train"))
    add_hard_negatives(corpus, seed=3, foreign=0.4)
    foreign = [p for p in corpus.pairs if p.source == "degen:foreign"]
    topical = [p for p in corpus.pairs if p.source == "generic:real>topical_generic"]
    assert foreign and topical
    for p in foreign:
        better, worse = corpus.examples[p.better], corpus.examples[p.worse]
        own = set(sentences(better.dialogue.response))
        added = [s for s in sentences(worse.dialogue.response) if s not in own]
        assert added and all(f"number {better.group[1:]} " not in s for s in added)  # never its own context
    for p in topical:
        assert corpus.examples[p.better].group != "low"  # only well-rated replies win against filler
        assert corpus.examples[p.worse].targets[2] == pytest.approx(0.25)
    off = Corpus()
    for e in corpus.examples[:41]:
        off.add(e)
    add_hard_negatives(off, seed=3)  # the default draws no foreign sentences
    assert not [p for p in off.pairs if p.source == "degen:foreign"]
    rng = random.Random(0)
    text = foreign_inserted(rng, "One. Two.", ["Alien sentence here."])
    assert "Alien sentence here." in text and "One." in text and "Two." in text
    assert foreign_inserted(rng, "One.", []) is None
    filler = topical_generic(random.Random(2), "My grandmother passed away and the funeral is tomorrow.", 30)
    assert any(w in filler.lower() for w in ("grandmother", "funeral", "passed")) and len(filler.split()) >= 20
    assert topical_generic(rng, "ok", 30) is None


def test_perm_redteam_cli(tiny_model_dir, tmp_path):
    records = tmp_path / "in.jsonl"
    records.write_text(
        json.dumps({"query": SEEKER, "response": REPLY})
        + "\n"
        + "not json\n"
        + json.dumps({"query": "My dog died today.", "response": "I am so sorry. What was your dog like?"})
        + "\n"
    )
    page = tmp_path / "r.html"
    cmd = [
        str(Path(sys.executable).parent / "perm"),
        "redteam",
        str(records),
        "--model",
        str(tiny_model_dir),
        "--budget",
        "20",
        "-o",
        str(page),
        "--json",
        str(tmp_path / "r.json"),
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "line 2" in done.stderr  # the bad line is reported, the others searched
    assert done.stdout.startswith("redteam: a degenerate reply scored above the original in")
    assert page.read_text().startswith("<!doctype html>")
    assert json.loads((tmp_path / "r.json").read_text())["contexts"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    strict = subprocess.run(cmd[:-5] + ["--max-hack-rate", "0", "-q"], capture_output=True, text=True, timeout=300)
    assert strict.returncode in (0, 5)
    if strict.returncode == 5:
        assert "above --max-hack-rate" in strict.stderr


def test_threshold_choice_holds_on_every_group():
    from perm_lite.training.thresholds import choose

    long_values = np.array([1.0, 1.5, 2.0, 3.0, 3.2, 3.5, 4.0, 4.2])
    long_ok = np.array([False, False, True, True, True, True, True, True])
    short_values = np.array([0.5, 0.8, 2.2, 2.5, 2.6, 2.8])
    short_ok = np.array([False, False, True, True, True, True])
    t = choose([(long_values, long_ok), (short_values, short_ok)], target_recall=0.8, max_flagged=0.2)
    assert (long_values[~long_ok] < t).all() and (short_values[~short_ok] < t).all()  # recall 1.0 in both
    assert (long_values[long_ok] < t).mean() <= 0.2 and (short_values[short_ok] < t).mean() <= 0.2
    assert t == 2.0  # the lowest threshold reaching the recall: never stricter than needed


def test_soft_tails_keep_order_beyond_the_knots():
    from perm_lite.model_dir import Calibration
    from perm_lite.training.calibrate import soft_tails

    knots = {"raw": [0.2, 0.5, 0.8], "score": [2.0, 3.0, 4.0], "method": "fit"}
    tailed = soft_tails(knots, 1.0, 5.0)
    assert tailed["tails"] == "soft" and tailed["method"] == "fit"
    assert all(b > a for a, b in zip(tailed["raw"], tailed["raw"][1:]))
    assert all(b > a for a, b in zip(tailed["score"], tailed["score"][1:]))
    cal = Calibration(tuple(tailed["raw"]), tuple(tailed["score"]))
    raw = np.array([-0.4, -0.2, 0.0, 0.2, 0.5, 0.8, 1.0, 1.2, 1.4])
    out = cal.apply(raw, 1.0, 5.0)
    assert (np.diff(out) > 0).all()
    assert out[0] > 1.0 and out[-1] < 5.0
    plain = Calibration(tuple(knots["raw"]), tuple(knots["score"])).apply(raw, 1.0, 5.0)
    assert plain[0] == plain[1] == 1.0
    np.testing.assert_allclose(out[3:6], [2.0, 3.0, 4.0])  # inside the knots: unchanged


def test_trl_reward_takes_the_repetition_term(tiny_model_dir):
    from perm_lite.integrations.trl import perm_reward

    plain = perm_reward(str(tiny_model_dir), length_coef=0)
    strict = perm_reward(str(tiny_model_dir), length_coef=0, repetition_coef=0.5)
    prompts = ["I feel sad and alone today", "I feel sad and alone today"]
    completions = ["I am so sorry. What happened today?", "I am so sorry. I am so sorry."]
    a, b = plain(prompts=prompts, completions=completions), strict(prompts=prompts, completions=completions)
    assert b[0] == pytest.approx(a[0])  # nothing repeated: no term
    assert b[1] == pytest.approx(a[1] - 0.25)  # half the reply repeats: 0.5 * 0.5


def test_perm_eval_robustness_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "robust.json"
    cmd = [
        str(Path(sys.executable).parent / "perm"),
        "eval",
        "--robustness",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "contrastive set only" in done.stderr  # no --data: says what it left out
    report = json.loads(out.read_text())["robustness"]
    assert list(report) == ["contrastive"] and report["contrastive"]["n_contexts"] == 48
    rates = report["contrastive"]["rates"]
    assert set(rates) == set(SUITE_NAMES)
    assert all(0.0 <= row[o] <= 1.0 for row in rates.values() for o in ("reception", "combined"))
    assert "| sentence_x50 | 48 |" in done.stdout
    missing = subprocess.run(cmd[:-3] + ["--data", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_soft_tails_lift_knots_pinned_at_the_floor():
    from perm_lite.model_dir import Calibration
    from perm_lite.training.calibrate import soft_tails

    pinned = {"raw": [-0.7, -0.5, -0.2, 0.2, 0.6], "score": [1.0, 1.004, 1.5, 3.0, 4.0]}
    tailed = soft_tails(pinned, 1.0, 5.0)
    assert tailed["score"][0] > 1.0 and all(b > a for a, b in zip(tailed["score"], tailed["score"][1:]))
    out = Calibration(tuple(tailed["raw"]), tuple(tailed["score"])).apply(np.array([-1.0, -0.8, -0.6, -0.4]), 1.0, 5.0)
    assert (np.diff(out) > 0).all() and out[0] > 1.0  # worse replies stay ordered, off the floor


def test_redteam_pools_limit_the_material(scorer):
    from perm_lite.errors import OptionError

    d = Dialogue(response=REPLY, query=SEEKER)
    report = redteam.run(
        scorer,
        [d, Dialogue(response="Other reply here. Totally different.", query="x")],
        budget=60,
        seed=0,
        pools=("reply",),
    )
    for r in report.results:
        for find in (r.best, r.best_degenerate):
            if find is not None:
                assert not any(e.startswith("insert") and "reply:" not in e for e in find.edits)
    assert report.pools == ("reply",)
    with pytest.raises(OptionError, match="pools"):
        redteam.run(scorer, [d], budget=10, pools=("everything",))


def test_training_modules_import_in_one_direction():
    """No two training modules import each other, at the top or inside a function."""
    import ast

    import perm_lite.training

    folder = Path(perm_lite.training.__file__).parent
    deps: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("perm_lite.training"):
                if node.module == "perm_lite.training":
                    names |= {a.name for a in node.names}
                else:
                    names.add(node.module.rsplit(".", 1)[-1])
        deps[path.stem] = names
    cycles = [(a, b) for a, ds in deps.items() for b in ds if a in deps.get(b, set())]
    assert not cycles, cycles
    assert "corpus" in deps["chatbot_data"] and "data" not in deps["chatbot_data"]


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "mint").is_dir(), reason="needs ../shared/data")
def test_perm_eval_says_what_it_scores(tiny_model_dir):
    from perm_lite.training.evaluate import run_evaluation

    messages: list[str] = []
    result = run_evaluation(str(tiny_model_dir), str(DATA), chatbot_only=True, progress=messages.append)
    assert set(result["chatbot"]) == {"perm-lite", "length"}
    assert any(m.startswith("perm-lite: scoring ") for m in messages)
    assert any(m.startswith("length: scoring ") for m in messages)
