"""The benchmark rows of issue 20 (`perm bench`, benchmarks/run.py): other int8 graphs of the
same weights, onnxruntime's transformer-optimizer + dynamic int8 baseline, optimum's ORTModel
worker, the int8 GEMM floor, and the section-at-a-time mode of run.py. Mechanics only: no
speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perm_lite import Scorer
from perm_lite.bench import (
    INT8,
    OPTIMIZER_BASELINE,
    build_backends,
    dialogue_record,
    fixed_length_dialogues,
    gemm_floor,
    measure,
    optimum_runner,
)
from perm_lite.records import Dialogue, Turn, parse_record

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "perm-lite-minilm" / "model.int8.onnx"


def test_compare_and_baseline_dirs_become_rows_through_the_public_api(tiny_model_dir):
    backends, skipped = build_backends(str(tiny_model_dir), False, None, {"qdq": tiny_model_dir}, tiny_model_dir)
    assert list(backends) == [INT8, f"{INT8} (qdq)", OPTIMIZER_BASELINE] and skipped == []
    table = measure(backends, {"16 tokens": fixed_length_dialogues(6, 16)}, [2], repeats=1)
    assert [r["backend"] for r in table] == list(backends)
    assert all(r["records_per_second"] > 0 for r in table)


def fake_rows(rps: dict[str, float]) -> list[dict]:
    return [
        {"inputs": inputs, "batch_size": 32, "backend": name, "records_per_second": value}
        for name, value in rps.items()
        for inputs in ("mix", "128 tokens")
    ]


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped model is not in this checkout")
def test_gemm_floor_gives_each_int8_row_its_fraction(monkeypatch):
    pytest.importorskip("onnx")
    from perm_lite import floor

    monkeypatch.setattr(floor, "gemm_rate", lambda m, k, n, int8, **kw: 1000.0 if int8 else 200.0)
    scorer = Scorer(provider="cpu")
    mix = scorer.encode(fixed_length_dialogues(4, 128))  # a "mix" of one length: same floor as 128 tokens
    table = fake_rows({INT8: 100.0, f"{INT8} (qdq)": 50.0, "pytorch fp32 sorted": 30.0})
    result = gemm_floor(table, SHIPPED, mix, [INT8, f"{INT8} (qdq)"])
    assert (result["int8_rate"], result["fp32_rate"]) == (1000.0, 200.0)
    mix_row, row_128 = result["rows"]
    assert mix_row["inputs"] == "mix" and row_128["inputs"] == "128 tokens"
    assert mix_row["floor_records_per_second"] == row_128["floor_records_per_second"]
    assert set(row_128["measured"]) == {INT8, f"{INT8} (qdq)"}  # only the int8 rows named
    floor_rps = row_128["floor_records_per_second"]
    assert row_128["measured"][f"{INT8} (qdq)"]["fraction_of_floor"] == round(50.0 / floor_rps, 3)
    assert row_128["fraction_of_floor"] == round(100.0 / floor_rps, 3)  # the first named: the shipped model


FAKE_WORKER = """
import json, sys
assert sys.argv[1:4] == ["-m", "perm_lite.bench", "optimum-worker"], sys.argv
records = [json.loads(line) for line in open(sys.argv[5])]
print(json.dumps({"ready": True, "records": len(records)}), flush=True)
for line in sys.stdin:
    size = int(line)
    print(json.dumps([0.001] * (-(-len(records) // size))), flush=True)
"""


def test_optimum_worker_scores_the_same_records_and_skips_warm_up_slices(tmp_path):
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    python.chmod(0o755)
    dialogues = fixed_length_dialogues(10, 16)
    run = optimum_runner(python, tmp_path, dialogues, tmp_path)
    assert run(dialogues[:4], 2) == []  # a warm-up slice: the worker only ever runs its whole input
    assert run(dialogues, 4) == [0.001] * 3
    written = (tmp_path / "optimum-input-10.jsonl").read_text().splitlines()
    assert [parse_record(json.loads(line)) for line in written] == dialogues


def test_dialogue_records_round_trip_with_history():
    d = Dialogue(
        response="That sounds hard.",
        query="I lost my job.",
        history=(Turn("seeker", "hi"), Turn("supporter", "hello, how are you?")),
        persona="a teacher",
    )
    assert parse_record(dialogue_record(d)) == d


def test_perm_bench_compare_rows_and_floor_in_json(tiny_model_dir):
    from perm_lite.cli.main import app

    args = ["bench", "--model", str(tiny_model_dir), "--records", "8", "--batch-sizes", "2", "--lengths", "16"]
    args += ["--repeats", "1", "--no-torch", "--compare", f"again={tiny_model_dir}", "--floor", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    assert [r["backend"] for r in payload["throughput"]] == [INT8, f"{INT8} (again)"]
    assert payload["floor"] is None  # the tiny model is not BERT-shaped: no floor, and it says so
    assert "skipped the GEMM floor" in result.output


def test_perm_bench_optimum_needs_an_fp32_model(tiny_model_dir, tmp_path):
    from perm_lite.cli.main import app

    args = ["bench", "--model", str(tiny_model_dir), "--no-torch", "--optimum-python", str(tmp_path / "python")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--fp32-dir" in result.output


def test_optimizer_baseline_dir_is_the_dynamic_graph_of_the_same_weights(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import onnx
    from test_export_graph import dialogues, tiny_model

    from perm_lite import bench
    from perm_lite.training import dequantize
    from perm_lite.training.export import export_model_dir

    net = tiny_model()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    from fixture_model import build_tokenizer
    from safetensors.torch import save_file

    net.encoder.config.to_json_file(str(ckpt / "encoder_config.json"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt / "model.safetensors"))
    build_tokenizer().save(str(ckpt / "tokenizer.json"))
    export_model_dir(ckpt, tmp_path / "src", dialogues(16, 1), dialogues(16, 2), name="t", version="0", max_length=48)
    built = []
    monkeypatch.setattr(dequantize, "torch_model_from_int8", lambda path: built.append(path) or net)
    out = bench.optimizer_baseline_dir(tmp_path / "src", tmp_path / "baseline")
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "QAttention"} <= ops
    a = Scorer(tmp_path / "src", provider="cpu").score([{"query": "i feel sad", "response": "i am sorry"}])
    b = Scorer(out, provider="cpu").score([{"query": "i feel sad", "response": "i am sorry"}])
    assert set(a[0].scores) == set(b[0].scores)
    bench.optimizer_baseline_dir(tmp_path / "src", tmp_path / "baseline")
    assert len(built) == 1  # built once, then reused


def test_run_py_refuses_unknown_sections():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "throughput,speed"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown sections ['speed']" in result.stderr


def test_report_names_sections_measured_again_later():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import render
    from test_bench_report import results

    res = results()
    res["partial_runs"] = [
        {"command": "python benchmarks/run.py --only scale --scale 1000000", "sections": ["scale"], "minutes": 90.0}
    ]
    text = render(res)
    assert "Sections scale were measured again later, on their own, by `python benchmarks/run.py --only scale" in text
    assert "## Targets (issue 20)" in text
