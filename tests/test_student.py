"""The fast tier's student (training.student): layer dropping keeps the teacher's weights,
inputs come from the training split only, and the student's checkpoint exports."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export_graph import encodings, tiny_model, torch_scores  # noqa: E402

from perm_lite.records import Dialogue  # noqa: E402


def test_shallow_copy_keeps_chosen_layers_and_heads():
    import torch

    from perm_lite.training.student import shallow_copy

    teacher = tiny_model(seed=3)
    student = shallow_copy(teacher, [1])
    assert student.encoder.config.num_hidden_layers == 1 and len(student.encoder.encoder.layer) == 1
    assert teacher.encoder.config.num_hidden_layers == 2  # the teacher is untouched
    for a, b in zip(student.encoder.encoder.layer[0].parameters(), teacher.encoder.encoder.layer[1].parameters()):
        assert torch.equal(a, b)
    assert torch.equal(student.heads.weight, teacher.heads.weight)
    encs = encodings(6, seed=1)
    assert torch_scores(student, encs).shape == (6, 4)
    # Keeping every layer is the teacher itself.
    same = shallow_copy(teacher, [0, 1])
    assert torch_scores(same, encs) == pytest.approx(torch_scores(teacher, encs), abs=1e-6)
    for bad in ([], [2], [0, 0], [-1]):
        with pytest.raises(ValueError, match="--layers"):
            shallow_copy(teacher, bad)


def test_choose_inputs_training_split_only_and_pairs_whole():
    from perm_lite.training.corpus import Corpus, Example, Pair, _targets
    from perm_lite.training.student import choose_inputs

    corpus = Corpus()
    for k in range(60):
        split = ("train", "val", "test")[k % 3]
        corpus.add(Example(Dialogue(response=f"r{k}", query="q"), _targets(reception=0.5), "mint", f"g{k}", split))
    for k in range(0, 57, 3):
        corpus.pairs.append(Pair(k, k + 3, (0, 1, 2, 3), "mint"))  # train > train
        corpus.pairs.append(Pair(k + 1, k + 4, (0, 1, 2, 3), "mint"))  # val > val: never used
    items, pairs = choose_inputs(corpus, 15, seed=0)
    assert all(corpus.examples[i].split == "train" for i in items)
    assert len(items) == len(set(items)) <= 15
    assert pairs and all(a in items and b in items for a, b in pairs)


def test_choose_inputs_follows_the_teachers_family_shares():
    """A small source drawn with its configured share, not its (tiny) share of the corpus."""
    from perm_lite.training.corpus import Corpus, Example, Pair, _targets
    from perm_lite.training.student import choose_inputs

    corpus = Corpus()
    for k in range(400):
        source = "epitome" if k >= 200 and k % 10 == 5 else "mint"  # 5% of the examples, in no pair
        corpus.add(Example(Dialogue(response=f"r{k}", query="q"), _targets(reception=0.5), source, f"g{k}", "train"))
    for k in range(0, 200, 2):
        corpus.pairs.append(Pair(k, k + 1, (0, 1, 2, 3), "counselchat" if k % 40 == 0 else "degen:x"))
    small = {i for i, e in enumerate(corpus.examples) if e.source == "epitome"}
    uniform, _ = choose_inputs(corpus, 60, seed=1)
    items, pairs = choose_inputs(corpus, 60, 1, {"counselchat": 0.5}, {"epitome": 0.5})
    counsel = sum(corpus.pairs[a // 2].source == "counselchat" for a, _ in pairs)
    assert len(pairs) == 20 and counsel >= 4  # 5 of 100 pairs, half of the draws: nearly all drawn
    singles = items[2 * len(pairs) :]
    assert len(set(singles) & small) >= 0.3 * len(singles) > len(set(uniform[-len(singles) :]) & small)


def test_write_checkpoint_replaces_the_previous_one_whole(tmp_path):
    """The checkpoint writer train.py and the student share: weights, optimizer, step."""
    import json

    import torch
    from safetensors.torch import load_file

    from perm_lite.training.train import write_checkpoint

    model = tiny_model(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = tmp_path / "checkpoint"
    write_checkpoint(model, optimizer, 10, ckpt)
    (ckpt / "stale.txt").write_text("from an older run")
    write_checkpoint(model, optimizer, 20, ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "state.json"]
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 20}
    assert not (tmp_path / "checkpoint.tmp").exists()
    saved = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(saved["heads.weight"], model.heads.weight)


def test_student_corpus_follows_the_teachers_sources_and_negatives(tmp_path):
    """A student sees what its teacher trained on: the hand-written pairs when the teacher
    named them, and the teacher's hard-negative mix; an explicit 0 is kept, not defaulted."""
    import json

    from perm_lite.training.train import TrainConfig

    teacher = {
        "sources": ["mint", "written"],
        "topical_negatives": 0.0,
        "degenerate_weights": {"repeat_in_place": 4},
        "pair_shares": {"written": 0.06},
    }
    (tmp_path / "train_config.json").write_text(json.dumps(teacher))
    assert TrainConfig.from_file(tmp_path / "train_config.json").corpus_options() == {
        "sources": ("mint", "written"),
        "foreign_negatives": 0.0,
        "topical_negatives": 0.0,
        "degenerate_weights": {"repeat_in_place": 4},
    }
    assert "sources" not in TrainConfig(sources=()).corpus_options()  # empty: the default sources
