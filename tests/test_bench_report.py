"""benchmarks/report.py: target verdicts come from the measured rows, not from prose."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from report import render, targets  # noqa: E402


def row(inputs, batch, backend, rps, p50=5.0):
    return {
        "inputs": inputs,
        "batch_size": batch,
        "backend": backend,
        "records_per_second": rps,
        "spread": [rps, rps],
        "p50_ms": p50,
        "p95_ms": p50,
        "vs_pytorch_eager": None,
    }


def results(int8_rps=120.0, p50=5.0, rss=(300.0, 305.0)):
    return {
        "command": "python benchmarks/run.py",
        "minutes": 1.0,
        "machine": {
            "cpu": "x",
            "isa": ["avx2"],
            "cores_used": 2,
            "memory_gib": 1.0,
            "python": "3.11",
            "versions": {"onnxruntime": "1"},
        },
        "throughput": [
            row("mix", 32, "perm-lite int8", int8_rps),
            row("mix", 32, "pytorch fp32 eager", 15.0),
            row("mix", 32, "pytorch fp32 sorted", 50.0),
            row("128 tokens", 1, "perm-lite int8", 100.0, p50),
        ],
        "skipped": [],
        "floor": {
            "shape": {"layers": 6, "hidden": 384, "intermediate": 1536},
            "gemm_gflops_int8": [1],
            "gemm_gflops_fp32": [1],
            "gemm_shapes": "s",
            "int8_rate": 1,
            "fp32_rate": 1,
            "rows": [
                {
                    "tokens": "mix",
                    "batch_size": 32,
                    "gflop_per_record": 4.0,
                    "attention_share": None,
                    "floor_records_per_second": 200.0,
                    "perm_lite_records_per_second": int8_rps,
                    "fraction_of_floor": int8_rps / 200,
                }
            ],
        },
        "profile": {
            "api_seconds_256_mix_records": 1.0,
            "share": {"onnxruntime": 0.9},
            "padded_over_real_tokens": 1.05,
            "ops_b32_128": {"MatMul": 1.0},
            "ops_b32_256": {"MatMul": 1.0},
        },
        "judge_cost": {
            "calls_per_reply": 4,
            "judge_model": "m",
            "records": 1,
            "input_tokens_per_reply_mean": 1.0,
            "input_tokens_per_reply_p95": 1,
            "output_tokens_per_reply": 1,
            "price_input_per_m_tokens": 1,
            "price_output_per_m_tokens": 1,
            "judge_usd_per_m_replies": 1,
            "perm_lite_cpu_seconds_per_m_replies": 1,
            "perm_lite_cpu_hours_per_m_replies": 1,
            "perm_lite_records_per_second": 1,
            "perm_lite_cores": 2,
        },
        "scale": [
            {
                "records": 10_000,
                "output_records": 10_000,
                "seconds": 1,
                "records_per_second": 1,
                "peak_rss_mib": rss[0],
            },
            {
                "records": 1_000_000,
                "output_records": 1_000_000,
                "seconds": 1,
                "records_per_second": 1,
                "peak_rss_mib": rss[1],
            },
        ],
    }


def verdicts(res):
    return {r[0]: (r[2], r[3]) for r in targets(res)}


def test_verdicts_follow_the_measured_ratios():
    v = verdicts(results())
    assert v["int8 vs PyTorch eager, batch 32, mix"] == ("8.00x", "met")
    assert v["int8 vs PyTorch length-sorted, batch 32, mix"] == ("2.40x", "not met")
    assert v["single-record p50, 128 tokens, public API"] == ("5.0 ms", "met")  # issue 20: <= 6 ms
    assert v["peak RSS 10k -> 1,000,000 records"] == ("300.0 -> 305.0 MiB", "met")


def test_misses_are_reported_as_misses():
    v = verdicts(results(int8_rps=60.0, p50=17.0, rss=(300.0, 900.0)))
    assert v["int8 vs PyTorch eager, batch 32, mix"] == ("4.00x", "not met")
    assert v["single-record p50, 128 tokens, public API"][1] == "not met"
    assert v["peak RSS 10k -> 1,000,000 records"][1] == "not met"


def test_render_holds_every_section():
    text = render(results())
    for heading in (
        "## Machine",
        "## Targets",
        "## Throughput",
        "## The floor",
        "## Where the time goes",
        "## Cost against the LLM judge",
        "## Scale",
    ):
        assert heading in text
