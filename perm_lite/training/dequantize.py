"""Rebuild PyTorch weights from a shipped int8 ONNX model.

Only the int8 model is committed (size budget). Benchmarks need a PyTorch baseline with
the same weights, and CUDA users need an fp32/fp16 variant: both come from this
dequantized state dict (int8 rounding included, so it matches the int8 model's weights,
not the original fp32 checkpoint's).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_MATMUL = re.compile(r"^/encoder/(encoder/layer\.\d+/.+)/MatMul(_Q8)?$")


def _dequantize(graph_inits: dict, producer: dict, tensor: str) -> np.ndarray:
    from onnx import numpy_helper

    if tensor in graph_inits:
        return numpy_helper.to_array(graph_inits[tensor]).astype(np.float32)
    node = producer[tensor]
    if node.op_type != "DequantizeLinear":
        raise ValueError(f"weight {tensor} comes from {node.op_type}, not an initializer or DequantizeLinear")
    q = numpy_helper.to_array(graph_inits[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(graph_inits[node.input[1]]).astype(np.float32)
    zero = (
        numpy_helper.to_array(graph_inits[node.input[2]]).astype(np.float32)
        if len(node.input) > 2 and node.input[2]
        else np.zeros_like(scale)
    )
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _dequantize_nbits(graph_inits: dict, node) -> np.ndarray:
    """(N, K) weight of an 8-bit symmetric MatMulNBits node (blocks along K, zero point 128)."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits") != 8 or len(node.input) > 3 and node.input[3]:
        raise ValueError(f"{node.name}: only 8-bit MatMulNBits without zero points is supported")
    q = numpy_helper.to_array(graph_inits[node.input[1]]).astype(np.float32)  # (N, blocks, block_size)
    scale = numpy_helper.to_array(graph_inits[node.input[2]]).astype(np.float32).reshape(q.shape[0], -1)
    w = (q - 128.0) * scale[:, :, None]
    return w.reshape(q.shape[0], -1)[:, : attrs["K"]].copy()


def state_dict_from_int8(path: Path) -> dict[str, np.ndarray]:
    """PermRewardModel state dict (numpy arrays) from a perm-lite int8 ONNX file."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out: dict[str, np.ndarray] = {}
    for name in inits:  # named parameters kept by the exporter
        if name.startswith(("encoder.", "heads.")) and not name.endswith(("_int8", "_scale", "_axis")):
            out[name] = _dequantize(inits, producer, name)
    table = "encoder.embeddings.word_embeddings.weight"
    if table + "_int8" in inits:
        from onnx import numpy_helper

        q = numpy_helper.to_array(inits[table + "_int8"]).astype(np.float32)
        out[table] = q * numpy_helper.to_array(inits[table + "_scale"]).astype(np.float32)[:, None]
    for node in graph.node:
        match = _MATMUL.match(node.name)
        if not match or match.group(1).endswith("attention/self"):
            continue
        key = "encoder." + match.group(1).replace("/", ".") + ".weight"
        if node.op_type == "MatMul":
            out[key] = _dequantize(inits, producer, node.input[1]).T.copy()
        elif node.op_type == "MatMulNBits":
            out[key] = _dequantize_nbits(inits, node)
    _fused_graph_weights(inits, out)
    return out


def _fused_graph_weights(inits: dict, out: dict[str, np.ndarray]) -> None:
    """Weights of the graph `perm export --graph fused` writes (training.fast_graph):
    `<param>_int8` (in, out) s8 with `<param>_scale` per output column, Q/K/V packed as
    `...attention.self.qkv.*`. (Its blockwise FFN projections are MatMulNBits nodes named
    like the QDQ graph's, read above.)"""
    from onnx import numpy_helper

    for name in list(out):  # activation zero points, MatMulNBits blocks: not parameters
        if name.endswith(("_zero_point", "_Q8", "_scales")):
            out.pop(name)
    for name in inits:
        if not name.endswith(".weight_int8") or name.startswith("encoder.embeddings."):
            continue
        param = name[: -len("_int8")]
        q = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = numpy_helper.to_array(inits[param + "_scale"]).astype(np.float32)
        weight = (q * scale[None, :]).T.copy()  # (out, in), the PyTorch layout
        if param.endswith(".attention.self.qkv.weight"):
            module = param[: -len("qkv.weight")]
            bias = out.pop(module + "qkv.bias")
            for part, w, b in zip(("query", "key", "value"), np.split(weight, 3), np.split(bias, 3)):
                out[f"{module}{part}.weight"], out[f"{module}{part}.bias"] = w.copy(), b.copy()
        else:
            out[param] = weight


def torch_model_from_int8(model_dir: Path):
    """A `PermRewardModel` (eval mode) carrying the dequantized weights of a model directory."""
    import torch

    from perm_lite.model_dir import read_config
    from perm_lite.training.model import PermRewardModel, base_encoder_dir

    config = read_config(Path(model_dir))
    state = state_dict_from_int8(config.variant_path("int8"))
    model = PermRewardModel.from_config(base_encoder_dir())
    expected = set(model.state_dict())
    # The pooler is not used by the reward model (mean pooling), so the export drops it.
    missing = {k for k in expected - set(state) if not k.startswith("encoder.pooler.")}
    missing.discard("encoder.embeddings.position_ids")
    if missing:
        raise ValueError(f"could not rebuild {sorted(missing)[:5]} from {config.variant_path('int8')}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if k in expected}, strict=False)
    model.eval()
    return model


def write_fp32_variant(model: str, out_dir: Path) -> Path:
    """Copy a model directory and add an fp32 ONNX variant (for CUDA) rebuilt from its int8
    weights. Returns the new directory; `Scorer(out_dir, provider="cuda")` then uses fp32."""
    import shutil
    import tempfile

    import torch

    from perm_lite.model_dir import read_config, resolve_model, write_config
    from perm_lite.training.export import export_fp32, fuse, run_onnx

    source = read_config(resolve_model(model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [source.tokenizer, source.variants["int8"], "README.md"]:
        if (source.path / name).exists():
            shutil.copy(source.path / name, out_dir / name)
    net = torch_model_from_int8(source.path)
    with tempfile.TemporaryDirectory(prefix="perm-fp32-") as tmp:
        raw = export_fp32(net, Path(tmp) / "raw.onnx")
        cfg = net.encoder.config
        fused = fuse(raw, out_dir / "model.fp32.onnx", cfg.num_attention_heads, cfg.hidden_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(4, 48))
    ones, zeros = np.ones_like(ids), np.zeros_like(ids)
    with torch.no_grad():
        expected = net(torch.from_numpy(ids), torch.from_numpy(ones), torch.from_numpy(zeros)).numpy()
    from perm_lite.text import Encoding

    got = run_onnx(fused, [Encoding(row, np.zeros_like(row), {}) for row in ids], 0)
    if float(np.abs(got - expected).max()) > 1e-3:
        raise RuntimeError("the fp32 ONNX variant does not match the rebuilt PyTorch model")
    config = source.editable_fields()
    config["variants"] = {"int8": source.variants["int8"], "fp32": "model.fp32.onnx"}
    config["fp32_variant"] = "rebuilt from the int8 weights (dequantized), fused; for CUDA"
    write_config(out_dir, config)
    return out_dir
