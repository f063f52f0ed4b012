"""The hand-written contrast sets: well-formed, kept apart from the test set, and turned into
the documented pairs; the validation rates follow the scores."""

import json

import numpy as np
import pytest

from perm_lite.training import written
from perm_lite.training.chatbot_eval import OUTPUTS, load_contrastive


def _seeker_text(item: dict) -> str:
    return " ".join(m["content"] for m in item["messages"] if m["role"] == "user").strip().lower()


@pytest.mark.parametrize("split", ["train", "val"])
def test_records_are_well_formed(split):
    items = written.load_written(split)
    assert len(items) >= 30
    for item in items:
        roles = [m["role"] for m in item["messages"]]
        assert roles[0] == roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert set(item["replies"]) == set(written.KINDS)
        assert len(item["replies"]["warm_short"].split()) < 40
    assert len({i["id"] for i in items}) == len(items)


def test_splits_and_the_test_set_share_no_conversation():
    train = {_seeker_text(i) for i in written.load_written("train")}
    val = {_seeker_text(i) for i in written.load_written("val")}
    test = {_seeker_text(i) for i in load_contrastive()}
    assert not train & val and not train & test and not val & test
    test_replies = {r for i in load_contrastive() for r in i["replies"].values()}
    assert not test_replies & {r for i in written.load_written("train") for r in i["replies"].values()}


def test_training_pairs_follow_the_ranks():
    from perm_lite.training.corpus import Corpus

    corpus = Corpus()
    n = written.add_written(corpus, "train", degenerate=0)
    items = written.load_written("train")
    assert n == len(corpus.pairs) == 16 * len(items) and len(corpus.examples) == 7 * len(items)
    rank = {k: 0 for k in written.WARM} | {k: 1 for k in written.GENERIC} | {k: 2 for k in written.BAD}
    for p in corpus.pairs:
        better, worse = corpus.examples[p.better], corpus.examples[p.worse]
        assert better.group == worse.group and better.split == "train" and p.heads == (0, 1, 2, 3)
        assert rank[better.kind.split(":")[1]] < rank[worse.kind.split(":")[1]]
        assert np.isnan(better.targets).all()  # pairs only: no regression targets
    assert {"written:warm_short>generic", "written_floor:generic>offtopic"} <= {p.source for p in corpus.pairs}
    assert not {p.source for p in corpus.pairs if p.source.startswith("written:generic")}


def test_degenerate_rewrites_of_warm_replies_must_lose():
    from perm_lite.training.corpus import Corpus

    corpus = Corpus()
    n = written.add_written(corpus, "train", degenerate=2, seed=5)
    items = written.load_written("train")
    degen = [p for p in corpus.pairs if p.source.startswith("degen_written:")]
    assert len(degen) == n - 16 * len(items) >= len(items)  # nearly two a context (a rewrite can fail)
    for p in degen:
        better, worse = corpus.examples[p.better], corpus.examples[p.worse]
        assert better.kind in ("written:warm", "written:warm_short", "written:warm_plain")
        assert worse.group == better.group and worse.dialogue.response != better.dialogue.response
        assert worse.dialogue.history == better.dialogue.history  # same conversation
    again = Corpus()
    written.add_written(again, "train", degenerate=2, seed=5)
    assert [e.dialogue.response for e in again.examples] == [e.dialogue.response for e in corpus.examples]


def test_rates_follow_the_scores():
    items = written.load_written("val")[:5]
    rank = np.array([3, 3, 3, 2, 2, 1, 1], dtype=float)
    right = np.tile(np.repeat(rank[:, None], len(OUTPUTS), axis=1), (len(items), 1))
    report = written.written_eval(items, right)
    assert report["n_contexts"] == 5
    assert report["rates"]["combined"]["mean"] == 1.0 and report["rates"]["bystander"]["warm>generic"] == 1.0
    wrong = written.written_eval(items, -right)["rates"]["combined"]
    assert wrong["mean"] == 0.0 and wrong["generic>bad"] == 0.0
    tied = written.written_eval(items, np.zeros_like(right))["rates"]["combined"]
    assert tied["warm>generic"] == 0.0  # a tie is not a win


def test_a_broken_record_names_its_file_and_line(tmp_path):
    good = written.load_written("val")[0]
    bad = json.loads(json.dumps(good))
    del bad["replies"]["offtopic"]
    (tmp_path / "val.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"written/val.jsonl line 2: replies \['offtopic'\]"):
        written.load_written("val", tmp_path)
    (tmp_path / "val.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        written.load_written("val", tmp_path)


def test_selection_counts_the_written_validation():
    from perm_lite.training.select import selection_score

    base = {
        "robust_worst": 0.2,
        "mint_combined": 0.85,
        "mint_length_matched": 0.75,
        "ieval_combined": 0.74,
        "counselchat": 0.8,
        "epitome_resonation": 0.4,
        "ladder_real>generic": 0.9,
    }
    without = selection_score(base)  # older selection files have no written figures
    better = selection_score(base | {"written_warm>generic": 0.9, "written_generic>bad": 0.8})
    worse = selection_score(base | {"written_warm>generic": 0.4, "written_generic>bad": 0.8})
    assert better - worse == pytest.approx(0.5) and better - without == pytest.approx(1.7)
