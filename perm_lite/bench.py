"""Throughput and latency of perm-lite against the baselines a user would otherwise write.

Every backend scores the same records, interleaved repeat by repeat so machine drift hits
all alike; the table reports medians and spreads and every ratio against PyTorch fp32
eager (unsorted, per-batch padding: the usual way). Backends that need torch are skipped,
and said to be skipped, when it is not installed.

Rows: perm-lite int8 (the public API), other int8 model directories through the same API
(`compare`, e.g. another export graph of the same weights), onnxruntime's transformer
optimizer + dynamic int8 of the same weights (`OPTIMIZER_BASELINE`, the public API's
batching), the fused fp32 graph, PyTorch fp32 eager and length-sorted, and optimum's
ORTModel (in its own environment: `optimum_runner`). `floor` adds the int8 GEMM floor.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.scorer import Scorer
from perm_lite.text import pad_batch

Runner = Callable[[Sequence[Dialogue], int], list[float]]  # (dialogues, batch) -> batch latencies (s)
Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)
INT8 = "perm-lite int8"
OPTIMIZER_BASELINE = "ort optimizer + dynamic int8"
OPTIMUM = "optimum ORTModel fp32"


@dataclass
class Measurement:
    backend: str
    inputs: str
    batch_size: int
    records_per_second: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        rps = self.records_per_second
        lat = np.array(self.latencies_ms)
        return {
            "backend": self.backend,
            "inputs": self.inputs,
            "batch_size": self.batch_size,
            "records_per_second": round(statistics.median(rps), 1),
            "spread": [round(min(rps), 1), round(max(rps), 1)],
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p95_ms": round(float(np.percentile(lat, 95)), 2),
        }


class _TimedSession:
    """Wraps an onnxruntime session and records how long each batch took."""

    def __init__(self, session) -> None:
        self._session = session
        self.durations: list[float] = []

    def get_inputs(self):
        return self._session.get_inputs()

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        out = self._session.run(*args, **kwargs)
        self.durations.append(time.perf_counter() - t)
        return out


def scorer_runner(scorer: Scorer) -> Runner:
    """The public API end to end (validation, rendering, tokenization, length sorting,
    inference) over the whole input; per-batch latency is inference time plus an equal
    share of the tokenization and Python time."""

    def run(dialogues: Sequence[Dialogue], batch_size: int) -> list[float]:
        timed = _TimedSession(scorer.session)
        engine = replace(scorer.engine, session=timed)  # the scorer's engine, batches timed
        t = time.perf_counter()
        encodings = scorer.encode(dialogues)  # the steps of Scorer.score_dialogues
        scorer.results(dialogues, encodings, engine.run(encodings, batch_size, scorer.max_batch_tokens))
        total = time.perf_counter() - t
        share = (total - sum(timed.durations)) / max(1, len(timed.durations))
        return [d + share for d in timed.durations]

    return run


def torch_runner(model, scorer: Scorer, sort: bool) -> Runner:
    """PyTorch fp32 eager, per-batch padding to the longest. Unsorted: batches in arrival
    order (the usual way). Sorted: the whole input is tokenized and grouped exactly as
    perm-lite groups it (length-sorted, same batch size and token budget), so only the
    engine differs."""
    import torch

    from perm_lite.inference import sorted_batches

    def forward(encodings) -> None:
        feed = pad_batch(encodings, 0)
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})

    def run(dialogues: Sequence[Dialogue], batch_size: int) -> list[float]:
        out = []
        with torch.inference_mode():
            if sort:
                t = time.perf_counter()
                encodings = scorer.encode(dialogues)
                groups = sorted_batches([len(e) for e in encodings], batch_size, scorer.max_batch_tokens)
                tokenize = time.perf_counter() - t
                for idx in groups:
                    t = time.perf_counter()
                    forward([encodings[i] for i in idx])
                    out.append(time.perf_counter() - t)
                share = tokenize / max(1, len(out))  # tokenization time spread over the batches
                return [x + share for x in out]
            for start in range(0, len(dialogues), batch_size):
                t = time.perf_counter()
                forward(scorer.encode(dialogues[start : start + batch_size]))
                out.append(time.perf_counter() - t)
        return out

    return run


def fixed_length_dialogues(n: int, tokens: int) -> list[Dialogue]:
    """Records that encode to exactly `tokens` tokens with the default tokenizer
    ([CLS] seeker : ... [SEP] response : ... [SEP]); every word is one token."""
    body = tokens - 7  # specials (3) and the two labels with colons (4)
    query_words, response_words = body // 2, body - body // 2
    return [
        Dialogue(response=" ".join(["sure"] * response_words), query=" ".join(["okay"] * query_words)) for _ in range(n)
    ]


def build_backends(
    model: str,
    with_torch: bool,
    fp32_dir: Path | None,
    compare: dict[str, Path] | None = None,
    baseline_dir: Path | None = None,
) -> tuple[dict[str, Runner], list[str]]:
    """The backends, by row name. `compare`: {label: model directory}, each an extra int8
    row "perm-lite int8 (label)" through the public API; `baseline_dir`: a model directory
    from `optimizer_baseline_dir` (the transformer-optimizer + dynamic int8 row)."""
    int8 = Scorer(model, provider="cpu")
    backends: dict[str, Runner] = {INT8: scorer_runner(int8)}
    skipped = []
    for label, path in (compare or {}).items():
        backends[f"{INT8} ({label})"] = scorer_runner(Scorer(path, provider="cpu"))
    if baseline_dir is not None:
        backends[OPTIMIZER_BASELINE] = scorer_runner(Scorer(baseline_dir, provider="cpu"))
    if fp32_dir is not None:
        backends["onnx fp32"] = scorer_runner(Scorer(fp32_dir, provider="cpu", variant="fp32"))
    if with_torch:
        try:
            import torch

            from perm_lite.session import available_cores
            from perm_lite.training.dequantize import torch_model_from_int8

            torch.set_num_threads(available_cores())
            net = torch_model_from_int8(int8.config.path)
            backends["pytorch fp32 eager"] = torch_runner(net, int8, sort=False)
            backends["pytorch fp32 sorted"] = torch_runner(net, int8, sort=True)
        except ImportError as exc:
            skipped.append(f"pytorch baselines: {exc}")
    return backends, skipped


def optimizer_baseline_dir(model: str | Path, out_dir: Path) -> Path:
    """A model directory like `model` whose int8 graph is what onnxruntime's own tools make
    of the same weights: the transformer optimizer with every fusion, then dynamic int8
    (`training.export.quantize_dynamic_baseline`). Weights are rebuilt from `model`'s int8
    file (needs the train extra). Reused when `out_dir` already holds it."""
    from perm_lite.model_dir import read_config, resolve_model, write_config

    out_dir = Path(out_dir)
    source = read_config(resolve_model(str(model)))
    marker = out_dir / "baseline_of.json"
    stamp = json.dumps({"source": str(source.path), "int8": source.files.get(source.variants["int8"])})
    if marker.exists() and marker.read_text() == stamp:
        return out_dir
    from perm_lite.training.dequantize import torch_model_from_int8
    from perm_lite.training.export import export_fp32, quantize_dynamic_baseline

    out_dir.mkdir(parents=True, exist_ok=True)
    net = torch_model_from_int8(source.path)
    with tempfile.TemporaryDirectory(prefix="perm-baseline-") as tmp:
        raw = export_fp32(net, Path(tmp) / "raw.onnx")
        cfg = net.encoder.config
        quantize_dynamic_baseline(raw, out_dir / "model.int8.onnx", cfg.num_attention_heads, cfg.hidden_size)
    shutil.copy(source.path / source.tokenizer, out_dir / source.tokenizer)
    config = source.editable_fields()
    config["variants"] = {"int8": "model.int8.onnx"}
    config["quantization"] = {"format": "dynamic (onnxruntime transformer optimizer + quantize_dynamic), baseline"}
    write_config(out_dir, config)
    marker.write_text(stamp)
    return out_dir


def optimum_runner(python: Path, model_dir: Path, dialogues: Sequence[Dialogue], work: Path) -> Runner:
    """optimum's ORTModelForCustomTasks on `model_dir`'s fp32 ONNX, in its own environment
    (optimum-onnx pins transformers<4.58): `python` runs this module as a worker over
    stdin/stdout, so its repeats interleave with the other backends'. It scores exactly
    `dialogues` (written to `work`), in arrival order, padded per batch; warm-up slices of
    other sizes are not sent to it."""
    records = Path(work) / f"optimum-input-{len(dialogues)}.jsonl"
    records.write_text("".join(json.dumps(dialogue_record(d)) + "\n" for d in dialogues))
    worker = subprocess.Popen(
        [str(python), "-m", "perm_lite.bench", "optimum-worker", str(model_dir), str(records)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    first = worker.stdout.readline()
    if not first:
        raise RuntimeError(f"the optimum worker ({python}) exited with {worker.wait()}")
    json.loads(first)

    def run(batch: Sequence[Dialogue], batch_size: int) -> list[float]:
        if len(batch) != len(dialogues):  # warm-up slices: the worker always runs its whole input
            return []
        worker.stdin.write(f"{batch_size}\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    return run


def optimum_worker(model_dir: Path, input_path: Path) -> None:
    """The worker side of `optimum_runner` (`python -m perm_lite.bench optimum-worker DIR
    INPUT.jsonl`): one line in, `BATCH_SIZE`; one line out, a JSON list of per-batch
    latencies in seconds over the whole input (the PyTorch eager row's encodings)."""
    from optimum.onnxruntime import ORTModelForCustomTasks
    from transformers import BertConfig

    from perm_lite.jsonl import open_input, read_records

    scorer = Scorer(model_dir, provider="cpu", variant="fp32")  # tokenization only
    with open_input(str(input_path)) as fh:
        dialogues = [p.dialogue for p in read_records(fh) if p.dialogue is not None]
    with tempfile.TemporaryDirectory(prefix="perm-optimum-") as tmp:
        shutil.copy(Path(model_dir) / scorer.config.variants["fp32"], Path(tmp) / "model.onnx")
        BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12).save_pretrained(tmp)
        model = ORTModelForCustomTasks.from_pretrained(tmp, file_name="model.onnx", provider="CPUExecutionProvider")
        print(json.dumps({"ready": True, "records": len(dialogues)}), flush=True)
        for line in sys.stdin:
            batch_size = int(line)
            latencies = []
            for start in range(0, len(dialogues), batch_size):
                t = time.perf_counter()
                model(**pad_batch(scorer.encode(dialogues[start : start + batch_size]), 0))
                latencies.append(time.perf_counter() - t)
            print(json.dumps(latencies), flush=True)


def dialogue_record(d: Dialogue) -> dict:
    """A JSONL record that parses back to `d` (context as chat messages when it has history)."""
    record: dict = {"response": d.response}
    for name in ("persona", "scenario", "analysis"):
        if getattr(d, name):
            record[name] = getattr(d, name)
    if d.history:
        record["messages"] = [
            {"role": "user" if t.role == "seeker" else "assistant", "content": t.text} for t in d.history
        ] + [{"role": "user", "content": d.query}]
    else:
        record["query"] = d.query
    return record


def gemm_floor(
    table: list[dict], model_path: Path, mix: Sequence | None = None, backends: Sequence[str] = (INT8,)
) -> dict:
    """The int8 GEMM floor: this machine's measured GEMM rates (int8 u8 x s8 -> fp32 for the
    linear layers, fp32 for the attention products) turned into records/s per length at
    batch 32, and the fraction of it each named backend's batch-32 row reached. `mix`: the
    encodings of the length-mix input (its mean cost per record), if the table has one."""
    from perm_lite.floor import floor_table, gemm_rate, model_shape

    shape = model_shape(model_path)
    m = 32 * 128
    shapes = ((shape.hidden, shape.intermediate), (shape.intermediate, shape.hidden), (shape.hidden, shape.hidden))
    rates_int8 = [gemm_rate(m, k, n, int8=True) for k, n in shapes]
    rates_fp32 = [gemm_rate(m, k, n, int8=False) for k, n in shapes]
    # Per layer: FFN in (h x 4h), FFN out (4h x h) and Q, K, V, O (4 x h x h) carry equal FLOPs,
    # so the effective rate is the harmonic mean of the three shapes' rates.
    int8_rate = 3 / sum(1 / r for r in rates_int8)
    fp32_rate = 3 / sum(1 / r for r in rates_fp32)
    lengths = sorted({int(r["inputs"].split()[0]) for r in table if r["inputs"].endswith(" tokens")})
    rows = floor_table(shape, lengths, 32, int8_rate, fp32_rate)
    for row in rows:
        row["inputs"] = f"{row['tokens']} tokens"
    if mix:
        counts = [len(e) for e in mix]
        per_record = [
            shape.flops(t)["linear"] / (int8_rate * 1e9) + shape.flops(t)["attention"] / (fp32_rate * 1e9)
            for t in counts
        ]
        gflop = sum(shape.flops(t)["total"] for t in counts) / len(counts) / 1e9
        rows.insert(
            0,
            {
                "inputs": "mix",
                "tokens": f"mix (mean {sum(counts) / len(counts):.0f})",
                "batch_size": 32,
                "gflop_per_record": round(gflop, 3),
                "attention_share": None,
                "floor_records_per_second": round(len(per_record) / sum(per_record), 1),
            },
        )
    measured = {(r["inputs"], r["batch_size"], r["backend"]): r["records_per_second"] for r in table}
    for row in rows:
        row["measured"] = {}
        for name in backends:
            got = measured.get((row["inputs"], 32, name))
            if got:
                row["measured"][name] = {
                    "records_per_second": got,
                    "fraction_of_floor": round(got / row["floor_records_per_second"], 3),
                }
        first = row["measured"].get(backends[0]) if backends else None
        row["perm_lite_records_per_second"] = first["records_per_second"] if first else None
        row["fraction_of_floor"] = first["fraction_of_floor"] if first else None
    return {
        "shape": shape.__dict__,
        "gemm_gflops_int8": [round(r, 1) for r in rates_int8],
        "gemm_gflops_fp32": [round(r, 1) for r in rates_fp32],
        "gemm_shapes": f"M={m} (32 x 128 tokens); K x N = " + ", ".join(f"{k}x{n}" for k, n in shapes),
        "int8_rate": round(int8_rate, 1),
        "fp32_rate": round(fp32_rate, 1),
        "rows": rows,
    }


def floor_markdown(floor: dict) -> str:
    lines = [
        f"int8 GEMM floor (int8 {floor['int8_rate']} GOP/s, fp32 {floor['fp32_rate']} GFLOP/s measured here; "
        "linear layers at the int8 rate, attention products at fp32, nothing else counted):",
        "",
        "| inputs | batch | GFLOP/record | floor records/s | backend | records/s | fraction of floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in floor["rows"]:
        for name, got in row["measured"].items() or [("-", None)]:
            rps, frac = (got["records_per_second"], got["fraction_of_floor"]) if got else ("-", "-")
            tokens = row["tokens"] if isinstance(row["tokens"], str) else f"{row['tokens']} tokens"
            lines.append(
                f"| {tokens} | {row['batch_size']} | {row['gflop_per_record']} | "
                f"{row['floor_records_per_second']} | {name} | {rps} | {frac} |"
            )
    return "\n".join(lines) + "\n"


def measure_steps(backends: int, inputs: int, batch_sizes: int, repeats: int) -> int:
    """How many runs `measure` makes: per input and batch size, a warm-up and `repeats`
    timed runs of every backend."""
    return inputs * batch_sizes * backends * (repeats + 1)


def measure(
    backends: dict[str, Runner],
    inputs: dict[str, Sequence[Dialogue]],
    batch_sizes: Sequence[int],
    repeats: int = 3,
    progress: Progress | None = None,
) -> list[dict]:
    """Measure every backend on every input and batch size. `progress(done, total, doing)`
    is told before each run what it is (and once more at the end); it is called between
    the timed runs, never inside one."""
    results: list[Measurement] = []
    total = measure_steps(len(backends), len(inputs), len(batch_sizes), repeats)
    done = 0

    def step(doing: str) -> None:
        if progress is not None:
            progress(done, total, doing)

    for input_name, dialogues in inputs.items():
        for batch_size in batch_sizes:
            row = {name: Measurement(name, input_name, batch_size) for name in backends}
            for name, run in backends.items():  # warm-up
                step(f"{input_name}, batch {batch_size}: {name} (warm-up)")
                run(dialogues[: batch_size * 2], batch_size)
                done += 1
            for repeat in range(repeats):
                for name, run in backends.items():
                    step(f"{input_name}, batch {batch_size}: {name} ({repeat + 1}/{repeats})")
                    started = time.perf_counter()
                    lat = run(dialogues, batch_size)
                    row[name].records_per_second.append(len(dialogues) / (time.perf_counter() - started))
                    row[name].latencies_ms.extend(x * 1000 for x in lat)
                    done += 1
            results.extend(row.values())
    step("done")
    table = [m.summary() for m in results]
    base = {
        (r["inputs"], r["batch_size"]): r["records_per_second"] for r in table if r["backend"] == "pytorch fp32 eager"
    }
    for r in table:
        ref = base.get((r["inputs"], r["batch_size"]))
        r["vs_pytorch_eager"] = round(r["records_per_second"] / ref, 2) if ref else None
    return table


def cycled(dialogues: Sequence[Dialogue], n: int) -> list[Dialogue]:
    """`n` records: `dialogues` repeated in order."""
    return list(itertools.islice(itertools.cycle(dialogues), n))


def to_markdown(table: list[dict]) -> str:
    lines = [
        "| inputs | batch | backend | records/s (median, min-max) | p50 ms | p95 ms | x PyTorch eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ratio = f"{r['vs_pytorch_eager']:.2f}" if r["vs_pytorch_eager"] else "-"
        lines.append(
            f"| {r['inputs']} | {r['batch_size']} | {r['backend']} | {r['records_per_second']} "
            f"({r['spread'][0]}-{r['spread'][1]}) | {r['p50_ms']} | {r['p95_ms']} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m perm_lite.bench optimum-worker MODEL_DIR INPUT.jsonl
    if len(sys.argv) != 4 or sys.argv[1] != "optimum-worker":
        sys.exit("usage: python -m perm_lite.bench optimum-worker MODEL_DIR INPUT.jsonl")
    optimum_worker(Path(sys.argv[2]), Path(sys.argv[3]))
