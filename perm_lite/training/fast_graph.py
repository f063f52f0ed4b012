"""The int8 graph written for speed: contrib operators emitted directly, no QDQ left to the optimizer.

`perm export` (graph "fused", the default) writes this graph from the PyTorch weights of a
BERT-style `PermRewardModel`:

- every weight matrix is one `MatMulIntegerToFloat` (u8 activations x per-channel s8
  weights -> fp32) with its bias as the operator's own input: no standalone bias Add;
- Q, K and V are one packed int8 projection inside onnxruntime's `QAttention` (the mask,
  scaling, softmax and the attention products in one kernel), or, with attention
  "unfused", three `MatMulIntegerToFloat` and the attention written out in fp32 ops;
- residual + LayerNorm is `SkipLayerNormalization`, GELU is the contrib `Gelu`
  (or `BiasGelu` with the bias taken out of the integer MatMul, option `gelu="bias"`);
- activation scales are constants calibrated on training records one at a time (min/max
  of the real tokens only), so a record's score does not depend on its batch neighbours;
- FFN output projections of `blockwise_layers` run as blockwise 8-bit `MatMulNBits`
  (per-row int8 activations at run time) instead, for layers whose GELU tail is too long
  for one u8 scale; none by default;
- the word-embedding table is int8 with one scale per row (as the QDQ export stores it).

Initializers carry the PyTorch parameter names (`<param>_int8` + `<param>_scale` for int8
weights, Q/K/V packed as `...attention.self.qkv.*`) so `training.dequantize` can rebuild
the PyTorch weights from the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ATTENTION_KINDS = ("qattention", "unfused")
GELU_KINDS = ("fold", "bias")
LAYERNORM_KINDS = ("plain", "skip")
MS = "com.microsoft"
LAYER_PREFIX = "encoder.encoder.layer."


@dataclass(frozen=True)
class GraphOptions:
    """What the fast graph is made of (each choice measured, see benchmarks/NOTES.md)."""

    attention: str = "qattention"
    gelu: str = "fold"
    layernorm: str = "plain"
    blockwise_layers: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {self.attention!r}")
        if self.gelu not in GELU_KINDS:
            raise ValueError(f"gelu must be one of {GELU_KINDS}, not {self.gelu!r}")
        if self.layernorm not in LAYERNORM_KINDS:
            raise ValueError(f"layernorm must be one of {LAYERNORM_KINDS}, not {self.layernorm!r}")


# ---------------------------------------------------------------- calibration


def activation_ranges(model, encodings: Sequence, pad_id: int) -> dict[str, tuple[float, float]]:
    """Min and max of the input of every encoder Linear layer over the calibration records,
    each record run alone (no padding enters a range). Keys: the Linear's module name."""
    import torch

    from perm_lite.text import pad_batch

    ranges: dict[str, list[float]] = {}
    hooks = []

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            low, high = float(x.min()), float(x.max())
            seen = ranges.setdefault(name, [low, high])
            seen[0], seen[1] = min(seen[0], low), max(seen[1], high)

        return record

    for name, module in model.encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layer." in f".{name}":
            hooks.append(module.register_forward_pre_hook(hook("encoder." + name)))
    try:
        with torch.inference_mode():
            for e in encodings:
                feed = pad_batch([e], pad_id)
                model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    finally:
        for h in hooks:
            h.remove()
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def activation_qparams(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """u8 asymmetric scale and zero point covering [low, high] and 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-8)
    zero = int(np.clip(round(-low / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def weight_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) fp32 PyTorch weight -> (in, out) s8 matrix and per-output-column scales
    (symmetric, [-127, 127])."""
    b = np.asarray(weight, dtype=np.float32).T
    scale = np.maximum(np.abs(b).max(axis=0), 1e-8) / 127.0
    q = np.clip(np.round(b / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


# ---------------------------------------------------------------- the graph


class _Builder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()

    def init(self, name: str, array) -> str:
        from onnx import numpy_helper

        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        outs = [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]


def build_graph(
    params: dict[str, np.ndarray],
    config,
    ranges: dict[str, tuple[float, float]],
    options: GraphOptions = GraphOptions(),
):
    """The int8 `onnx.ModelProto` (inputs input_ids, attention_mask, token_type_ids; output
    scores) of a PermRewardModel's parameters (numpy, PyTorch names) and BERT config."""
    import onnx
    from onnx import TensorProto, helper

    g = _Builder()
    hidden, n_heads = config.hidden_size, config.num_attention_heads
    eps = float(config.layer_norm_eps)
    head_size = hidden // n_heads
    # ---- embeddings: int8 word table (row scales) + token type + positions, LayerNorm
    table = np.asarray(params["encoder.embeddings.word_embeddings.weight"], dtype=np.float32)
    row_scale = np.maximum(np.abs(table).max(axis=1), 1e-8) / 127.0
    base = "encoder.embeddings.word_embeddings.weight"
    g.init(base + "_int8", np.clip(np.round(table / row_scale[:, None]), -127, 127).astype(np.int8))
    g.init(base + "_scale", row_scale.astype(np.float32))
    g.init(base + "_axis", np.array([-1], dtype=np.int64))
    word_q = g.one("Gather", [base + "_int8", "input_ids"], "/encoder/embeddings/word_embeddings/Gather")
    word_f = g.one("Cast", [word_q], "/encoder/embeddings/word_embeddings/Cast", to=TensorProto.FLOAT)
    word_s = g.one("Gather", [base + "_scale", "input_ids"], "/encoder/embeddings/word_embeddings/GatherScale")
    word_s = g.one("Unsqueeze", [word_s, base + "_axis"], "/encoder/embeddings/word_embeddings/Unsqueeze")
    word = g.one("Mul", [word_f, word_s], "/encoder/embeddings/word_embeddings/Mul")
    types = g.one(
        "Gather",
        [g.init("encoder.embeddings.token_type_embeddings.weight", _f32(params, "token_type")), "token_type_ids"],
        "/encoder/embeddings/token_type_embeddings/Gather",
    )
    summed = g.one("Add", [word, types], "/encoder/embeddings/Add")
    shape = g.one("Shape", ["input_ids"], "/encoder/embeddings/Shape")
    length = g.one("Gather", [shape, g.init("const_1", np.array(1, dtype=np.int64))], "/encoder/embeddings/Length")
    zero, one = g.init("const_0", np.array(0, dtype=np.int64)), "const_1"
    positions = g.one("Range", [zero, length, one], "/encoder/embeddings/Range")
    pos = g.one(
        "Gather",
        [g.init("encoder.embeddings.position_embeddings.weight", _f32(params, "position")), positions],
        "/encoder/embeddings/position_embeddings/Gather",
    )
    x = _add_layernorm(g, params, summed, pos, "encoder.embeddings.LayerNorm", "/encoder/embeddings/", eps, options)
    mask_i32 = mask_bias = None
    if options.attention == "qattention":  # the raw (batch, sequence) mask, as QAttention takes it
        mask_i32 = g.one("Cast", ["attention_mask"], "/encoder/MaskCast", to=TensorProto.INT32)
    else:  # an additive bias on the attention scores, as the PyTorch model's eager attention
        maskf = g.one("Cast", ["attention_mask"], "/encoder/MaskFloat", to=TensorProto.FLOAT)
        inverted = g.one("Sub", [g.init("const_1f", np.array(1.0, np.float32)), maskf], "/encoder/MaskInvert")
        mask2 = g.one(
            "Mul", [inverted, g.init("const_mask_value", np.array(-10000.0, np.float32))], "/encoder/MaskBias"
        )
        mask_bias = g.one(
            "Unsqueeze", [mask2, g.init("const_axes_1_2", np.array([1, 2], np.int64))], "/encoder/MaskBias4"
        )
    layers = sorted({int(k[len(LAYER_PREFIX) :].split(".")[0]) for k in params if k.startswith(LAYER_PREFIX)})
    blockwise: list[str] = []
    for i in layers:
        p = f"{LAYER_PREFIX}{i}."
        n = f"/encoder/encoder/layer.{i}/"
        xq, xs, xz = _quantize(g, x, ranges, p + "attention.self.query", n + "attention/self/QuantizeLinear")
        if options.attention == "qattention":
            qkv = [p + f"attention.self.{m}" for m in ("query", "key", "value")]
            w = np.concatenate([np.asarray(params[k + ".weight"], np.float32) for k in qkv], axis=0)
            wq, ws = weight_int8(w)
            packed = p + "attention.self.qkv"
            g.init(packed + ".weight_int8", wq)
            g.init(packed + ".weight_scale", ws)
            g.init(packed + ".bias", np.concatenate([_f32p(params, k + ".bias") for k in qkv]))
            context = g.node(
                "QAttention",
                [xq, packed + ".weight_int8", packed + ".bias", xs, packed + ".weight_scale", mask_i32, xz],
                n + "attention/self/QAttention",
                domain=MS,
                num_heads=n_heads,
            )[0]
        else:
            heads_shape = g.init("const_heads_shape", np.array([0, 0, n_heads, head_size], np.int64))
            parts = {}
            for m in ("query", "key", "value"):
                y = _int8_matmul(
                    g, params, xq, xs, xz, p + f"attention.self.{m}", n + f"attention/self/{m}/MatMulIntegerToFloat"
                )
                y = g.one("Reshape", [y, heads_shape], n + f"attention/self/{m}/Reshape")
                perm = [0, 2, 3, 1] if m == "key" else [0, 2, 1, 3]
                parts[m] = g.one("Transpose", [y], n + f"attention/self/{m}/Transpose", perm=perm)
            scores = g.one("MatMul", [parts["query"], parts["key"]], n + "attention/self/MatMul")
            scaled = g.one(
                "Mul",
                [scores, g.init("const_attn_scale", np.array(1 / np.sqrt(head_size), np.float32))],
                n + "attention/self/Mul",
            )
            masked = g.one("Add", [scaled, mask_bias], n + "attention/self/Add")
            probs = g.one("Softmax", [masked], n + "attention/self/Softmax", axis=-1)
            ctx = g.one("MatMul", [probs, parts["value"]], n + "attention/self/MatMul_1")
            ctx = g.one("Transpose", [ctx], n + "attention/self/Transpose", perm=[0, 2, 1, 3])
            context = g.one(
                "Reshape",
                [ctx, g.init("const_merge_shape", np.array([0, 0, hidden], np.int64))],
                n + "attention/self/Reshape",
            )
        cq, cs, cz = _quantize(g, context, ranges, p + "attention.output.dense", n + "attention/output/QuantizeLinear")
        attn_out = _int8_matmul(
            g, params, cq, cs, cz, p + "attention.output.dense", n + "attention/output/dense/MatMulIntegerToFloat"
        )
        h = _add_layernorm(
            g, params, attn_out, x, p + "attention.output.LayerNorm", n + "attention/output/", eps, options
        )
        hq, hs, hz = _quantize(g, h, ranges, p + "intermediate.dense", n + "intermediate/QuantizeLinear")
        name = n + "intermediate/dense/MatMulIntegerToFloat"
        if options.gelu == "bias":
            f = _int8_matmul(g, params, hq, hs, hz, p + "intermediate.dense", name, with_bias=False)
            act = g.one(
                "BiasGelu",
                [f, g.init(p + "intermediate.dense.bias", _f32p(params, p + "intermediate.dense.bias"))],
                n + "intermediate/BiasGelu",
                domain=MS,
            )
        else:
            f = _int8_matmul(g, params, hq, hs, hz, p + "intermediate.dense", name)
            act = g.one("Gelu", [f], n + "intermediate/Gelu", domain=MS)
        if i in options.blockwise_layers:
            # fp32 MatMul + Add here; turned into MatMulNBits (bias folded in) after the build
            w = g.init(p + "output.dense.weight_t", _f32p(params, p + "output.dense.weight").T.copy())
            name = n + "output/dense/MatMul"
            blockwise.append(name)
            y = g.one("MatMul", [act, w], name)
            out = g.one(
                "Add",
                [y, g.init(p + "output.dense.bias", _f32p(params, p + "output.dense.bias"))],
                n + "output/dense/Add",
            )
        else:
            aq, as_, az = _quantize(g, act, ranges, p + "output.dense", n + "output/QuantizeLinear")
            out = _int8_matmul(g, params, aq, as_, az, p + "output.dense", n + "output/dense/MatMulIntegerToFloat")
        x = _add_layernorm(g, params, out, h, p + "output.LayerNorm", n + "output/", eps, options)
    # ---- mean pooling over real tokens, then the heads (fp32: 4 outputs, negligible work)
    maskf = g.one("Cast", ["attention_mask"], "/pool/Cast", to=TensorProto.FLOAT)
    mask3 = g.one("Unsqueeze", [maskf, g.init("const_axes_1", np.array([1], np.int64))], "/pool/Unsqueeze")
    summed = g.one("MatMul", [mask3, x], "/pool/MatMul")
    summed = g.one("Squeeze", [summed, "const_axes_1"], "/pool/Squeeze")
    count = g.one("ReduceSum", [maskf, "const_axes_1"], "/pool/ReduceSum", keepdims=1)
    count = g.one("Max", [count, g.init("const_1f", np.array(1.0, np.float32))], "/pool/Max")
    pooled = g.one("Div", [summed, count], "/pool/Div")
    out_heads = int(np.asarray(params["heads.weight"]).shape[0])
    g.nodes.append(
        helper.make_node(
            "Gemm",
            [
                pooled,
                g.init("heads.weight", _f32p(params, "heads.weight")),
                g.init("heads.bias", _f32p(params, "heads.bias")),
            ],
            ["scores"],
            name="/heads/Gemm",
            transB=1,
        )
    )
    io = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    graph = helper.make_graph(
        g.nodes,
        "perm-lite-int8-fused",
        io,
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", out_heads])],
        g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], producer_name="perm-lite"
    )
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model, blockwise


def _f32(params: dict, kind: str) -> np.ndarray:
    return _f32p(params, f"encoder.embeddings.{kind}_embeddings.weight")


def _f32p(params: dict, name: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(params[name], dtype=np.float32))


def _add_layernorm(g: _Builder, params: dict, a: str, b: str, module: str, name: str, eps: float, options) -> str:
    """LayerNorm(a + b). "skip": onnxruntime's SkipLayerNormalization. "plain": Add, then
    LayerNormalization, with a shape-keeping Reshape between them so that onnxruntime does
    not fuse the two into SkipLayerNormalization at load: in onnxruntime 1.32 on CPU that
    kernel took 4-7x the time of Add + LayerNormalization (benchmarks/NOTES.md)."""
    gamma = g.init(module + ".weight", _f32p(params, module + ".weight"))
    beta = g.init(module + ".bias", _f32p(params, module + ".bias"))
    if options.layernorm == "skip":
        return g.one("SkipLayerNormalization", [a, b, gamma, beta], name + "LayerNorm", domain=MS, epsilon=eps)
    summed = g.one("Add", [a, b], name + "ResidualAdd")
    hidden = int(np.asarray(params[module + ".weight"]).shape[0])
    shape = g.init(f"const_shape_0_0_{hidden}", np.array([0, 0, hidden], np.int64))
    kept = g.one("Reshape", [summed, shape], name + "KeepUnfused")
    return g.one("LayerNormalization", [kept, gamma, beta], name + "LayerNorm", axis=-1, epsilon=eps)


def _quantize(g: _Builder, x: str, ranges: dict, module: str, name: str) -> tuple[str, str, str]:
    """QuantizeLinear of `x` with the constant u8 scale calibrated for `module`'s input."""
    if module not in ranges:
        raise ValueError(f"no calibrated activation range for {module}")
    scale, zero = activation_qparams(*ranges[module])
    s = g.init(module + ".input_scale", np.array(scale, np.float32))
    z = g.init(module + ".input_zero_point", np.array(zero, np.uint8))
    return g.one("QuantizeLinear", [x, s, z], name), s, z


def _int8_matmul(
    g: _Builder, params: dict, xq: str, xs: str, xz: str, module: str, name: str, with_bias: bool = True
) -> str:
    wq, ws = weight_int8(params[module + ".weight"])
    w = g.init(module + ".weight_int8", wq)
    s = g.init(module + ".weight_scale", ws)
    inputs = [xq, w, xs, s, xz, ""]
    if with_bias:
        inputs.append(g.init(module + ".bias", _f32p(params, module + ".bias")))
    else:
        inputs.pop()
    return g.one("MatMulIntegerToFloat", inputs, name, domain=MS)


def blockwise_int8(model, node_names: Sequence[str], block_size: int = 32):
    """The named fp32 MatMuls (each followed by its bias Add) as 8-bit MatMulNBits with the
    bias folded in (accuracy level 4: per-row int8 activations at run time, batch-independent)."""
    if not node_names:
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_include=list(node_names), algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    consumers = {i: n for n in graph.node for i in n.input}
    for node in list(graph.node):
        if node.op_type != "MatMulNBits":
            continue
        add = consumers.get(node.output[0])
        if add is None or add.op_type != "Add":
            continue
        bias = next((i for i in add.input if i in inits), None)
        if bias is None:
            continue
        while len(node.input) < 5:
            node.input.append("")
        node.input.append(bias)  # input 5: bias
        node.output[0] = add.output[0]
        graph.node.remove(add)
    return model


def export_fast_int8(model, path, calibration: Sequence, pad_id: int, options: GraphOptions = GraphOptions()):
    """PermRewardModel -> the fast int8 graph at `path` (calibrated on `calibration` encodings)."""
    import onnx

    config = model.encoder.config
    kind = (getattr(config, "model_type", "bert"), getattr(config, "position_embedding_type", "absolute"))
    if kind != ("bert", "absolute") or getattr(config, "hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"the fused int8 graph is written for BERT encoders (absolute positions, exact GELU), not {kind}; "
            "export with graph 'qdq'"
        )
    params = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    ranges = activation_ranges(model, calibration, pad_id)
    graph, blockwise = build_graph(params, config, ranges, options)
    graph = blockwise_int8(graph, blockwise)
    onnx.save(graph, str(path))
    return path
