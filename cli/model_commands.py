"""`perm info`, `perm env`, `perm fp32-variant` and `perm bench`: what a model is and how fast it runs here."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import EXIT_USAGE, err, fail, parse_mapping, quiet_torch, train_extra

from perm_lite.errors import PermError


def info(
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a model's card summary, files, hashes and the providers it can run on."""
    from perm_lite.model_dir import read_config, resolve_model
    from perm_lite.report import model_info

    try:
        config = read_config(resolve_model(model))
    except PermError as exc:
        raise fail(str(exc)) from None
    data = model_info(config)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for k, v in value.items():
                typer.echo(f"  {k}: {v}")
        else:
            typer.echo(f"{key}: {value}")


def env(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Versions, available providers, and conflicts between onnxruntime packages."""
    from perm_lite.report import environment

    data = environment()
    for warning in data["warnings"]:
        err(f"warning: {warning}")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key != "warnings":
            typer.echo(f"{key}: {value}")


def fp32_variant(
    output: Annotated[str, typer.Option("-o", "--output", help="New model directory (int8 + fp32).")],
    model: Annotated[str, typer.Option(help="Model whose int8 weights to rebuild from.")] = "default",
) -> None:
    """Add an fp32 ONNX variant (for CUDA) rebuilt from a model's int8 weights (needs the train extra)."""
    # torch, transformers and onnx are imported inside write_fp32_variant: a missing one is one line too
    with train_extra("perm fp32-variant"), quiet_torch():
        from perm_lite.training.dequantize import write_fp32_variant

        try:
            typer.echo(str(write_fp32_variant(model, Path(output))))
        except PermError as exc:
            raise fail(str(exc)) from None


def bench(
    input: Annotated[str | None, typer.Option(help="JSONL of real records for the length-mix rows.")] = None,
    model: Annotated[str, typer.Option(help="Model to benchmark.")] = "default",
    records: Annotated[int, typer.Option(min=8, help="Records per measurement.")] = 256,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,128",
    lengths: Annotated[str, typer.Option(help="Fixed token lengths to add as rows.")] = "128,256",
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repeats (median reported).")] = 3,
    torch_baselines: Annotated[bool, typer.Option("--torch/--no-torch", help="PyTorch rows (train extra).")] = True,
    fp32_dir: Annotated[str | None, typer.Option(help="Model dir with an fp32 variant (perm fp32-variant).")] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="Other int8 model directories as extra rows through the same API, NAME=DIR[,NAME=DIR] "
            "(e.g. `perm export --graph qdq` of the same checkpoint)."
        ),
    ] = None,
    optimizer_baseline: Annotated[
        bool,
        typer.Option(
            "--optimizer-baseline/--no-optimizer-baseline",
            help="Row of onnxruntime's transformer optimizer + dynamic int8 on the same weights (with --torch).",
        ),
    ] = True,
    floor: Annotated[
        bool,
        typer.Option(
            "--floor/--no-floor",
            help="Measure the int8 GEMM floor and each int8 row's fraction of it at batch 32 "
            "(with --json the output becomes {throughput, floor}).",
        ),
    ] = False,
    optimum_python: Annotated[
        str | None,
        typer.Option(
            help="Python of an environment with optimum-onnx and perm-lite (--no-deps) for the optimum "
            "ORTModel row; needs --fp32-dir (see benchmarks/run.py)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Throughput and latency on this machine, as ratios against PyTorch fp32 in the same run."""
    import tempfile

    from perm_lite import bench as bench_lib
    from perm_lite.jsonl import open_input, read_records

    inputs = {}
    if input:
        with open_input(input) as fh:
            dialogues = [p.dialogue for p in read_records(fh) if p.dialogue is not None]
        if not dialogues:
            raise fail(f"{input} holds no valid records")
        inputs["mix"] = bench_lib.cycled(dialogues, records)
    for n in (int(x) for x in lengths.split(",") if x.strip()):
        inputs[f"{n} tokens"] = bench_lib.fixed_length_dialogues(records, n)
    sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    others = {name: Path(path) for name, path in parse_mapping(compare, "--compare").items()}
    if optimum_python and not fp32_dir:
        raise fail("--optimum-python needs --fp32-dir (a model directory with an fp32 variant)", EXIT_USAGE)
    show = stderr_is_terminal()
    started = time.perf_counter()
    if show:
        err("loading the models" + (" and the PyTorch baselines" if torch_baselines else "") + " ...")
    with quiet_torch(), tempfile.TemporaryDirectory(prefix="perm-bench-") as work:
        baseline = None
        if optimizer_baseline and torch_baselines:
            try:
                baseline = bench_lib.optimizer_baseline_dir(model, Path(work) / "baseline")
            except ImportError as exc:
                err(f"skipped {bench_lib.OPTIMIZER_BASELINE}: {exc}")
        try:
            backends, skipped = bench_lib.build_backends(
                model, torch_baselines, Path(fp32_dir) if fp32_dir else None, others, baseline
            )
        except PermError as exc:
            raise fail(str(exc)) from None
        for reason in skipped:
            err(f"skipped {reason}")
        if optimum_python:  # optimum's worker scores one fixed input: one worker and one measure per input
            table = []
            for name, dialogues in inputs.items():
                active = dict(backends)
                active[bench_lib.OPTIMUM] = bench_lib.optimum_runner(
                    Path(optimum_python), Path(fp32_dir), dialogues, Path(work)
                )
                with bench_progress(show) as progress:
                    table += bench_lib.measure(active, {name: dialogues}, sizes, repeats, progress=progress)
        else:
            with bench_progress(show) as progress:
                table = bench_lib.measure(backends, inputs, sizes, repeats, progress=progress)
        floor_result = None
        if floor:
            from perm_lite.scorer import Scorer

            scorer = Scorer(model, provider="cpu")
            mix = scorer.encode(inputs["mix"]) if "mix" in inputs else None
            int8_rows = [name for name in backends if "int8" in name]
            try:
                floor_result = bench_lib.gemm_floor(table, scorer.config.variant_path(scorer.variant), mix, int8_rows)
            except (ImportError, ValueError) as exc:
                err(f"skipped the GEMM floor: {exc}")
    if as_json:
        typer.echo(json.dumps({"throughput": table, "floor": floor_result} if floor else table, indent=2))
    else:
        typer.echo(bench_lib.to_markdown(table))
        if floor_result:
            typer.echo(bench_lib.floor_markdown(floor_result))
    runs = bench_lib.measure_steps(len(backends) + bool(optimum_python), len(inputs), len(sizes), repeats)
    err(
        f"benchmarked {len(backends) + bool(optimum_python)} backends on {len(inputs)} inputs x {len(sizes)} "
        f"batch sizes ({repeats} repeats, {runs} runs of {records} records or fewer) in "
        f"{time.perf_counter() - started:.0f} s"
    )


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def bench_progress(show: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A bar of `perm bench`'s runs on stderr, naming the one in progress, or nothing. It is
    redrawn only between runs (no refresh thread competing with the measurement)."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("benchmarking"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        auto_refresh=False,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, doing: str) -> None:
            bar.update(task, completed=done, total=total, description=doing)
            bar.refresh()

        yield progress
