"""The compute floor: FLOP counts, the GEMM probes' arithmetic, and the operator profile."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from perm_lite import Scorer
from perm_lite.floor import Shape, _probe_graph, floor_table, gemm_rate, model_shape, profile_ops

pytest.importorskip("onnx")

MINILM = Shape(layers=6, hidden=384, intermediate=1536)


def test_flops_per_record_match_hand_count():
    f = MINILM.flops(128)
    # per layer: 2 x 128 x (4 x 384^2 + 2 x 384 x 1536) linear, 2 x 2 x 128^2 x 384 attention
    assert f["linear"] == 6 * 2 * 128 * (4 * 384 * 384 + 2 * 384 * 1536) == 2_717_908_992
    assert f["attention"] == 6 * 4 * 128 * 128 * 384
    assert round(f["total"] / 1e9, 2) == 2.87  # the figure RUNTIME-NOTES gives for 128 tokens


def test_floor_charges_linear_at_int8_and_attention_at_fp32():
    (row,) = floor_table(MINILM, [128], 32, int8_rate=600.0, fp32_rate=150.0)
    f = MINILM.flops(128)
    expected = 1 / (f["linear"] / 600e9 + f["attention"] / 150e9)
    assert row["floor_records_per_second"] == round(expected, 1)
    assert row["attention_share"] == round(f["attention"] / f["total"], 3)


def test_shape_is_read_off_the_shipped_graph():
    model = Scorer(provider="cpu").config.path / "model.int8.onnx"
    assert model_shape(model) == MINILM


@pytest.mark.parametrize("int8", [True, False])
def test_gemm_probe_computes_the_product_it_times(tmp_path: Path, int8: bool):
    _probe_graph(tmp_path / "p.onnx", 16, 32, 8, int8)
    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    if int8:
        xq = np.clip(np.round(x / 0.05) + 128, 0, 255)
        expected = ((xq - 128) * 0.05) @ (inits["w_q"].astype(np.float32) * 0.01)
    else:
        expected = x @ inits["w"]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)
    assert gemm_rate(16, 32, 8, int8, seconds=0.03) > 0


def test_profile_shares_sum_to_one_and_name_the_int8_kernels():
    model = Scorer(provider="cpu").config.path / "model.int8.onnx"
    shares = profile_ops(model, batch_size=2, tokens=16, runs=2)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert "MatMulIntegerToFloat" in shares  # static int8 linear layers, fp32 outputs
