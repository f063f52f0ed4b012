"""`perm info`, `perm env`, `perm fp32-variant` and `perm bench`: what a model is and how fast it runs here."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import err, fail, train_extra

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
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Throughput and latency on this machine, as ratios against PyTorch fp32 in the same run."""
    import itertools

    from perm_lite.bench import build_backends, fixed_length_dialogues, measure, measure_steps, to_markdown
    from perm_lite.jsonl import open_input, read_records

    inputs = {}
    if input:
        with open_input(input) as fh:
            dialogues = [p.dialogue for p in read_records(fh) if p.dialogue is not None]
        if not dialogues:
            raise fail(f"{input} holds no valid records")
        inputs["mix"] = list(itertools.islice(itertools.cycle(dialogues), records))
    for n in (int(x) for x in lengths.split(",") if x.strip()):
        inputs[f"{n} tokens"] = fixed_length_dialogues(records, n)
    sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    show = stderr_is_terminal()
    started = time.perf_counter()
    if show:
        err("loading the models" + (" and the PyTorch baselines" if torch_baselines else "") + " ...")
    with quiet_torch():
        try:
            backends, skipped = build_backends(model, torch_baselines, Path(fp32_dir) if fp32_dir else None)
        except PermError as exc:
            raise fail(str(exc)) from None
        for reason in skipped:
            err(f"skipped {reason}")
        with bench_progress(show) as progress:
            table = measure(backends, inputs, sizes, repeats, progress=progress)
    typer.echo(json.dumps(table, indent=2) if as_json else to_markdown(table))
    runs = measure_steps(len(backends), len(inputs), len(sizes), repeats)
    err(
        f"benchmarked {len(backends)} backends on {len(inputs)} inputs x {len(sizes)} batch sizes "
        f"({repeats} repeats, {runs} runs of {records} records or fewer) in {time.perf_counter() - started:.0f} s"
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


# Warnings from these modules (and from the training code that drives them) are addressed to
# developers of the libraries, not to someone running a perm command.
_LIBRARY_WARNINGS = r"(torch|transformers|onnx|onnxscript|onnxruntime|perm_lite\.training)(\.|$)"
_LIBRARY_LOGGERS = ("torch", "transformers", "onnxscript")


@contextmanager
def quiet_torch() -> Iterator[None]:
    """While a command runs PyTorch, transformers or the ONNX exporter: their Python warnings
    (TracerWarning, deprecations, ...) and their log lines below ERROR are not shown."""
    saved_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read by transformers when it is imported
    levels = {name: logging.getLogger(name).level for name in _LIBRARY_LOGGERS}
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # by the module a warning is attributed to: torch's TracerWarning, for one, names the
            # model code being traced (transformers' or perm_lite.training's), not torch
            warnings.filterwarnings("ignore", module=_LIBRARY_WARNINGS)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if saved_env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
