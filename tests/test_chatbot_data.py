"""mint / iEval loaders, counterfactual pairs, sampling shares and the chatbot evaluation,
on small files written by the tests (no shared data needed)."""

import json
import random

import numpy as np
import pytest

from perm_lite.training import chatbot_data, chatbot_eval, counterfactual
from perm_lite.training.data import HEAD, Corpus, family

LABELS = chatbot_data.MINT_QUESTIONS[:-1]  # the six questions, without the aggregate


def _mint_row(conv, turn, variant, response, agg, understanding=3, validating=3, dismissing=1):
    labels = dict.fromkeys(LABELS, 1.0)
    labels.update(
        demonstrating_understanding=understanding,
        validating_emotions=validating,
        dismissing_emotions=dismissing,
        aggregated_empathy=agg,
    )
    return {
        "variant": variant,
        "conversation_id": conv,
        "turn_index": turn,
        "messages": [
            {"role": "user", "content": "My boss yelled at me in front of everyone."},
            {"role": "assistant", "content": "That sounds humiliating."},
            {"role": "user", "content": "It was. I keep replaying it."},
        ],
        "response": response,
        "labels": labels,
    }


@pytest.fixture()
def mint_dir(tmp_path):
    rows = [
        _mint_row("c1", 3, "a_Qwen3-1.7B", "Being yelled at in public is humiliating.", 4.5, understanding=5),
        _mint_row("c1", 3, "a_Qwen3-4B", "ok", 2.0, understanding=1, validating=1, dismissing=4),
        _mint_row("c1", 3, "gold", "Replaying it makes sense.", 4.3, understanding=4),
        _mint_row("c2", 1, "a_Qwen3-4B", "Tell me more.", 3.0),
    ]
    folder = tmp_path / "mint"
    folder.mkdir()
    (folder / "mint_judged_replies.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _ieval_bot(log, eu, er, a=3, s=3):
    return {"chat_log": log, "EU": eu, "ER": er, "A": a, "S": s, "P": 3, "L": 3, "R": 3, "Rating": 1}


@pytest.fixture()
def ieval_dir(tmp_path):
    log_good = (
        "- I passed my exam!\n- that ' s great ! how do you feel ?\n- relieved\n- you worked hard\n- yes\n- well done"
    )
    log_bad = "- I passed my exam!\n- what is your name ?\n- why\n- i like cats\n- ok\n- cats are nice"
    task = {
        "part": 7,
        "positive": {
            "prompt": "I passed an exam",
            "Pink": _ieval_bot(log_good, 5, 5, 5, 5),
            "Green": _ieval_bot(log_bad, 1, 2, 2, 1),
        },
        "negative": {},
    }
    folder = tmp_path / "ieval"
    folder.mkdir()
    (folder / "ieval_data.json").write_text(json.dumps([task]))
    return folder


def test_grouped_split_is_deterministic_and_covers_all_splits():
    splits = [chatbot_data.grouped_split(f"mint:{i}") for i in range(400)]
    assert splits == [chatbot_data.grouped_split(f"mint:{i}") for i in range(400)]
    share = {s: splits.count(s) / 400 for s in ("train", "val", "test")}
    assert 0.6 < share["train"] < 0.8 and 0.05 < share["val"] < 0.16 and 0.13 < share["test"] < 0.28


def test_mint_head_mapping():
    labels = dict(demonstrating_understanding=4, validating_emotions=5, dismissing_emotions=2, aggregated_empathy=3.5)
    assert chatbot_data.mint_head_scores(labels) == {"resonation": 4.0, "expression": 4.5, "reception": 3.5}


def test_mint_loader_targets_pairs_and_split(mint_dir):
    corpus = Corpus()
    chatbot_data.add_mint(corpus, mint_dir)
    assert len(corpus.examples) == 4
    first = corpus.examples[0]
    assert first.dialogue.query == "It was. I keep replaying it."
    assert [t.role for t in first.dialogue.history] == ["seeker", "supporter"]
    assert first.targets[HEAD["reception"]] == pytest.approx((4.5 - 1) / 4)
    assert np.isnan(first.targets[HEAD["bystander"]])
    assert corpus.examples[2].kind == "human" and first.kind == "chatbot"
    # one conversation, one split
    assert len({e.split for e in corpus.examples[:3]}) == 1
    reception = [(p.better, p.worse) for p in corpus.pairs if p.heads == (HEAD["reception"],)]
    # 4.5 vs 2.0 and 4.3 vs 2.0 differ by >= 0.5; 4.5 vs 4.3 does not; c2 is alone
    assert sorted(reception) == [(0, 1), (2, 1)]
    assert all(p.source == "mint" for p in corpus.pairs)


def test_ieval_loader_detokenizes_and_pairs_same_turns(ieval_dir):
    rows = chatbot_data.read_ieval(ieval_dir)
    assert len(rows) == 2
    dialogues = chatbot_data.ieval_dialogues(rows[0])
    assert [d.response for d in dialogues] == ["that's great! how do you feel?", "you worked hard", "well done"]
    assert dialogues[1].query == "relieved" and len(dialogues[1].history) == 2
    assert rows[0]["ratings"] == {"resonation": 5.0, "expression": 5.0, "reception": 5.0, "bystander": 5.0}
    corpus = Corpus()
    chatbot_data.add_ieval(corpus, ieval_dir)
    assert len(corpus.examples) == 6
    # Pink (indices 0-2) beats Green (3-5) turn by turn on every head whose ratings differ by >= 1
    assert {(p.better, p.worse) for p in corpus.pairs} == {(0, 3), (1, 4), (2, 5)}
    assert {p.heads[0] for p in corpus.pairs} == set(range(4))
    assert all(e.weight == 0.3 for e in corpus.examples)


def test_detokenize():
    text = "i ' m sorry , that ' s sad . do n't worry !"
    assert chatbot_data.detokenize(text) == "i'm sorry, that's sad. don't worry!"


def test_remove_spans_and_insertions():
    reply = "I am so sorry you lost him. Have you talked to anyone about it?"
    assert counterfactual.remove_spans(reply, ["I am so sorry you lost him.", ""]) == (
        "Have you talked to anyone about it?"
    )
    assert counterfactual.remove_spans(reply, ["not in the reply"]) is None
    assert counterfactual.remove_spans(reply, [reply]) is None  # nothing left
    rng = random.Random(0)
    inserted = counterfactual.insert_sentence(rng, reply, counterfactual.DISMISSIVE)
    assert any(s in inserted for s in counterfactual.DISMISSIVE) and len(inserted) > len(reply)
    padded = counterfactual.pad(rng, reply)
    assert padded.startswith(reply) and len(padded.split()) >= 2 * len(reply.split())


def test_family_shares():
    pytest.importorskip("torch")  # train.py needs the train extra
    from perm_lite.training.train import family_shares

    families = ["mint"] * 8 + ["cf"] * 2
    p = family_shares(families, {"cf": 0.5})
    assert p[:8].sum() == pytest.approx(0.5) and p[8:].sum() == pytest.approx(0.5)
    assert family_shares(families, None) is None
    off = family_shares(families + ["degen"] * 5, {"cf": 0.5, "degen": 0})  # named 0: never drawn
    assert off[10:].sum() == 0 and off[:8].sum() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="share of 0"):
        family_shares(families, {"cf": 0, "mint": 0})
    assert family("weak:generic") == "weak" and family("mint") == "mint"


def test_mint_eval_perfect_and_length_predictors(mint_dir):
    rows = chatbot_data.read_mint(mint_dir)
    perfect = np.array([[r["labels"]["aggregated_empathy"]] * 5 for r in rows])
    report = chatbot_eval.mint_eval(rows, perfect)
    assert report["aggregated"]["all"]["combined"] == {"accuracy": 1.0, "n": 2}
    assert report["aggregated"]["same_method_two_sizes"]["combined"]["n"] == 1
    constant = np.ones((len(rows), 5))
    assert chatbot_eval.mint_eval(rows, constant)["aggregated"]["all"]["reception"]["accuracy"] == 0.5
    length = chatbot_eval.length_predictor([r["dialogue"] for r in rows])
    # "ok" (1 word) loses to both longer replies: length orders both pairs right
    assert chatbot_eval.mint_eval(rows, length)["aggregated"]["all"]["combined"]["accuracy"] == 1.0


def test_ieval_eval_bot_level(ieval_dir):
    rows = chatbot_data.read_ieval(ieval_dir)
    good_first = [np.full((3, 5), 2.0), np.full((3, 5), 1.0)]
    report = chatbot_eval.ieval_eval(rows, good_first)
    assert report["pairs"]["reception"]["combined"] == {"accuracy": 1.0, "n": 1}
    report = chatbot_eval.ieval_eval(rows, good_first[::-1])
    assert report["pairs"]["reception"]["combined"]["accuracy"] == 0.0


def test_contrastive_set_is_complete_and_scored():
    items = chatbot_eval.load_contrastive()
    assert len(items) >= 40
    assert len({i["id"] for i in items}) == len(items)
    for item in items:
        assert set(item["replies"]) == set(chatbot_eval.CONTRASTIVE_KINDS)
        assert item["messages"][-1]["role"] == "user"
        assert len(item["replies"]["padded"].split()) > len(item["replies"]["warm"].split())
    # a predictor that knows the intended order passes every check
    rank = {"warm": 5, "padded": 4, "generic": 3, "offtopic": 2, "dismissive": 1}
    pred = np.array([[rank[k]] * 5 for _ in items for k in chatbot_eval.CONTRASTIVE_KINDS], dtype=float)
    rates = chatbot_eval.contrastive_eval(items, pred)["rates"]["combined"]
    assert set(rates.values()) == {1.0}
    # the length baseline ranks padding first
    length = chatbot_eval.length_predictor([d for i in items for d in chatbot_eval.contrastive_dialogues(i)])
    assert chatbot_eval.contrastive_eval(items, length)["rates"]["combined"]["warm>padded"] == 0.0


def test_behaviour_ladder_pairs_and_generators(mint_dir):
    from perm_lite.training import weak

    rng = random.Random(3)
    texts = {weak.rich_dismissive_reply(rng) for _ in range(50)}
    assert len(texts) > 30  # compositional, not a handful of strings
    assert all(4 <= len(t.split()) <= 60 for t in texts)
    chatter = {weak.offtopic_chatter(rng) for _ in range(50)}
    assert len(chatter) > 20 and all(t[0].isupper() for t in chatter)

    corpus = Corpus()
    chatbot_data.add_mint(corpus, mint_dir)
    before = len(corpus.pairs)
    counterfactual.behaviour_ladder(corpus, 0, rng)  # a reply the judge rated 4.5
    new = corpus.pairs[before:]
    kinds = {p.source: (corpus.examples[p.better].kind, corpus.examples[p.worse].kind) for p in new}
    assert kinds == {
        "cf:ladder_real>generic": ("chatbot", "ladder:generic"),
        "cf:ladder_real>dismissive": ("chatbot", "ladder:dismissive"),
        "cf:ladder_real>offtopic": ("chatbot", "ladder:offtopic"),
        "cf:ladder_generic>dismissive": ("ladder:generic", "ladder:dismissive"),
        "cf:ladder_generic>offtopic": ("ladder:generic", "ladder:offtopic"),
    }
    assert all(p.heads == (0, 1, 2, 3) for p in new)
    assert all(corpus.examples[p.worse].dialogue.query == corpus.examples[0].dialogue.query for p in new)
    # a reply rated at the bottom does not beat polite filler
    low = Corpus()
    chatbot_data.add_mint(low, mint_dir)
    low.examples[0].targets[:] = 0.0
    counterfactual.behaviour_ladder(low, 0, rng)
    assert "cf:ladder_real>generic" not in {p.source for p in low.pairs}
