"""`perm score --engine ray`: JSONL or Parquet files/directories in, a directory out.

JSONL: every input file gives an output file of the same name in OUTPUT (input order), and
bad lines go to OUTPUT/_errors.jsonl with their file and line, as the local path reports
them. Parquet: good rows, with the score columns added, are written as Parquet files in
OUTPUT; bad rows go to OUTPUT/_errors.jsonl with their file and `id` (Parquet rows have no
line numbers).

Nothing is destroyed before the run finishes: JSONL outputs are written to temporary files
beside their targets and renamed over them at the end, Parquet parts are written to a
temporary folder inside OUTPUT and moved in at the end, and the earlier perm outputs that
`--overwrite` replaces (`replaces`) are removed only then. A failed or interrupted run
leaves OUTPUT as it was (less only the temporary files it created).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perm_lite.errors import OptionError, PermError
from perm_lite.reward import Reward


@dataclass
class RaySummary:
    scored: int = 0
    errors: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    workers: int = 0
    threads_per_worker: int = 0
    provider: str = "cpu"


class RayRunError(PermError):
    """The Ray job itself failed (not one record): one line saying why."""


def describe_failure(exc: BaseException) -> str:
    """One line for a failed Ray job: Ray's own messages run to dozens of lines of traceback."""
    from perm_lite.jsonl import printable

    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    cause = next((x for x in reversed(lines) if not x.startswith(("File ", "^", "~"))), "") if lines else ""
    return printable(f"{type(exc).__name__}: {cause}"[:400])


def input_files(path: str) -> tuple[list[str], str]:
    """The files to read and their format ('jsonl' or 'parquet'), from a file or a directory."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix in (".jsonl", ".parquet") and x.is_file())
    else:
        raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise OptionError(f"{path} holds no .jsonl or .parquet files")
    kinds = {"parquet" if f.suffix == ".parquet" else "jsonl" for f in files}
    if len(kinds) > 1:
        raise OptionError(f"{path} mixes JSONL and Parquet files; score them separately")
    return [str(f.resolve()) for f in files], kinds.pop()


def run(
    input_path: str,
    output_dir: str,
    *,
    address: str | None,
    model: str,
    workers: int | None,
    threads_per_worker: int,
    field_map: Mapping[str, str] | None,
    scorer_options: Mapping[str, Any],
    on_error: str = "skip",
    provider: str = "cpu",
    inference_batch_size: int = 32,
    replaces: Sequence[Path] = (),
    names: tuple[str, str] = ("workers", "threads_per_worker"),
    note: Callable[[str], None] | None = None,
) -> RaySummary:
    """Score `input_path` into `output_dir` on Ray. Refused before anything is written:
    a model that does not load (`ModelError`), bad options (`OptionError`, a `ValueError`) and a configuration
    the cluster could never schedule (`RayResourceError`, a `ValueError`). `replaces`: earlier
    perm outputs in `output_dir` to remove once the run has finished. `note` gets what is
    worth saying before the run starts (the CPUs it needs are busy now: it will wait)."""
    import ray

    from perm_lite.integrations.ray import check_scorer_options, plan_actors, score_dataset, score_jsonl_lines
    from perm_lite.model_dir import read_config, resolve_model

    files, kind = input_files(input_path)
    options = check_scorer_options(scorer_options)
    # The model is checked here, on the driver: a bad name or directory is one line, not an
    # actor that fails to start on every worker.
    config = read_config(resolve_model(model, options.get("cache_dir"), options.get("revision")))
    reward_options = {k: options.get(k) for k in ("combine", "weights", "bystander_coef")}
    Reward.from_settings(options.get("reward"), **reward_options).bind(config.heads)  # weights vs its heads
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        plan = plan_actors(workers, threads_per_worker, provider, names=names)  # reading takes no CPU slot
    for warning in caught:
        if note is not None:
            note(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = RaySummary(workers=plan.workers, threads_per_worker=plan.threads, provider=plan.provider)
    started = time.perf_counter()
    common = {
        "model": model,
        "workers": plan.workers,
        "threads_per_worker": plan.threads,
        "provider": provider,
        "inference_batch_size": inference_batch_size,
        "batch_size": max(64, inference_batch_size),
        "field_map": field_map,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* are free now", category=RuntimeWarning)  # said above
        if kind == "jsonl":
            ds = score_jsonl_lines(files, **common, **options)
        else:
            ds = score_dataset(_parquet_dataset(files), **common, **options)
    if kind == "jsonl":
        written = _write_jsonl(ds, files, out, on_error, summary)
    else:
        written = _write_parquet(ds, out, summary)
    for entry in replaces:  # earlier perm outputs this run did not overwrite: files only, never a tree
        if entry.resolve() not in written and (entry.is_file() or entry.is_symlink()):
            try:
                entry.unlink()
            except OSError:
                pass
    summary.seconds = time.perf_counter() - started
    return summary


def _write_jsonl(ds, files: list[str], out: Path, on_error: str, summary: RaySummary) -> set[Path]:
    from perm_lite.outputs import OutputFile

    targets = {path: OutputFile(out / Path(path).name, "replace") for path in files}
    errors = OutputFile(out / "_errors.jsonl", "replace", publish_empty=False)
    every = [*targets.values(), errors]
    try:
        for batch in ds.iter_batches(batch_format="pyarrow"):
            stop = False
            for row in batch.to_pylist():
                if row["error"] is not None:
                    summary.errors += 1
                    errors.write(row["error"] + "\n")
                    if on_error == "stop":
                        stop = True
                        break
                    continue
                targets[row["path"]].write(row["output"] + "\n")
                summary.scored += 1
            if stop:
                break
        for target in targets.values():
            target.commit()
        if summary.errors:
            errors.commit()
        else:
            errors.abort()
    except BaseException:
        for target in every:
            target.abort()
        raise
    summary.outputs = [str(t.path) for t in targets.values()]
    written = {t.path.resolve() for t in targets.values()}
    if summary.errors:
        written.add(errors.path.resolve())
    return written


def _write_parquet(ds, out: Path, summary: RaySummary) -> set[Path]:
    from perm_lite.jsonl import error_line
    from perm_lite.outputs import OutputFile

    staging = out / f".parquet.{secrets.token_hex(6)}.perm-tmp"
    errors = OutputFile(out / "_errors.jsonl", "replace", publish_empty=False)
    moved: list[Path] = []
    try:
        staging.mkdir()
        scored = ds.materialize()
        bad = scored.filter(lambda row: row["perm_error"] is not None).take_all()
        for row in bad:
            entry = {"file": row.get("path"), "id": row.get("id"), "error": row["perm_error"]}
            errors.write(error_line({k: _plain(v) for k, v in entry.items()}))
        summary.errors = len(bad)
        good = scored.filter(lambda row: row["perm_error"] is None)
        summary.scored = good.count()
        good.drop_columns(["perm_error"]).write_parquet(str(staging))
        for part in sorted(staging.glob("*.parquet")):
            os.replace(part, out / part.name)
            moved.append(out / part.name)
        if summary.errors:
            errors.commit()
        else:
            errors.abort()
    except BaseException:
        errors.abort()
        for part in moved:  # parts this run created
            try:
                part.unlink()
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # created by this run, holds only its parts
    summary.outputs = sorted(str(p) for p in moved)
    written = {p.resolve() for p in moved}
    if summary.errors:
        written.add(errors.path.resolve())
    return written


def _plain(value: Any) -> Any:
    """Arrow values (timestamps, decimals, bytes) as JSON-friendly values."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _parquet_dataset(files: list[str]):
    """Parquet files read by the driver (pyarrow), one block per row group, with a `path`
    column. Ray's own reader would reserve a CPU slot per read task, which the scoring
    actors may hold all of on a small cluster; the driver read never waits for them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    tables = []
    for path in files:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            tables.append(table.append_column("path", pa.array([path] * table.num_rows, pa.string())))
    return ray.data.from_arrow(tables)
