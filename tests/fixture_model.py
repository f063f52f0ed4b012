"""A tiny, seeded ONNX model and word-level tokenizer for testing the runtime's mechanics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from perm_lite.model_dir import write_config

WORDS = (
    "i you my your me am are is was be been feel feeling sad happy lost job sorry that sounds hard "
    "really so very hear to the a and of it this what how why do can help here with for not no yes "
    "friend mother father dog died today work school alone tired angry anxious scared okay thank thanks "
    "hi hello response analysis seeker supporter persona situation : , . ! ?"
).split()
DIM = 8


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def build_graph(vocab_size: int, seed: int = 0, heads: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (vocab_size, DIM)).astype(np.float32), "word_emb"),
        numpy_helper.from_array(rng.normal(0, 1, (2, DIM)).astype(np.float32), "type_emb"),
        numpy_helper.from_array(rng.normal(0, 0.5, (DIM, DIM)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.12, (DIM, heads)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.full(heads, 0.5, np.float32), "b2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
    ]
    nodes = [
        helper.make_node("Gather", ["word_emb", "input_ids"], ["we"]),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["te"]),
        helper.make_node("Add", ["we", "te"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["scores"]),
    ]
    io = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", heads])
    graph = helper.make_graph(nodes, "tiny_perm", io, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_model_dir(
    path: Path,
    max_length: int = 32,
    calibration: dict | None = None,
    scales: dict[str, list[float]] | None = None,
    reward: dict | None = None,
) -> Path:
    """Write a complete model directory (config with hashes, tokenizer, ONNX, card).
    `scales` ({head: [low, high]}, in output order) and `reward` make a model with other
    heads than PERM's four; nothing else changes."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    onnx.save(build_graph(tok.get_vocab_size(), heads=len(scales) if scales else 4), str(path / "model.fp32.onnx"))
    (path / "README.md").write_text("# tiny-test\n\nA random tiny model for runtime tests. Not a real scorer.\n")
    config = {
        "name": "tiny-test",
        "version": "0.0.1",
        "max_length": max_length,
        "tokenizer": "tokenizer.json",
        "variants": {"fp32": "model.fp32.onnx"},
        "licence": "test only",
    }
    if calibration:
        config["calibration"] = calibration
    if scales:
        config["perspectives"], config["scales"] = list(scales), scales
    if reward:
        config["reward"] = reward
    write_config(path, config)
    return path
