"""What every `perm` command shares: exit codes, one-line errors, option parsing helpers,
the progress bar and the choices of enumerated options."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum

import typer

from perm_lite.errors import OptionError, PermError

EXIT_FATAL, EXIT_USAGE, EXIT_RECORD_ERRORS, EXIT_STOPPED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def err(message: str) -> None:
    typer.echo(message, err=True)


def fail(message: str, code: int = EXIT_FATAL) -> typer.Exit:
    """Print `error: message` on stderr; the `typer.Exit` to raise."""
    err(f"error: {message}")
    return typer.Exit(code)


def library_error(exc: Exception) -> typer.Exit:
    """A refusal of the library as one line: bad option values (`OptionError`) and refused
    paths (`TargetError` with its `code`) are usage errors, every other error is fatal."""
    from perm_lite.jsonl import printable
    from perm_lite.outputs import TargetError

    if isinstance(exc, TargetError):
        return fail(printable(str(exc)), exc.code)
    if isinstance(exc, OptionError):
        return fail(printable(str(exc)), EXIT_USAGE)
    message = str(exc) if isinstance(exc, PermError | ValueError | OSError) else f"{type(exc).__name__}: {exc}"
    return fail(printable(message))


@contextmanager
def train_extra(command: str) -> Iterator[None]:
    """Turn a missing training dependency into a clear error naming the extra."""
    try:
        yield
    except ImportError as exc:
        raise fail(f"{command} needs the train extra: pip install '.[train]' in the checkout ({exc})") from None


def parse_mapping(text: str | None, option: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise typer.BadParameter(f"expected name=value pairs separated by commas, got {item!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


@contextmanager
def progress_bar(show: bool, total: int | None, label: str = "scoring") -> Iterator[Callable[[int], None] | None]:
    """A records/s progress bar on stderr, or nothing."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} rec/s"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total, rate="-")

        def tick(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.0f}" if speed else "-")

        yield tick


class CombineChoice(StrEnum):
    harmonic = "harmonic"
    mean = "mean"
    geometric = "geometric"


class ProviderChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OnErrorChoice(StrEnum):
    skip = "skip"
    stop = "stop"


class EngineChoice(StrEnum):
    local = "local"
    ray = "ray"


MAX_BATCH_TOKENS_HELP = (
    "Most padded tokens (records x longest) per inference batch (default: the library's auto, "
    "1024 on CPU and no limit on CUDA)."
)


def max_batch_tokens_option(value: int | None) -> int | str:
    """--max-batch-tokens as the Scorer takes it: a number, or "auto" when not given."""
    return "auto" if value is None else value


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
