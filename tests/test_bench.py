"""The benchmark harness's mechanics (speed itself is never asserted)."""

from perm_lite import Scorer
from perm_lite.bench import fixed_length_dialogues, measure, scorer_runner, to_markdown


def test_fixed_length_records_have_exact_token_counts():
    scorer = Scorer(provider="cpu")
    for n in (128, 256):
        assert {len(e) for e in scorer.encode(fixed_length_dialogues(3, n))} == {n}


def test_measure_reports_every_backend_and_batch(tiny_model_dir):
    scorer = Scorer(tiny_model_dir, provider="cpu")
    backends = {"a": scorer_runner(scorer), "b": scorer_runner(scorer)}
    table = measure(backends, {"fixed": fixed_length_dialogues(10, 20)}, [1, 4], repeats=2)
    assert [(r["backend"], r["batch_size"]) for r in table] == [("a", 1), ("b", 1), ("a", 4), ("b", 4)]
    for row in table:
        assert row["records_per_second"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
        assert row["vs_pytorch_eager"] is None  # no PyTorch row in this run
    assert to_markdown(table).count("\n") == 2 + len(table)
    assert scorer.batch_size == 32  # measured per call: the scorer itself is not reconfigured
