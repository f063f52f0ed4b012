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

OUTPUT is locked (`perm_lite.outputs.OutputLock`) for the whole run, and OUTPUT/_perm_manifest.json
lists what the engine wrote there (name, size, modification time; before the run, also what
it is about to create): `--overwrite` replaces exactly those files (`earlier_outputs`),
unchanged since, and refuses a directory holding anything else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perm_lite.errors import OptionError, PermError
from perm_lite.reward import Reward

MANIFEST = "_perm_manifest.json"  # "_": Parquet and Ray readers skip it
_MANIFEST_FORMAT = "perm-lite ray output"


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


# -- what an earlier run wrote: the manifest -------------------------------------------------


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name and "\0" not in name


def _stamp(path: Path) -> dict[str, int]:
    st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_manifest(out: Path) -> dict[str, Any] | None:
    """OUTPUT/_perm_manifest.json as written by this engine, or None (absent or not one)."""
    path = out / MANIFEST
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT:
        return None
    files, pending = data.get("files"), data.get("pending")
    if not isinstance(files, dict) or not isinstance(pending, list):
        return None
    return {
        "files": {k: v for k, v in files.items() if _plain_name(k) and isinstance(v, dict)},
        "pending": [n for n in pending if _plain_name(n)],
    }


def earlier_outputs(out: Path) -> tuple[list[Path], list[str]]:
    """(the entries of OUTPUT an earlier run of this engine wrote, the names of all others).

    Ours: the manifest itself, every file it lists that is still the file written (a regular
    file of the same size and modification time), and what a run that did not finish had
    started to create (its temporary files and folder, its outputs). Anything else, a
    symbolic link, or every entry when there is no manifest, is not ours."""
    manifest = read_manifest(out)
    ours: list[Path] = []
    foreign: list[str] = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        mine = False
        if manifest is not None and not entry.is_symlink():
            if name == MANIFEST:
                mine = True
            elif name in manifest["pending"]:
                mine = entry.is_file() or (entry.is_dir() and name.endswith(".perm-tmp"))
            elif name in manifest["files"] and entry.is_file():
                try:
                    mine = _stamp(entry) == {k: manifest["files"][name].get(k) for k in ("size", "mtime_ns")}
                except OSError:
                    mine = False
        (ours if mine else foreign).append(entry if mine else name)  # type: ignore[arg-type]
    return ours, foreign


def _write_manifest(out: Path, files: Iterable[Path], pending: Iterable[str] = (), keep: Mapping | None = None) -> None:
    """Replace OUTPUT/_perm_manifest.json (a temporary file renamed over it)."""
    from perm_lite.outputs import OutputFile

    listed = dict(keep or {})
    for path in files:
        try:
            listed[path.name] = _stamp(path)
        except OSError:
            continue
    manifest = OutputFile(out / MANIFEST, "replace", lock=False)  # OUTPUT itself is locked
    try:
        text = {"format": _MANIFEST_FORMAT, "version": 1, "files": listed, "pending": sorted(set(pending))}
        manifest.write(json.dumps(text, ensure_ascii=False, indent=1) + "\n")
        manifest.commit()
    except BaseException:
        manifest.abort()
        raise


# -- Ray's own messages -----------------------------------------------------------------------


@contextlib.contextmanager
def _ray_quiet(note: Callable[[str], None] | None) -> Iterator[None]:
    """Ray's own messages go to a log file, not the terminal: perm says what happened in its
    own lines. That is its Python loggers, its Data progress logs, its warnings, and its C++
    core, which writes to file descriptor 2: fd 2 is pointed at the log while `sys.stderr`
    (perm's lines, its progress bar) keeps writing to the terminal. The log is removed
    after a run that succeeds; after one that fails, `note` names it."""
    import ray.data

    fd, name = tempfile.mkstemp(prefix="perm-ray-", suffix=".log")
    context = ray.data.DataContext.get_current()
    flags = {"enable_progress_bars": False, "print_on_execution_start": False, "enable_auto_log_stats": False}
    saved_flags = {k: getattr(context, k) for k in flags if hasattr(context, k)}
    loggers = {n: logging.getLogger(n) for n in ("ray", "ray.data")}
    levels = {n: lg.level for n, lg in loggers.items()}
    old_stderr = sys.stderr
    try:
        on_fd2 = old_stderr is not None and old_stderr.fileno() == 2
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (tests, IDEs)
        on_fd2 = False
    if old_stderr is not None:
        old_stderr.flush()
    terminal = os.dup(2)
    ok = False
    try:
        os.dup2(fd, 2)
        if on_fd2:  # perm's own lines still reach the terminal
            sys.stderr = open(  # noqa: SIM115 - closed below
                os.dup(terminal), "w", encoding=old_stderr.encoding, errors=old_stderr.errors, buffering=1
            )
        for key in saved_flags:
            setattr(context, key, flags[key])
        for lg in loggers.values():
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
            yield
        ok = True
    finally:
        if sys.stderr is not old_stderr:
            with contextlib.suppress(OSError):
                sys.stderr.close()
            sys.stderr = old_stderr
        os.dup2(terminal, 2)
        os.close(terminal)
        os.close(fd)
        for key, value in saved_flags.items():
            setattr(context, key, value)
        for n, lg in loggers.items():
            lg.setLevel(levels[n])
        if ok or not os.path.getsize(name):
            with contextlib.suppress(OSError):
                os.unlink(name)
        elif note is not None:
            note(f"Ray's own messages of this run are in {name}")


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
    lock: Any = None,
    progress: Callable[[int], None] | None = None,
) -> RaySummary:
    """Score `input_path` into `output_dir` on Ray. Refused before anything is written:
    a model that does not load (`ModelError`), bad options (`OptionError`, a `ValueError`), a configuration
    the cluster could never schedule (`RayResourceError`, a `ValueError`) and an output
    directory another run is writing (`OutputBusy`). `replaces`: earlier perm outputs in
    `output_dir` (`earlier_outputs`) to remove once the run has finished. `note` gets what
    is worth saying before the run starts (the CPUs it needs are busy now: it will wait).
    `lock`: the `OutputLock` of `output_dir` when the caller already holds it (kept);
    otherwise the run takes and releases its own. `progress(n)`: JSONL lines written.
    Ray's own log lines go to a log file, not the terminal (`_ray_quiet`)."""
    from perm_lite.outputs import OutputLock

    own_lock = lock is None
    if own_lock:
        lock = OutputLock(output_dir, "output directory")
    try:
        return _run(
            input_path,
            Path(output_dir),
            address=address,
            model=model,
            workers=workers,
            threads_per_worker=threads_per_worker,
            field_map=field_map,
            scorer_options=scorer_options,
            on_error=on_error,
            provider=provider,
            inference_batch_size=inference_batch_size,
            replaces=replaces,
            names=names,
            note=note,
            progress=progress,
        )
    finally:
        if own_lock:
            lock.release()


def _run(
    input_path: str,
    out: Path,
    *,
    address: str | None,
    model: str,
    workers: int | None,
    threads_per_worker: int,
    field_map: Mapping[str, str] | None,
    scorer_options: Mapping[str, Any],
    on_error: str,
    provider: str,
    inference_batch_size: int,
    replaces: Sequence[Path],
    names: tuple[str, str],
    note: Callable[[str], None] | None,
    progress: Callable[[int], None] | None,
) -> RaySummary:
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
    with _ray_quiet(note):
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            plan = plan_actors(workers, threads_per_worker, provider, names=names)  # reading takes no CPU slot
        for warning in caught:
            if note is not None:
                note(str(warning.message))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
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
        earlier = read_manifest(out) or {"files": {}, "pending": []}
        kept = {e.name: earlier["files"][e.name] for e in replaces if e.name in earlier["files"]}
        try:
            if kind == "jsonl":
                written = _write_jsonl(ds, files, out, on_error, summary, kept, progress)
            else:
                written = _write_parquet(ds, out, summary, kept)
        except BaseException:
            if [e.name for e in out.iterdir()] == [MANIFEST] and not kept:
                with contextlib.suppress(OSError):  # a failed first run leaves OUTPUT empty, as it found it
                    (out / MANIFEST).unlink()
            raise
        for entry in replaces:  # earlier outputs of this engine that this run did not overwrite
            if entry.resolve() in written:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # a killed run's temporary folder (manifest-listed)
            elif entry.name != MANIFEST:
                with contextlib.suppress(OSError):
                    entry.unlink()
        _write_manifest(out, sorted(written))
    summary.seconds = time.perf_counter() - started
    return summary


def _write_jsonl(
    ds,
    files: list[str],
    out: Path,
    on_error: str,
    summary: RaySummary,
    kept: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> set[Path]:
    from perm_lite.outputs import OutputFile

    targets = {path: OutputFile(out / Path(path).name, "replace", lock=False) for path in files}
    errors = OutputFile(out / "_errors.jsonl", "replace", publish_empty=False, lock=False)
    every = [*targets.values(), errors]
    try:
        for target in every:
            target.open()  # the temporary files, named in the manifest before anything is written
        pending = [t.path.name for t in every] + [t.temporary.name for t in every if t.temporary is not None]
        _write_manifest(out, (), pending, keep=kept)
        for batch in ds.iter_batches(batch_format="pyarrow"):
            stop = False
            rows = 0
            for row in batch.to_pylist():
                rows += 1
                if row["error"] is not None:
                    summary.errors += 1
                    errors.write(row["error"] + "\n")
                    if on_error == "stop":
                        stop = True
                        break
                    continue
                targets[row["path"]].write(row["output"] + "\n")
                summary.scored += 1
            if progress is not None:
                progress(rows)
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


def _write_parquet(ds, out: Path, summary: RaySummary, kept: Mapping[str, Any]) -> set[Path]:
    from perm_lite.jsonl import error_line
    from perm_lite.outputs import OutputFile

    staging = out / f".parquet.{secrets.token_hex(6)}.perm-tmp"
    errors = OutputFile(out / "_errors.jsonl", "replace", publish_empty=False, lock=False)
    moved: list[Path] = []
    try:
        errors.open()
        pending = [staging.name, errors.path.name, errors.temporary.name]
        _write_manifest(out, (), pending, keep=kept)
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
        parts = sorted(staging.glob("*.parquet"))
        _write_manifest(out, (), [*pending, *(p.name for p in parts)], keep=kept)  # before they move in
        for part in parts:
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
