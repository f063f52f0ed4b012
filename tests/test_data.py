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
        if e.kind == "human":
            for head, j in HEAD.items():
                if not np.isnan(e.targets[j]):
                    labelled[head].add(e.source)
    assert labelled["resonation"] == {"epitome"}
    assert labelled["expression"] == {"epitome", "condolence"}
    assert labelled["reception"] == {"condolence", "failedesconv", "esconv"}
    assert "bystander" not in labelled  # only pairs and weak negatives
    assert {p.source for p in corpus.pairs} >= {"counselchat", "weak:mismatched", "weak:generic", "weak:padded"}


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
