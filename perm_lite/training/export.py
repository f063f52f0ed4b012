"""Export a trained checkpoint to ONNX (fp32, fused) and quantize it to int8.

Three int8 graphs (`GRAPHS`, `perm export --graph`), compared in benchmarks/NOTES.md:
- "fused" (the default): the graph written for speed by `training.fast_graph`: contrib
  operators emitted directly (MatMulIntegerToFloat with the bias folded in, QAttention
  with an int8 packed Q/K/V projection, LayerNormalization, Gelu), constant activation
  scales calibrated on training records one at a time;
- "qdq": the previous export: static QDQ left to onnxruntime's optimizer (per-channel s8
  weights, u8 activations, MatMul outputs fp32) with blockwise 8-bit MatMulNBits FFN output
  projections in `ffn_blockwise_layers` (layer 0 by default);
- "dynamic": a baseline only, onnxruntime's transformer optimizer (every fusion) plus
  `quantize_dynamic` (per-channel s8): one activation scale per batch tensor, so a
  record's score depends on its batch neighbours (it fails the batch-independence bar).

Common choices: legacy `torch.onnx.export` (dynamo=False) for the fp32 graph, which
onnxruntime's transformer optimizer can fuse; per-tensor weights distort scores and are
not offered.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from perm_lite.model_dir import write_config
from perm_lite.records import Dialogue
from perm_lite.text import Encoding, encode_dialogues, load_tokenizer, pad_batch

log = logging.getLogger("perm_lite.export")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
GRAPHS = ("fused", "qdq", "dynamic")
DEFAULT_GRAPH = "fused"
# FFN output projections run as blockwise MatMulNBits, per graph, unless told otherwise.
DEFAULT_BLOCKWISE = {"fused": (), "qdq": (0,), "dynamic": ()}


def blockwise_layers(graph: str, layers: Sequence[int] | None | str = "default") -> Sequence[int] | None:
    """The FFN-output layers that run blockwise for `graph`: `layers`, or the graph's default."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, not {graph!r}")
    if isinstance(layers, str):
        if layers != "default":
            raise ValueError(f"ffn_blockwise_layers: a list of layers, None (all) or 'default', not {layers!r}")
        return DEFAULT_BLOCKWISE[graph]
    if graph == "dynamic" and (layers is None or list(layers)):
        raise ValueError("the dynamic baseline has no blockwise layers")
    return layers


def load_checkpoint(folder: Path):
    """A `PermRewardModel` from a training output folder (final/ or checkpoint/)."""
    from safetensors.torch import load_file

    from perm_lite.training.model import PermRewardModel, base_encoder_dir

    folder = Path(folder)
    encoder_cfg = folder / "encoder_config.json"
    if encoder_cfg.exists():
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(encoder_cfg, Path(tmp) / "config.json")
            model = PermRewardModel.from_config(Path(tmp))
    else:
        model = PermRewardModel.from_config(base_encoder_dir())
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.eval()
    return model


def export_fp32(model, path: Path, opset: int = 17) -> Path:
    import torch

    dummy = {
        "input_ids": torch.ones(2, 16, dtype=torch.long),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 16, dtype=torch.long),
    }
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["scores"] = {0: "batch"}
    torch.onnx.export(
        model,
        (dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"]),
        str(path),
        input_names=list(INPUTS),
        output_names=["scores"],
        dynamic_axes=axes,
        opset_version=opset,
        dynamo=False,
    )
    return path


def fuse(src: Path, dst: Path, num_heads: int, hidden_size: int, every_fusion: bool = False) -> Path:
    """Fuse LayerNorm, SkipLayerNorm and Gelu. Attention and EmbedLayerNorm stay unfused so
    that every weight matrix remains a plain MatMul/Gather that int8 quantization covers,
    unless `every_fusion` (the dynamic baseline, whose quantizer has rules for both)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = every_fusion
    options.enable_embed_layer_norm = every_fusion
    optimized = optimize_model(
        str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, optimization_options=options
    )
    optimized.save_model_to_file(str(dst))
    return dst


def quantize_dynamic_baseline(src: Path, dst: Path, num_heads: int, hidden_size: int) -> Path:
    """The baseline a user gets from onnxruntime's own tools: the transformer optimizer with
    every fusion (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu),
    then `quantize_dynamic` with per-channel s8 weights (QAttention, DynamicQuantizeLinear +
    MatMulInteger). Activation scales are computed per batch tensor at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused = Path(dst).with_suffix(".fused.onnx")
    fuse(src, fused, num_heads, hidden_size, every_fusion=True)
    # quantize_dynamic logs advice on the root logger (which would also install a handler there)
    root, quiet, disabled = logging.getLogger(), logging.NullHandler(), logging.root.manager.disable
    root.addHandler(quiet)
    logging.disable(max(disabled, logging.WARNING))
    try:
        quantize_dynamic(
            str(fused),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(disabled)
        root.removeHandler(quiet)
    fused.unlink()
    return dst


class _Reader(CalibrationDataReader):
    """Calibration records for `quantize_static`, one record per batch.

    MinMax takes each record at its own length (no padding in the ranges); histogram
    methods need one shape, so records are padded to `width` with a zero attention mask.
    """

    def __init__(self, encodings: Sequence[Encoding], pad_id: int, width: int | None = None) -> None:
        def item(e: Encoding) -> dict[str, np.ndarray]:
            batch = pad_batch([e], pad_id)
            if width is None:
                return batch
            out = {k: np.zeros((1, width), dtype=np.int64) for k in batch}
            out["input_ids"][:] = pad_id
            for k, v in batch.items():
                out[k][:, : v.shape[1]] = v
            return out

        self._items = iter([item(e) for e in encodings])

    def get_next(self):
        return next(self._items, None)


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: Sequence[Encoding],
    pad_id: int,
    method: str = "percentile",
    ffn_blockwise_layers: Sequence[int] | None = (0,),
) -> Path:
    """Static QDQ int8: per-channel s8 weights, u8 activations, constant activation scales.

    MatMul outputs stay fp32 (onnxruntime then runs MatMulIntegerToFloat with the bias
    fused). `ffn_blockwise_layers`: encoder layers whose FFN output projection keeps fp32
    activations (weights still stored as int8); None means every layer.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    from onnxruntime.quantization.shape_inference import quant_pre_process

    width = None if method == "minmax" else max(len(e) for e in calibration)
    reader = _Reader(calibration, pad_id, width)
    # Shape inference first: without tensor types the quantizer skips the FFN MatMuls.
    inferred = Path(dst).with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(inferred), skip_optimization=True, skip_symbolic_shape=True)
    model = onnx.load(str(inferred))
    weights = {init.name for init in model.graph.initializer}
    # Only MatMuls with a weight matrix: activation x activation products (attention) and
    # the tiny 4-output head (whose bias cannot take the pooled input's scale) stay fp32.
    keep_fp32 = [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and (not any(i in weights for i in n.input) or any("heads" in i for i in n.input))
    ]
    # The FFN output projections read GELU outputs, whose long tail makes one u8 scale per
    # tensor coarse: in the layers named, they get blockwise 8-bit weights and per-row
    # blockwise activation quantization at run time instead (MatMulNBits, below).
    ffn_out = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and "/output/dense/" in n.name
        and "/attention/" not in n.name
        and (ffn_blockwise_layers is None or _layer_index(n.name) in set(ffn_blockwise_layers))
    ]
    keep_fp32 += ffn_out
    quantize_static(
        str(inferred),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=keep_fp32,
        calibrate_method=methods[method],
        extra_options={
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            "CalibPercentile": 99.999,
            "ActivationSymmetric": False,
            "WeightSymmetric": True,
            # Re-quantizing every MatMul output adds a Q/DQ pair per layer and most of the
            # int8 error (Pearson vs fp32 0.9915 -> 0.9942 on long records without it).
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
        },
    )
    inferred.unlink()
    quantize_word_embeddings(dst)
    weight_only_int8(dst, ffn_out)
    return dst


def _layer_index(node_name: str) -> int:
    """'/encoder/layer.3/output/dense/MatMul' -> 3."""
    match = re.search(r"layer\.(\d+)/", node_name)
    if match is None:
        raise ValueError(f"no encoder layer index in node name {node_name!r}")
    return int(match.group(1))


def weight_only_int8(path: Path, node_names: Sequence[str], block_size: int = 32) -> None:
    """Turn the named fp32 MatMuls into MatMulNBits: 8-bit symmetric weights in blocks of
    `block_size` along K, and accuracy level 4, where onnxruntime quantizes each row of the
    activations per block at run time (int8 kernels; rows are independent, so a record's
    result does not depend on its batch)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if not node_names:
        return
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), nodes_to_include=list(node_names), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), False)


def quantize_word_embeddings(path: Path) -> None:
    """Store the word-embedding table as int8 with one scale per row.

    Gather(int8 table) -> Cast -> Mul(row scale): only the looked-up rows are dequantized,
    so this costs nothing per batch and cuts the file by ~35 MB (table: vocab x hidden).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gather = next(
        n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and "word_embeddings" in n.input[0]
    )
    table = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    scale = np.maximum(np.abs(table).max(axis=1), 1e-8) / 127.0
    q = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
    base = gather.input[0]
    graph.initializer.remove(inits[base])
    graph.initializer.extend(
        [
            numpy_helper.from_array(q, base + "_int8"),
            numpy_helper.from_array(scale.astype(np.float32), base + "_scale"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), base + "_axis"),
        ]
    )
    ids, out = gather.input[1], gather.output[0]
    new_nodes = [
        helper.make_node("Gather", [base + "_int8", ids], [out + "_q"], name=base + "_gather_q"),
        helper.make_node("Cast", [out + "_q"], [out + "_f"], to=TensorProto.FLOAT, name=base + "_cast"),
        helper.make_node("Gather", [base + "_scale", ids], [out + "_s"], name=base + "_gather_scale"),
        helper.make_node("Unsqueeze", [out + "_s", base + "_axis"], [out + "_s3"], name=base + "_unsqueeze"),
        helper.make_node("Mul", [out + "_f", out + "_s3"], [out], name=base + "_dequant"),
    ]
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(position + offset, node)
    onnx.save(model, str(path))


def quantization_card(graph: str, layers: Sequence[int] | None, method: str) -> dict:
    """The `quantization` block of config.json: what the int8 graph is made of."""
    blockwise = {
        "ffn_output_matmulnbits_layers": "all" if layers is None else list(layers),
        "matmulnbits": "FFN output projections of those layers: 8-bit symmetric weights in blocks of 32, "
        "activations quantized per row at run time (accuracy level 4)",
    }
    if graph == "fused":
        return {
            "format": "int8 contrib operators written at export (graph 'fused')",
            "weights": "s8 per-channel, symmetric",
            "activations": "u8, constant scales (minmax calibration, one record at a time)",
            "operators": "MatMulIntegerToFloat with the bias folded in; QAttention (int8 packed Q/K/V "
            "projection, fused attention); Add + LayerNormalization; Gelu",
            **blockwise,
            "calibration": "minmax",
        }
    if graph == "qdq":
        return {
            "format": "QDQ static",
            "weights": "s8 per-channel",
            "activations": "u8, constant scales (minmax calibration); MatMul outputs fp32 (MatMulIntegerToFloat)",
            **blockwise,
            "calibration": method,
        }
    return {
        "format": "dynamic (onnxruntime transformer optimizer + quantize_dynamic), baseline",
        "weights": "s8 per-channel",
        "activations": "u8, one scale per batch tensor computed at run time: scores depend on batch neighbours",
    }


def run_onnx(path: Path, encodings: Sequence[Encoding], pad_id: int, batch_size: int = 32) -> np.ndarray:
    """Raw outputs of an ONNX file, length-sorted batches, input order (for checks)."""
    import onnxruntime as ort

    from perm_lite.inference import Engine

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Engine(session, pad_id).run(encodings, batch_size)


def run_torch(model, encodings: Sequence[Encoding], pad_id: int, batch_size: int = 32) -> np.ndarray:
    import torch

    out = np.zeros((len(encodings), model.heads.out_features), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(encodings), batch_size):
            feed = pad_batch(encodings[start : start + batch_size], pad_id)
            out[start : start + batch_size] = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    return out


def export_model_dir(
    checkpoint: Path,
    out_dir: Path,
    calibration_dialogues: Sequence[Dialogue],
    check_dialogues: Sequence[Dialogue],
    *,
    name: str,
    version: str,
    max_length: int,
    method: str = "minmax",
    ffn_blockwise_layers: Sequence[int] | None | str = "default",
    keep_fp32: bool = False,
    extra_config: dict | None = None,
    graph: str = DEFAULT_GRAPH,
) -> dict:
    """Checkpoint -> fused fp32 ONNX -> int8 (`graph`, one of `GRAPHS`), checked against
    PyTorch; returns a report. `ffn_blockwise_layers`: layers, None (all) or "default"
    (the graph's own default: `DEFAULT_BLOCKWISE`)."""
    layers = blockwise_layers(graph, ffn_blockwise_layers)
    if graph == "fused" and method != "minmax":
        raise ValueError(f"the fused graph is calibrated with minmax, not {method!r} (use graph 'qdq')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_checkpoint(checkpoint)
    tokenizer_src = Path(checkpoint) / "tokenizer.json"
    if not tokenizer_src.exists():
        from perm_lite.training.model import base_encoder_dir

        tokenizer_src = base_encoder_dir() / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_src)
    pad_id = tokenizer.token_to_id("[PAD]")
    int8_file = out_dir / "model.int8.onnx"
    with tempfile.TemporaryDirectory(prefix="perm-export-") as tmp:
        work = Path(tmp)
        raw_fp32 = export_fp32(model, work / "raw.onnx")
        cfg = model.encoder.config
        fused = fuse(raw_fp32, work / "fused.onnx", cfg.num_attention_heads, cfg.hidden_size)
        check = encode_dialogues(check_dialogues, tokenizer, max_length)
        torch_out = run_torch(model, check, pad_id)
        fp32_out = run_onnx(fused, check, pad_id)
        fp32_err = float(np.abs(torch_out - fp32_out).max())
        if fp32_err > 1e-3:
            raise RuntimeError(f"fused ONNX differs from PyTorch by {fp32_err:.2e} (> 1e-3)")
        calib = encode_dialogues(calibration_dialogues, tokenizer, max_length)
        if graph == "fused":
            from perm_lite.training.fast_graph import GraphOptions, export_fast_int8

            every = tuple(range(cfg.num_hidden_layers))
            options = GraphOptions(blockwise_layers=every if layers is None else tuple(layers))
            int8_path = export_fast_int8(model, int8_file, calib, pad_id, options)
        elif graph == "qdq":
            # Quantize the unfused graph: ONNX shape inference must type every tensor or the
            # quantizer skips it. onnxruntime fuses the QDQ graph itself when a session loads it.
            int8_path = quantize_int8(raw_fp32, int8_file, calib, pad_id, method, layers)
        else:
            int8_path = quantize_dynamic_baseline(raw_fp32, int8_file, cfg.num_attention_heads, cfg.hidden_size)
        int8_out = run_onnx(int8_path, check, pad_id)
        variants = {"int8": "model.int8.onnx"}
        if keep_fp32:
            shutil.copy(fused, out_dir / "model.fp32.onnx")
            variants["fp32"] = "model.fp32.onnx"
    shutil.copy(tokenizer_src, out_dir / "tokenizer.json")
    config = {
        "name": name,
        "version": version,
        "max_length": max_length,
        "tokenizer": "tokenizer.json",
        "variants": variants,
        "quantization": quantization_card(graph, layers, method),
        **(extra_config or {}),
    }
    write_config(out_dir, config)
    report = {
        "graph": graph,
        "fp32_vs_torch_max_abs": fp32_err,
        "int8_vs_fp32_pearson": [
            float(np.corrcoef(int8_out[:, j], fp32_out[:, j])[0, 1]) for j in range(int8_out.shape[1])
        ],
        "int8_bytes": (out_dir / "model.int8.onnx").stat().st_size,
    }
    log.info("export report: %s", report)
    return report
