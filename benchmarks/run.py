"""Regenerate benchmarks/RESULTS.md, results.json and throughput.png in one command.

    python benchmarks/run.py --data ../shared/data            # everything (about 3 h here)
    python benchmarks/run.py --data ../shared/data --quick    # a smoke run (minutes)
    python benchmarks/run.py --only scale --scale 1000000     # one section, merged into results.json

Needs the train and bench extras (torch for the PyTorch rows, onnx for the floor probes,
matplotlib for the chart, tiktoken for the judge's tokens). optimum's ORTModel row runs in
its own environment (optimum-onnx pins transformers<4.58): create it with

    python3 -m venv .bench-optimum && .bench-optimum/bin/pip install torch==2.13.0 \
        optimum-onnx onnxruntime && .bench-optimum/bin/pip install --no-deps -e .

and it is used when present (or pass --optimum-python). Rows beside the shipped model
(`perm-lite int8`): `--compare NAME=DIR` adds other int8 model directories (say the
`perm export --graph qdq` of the same checkpoint), and the transformer-optimizer + dynamic
int8 baseline is built from the shipped weights (`--no-optimizer-baseline` skips it).
`--only SECTION[,SECTION]` runs only those sections (throughput, floor, profile, judge,
serve, ray, scale) and keeps the others from the existing results.json, so the
1,000,000-record `perm score` row can be measured on its own, later. Derived data (the
length mix from the test splits, generated scale files, the fp32 variant, the baseline)
lives in benchmarks/.cache, which git ignores.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from judge_cost import judge_cost  # noqa: E402

from perm_lite.bench import (  # noqa: E402
    INT8,
    OPTIMIZER_BASELINE,
    OPTIMUM,
    build_backends,
    cycled,
    dialogue_record,
    fixed_length_dialogues,
    gemm_floor,
    measure,
    optimizer_baseline_dir,
    optimum_runner,
)
from perm_lite.floor import profile_ops  # noqa: E402
from perm_lite.jsonl import open_input, read_records  # noqa: E402
from perm_lite.records import Dialogue  # noqa: E402
from perm_lite.scorer import Scorer  # noqa: E402
from perm_lite.session import available_cores  # noqa: E402

SECTIONS = ("throughput", "floor", "profile", "judge", "serve", "ray", "scale")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs


def length_mix(data_dir: Path, cache: Path, n: int = 512) -> Path:
    """Human replies of the test splits with their contexts (what users score), shuffled."""
    path = cache / "mix.jsonl"
    if path.exists():
        return path
    from perm_lite.training.data import build_corpus

    corpus = build_corpus(data_dir, seed=13)
    dialogues = [e.dialogue for e in corpus.examples if e.split == "test" and e.kind == "human"]
    random.Random(13).shuffle(dialogues)
    with path.open("w") as fh:
        for d in dialogues[:n]:
            fh.write(json.dumps(dialogue_record(d)) + "\n")
    return path


def read_dialogues(path: Path) -> list[Dialogue]:
    with open_input(str(path)) as fh:
        return [p.dialogue for p in read_records(fh) if p.dialogue is not None]


def fp32_variant(cache: Path) -> Path:
    """The shipped model with an fp32 variant rebuilt from its int8 weights; rebuilt when
    the shipped int8 file changes (the cache would otherwise outlive a new default model)."""
    out = cache / "fp32-model"
    int8 = Scorer(provider="cpu").config
    stamp = int8.files[int8.variants["int8"]]
    if (
        not (out / "model.fp32.onnx").exists()
        or not (out / "int8.sha256").exists()
        or ((out / "int8.sha256").read_text() != stamp)
    ):
        from perm_lite.training.dequantize import write_fp32_variant

        write_fp32_variant("default", out)
        (out / "int8.sha256").write_text(stamp)
    return out


# ---------------------------------------------------------------- sections


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    versions = {}
    for module in ("onnxruntime", "numpy", "tokenizers", "torch", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
    return {
        "cpu": cpu,
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f" {f}" in flags],
        "cores_used": available_cores(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "versions": versions,
    }


def throughput(args, mix: Path, cache: Path) -> tuple[list[dict], list[str]]:
    fp32_dir = fp32_variant(cache)
    inputs = {"mix": cycled(read_dialogues(mix), args.records)}
    for n in args.lengths:
        inputs[f"{n} tokens"] = fixed_length_dialogues(args.records, n)
    baseline = None
    if args.optimizer_baseline:
        log(f"building the {OPTIMIZER_BASELINE} baseline from the shipped weights")
        baseline = optimizer_baseline_dir("default", cache / "optimizer-baseline")
    backends, skipped = build_backends("default", True, fp32_dir, args.compare, baseline)
    table = []
    optimum_python = args.optimum_python
    for name, dialogues in inputs.items():
        active = dict(backends)
        if optimum_python and optimum_python.exists():
            active[OPTIMUM] = optimum_runner(optimum_python, fp32_dir, dialogues, cache)
        log(f"throughput: {name}, {len(dialogues)} records, backends {', '.join(active)}")
        table += measure(active, {name: dialogues}, args.batch_sizes, args.repeats)
    if not (optimum_python and optimum_python.exists()):
        skipped.append(f"optimum ORTModel: no environment at {optimum_python} (see this script's docstring)")
    return table, skipped


def floor(table: list[dict], mix: Path, model_path: Path) -> dict:
    """The int8 GEMM floor and the fraction of it each int8 row reached at batch 32."""
    encodings = Scorer(provider="cpu").encode(read_dialogues(mix))
    int8_rows = list(dict.fromkeys(r["backend"] for r in table if "int8" in r["backend"]))
    int8_rows.sort(key=lambda name: name != INT8)  # the shipped model first: the targets read it
    return gemm_floor(table, model_path, encodings, int8_rows)


def profile(mix: Path, model_path: Path) -> dict:
    """Where the time of one public-API call goes, and which operators the engine spends on."""
    from perm_lite.bench import _TimedSession
    from perm_lite.inference import Engine, sorted_batches
    from perm_lite.text import pad_batch

    scorer = Scorer(provider="cpu", batch_size=32)
    budget = scorer.max_batch_tokens
    dialogues = read_dialogues(mix)[:256]
    scorer.score_dialogues(dialogues[:32])
    splits = {"total": [], "tokenize": [], "pad": [], "engine": []}
    for _ in range(3):
        t0 = time.perf_counter()
        encodings = scorer.encode(dialogues)
        t1 = time.perf_counter()
        for idx in sorted_batches([len(e) for e in encodings], 32, budget):
            pad_batch([encodings[i] for i in idx], scorer.engine.pad_id)
        t2 = time.perf_counter()
        timed = _TimedSession(scorer.session)
        Engine(timed, scorer.engine.pad_id).run(encodings, 32, budget)
        splits["tokenize"].append(t1 - t0)
        splits["pad"].append(t2 - t1)
        splits["engine"].append(sum(timed.durations))
        t3 = time.perf_counter()
        scorer.score_dialogues(dialogues)
        splits["total"].append(time.perf_counter() - t3)
    med = {k: sorted(v)[1] for k, v in splits.items()}
    padded = real = 0
    lengths = [len(e) for e in scorer.encode(dialogues)]
    for idx in sorted_batches(lengths, 32, budget):
        padded += max(lengths[i] for i in idx) * len(idx)
        real += sum(lengths[i] for i in idx)
    return {
        "api_seconds_256_mix_records": round(med["total"], 3),
        "share": {
            "render_and_tokenize": round(med["tokenize"] / med["total"], 3),
            "padding": round(med["pad"] / med["total"], 3),
            "onnxruntime": round(med["engine"] / med["total"], 3),
            "other_python": round(1 - (med["tokenize"] + med["pad"] + med["engine"]) / med["total"], 3),
        },
        "padded_over_real_tokens": round(padded / real, 3),
        "max_batch_tokens": budget,
        "ops_b32_128": profile_ops(model_path, 32, 128),
        "ops_b32_256": profile_ops(model_path, 32, 256),
    }


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # exited between poll() and the read
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def scale(sizes: Sequence[int], cache: Path) -> list[dict]:
    """`perm score` end to end on files generated from examples/: records/s and peak RSS."""
    examples = [json.loads(x) for x in (ROOT / "examples" / "dialogues.jsonl").read_text().splitlines() if x.strip()]
    perm = Path(sys.executable).parent / "perm"
    rows = []
    for n in sizes:
        src, out = cache / f"scale-{n}.jsonl", cache / f"scale-{n}.out.jsonl"
        with src.open("w") as fh:
            for i in range(n):
                record = dict(examples[i % len(examples)], id=f"r{i}")
                fh.write(json.dumps(record) + "\n")
        log(f"scale: perm score on {n:,} records")
        started = time.perf_counter()
        proc = subprocess.Popen(
            [str(perm), "score", str(src), "-o", str(out), "--overwrite", "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # VmHWM is the child's own high-water mark (ru_maxrss of a child started from this
        # process would report this process's size before exec). It only grows, so the
        # last reading before exit is the peak up to the final poll interval.
        peak_kib = 0
        while proc.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - started
        stderr = proc.stderr.read().decode()
        if proc.returncode != 0:
            raise RuntimeError(f"perm score failed ({proc.returncode}): {stderr[-2000:]}")
        with out.open("rb") as fh:
            lines = sum(1 for _ in fh)
        rows.append(
            {
                "records": n,
                "output_records": lines,
                "seconds": round(wall, 1),
                "records_per_second": round(n / wall, 1),
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }
        )
        src.unlink()
        out.unlink()
    return rows


def chart(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = list(dict.fromkeys(r["inputs"] for r in table))
    fig, axes = plt.subplots(1, len(inputs), figsize=(5 * len(inputs), 4), sharey=False)
    for ax, name in zip(axes if len(inputs) > 1 else [axes], inputs):
        rows = [r for r in table if r["inputs"] == name]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["batch_size"], r["records_per_second"]) for r in rows if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["batch_size"] for r in rows if r["backend"] == rows[0]["backend"]])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(name)
        ax.set_xlabel("batch size")
        ax.set_ylabel("records/s (median)")
        ax.grid(alpha=0.3)
    axes_list = axes if len(inputs) > 1 else [axes]
    axes_list[0].legend(fontsize=8)
    fig.suptitle("Throughput by batch size, per backend (this machine, one interleaved run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--lengths", default="128,256")
    parser.add_argument("--scale", default="1000,10000,100000,1000000")
    parser.add_argument("--optimum-python", type=Path, default=ROOT / ".bench-optimum" / "bin" / "python")
    parser.add_argument(
        "--compare",
        default="",
        help="Extra int8 rows: NAME=MODEL_DIR[,NAME=MODEL_DIR] (e.g. the --graph qdq export of the same checkpoint).",
    )
    parser.add_argument("--no-optimizer-baseline", dest="optimizer_baseline", action="store_false")
    parser.add_argument("--only", default="", help=f"Comma-separated sections to run: {', '.join(SECTIONS)}.")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--quick", action="store_true", help="Small smoke run: 64 records, 1 repeat, 1k/10k scale.")
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite RESULTS.md and the chart from OUT/results.json."
    )
    args = parser.parse_args()
    if args.render_only:
        from report import render

        results = json.loads((args.out / "results.json").read_text())
        chart(results["throughput"], args.out / "throughput.png")
        (args.out / "RESULTS.md").write_text(render(results))
        return
    if args.quick:
        args.records, args.repeats, args.scale = 64, 1, "1000,10000"
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.compare = {k: Path(v) for k, v in (x.split("=", 1) for x in args.compare.split(",") if x.strip())}
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    started = time.time()
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    if only:  # one or more sections measured again, the rest kept from the last full run
        results = json.loads((args.out / "results.json").read_text())
        results.setdefault("partial_runs", []).append({"command": command, "sections": only, "machine": machine()})
    else:
        results = {"command": command, "machine": machine()}
    sections = only or list(SECTIONS)
    mix = length_mix(args.data, cache)
    model_path = Scorer(provider="cpu").config.variant_path("int8")
    if "throughput" in sections:
        log("throughput and latency")
        results["throughput"], results["skipped"] = throughput(args, mix, cache)
    if "floor" in sections:
        log("floor: GEMM probes")
        results["floor"] = floor(results["throughput"], mix, model_path)
    if "profile" in sections:
        log("profile")
        results["profile"] = profile(mix, model_path)
    if "judge" in sections:
        mix_rows = [r for r in results["throughput"] if r["inputs"] == "mix" and r["backend"] == INT8]
        mix_b32 = min(mix_rows, key=lambda r: abs(r["batch_size"] - 32))["records_per_second"]
        log("judge cost")
        results["judge_cost"] = judge_cost(read_dialogues(mix), cache, mix_b32, available_cores())
    if "serve" in sections:
        log("perm serve load test")
        from load_serve import run as load_test

        results["serve"] = load_test(seconds=5 if args.quick else 15)
    if "ray" in sections:
        try:
            from ray_bench import run as ray_bench

            log("ray engine")
            results["ray"] = ray_bench(1000 if args.quick else 3000, cache)
        except ImportError as exc:
            results.setdefault("skipped", []).append(f"ray engine: {exc} (pip install '.[ray]' in the checkout)")
    if "scale" in sections:
        results["scale"] = scale([int(x) for x in args.scale.split(",")], cache)
    minutes = round((time.time() - started) / 60, 1)
    if only:
        results["partial_runs"][-1]["minutes"] = minutes
    else:
        results["minutes"] = minutes
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results["throughput"], args.out / "throughput.png")
    from report import render

    (args.out / "RESULTS.md").write_text(render(results))
    log(f"wrote {args.out / 'RESULTS.md'}, results.json and throughput.png in {minutes} min")


if __name__ == "__main__":
    main()
