"""The compute floor: FLOPs per record, this machine's GEMM rates, and where time goes.

FLOPs are counted from the model's own graph (layer count and widths read off the ONNX
weights); GEMM rates are measured with onnxruntime on the same kernels the shipped model
uses (static int8: u8 activations x s8 weights with fp32 output; fp32 MatMul). Needs the
`onnx` package (test or train extra) to build the two one-node probe graphs.
"""

from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from perm_lite.session import available_cores


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int

    def flops(self, tokens: int) -> dict[str, float]:
        """Multiply-adds x 2 for one record of `tokens` tokens, split by kind."""
        linear = self.layers * 2 * tokens * (4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate)
        attention = self.layers * 2 * 2 * tokens * tokens * self.hidden  # QK^T and AV
        return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def model_shape(onnx_path: Path) -> Shape:
    """Layer count and widths of a BERT-style encoder, read off its weights."""
    import onnx

    model = onnx.load(str(onnx_path))
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    ffn_in = [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "MatMulIntegerToFloat", "MatMulNBits") and "/intermediate/dense/" in n.name
    ]
    if not ffn_in:
        raise ValueError(f"{onnx_path}: no '/intermediate/dense/' MatMul; not a BERT-style export")
    weight = next(w for w in ffn_in[0].input[1:] + _dq_sources(model, ffn_in[0].input[1]) if w in shapes)
    hidden, intermediate = shapes[weight]
    return Shape(layers=len(ffn_in), hidden=int(hidden), intermediate=int(intermediate))


def _dq_sources(model, tensor: str) -> list[str]:
    """Inputs of the node that produces `tensor` (a weight behind DequantizeLinear)."""
    for node in model.graph.node:
        if tensor in node.output:
            return list(node.input)
    return []


def _probe_graph(path: Path, m: int, k: int, n: int, int8: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = []
    if int8:
        inits += [
            numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w_q"),
            numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=1),
            helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
        ]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "gemm_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def gemm_rate(m: int, k: int, n: int, int8: bool, threads: int | None = None, seconds: float = 1.0) -> float:
    """Measured GFLOP/s (2 x multiply-adds per second) of one M x K by K x N product."""
    with tempfile.TemporaryDirectory(prefix="perm-gemm-") as tmp:
        path = Path(tmp) / "probe.onnx"
        _probe_graph(path, m, k, n, int8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    session.run(None, {"x": x})
    rates = []
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            session.run(None, {"x": x})
            count += 1
        rates.append(2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def floor_table(shape: Shape, lengths: list[int], batch_size: int, int8_rate: float, fp32_rate: float) -> list[dict]:
    """Records/s the measured GEMM rates allow: int8 linear layers, fp32 attention products."""
    rows = []
    for tokens in lengths:
        f = shape.flops(tokens)
        seconds = f["linear"] / (int8_rate * 1e9) + f["attention"] / (fp32_rate * 1e9)
        rows.append(
            {
                "tokens": tokens,
                "batch_size": batch_size,
                "gflop_per_record": round(f["total"] / 1e9, 3),
                "attention_share": round(f["attention"] / f["total"], 3),
                "floor_records_per_second": round(1 / seconds, 1),
            }
        )
    return rows


def profile_ops(model_path: Path, batch_size: int, tokens: int, runs: int = 5, threads: int | None = None) -> dict:
    """Share of onnxruntime kernel time per operator type at one fixed batch shape."""
    with tempfile.TemporaryDirectory(prefix="perm-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {}
        for i in session.get_inputs():
            if "mask" in i.name:
                feed[i.name] = np.ones((batch_size, tokens), np.int64)
            elif "type" in i.name:
                feed[i.name] = np.zeros((batch_size, tokens), np.int64)
            else:
                feed[i.name] = rng.integers(1000, 20000, (batch_size, tokens), dtype=np.int64)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: round(us / total, 4) for op, us in per_op.most_common()}
