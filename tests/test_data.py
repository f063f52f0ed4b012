"""The training data pipeline against ../shared/data (skipped where the data is absent)."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")


@pytest.fixture(scope="module")
def corpus():
    from perm_lite.training.data import build_corpus

    return build_corpus(DATA, seed=13)


def test_contexts_never_span_two_splits(corpus):
    splits = defaultdict(set)
    for e in corpus.examples:
        splits[e.group].add(e.split)
    assert all(len(s) == 1 for s in splits.values())


def test_pairs_stay_inside_one_context(corpus):
    for p in corpus.pairs:
        assert corpus.examples[p.better].group == corpus.examples[p.worse].group


def test_heads_supervised_by_the_documented_sources(corpus):
    from perm_lite.training.data import HEAD

    labelled = defaultdict(set)
    for e in corpus.examples:
        if e.kind in ("human", "chatbot"):
            for head, j in HEAD.items():
                if not np.isnan(e.targets[j]):
                    labelled[head].add(e.source)
    assert labelled["resonation"] == {"epitome", "mint", "ieval"}
    assert labelled["expression"] == {"epitome", "condolence", "mint", "ieval"}
    assert labelled["reception"] == {"condolence", "failedesconv", "esconv", "mint", "ieval"}
    assert labelled["bystander"] == {"ieval"}  # elsewhere only pairs and weak negatives
    assert {p.source for p in corpus.pairs} >= {
        "counselchat",
        "mint",
        "ieval",
        "weak:mismatched",
        "weak:generic",
        "weak:padded",
        "cf:padded",
        "cf:dismissive_inserted",
        "cf:offtopic",
        "cf:removed:interpretations",
        "cf:removed:emotional-reactions",
        "generic:real>topical_generic",
    }
    assert not any(p.source.startswith(("written", "degen_written")) for p in corpus.pairs)  # opt-in


def test_chatbot_sources_split_by_conversation_and_person(corpus):
    by_conversation, by_person = defaultdict(set), defaultdict(set)
    for e in corpus.examples:
        if e.source == "mint" and e.kind in ("human", "chatbot"):
            by_conversation[e.meta["conversation"]].add(e.split)
        if e.source == "ieval" and e.kind == "chatbot":
            by_person[e.meta["person"]].add(e.split)
    assert len(by_conversation) == 35 and all(len(s) == 1 for s in by_conversation.values())
    assert len(by_person) == 240 and all(len(s) == 1 for s in by_person.values())
    assert {s for v in by_conversation.values() for s in v} == {"train", "val", "test"}


def test_mint_pairs_follow_the_judge(corpus):
    from perm_lite.training.chatbot_data import mint_head_scores
    from perm_lite.training.data import PERSPECTIVES

    mint = [p for p in corpus.pairs if p.source == "mint"]
    assert len(mint) > 50_000
    for p in mint[:: len(mint) // 500]:
        head = PERSPECTIVES[p.heads[0]]
        better = mint_head_scores(corpus.examples[p.better].meta["labels"])[head]
        worse = mint_head_scores(corpus.examples[p.worse].meta["labels"])[head]
        assert better - worse >= 0.5


def test_a_left_out_source_is_absent_everywhere():
    from perm_lite.training.data import SOURCES, build_corpus

    corpus = build_corpus(DATA, seed=13, sources=[s for s in SOURCES if s != "ieval"])
    assert not any(e.source == "ieval" for e in corpus.examples)
    assert {"written:warm_short>generic", "written_floor:generic>offtopic"} <= {p.source for p in corpus.pairs}
    assert not any(p.source == "ieval" for p in corpus.pairs)
    with pytest.raises(ValueError, match="unknown training sources"):
        build_corpus(DATA, sources=["mint", "reddit"])


def test_targets_are_normalised(corpus):
    t = np.stack([e.targets for e in corpus.examples])
    assert np.nanmin(t) >= 0.0 and np.nanmax(t) <= 1.0


def test_published_splits_are_used(corpus):
    condolence = defaultdict(int)
    for e in corpus.examples:
        if e.source == "condolence" and e.kind == "human":
            condolence[e.split] += 1
    # Published 801/102/101, less the val/test copies of posts already in an earlier split.
    assert condolence == {"train": 801, "val": 88, "test": 95}


def test_build_is_deterministic(corpus):
    from perm_lite.training.data import build_corpus

    again = build_corpus(DATA, seed=13)
    assert [e.dialogue for e in again.examples[-50:]] == [e.dialogue for e in corpus.examples[-50:]]
    assert len(again.pairs) == len(corpus.pairs)
