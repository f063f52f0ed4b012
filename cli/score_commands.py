"""`perm score`: options in, `perm_lite.batch.ScoreRun` (local) or the Ray engine, exit codes out."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_RECORD_ERRORS,
    EXIT_STOPPED,
    EXIT_USAGE,
    MAX_BATCH_TOKENS_HELP,
    CombineChoice,
    EngineChoice,
    OnErrorChoice,
    ProviderChoice,
    err,
    fail,
    library_error,
    max_batch_tokens_option,
    parse_mapping,
    progress_bar,
)

from perm_lite.errors import OptionError, PermError
from perm_lite.reward import Reward


def parse_weights(text: str | None) -> dict[str, float] | None:
    """--weights resonation=1,reception=2 as numbers; names and values are checked by the
    library against the model's perspectives (`OptionError`: exit 2)."""
    if not text:
        return None
    try:
        pairs = parse_mapping(text, "--weights")
    except typer.BadParameter as exc:
        raise fail(f"--weights: {exc.message}", EXIT_USAGE) from None
    weights = {}
    for name, value in pairs.items():
        try:
            weights[name] = float(value)
        except ValueError:
            raise fail(f"--weights {name}={value!r}: not a number", EXIT_USAGE) from None
    return weights


def score(
    input: Annotated[str, typer.Argument(help="JSONL file of dialogues, or - for stdin.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output JSONL, or - for stdout.")] = "-",
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    batch_size: Annotated[int, typer.Option(min=1, help="Records per inference batch.")] = 32,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: available cores).")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(min=1, help=MAX_BATCH_TOKENS_HELP)] = None,
    provider: Annotated[ProviderChoice, typer.Option(help="Execution provider.")] = ProviderChoice.auto,
    combine: Annotated[CombineChoice, typer.Option(help="Empathy combination.")] = CombineChoice.harmonic,
    weights: Annotated[str | None, typer.Option(help="Perspective weights, e.g. resonation=1,reception=2.")] = None,
    bystander_coef: Annotated[float, typer.Option(help="Bystander term coefficient (0 disables).")] = 0.5,
    fields: Annotated[
        str | None, typer.Option(help="Map field names, e.g. response=reply,query=question (ours=theirs).")
    ] = None,
    on_error: Annotated[
        OnErrorChoice, typer.Option(help="skip: report bad records and go on; stop: end at the first.")
    ] = OnErrorChoice.skip,
    errors: Annotated[
        str | None,
        typer.Option(
            help="Where bad records are reported (default OUTPUT.errors.jsonl; perm-errors.jsonl with -o -, "
            "replacing an earlier run's; /dev/null: not kept)."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run: skip lines already in OUTPUT.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing OUTPUT (and its errors file) once the run succeeds.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="Cache for Hub models.")] = None,
    engine: Annotated[
        EngineChoice, typer.Option(help="local, or ray (input: files/directories; output: a directory).")
    ] = EngineChoice.local,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Ray: scoring actors, one model each (default: as many as the cluster's CPUs hold)."),
    ] = None,
    threads_per_worker: Annotated[
        int | None,
        typer.Option(min=1, help="Ray: onnxruntime threads (CPU slots) per actor (default: --threads or 1)."),
    ] = None,
    explain: Annotated[
        int,
        typer.Option(
            min=0, help="Add `explain`: the N sentences that moved each score most (occlusion; ~1 extra batch/record)."
        ),
    ] = 0,
) -> None:
    """Score a JSONL file of dialogues; write one result line per record."""
    from perm_lite.batch import ScoreRun
    from perm_lite.jsonl import count_lines, printable
    from perm_lite.outputs import OutputWriteError, StreamSink
    from perm_lite.records import check_field_map
    from perm_lite.scorer import Scorer

    on_error_mode = on_error.value
    try:
        field_map = parse_mapping(fields, "--fields")
    except typer.BadParameter as exc:
        raise fail(f"--fields: {exc.message}", EXIT_USAGE) from None
    try:
        field_map = check_field_map(field_map)
    except OptionError as exc:
        raise fail(f"--fields: {exc}", EXIT_USAGE) from None
    try:  # checked before anything loads; the weights' names again against the model's heads
        reward = Reward.from_settings(
            combine=combine.value, weights=parse_weights(weights), bystander_coef=bystander_coef
        )
    except OptionError as exc:
        flag = {"weights": "--weights", "bystander_coef": "--bystander-coef"}.get(exc.option or "", "--combine")
        raise fail(f"{flag}: {exc}", EXIT_USAGE) from None
    if engine is EngineChoice.ray and explain:
        raise fail("--explain runs with the local engine only", EXIT_USAGE)
    if engine is EngineChoice.ray:
        options = {
            "reward": reward,
            "max_batch_tokens": max_batch_tokens,
        }
        _score_on_ray(
            input,
            output,
            model,
            fields,
            on_error_mode,
            resume,
            overwrite,
            quiet,
            address,
            workers,
            threads_per_worker,
            options,
            provider=provider.value,
            threads=threads,
            batch_size=batch_size,
            cache_dir=cache_dir,
            errors=errors,
        )
        return
    ray_only = [name for name, value in (("--address", address), ("--workers", workers)) if value is not None]
    if threads_per_worker is not None:
        ray_only.append("--threads-per-worker")
    if ray_only:
        raise fail(f"{', '.join(ray_only)}: for --engine ray only (the local engine uses --threads)", EXIT_USAGE)
    try:  # every path checked (and a resumed output read) before the model loads
        run = ScoreRun(input, output, errors_path=errors, resume=resume, overwrite=overwrite)
    except PermError as exc:
        raise library_error(exc) from None
    try:
        scorer = Scorer(
            model,
            provider=provider.value,
            threads=threads,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens_option(max_batch_tokens),
            reward=reward,
            cache_dir=cache_dir,
        )
    except KeyboardInterrupt:
        run.close()
        raise fail("interrupted before scoring started; nothing was written", EXIT_INTERRUPTED) from None
    except Exception as exc:  # OptionError (usage), other PermErrors (model, provider), a model file ORT cannot load
        run.close()
        raise library_error(exc) from None
    show = not quiet and sys.stderr.isatty()
    error_count = 0

    def report(error) -> None:  # bad records are said even with --quiet (it hides the bar and summary)
        nonlocal error_count
        error_count += 1
        if error_count <= 20:
            err(printable(f"skipped {error}" if on_error_mode == "skip" else f"error: {error}"))
        elif error_count == 21:
            err("... more errors" + ("" if run.discards_errors else f" in {run.errors_path}"))

    try:
        with progress_bar(show, count_lines(input) if show else None) as tick:
            annotate = _explainer(scorer, explain) if explain else None
            if tick is not None and not explain:
                tick = _per_batch(scorer, tick)  # the bar moves with each batch, not each 512-record chunk
            elif tick is not None:
                tick, annotate = _per_record(tick, annotate)  # explanations: with each explained record
            summary = run.run(
                scorer,
                on_error=on_error_mode,
                field_map=field_map,
                progress=tick,
                report_error=report,
                annotate=annotate,
            )
    except OutputWriteError as exc:
        if run.output_path is None:
            StreamSink(sys.stdout).silence()  # a closed pipe: no second error when Python flushes at exit
        raise fail(printable(str(exc))) from None
    except OSError as exc:  # reading the input
        raise fail(f"cannot read {input}: {exc.strerror or exc}") from None
    except Exception as exc:  # the model failed on every record: not one record's fault
        raise fail(f"scoring failed ({type(exc).__name__}: {printable(str(exc))})") from None
    if not quiet:
        info = summary.to_dict()
        means = ", ".join(f"{k} {v}" for k, v in info["means"].items())
        err(
            f"scored {info['scored']} records in {info['seconds']} s ({info['records_per_second']} rec/s), "
            f"{info['errors']} errors" + (f", {info['resumed']} already done" if resume else "")
        )
        if means:
            err(f"means: {means}")
        if summary.errors and run.discards_errors:
            err(f"errors not kept (--errors {run.errors_path})")
        elif summary.errors and not (summary.interrupted and run.replacing):
            err(f"errors written to {run.errors_path}")
        if summary.replaced_fields:
            err(f"note: {summary.replaced_fields} records already had scores/combined/perm fields; they were replaced")
        err(f"model {scorer.model_name} {scorer.config.version} ({scorer.variant}) on {scorer.provider}")
    if summary.interrupted:
        if run.replacing:
            err(f"interrupted: {run.output_path} was left as it was (--overwrite replaces it only when a run finishes)")
        else:
            err("interrupted: output holds every record scored so far; rerun with --resume to finish")
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.stopped_early:
        raise typer.Exit(EXIT_STOPPED)
    if summary.errors:
        raise typer.Exit(EXIT_RECORD_ERRORS)


def _per_batch(scorer, tick):
    """A progress callback for `score_file` that also moves the bar as each inference batch
    of a chunk is scored: those rows count provisionally, and the chunk's own count (the
    runner's `progress(n)` once it is written) settles them. Scores are untouched: the
    scorer's session is only wrapped to count the rows of each batch."""
    from dataclasses import replace

    session = scorer.engine.session
    shown = 0

    class CountedSession:
        def get_inputs(self):
            return session.get_inputs()

        def run(self, *args, **kwargs):
            nonlocal shown
            out = session.run(*args, **kwargs)
            rows = len(out[0])
            shown += rows
            tick(rows)
            return out

    scorer.engine = replace(scorer.engine, session=CountedSession())

    def settle(handled: int) -> None:
        nonlocal shown
        tick(handled - shown)
        shown = 0

    return settle


def _per_record(tick, annotate):
    """With --explain: the bar moves as each record is explained (explanations are slow, a
    512-record chunk can take minutes); the chunk's own count settles it, as in `_per_batch`."""
    shown = 0

    def counted(dialogue, result) -> dict:
        nonlocal shown
        try:
            return annotate(dialogue, result)
        finally:
            shown += 1
            tick(1)

    def settle(handled: int) -> None:
        nonlocal shown
        tick(handled - shown)
        shown = 0

    return settle, counted


def _explainer(scorer, k: int):
    """`score_file`'s annotate hook for --explain: a failure is that record's error."""
    from perm_lite.records import RecordError

    def annotate(dialogue, result) -> dict:
        try:
            return {"explain": scorer.explain(dialogue).summary(k)}
        except Exception as exc:  # one record's explanation must not end the run
            raise RecordError(f"could not be explained ({type(exc).__name__}: {exc})", "response") from None

    return annotate


_RAY_OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def _check_ray_paths(input: str, out: Path, overwrite: bool) -> list[Path]:
    """Refuse an output directory that would overwrite an input or hold files perm did not
    write; returns the entries of an earlier perm Ray output (those its manifest lists,
    unchanged since) that --overwrite replaces."""
    from perm_lite.integrations.ray_engine import earlier_outputs

    src = Path(input)
    if not src.exists():
        raise fail(f"input {input} does not exist", EXIT_USAGE)
    if not (out.exists() or out.is_symlink()):
        return []
    if not out.is_dir():
        raise fail(f"{out} exists and is not a directory: --engine ray writes a directory", EXIT_USAGE)
    real_out = out.resolve()
    inputs = [src.resolve()]
    if src.is_dir():
        inputs += [p.resolve() for p in src.iterdir() if p.suffix in _RAY_OUTPUT_SUFFIXES]
    for path in inputs:
        if real_out == path or (path.is_file() and real_out == path.parent):
            raise fail(
                f"-o {out} would overwrite the input ({path}): outputs are named like the input files; "
                "choose another directory",
                EXIT_USAGE,
            )
    if any(out.iterdir()) and not overwrite:
        raise fail(f"{out} exists and is not an empty directory: use --overwrite or another -o", EXIT_USAGE)
    ours, foreign = earlier_outputs(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise fail(
            f"{out} holds files perm did not write ({shown}): --overwrite replaces only the files an earlier "
            "perm Ray run lists in its _perm_manifest.json (unchanged since); choose another -o",
            EXIT_USAGE,
        )
    return ours


def _lock_ray_output(input: str, out: Path):
    """The output directory's lock (`OutputLock`), taken before its contents are looked at."""
    from perm_lite.outputs import OutputLock

    if not Path(input).exists():
        raise fail(f"input {input} does not exist", EXIT_USAGE)
    try:
        Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)  # the lock file goes beside OUTPUT
        return OutputLock(out, "output directory")
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
    except PermError as exc:
        raise library_error(exc) from None


def _score_on_ray(
    input: str,
    output: str,
    model: str,
    fields: str | None,
    on_error: str,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    address: str | None,
    workers: int | None,
    threads_per_worker: int | None,
    scorer_options: dict,
    *,
    provider: str = "auto",
    threads: int | None = None,
    batch_size: int = 32,
    cache_dir: str | None = None,
    errors: str | None = None,
) -> None:
    """--engine ray: every scoring option reaches the actors (--provider, --batch-size,
    --cache-dir, --threads as threads per actor) or is refused here, never ignored."""
    if resume:
        raise fail("--resume is for the local engine; a Ray run writes a fresh output directory", EXIT_USAGE)
    if output == "-":
        raise fail("--engine ray writes a directory: give -o OUTPUT_DIR", EXIT_USAGE)
    if errors is not None:
        raise fail(
            "--errors is for the local engine; with --engine ray bad records go to OUTPUT/_errors.jsonl", EXIT_USAGE
        )
    if threads is not None and threads_per_worker is not None and threads != threads_per_worker:
        raise fail(
            f"--threads {threads} and --threads-per-worker {threads_per_worker} disagree: with --engine ray "
            "give --threads-per-worker (onnxruntime threads per actor)",
            EXIT_USAGE,
        )
    per_worker = threads_per_worker or threads or 1
    out = Path(output)
    lock = _lock_ray_output(input, out)
    try:
        summary = _run_ray(
            input,
            out,
            lock,
            model,
            fields,
            on_error,
            overwrite,
            quiet,
            address,
            workers,
            per_worker,
            {**scorer_options, "cache_dir": cache_dir},
            provider=provider,
            batch_size=batch_size,
        )
    finally:
        lock.release()
    if not quiet:
        rate = summary.scored / summary.seconds if summary.seconds else 0.0
        err(
            f"scored {summary.scored} records in {summary.seconds:.1f} s ({rate:.1f} rec/s) on Ray "
            f"({summary.workers} actors x {summary.threads_per_worker} threads, {summary.provider}), "
            f"{summary.errors} errors" + (f" (see {out / '_errors.jsonl'})" if summary.errors else "")
        )
    if summary.errors:
        raise typer.Exit(EXIT_STOPPED if on_error == "stop" else EXIT_RECORD_ERRORS)


def _run_ray(
    input: str,
    out: Path,
    lock,
    model: str,
    fields: str | None,
    on_error: str,
    overwrite: bool,
    quiet: bool,
    address: str | None,
    workers: int | None,
    per_worker: int,
    options: dict,
    *,
    provider: str,
    batch_size: int,
):
    """The Ray run itself, with OUTPUT locked: its paths checked, then `ray_engine.run`."""
    earlier = _check_ray_paths(input, out, overwrite)
    try:
        import ray  # noqa: F401 - known to import before anything is replaced

        from perm_lite.integrations import ray_engine
    except ImportError as exc:
        raise fail(f"--engine ray needs the ray extra: pip install '.[ray]' in the checkout ({exc})") from None
    show = not quiet and sys.stderr.isatty()
    total = None
    if show:
        from perm_lite.jsonl import count_lines

        try:
            files, kind = ray_engine.input_files(input)
            total = sum(count_lines(f) or 0 for f in files) if kind == "jsonl" else None
        except (OSError, ValueError):
            total = None  # said below, by the run
    try:
        with progress_bar(show and total is not None, total) as tick:
            return ray_engine.run(
                input,
                str(out),
                address=address,
                model=model,
                workers=workers,
                threads_per_worker=per_worker,
                field_map=parse_mapping(fields, "--fields") or None,
                scorer_options={k: v for k, v in options.items() if v is not None},
                on_error=on_error,
                provider=provider,
                inference_batch_size=batch_size,
                replaces=earlier,  # removed only once the run has finished
                names=("--workers", "--threads-per-worker"),
                note=(lambda text: None) if quiet else (lambda text: err(f"note: {text}")),
                lock=lock,
                progress=tick,
            )
    except ImportError as exc:
        raise fail(f"--engine ray needs the ray extra: pip install '.[ray]' in the checkout ({exc})") from None
    except (FileNotFoundError, ValueError) as exc:  # bad options, or a configuration Ray could never schedule
        raise fail(str(exc), EXIT_USAGE) from None
    except PermError as exc:  # the model, or writing the outputs
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail(
            f"interrupted: {out} was left as it was (outputs are replaced only when a run finishes)", EXIT_INTERRUPTED
        ) from None
    except Exception as exc:  # the Ray job failed as a whole (not one record)
        raise fail(f"the Ray run failed ({ray_engine.describe_failure(exc)}); {out} was left as it was") from None
