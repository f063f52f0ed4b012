"""The `perm` command: argument parsing only; the work happens in `perm_lite`."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from perm_lite.errors import PermError
from perm_lite.rubric import JUDGE_TEMPERATURE

app = typer.Typer(
    name="perm",
    help="Score empathy in conversations from PERM's four perspectives, locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_FATAL, EXIT_USAGE, EXIT_RECORD_ERRORS, EXIT_STOPPED = 1, 2, 3, 4


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _fail(message: str, code: int = EXIT_FATAL) -> typer.Exit:
    _err(f"error: {message}")
    return typer.Exit(code)


@contextmanager
def _train_extra(command: str) -> Iterator[None]:
    """Turn a missing training dependency into a clear error naming the extra."""
    try:
        yield
    except ImportError as exc:
        raise _fail(f"{command} needs the train extra: pip install 'perm-lite[train]' ({exc})") from None


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
def _progress(show: bool, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A records/s progress bar on stderr, or nothing."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} rec/s"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task("score", total=total, rate="-")

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


def _finite(value: float, option: str) -> float:
    """A finite float, or a one-line usage error (NaN and infinity would poison every score)."""
    if not math.isfinite(value):
        raise _fail(f"{option} must be a finite number, got {value}", EXIT_USAGE)
    return value


def _parse_weights(text: str | None) -> dict[str, float] | None:
    """--weights resonation=1,reception=2: known names, finite non-negative numbers, not all zero."""
    from perm_lite.scales import EMPATHY

    if not text:
        return None
    try:
        pairs = parse_mapping(text, "--weights")
    except typer.BadParameter as exc:
        raise _fail(f"--weights: {exc.message}", EXIT_USAGE) from None
    weights = {}
    for name, value in pairs.items():
        if name not in EMPATHY:
            raise _fail(f"--weights: unknown perspective {name!r}; weights apply to {', '.join(EMPATHY)}", EXIT_USAGE)
        try:
            number = float(value)
        except ValueError:
            raise _fail(f"--weights {name}={value!r}: not a number", EXIT_USAGE) from None
        if not math.isfinite(number) or number < 0:
            raise _fail(f"--weights {name}={value!r}: must be a finite number >= 0", EXIT_USAGE)
        weights[name] = number
    if not any(weights.values()):
        raise _fail("--weights: at least one weight must be above 0", EXIT_USAGE)
    return weights


def _check_input(input: str) -> None:
    if input == "-":
        return
    if not os.path.exists(input):
        raise _fail(f"input file {input} does not exist", EXIT_USAGE)
    if os.path.isdir(input):
        raise _fail(f"input {input} is a directory; give a JSONL file (or --engine ray for directories)", EXIT_USAGE)


@app.command()
def score(
    input: Annotated[str, typer.Argument(help="JSONL file of dialogues, or - for stdin.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output JSONL, or - for stdout.")] = "-",
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    batch_size: Annotated[int, typer.Option(min=1, help="Records per inference batch.")] = 32,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: available cores).")] = None,
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
        typer.Option(help="Where bad records are reported (default OUTPUT.errors.jsonl; perm-errors.jsonl with -o -)."),
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
    from perm_lite.batch import (
        OutputWriteError,
        StreamSink,
        TargetError,
        count_lines,
        default_errors_path,
        open_input,
        plan_outputs,
        prepare_resume,
        previous_error_lines,
        printable,
        score_file,
    )
    from perm_lite.records import KNOWN_FIELDS, RecordError
    from perm_lite.scorer import Scorer

    on_error_mode = on_error.value
    try:
        field_map = parse_mapping(fields, "--fields")
    except typer.BadParameter as exc:
        raise _fail(f"--fields: {exc.message}", EXIT_USAGE) from None
    unknown = set(field_map) - set(KNOWN_FIELDS)
    if unknown:
        raise _fail(f"--fields: unknown perm-lite fields {sorted(unknown)}; known: {', '.join(KNOWN_FIELDS)}", 2)
    weight_map = _parse_weights(weights)
    bystander_coef = _finite(bystander_coef, "--bystander-coef")
    if engine is EngineChoice.ray and explain:
        raise _fail("--explain runs with the local engine only", EXIT_USAGE)
    if engine is EngineChoice.ray:
        options = {"combine": combine.value, "bystander_coef": bystander_coef, "weights": weight_map}
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
        raise _fail(f"{', '.join(ray_only)}: for --engine ray only (the local engine uses --threads)", EXIT_USAGE)
    _check_input(input)
    out_path = None if output == "-" else Path(output)
    if out_path is None and resume:
        raise _fail("--resume needs an output file (-o OUT.jsonl), not stdout", EXIT_USAGE)
    errors_path = Path(errors) if errors else default_errors_path(output)
    try:
        plan = plan_outputs(input, out_path, errors_path, resume=resume, overwrite=overwrite)
        skip = prepare_resume(out_path) if (resume and out_path) else set()
        if resume:
            skip |= previous_error_lines(errors_path)
    except TargetError as exc:
        raise _fail(str(exc), exc.code) from None
    except RecordError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise _fail(f"cannot read {exc.filename or out_path}: {exc.strerror or exc}") from None
    try:
        scorer = Scorer(
            model,
            provider=provider.value,
            threads=threads,
            batch_size=batch_size,
            combine=combine.value,
            weights=weight_map,
            bystander_coef=bystander_coef,
            cache_dir=cache_dir,
        )
    except KeyboardInterrupt:
        raise _fail("interrupted before scoring started; nothing was written", 130) from None
    except Exception as exc:  # PermError (model, provider) or a model file onnxruntime cannot load
        message = str(exc) if isinstance(exc, PermError | ValueError | OSError) else f"{type(exc).__name__}: {exc}"
        raise _fail(printable(message)) from None
    show = not quiet and sys.stderr.isatty()
    error_count = 0

    def report(err) -> None:
        nonlocal error_count
        error_count += 1
        if error_count <= 20 and not quiet:
            _err(printable(f"skipped {err}" if on_error_mode == "skip" else f"error: {err}"))
        elif error_count == 21 and not quiet:
            _err(f"... more errors in {errors_path}")

    sink = plan.output if plan.output is not None else StreamSink(sys.stdout)
    try:
        if plan.output is not None:
            plan.output.open()  # created (or the replacement started) before the first record
        with open_input(input) as source, _progress(show, count_lines(input) if show else None) as tick:
            summary = score_file(
                scorer,
                source,
                sink,
                plan.errors,
                on_error=on_error_mode,
                skip_lines=skip,
                field_map=field_map,
                progress=tick,
                report_error=report,
                annotate=_explainer(scorer, explain) if explain else None,
            )
        if summary.interrupted and plan.replacing:
            plan.abort()  # --overwrite replaces only on success: the old files stay whole
        else:
            plan.commit()
    except OutputWriteError as exc:
        plan.abort()
        if isinstance(sink, StreamSink):
            sink.silence()
        raise _fail(printable(str(exc))) from None
    except OSError as exc:  # reading the input
        plan.abort()
        raise _fail(f"cannot read {input}: {exc.strerror or exc}") from None
    except Exception as exc:  # the model failed on every record: not one record's fault
        plan.abort()
        raise _fail(f"scoring failed ({type(exc).__name__}: {printable(str(exc))})") from None
    if not quiet:
        info = summary.to_dict()
        means = ", ".join(f"{k} {v}" for k, v in info["means"].items())
        _err(
            f"scored {info['scored']} records in {info['seconds']} s ({info['records_per_second']} rec/s), "
            f"{info['errors']} errors" + (f", {info['resumed']} already done" if resume else "")
        )
        if means:
            _err(f"means: {means}")
        if summary.errors and not (summary.interrupted and plan.replacing):
            _err(f"errors written to {errors_path}")
        if summary.replaced_fields:
            _err(f"note: {summary.replaced_fields} records already had scores/combined/perm fields; they were replaced")
        _err(f"model {scorer.model_name} {scorer.config.version} ({scorer.variant}) on {scorer.provider}")
    if summary.interrupted:
        if plan.replacing:
            _err(f"interrupted: {out_path} was left as it was (--overwrite replaces it only when a run finishes)")
        else:
            _err("interrupted: output holds every record scored so far; rerun with --resume to finish")
        raise typer.Exit(130)
    if summary.stopped_early:
        raise typer.Exit(EXIT_STOPPED)
    if summary.errors:
        raise typer.Exit(EXIT_RECORD_ERRORS)


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


def _ray_output_entry(entry: Path) -> bool:
    """Whether `entry` looks like a file an earlier perm Ray run wrote (and --overwrite may replace)."""
    if entry.is_symlink() or not entry.is_file():
        return False
    if entry.name == "_errors.jsonl" or (entry.name.startswith(".") and entry.name.endswith(".perm-tmp")):
        return True  # (the temporary file of a run that was killed)
    if entry.suffix == ".jsonl":
        with open(entry, "rb") as fh:
            first = fh.readline()
        if not first.strip():
            return entry.stat().st_size == 0
        try:
            return isinstance(json.loads(first)["perm"]["line"], int)
        except (ValueError, KeyError, TypeError, RecursionError):
            return False
    if entry.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return "perm_combined" in pq.read_schema(entry).names
        except Exception:  # no pyarrow, or not a Parquet file
            return False
    return False


def _check_ray_paths(input: str, out: Path, overwrite: bool) -> list[Path]:
    """Refuse an output directory that would overwrite an input or hold files perm did not
    write; returns the earlier perm outputs that --overwrite replaces (files, never trees)."""
    src = Path(input)
    if not src.exists():
        raise _fail(f"input {input} does not exist", EXIT_USAGE)
    if not (out.exists() or out.is_symlink()):
        return []
    if not out.is_dir():
        raise _fail(f"{out} exists and is not a directory: --engine ray writes a directory", EXIT_USAGE)
    real_out = out.resolve()
    inputs = [src.resolve()]
    if src.is_dir():
        inputs += [p.resolve() for p in src.iterdir() if p.suffix in _RAY_OUTPUT_SUFFIXES]
    for path in inputs:
        if real_out == path or (path.is_file() and real_out == path.parent):
            raise _fail(
                f"-o {out} would overwrite the input ({path}): outputs are named like the input files; "
                "choose another directory",
                EXIT_USAGE,
            )
    entries = sorted(out.iterdir())
    if entries and not overwrite:
        raise _fail(f"{out} exists and is not an empty directory: use --overwrite or another -o", EXIT_USAGE)
    foreign = [e.name for e in entries if not _ray_output_entry(e)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise _fail(
            f"{out} holds files perm did not write ({shown}): --overwrite replaces only an earlier perm "
            "Ray output; choose another -o",
            EXIT_USAGE,
        )
    return entries


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
        raise _fail("--resume is for the local engine; a Ray run writes a fresh output directory", EXIT_USAGE)
    if output == "-":
        raise _fail("--engine ray writes a directory: give -o OUTPUT_DIR", EXIT_USAGE)
    if errors is not None:
        raise _fail(
            "--errors is for the local engine; with --engine ray bad records go to OUTPUT/_errors.jsonl", EXIT_USAGE
        )
    if threads is not None and threads_per_worker is not None and threads != threads_per_worker:
        raise _fail(
            f"--threads {threads} and --threads-per-worker {threads_per_worker} disagree: with --engine ray "
            "give --threads-per-worker (onnxruntime threads per actor)",
            EXIT_USAGE,
        )
    per_worker = threads_per_worker or threads or 1
    out = Path(output)
    earlier = _check_ray_paths(input, out, overwrite)
    try:
        import ray  # noqa: F401 - known to import before anything is replaced

        from perm_lite.integrations import ray_engine
    except ImportError as exc:
        raise _fail(f"--engine ray needs the ray extra: pip install 'perm-lite[ray]' ({exc})") from None
    options = {**scorer_options, "cache_dir": cache_dir}
    try:
        summary = ray_engine.run(
            input,
            output,
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
            note=(lambda text: None) if quiet else (lambda text: _err(f"note: {text}")),
        )
    except ImportError as exc:
        raise _fail(f"--engine ray needs the ray extra: pip install 'perm-lite[ray]' ({exc})") from None
    except (FileNotFoundError, ValueError) as exc:  # bad options, or a configuration Ray could never schedule
        raise _fail(str(exc), EXIT_USAGE) from None
    except PermError as exc:  # the model, or writing the outputs
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail(
            f"interrupted: {out} was left as it was (outputs are replaced only when a run finishes)", 130
        ) from None
    except Exception as exc:  # the Ray job failed as a whole (not one record)
        raise _fail(f"the Ray run failed ({ray_engine.describe_failure(exc)}); {out} was left as it was") from None
    if not quiet:
        rate = summary.scored / summary.seconds if summary.seconds else 0.0
        _err(
            f"scored {summary.scored} records in {summary.seconds:.1f} s ({rate:.1f} rec/s) on Ray "
            f"({summary.workers} actors x {summary.threads_per_worker} threads, {summary.provider}), "
            f"{summary.errors} errors" + (f" (see {out / '_errors.jsonl'})" if summary.errors else "")
        )
    if summary.errors:
        raise typer.Exit(EXIT_STOPPED if on_error == "stop" else EXIT_RECORD_ERRORS)


@app.command()
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
        raise _fail(str(exc)) from None
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


@app.command()
def env(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Versions, available providers, and conflicts between onnxruntime packages."""
    from perm_lite.report import environment

    data = environment()
    for warning in data["warnings"]:
        _err(f"warning: {warning}")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key != "warnings":
            typer.echo(f"{key}: {value}")


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="JSON training config (see models/*/train_config.json).")] = None,
    data: Annotated[str | None, typer.Option(help="Data folder in the layout of ../shared/data.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (checkpoints, log, final/).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="Subsample the data (smoke runs).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads.")] = None,
) -> None:
    """Train a PERM reward model (needs the `train` extra). Reruns resume from the last checkpoint."""
    with _train_extra("perm train"):
        from perm_lite.training.train import TrainConfig
        from perm_lite.training.train import train as run_training
    cfg = TrainConfig.from_file(
        config, data_dir=data, out_dir=out, steps=steps, max_examples=max_examples, threads=threads
    )
    final = run_training(cfg)
    typer.echo(str(final))


@app.command("export")
def export_model(
    checkpoint: Annotated[str, typer.Argument(help="Training output (final/ or checkpoint/).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Model directory to write.")],
    data: Annotated[str, typer.Option(help="Data folder: calibration, checks, score calibration.")],
    name: Annotated[str, typer.Option(help="Model name in config.json.")] = "perm-lite-minilm",
    version: Annotated[str, typer.Option(help="Model version.")] = "2.0.0",
    max_length: Annotated[int, typer.Option(help="Max tokens per record.")] = 384,
    keep_fp32: Annotated[bool, typer.Option(help="Also keep the fp32 variant (for CUDA).")] = False,
    max_check_records: Annotated[int, typer.Option(help="Limit val/test records checked (0 = all).")] = 0,
    calibration_records: Annotated[int, typer.Option(min=1, help="Training records for int8 calibration.")] = 300,
    ffn_blockwise_layers: Annotated[
        str,
        typer.Option(
            help="Layers whose FFN output projection runs blockwise 8-bit (MatMulNBits) instead of static "
            "int8: 'all', 'none' or e.g. '0,1' (the shipped model: '0')."
        ),
    ] = "0",
) -> None:
    """Export a checkpoint to ONNX, quantize to static int8, check it and calibrate it."""
    with _train_extra("perm export"):
        from perm_lite.training.build import build_model_dir
    report = build_model_dir(
        Path(checkpoint),
        Path(output),
        Path(data),
        name=name,
        version=version,
        max_length=max_length,
        keep_fp32=keep_fp32,
        max_check_records=max_check_records,
        calibration_records=calibration_records,
        ffn_blockwise_layers=_layer_list(ffn_blockwise_layers),
    )
    typer.echo(json.dumps(report["quantization"], indent=2))


def _layer_list(text: str) -> list[int] | None:
    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        message = f"--ffn-blockwise-layers takes 'all', 'none' or comma-separated layer numbers, not {text!r}"
        raise _fail(message, EXIT_USAGE) from None


@app.command("eval")
def eval_model(
    data: Annotated[str, typer.Option(help="Data folder in the layout of ../shared/data.")],
    model: Annotated[str, typer.Option(help="Model to evaluate.")] = "default",
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    out: Annotated[str | None, typer.Option(help="Write the full report as JSON here.")] = None,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(help="Also evaluate a PyTorch training checkpoint: NAME=FOLDER (repeatable)."),
    ] = None,
    max_length: Annotated[int, typer.Option(help="Token budget for --checkpoint models.")] = 384,
    no_model: Annotated[bool, typer.Option("--no-model", help="Evaluate only the --checkpoint models.")] = False,
    chatbot_only: Annotated[
        bool, typer.Option("--chatbot-only", help="Only mint, iEval and the contrastive set (not the older sources).")
    ] = False,
) -> None:
    """Validity against baselines (length, TF-IDF ridge) in one run: held-out mint
    conversations, held-out iEval people, the contrastive check set and the older sources."""
    with _train_extra("perm eval"):
        from perm_lite.training.evaluate import run_evaluation, to_markdown
    checkpoints = parse_mapping(",".join(checkpoint or []), "--checkpoint") if checkpoint else {}
    result = run_evaluation(
        "" if no_model else model,
        data,
        split,
        checkpoints=checkpoints,
        max_length=max_length,
        chatbot_only=chatbot_only,
    )
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(to_markdown(result))


@app.command("fp32-variant")
def fp32_variant(
    output: Annotated[str, typer.Option("-o", "--output", help="New model directory (int8 + fp32).")],
    model: Annotated[str, typer.Option(help="Model whose int8 weights to rebuild from.")] = "default",
) -> None:
    """Add an fp32 ONNX variant (for CUDA) rebuilt from a model's int8 weights (needs the train extra)."""
    with _train_extra("perm fp32-variant"):
        from perm_lite.training.dequantize import write_fp32_variant
    try:
        typer.echo(str(write_fp32_variant(model, Path(output))))
    except PermError as exc:
        raise _fail(str(exc)) from None


@app.command()
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

    from perm_lite.batch import open_input, read_records
    from perm_lite.bench import build_backends, fixed_length_dialogues, measure, to_markdown

    inputs = {}
    if input:
        with open_input(input) as fh:
            dialogues = [p.dialogue for p in read_records(fh) if p.dialogue is not None]
        if not dialogues:
            raise _fail(f"{input} holds no valid records")
        inputs["mix"] = list(itertools.islice(itertools.cycle(dialogues), records))
    for n in (int(x) for x in lengths.split(",") if x.strip()):
        inputs[f"{n} tokens"] = fixed_length_dialogues(records, n)
    sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    try:
        backends, skipped = build_backends(model, torch_baselines, Path(fp32_dir) if fp32_dir else None)
    except PermError as exc:
        raise _fail(str(exc)) from None
    for reason in skipped:
        _err(f"skipped {reason}")
    table = measure(backends, inputs, sizes, repeats)
    typer.echo(json.dumps(table, indent=2) if as_json else to_markdown(table))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: available cores).")] = None,
    provider: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threshold: Annotated[
        str | None, typer.Option(help="Default /v1/check thresholds, e.g. reception=2.5,combined=0.3.")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most records merged into one inference.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest wait for more requests to merge.")] = 5.0,
    queue_size: Annotated[int, typer.Option(min=1, help="Requests waiting before 503.")] = 64,
    max_records: Annotated[int, typer.Option(min=1, help="Records per /v1/score request.")] = 256,
    max_body_kb: Annotated[int, typer.Option(min=1, help="Request body limit in KiB.")] = 1024,
    max_queue_records: Annotated[
        int, typer.Option(min=1, help="Records held by requests waiting or being scored before 503.")
    ] = 4096,
    max_queue_chars: Annotated[
        int,
        typer.Option(
            min=1, help="Characters (request-body bytes) held by requests being read, waiting or scored before 503."
        ),
    ] = 16_000_000,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, seconds to answer accepted requests; the rest get 503.")
    ] = 10.0,
    auth_token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding an API key; requests then need Authorization: Bearer KEY."),
    ] = None,
    docs: Annotated[
        bool, typer.Option(help="Serve /docs and /redoc (their JavaScript and CSS load from a CDN).")
    ] = False,
) -> None:
    """HTTP API: POST /v1/score, POST /v1/check, GET /healthz, GET /v1/model (serve extra)."""
    from perm_lite.scorer import Scorer

    try:
        import uvicorn  # noqa: F401

        from perm_lite.serve.app import create_app
        from perm_lite.serve.server import bind
        from perm_lite.serve.server import serve as serve_app
    except ImportError as exc:
        raise _fail(f"perm serve needs the serve extra: pip install 'perm-lite[serve]' ({exc})") from None
    if provider not in ("auto", "cpu", "cuda"):
        raise _fail(f"--provider {provider!r}: choose auto, cpu or cuda", EXIT_USAGE)
    thresholds = {}
    for name, value in parse_mapping(threshold, "--threshold").items():
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise _fail(f"--threshold {name}={value!r}: not a number", EXIT_USAGE) from None
        if not math.isfinite(thresholds[name]):
            raise _fail(f"--threshold {name}={value!r}: not a finite number", EXIT_USAGE)
    auth_token = None
    if auth_token_env is not None:
        auth_token = os.environ.get(auth_token_env, "").strip()
        if not auth_token:
            raise _fail(f"--auth-token-env {auth_token_env}: ${auth_token_env} is not set or empty", EXIT_USAGE)
    try:
        sock = bind(host, port)  # before the model loads: a busy port is one line, exit 1
    except PermError as exc:
        raise _fail(str(exc)) from None
    try:
        scorer = Scorer(model, provider=provider, threads=threads)
        app_ = create_app(
            scorer,
            thresholds=thresholds or None,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            max_body_bytes=max_body_kb * 1024,
            max_records=max_records,
            max_queue_records=max_queue_records,
            max_queue_chars=max_queue_chars,
            shutdown_timeout=shutdown_timeout,
            auth_token=auth_token,
            docs=docs,
        )
    except PermError as exc:
        sock.close()
        raise _fail(str(exc)) from None
    except ValueError as exc:
        sock.close()
        raise _fail(str(exc), EXIT_USAGE) from None
    port = sock.getsockname()[1]
    auth = f", API key from ${auth_token_env}" if auth_token else ""
    _err(f"perm serve: {scorer.config.name} {scorer.config.version} on {scorer.provider}, http://{host}:{port}{auth}")
    try:
        serve_app(app_, sock, shutdown_timeout)
    except PermError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it after its graceful shutdown
        raise typer.Exit(130) from None


def _judge_outputs(input: str, output: str, cache_path: Path | None, overwrite: bool):
    """perm judge's OUTPUT and OUTPUT.errors.jsonl, protected as perm score protects its
    outputs: refused when one is the input (links included) or not a regular file, or
    exists without --overwrite; with --overwrite written beside the target and renamed
    over it only when the run finishes. The answer cache must not be any of those files."""
    from perm_lite.batch import TargetError, check_target, default_errors_path, input_identity, plan_outputs

    out_path, errors_path = Path(output), default_errors_path(output)
    source = input_identity(input)
    try:
        out_st = check_target(out_path, "output", source)
        errors_st = check_target(errors_path, "errors file", source)
        if cache_path is not None and (cache_path.exists() or cache_path.is_symlink()):
            check_target(cache_path, "answer cache", source)
        if cache_path is not None and os.path.realpath(cache_path) in {
            os.path.realpath(out_path),
            os.path.realpath(errors_path),
        }:
            raise TargetError(f"the answer cache {cache_path} is an output of this run; give --cache another path")
        if out_st is not None and out_st.st_size and not overwrite:
            raise TargetError(
                f"{out_path} exists: use --overwrite (answers already paid for come from the cache {cache_path})"
            )
        if errors_st is not None and errors_st.st_size and not overwrite:
            raise TargetError(
                f"{errors_path} exists (bad records of an earlier run): use --overwrite to replace it, or another -o"
            )
        return plan_outputs(input, out_path, errors_path, overwrite=True)  # refusals checked above
    except TargetError as exc:
        raise _fail(str(exc), exc.code) from None


@app.command()
def judge(
    input: Annotated[str, typer.Argument(help="JSONL file of dialogues to label.")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="Labels JSONL to write.")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Judge model name at that endpoint.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    max_retries: Annotated[int, typer.Option(min=0, help="Retries on 429, 5xx, timeouts.")] = 5,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per request.")] = 60.0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (PERM: 0.3).")] = JUDGE_TEMPERATURE,
    cache: Annotated[str | None, typer.Option(help="Answer cache (SQLite); default OUTPUT.cache.sqlite.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print calls, tokens and estimated cost; send nothing.")] = False,
    price_input: Annotated[float, typer.Option(help="USD per 1M input tokens (default: gpt-4o-mini).")] = 0.15,
    price_output: Annotated[float, typer.Option(help="USD per 1M output tokens (default: gpt-4o-mini).")] = 0.60,
    on_error: Annotated[str, typer.Option(help="skip: report bad records and go on; stop: end at the first.")] = "skip",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT.")] = False,
    allow_insecure_http: Annotated[
        bool, typer.Option(help="Send the API key over plain http to a host other than this machine.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """Label records PERM's way: four rubric judgements per record from an LLM endpoint."""
    import sqlite3

    from perm_lite.batch import OutputWriteError, count_lines, printable

    try:
        from perm_lite.judge.cache import AnswerCache
        from perm_lite.judge.client import AuthFailed, InsecureEndpoint, JudgeConfig, check_endpoint
        from perm_lite.judge.run import dry_run as judge_dry_run
        from perm_lite.judge.run import judge_file
    except ImportError as exc:
        raise _fail(f"perm judge needs the judge extra: pip install 'perm-lite[judge]' ({exc})") from None
    if on_error not in ("skip", "stop"):
        raise typer.BadParameter("choose skip or stop", param_hint="--on-error")
    if not Path(input).is_file():
        raise _fail(f"input file {input} does not exist", EXIT_USAGE)
    if not model:
        raise _fail("--model is required (the judge model's name at the endpoint)", EXIT_USAGE)
    if not base_url and not dry_run:
        raise _fail("--base-url is required (an OpenAI-compatible endpoint)", EXIT_USAGE)
    if not output and not dry_run:
        raise _fail("-o OUTPUT is required", EXIT_USAGE)
    config = JudgeConfig(
        base_url=base_url or "",
        model=model,
        api_key_env=api_key_env,
        concurrency=concurrency,
        max_retries=max_retries,
        timeout=timeout,
        temperature=temperature,
        allow_insecure_http=allow_insecure_http,
    )
    if not dry_run:
        try:
            check_endpoint(config.base_url, bool(os.environ.get(api_key_env)), allow_insecure_http)
        except InsecureEndpoint as exc:
            raise _fail(str(exc), EXIT_USAGE) from None
    cache_path = Path(cache) if cache else (Path(output + ".cache.sqlite") if output else None)
    plan = _judge_outputs(input, output, cache_path, overwrite) if not dry_run else None
    try:
        answers = AnswerCache(cache_path) if cache_path else None
    except (sqlite3.Error, OSError) as exc:
        raise _fail(f"cannot use the answer cache {cache_path}: {exc}") from None
    if dry_run:
        with open(input, "rb") as source:
            estimate = judge_dry_run(source, config, price_input, price_output, answers)
        typer.echo(json.dumps(estimate, indent=2))
        return
    if not os.environ.get(api_key_env):
        _err(f"note: ${api_key_env} is not set; requests go without an API key (fine for local servers)")
    out_path = Path(output)
    show = not quiet and sys.stderr.isatty()

    def report(err) -> None:
        if not quiet:
            _err(printable(f"skipped {err}" if on_error == "skip" else f"error: {err}"))

    kept = f"{out_path} was left as it was (--overwrite replaces it only when a run finishes)"
    try:
        with open(input, "rb") as source, _progress(show, count_lines(input) if show else None) as tick:
            plan.output.open()  # created (or its replacement started) before the first call
            summary, client = judge_file(
                config,
                source,
                plan.output,
                plan.errors,
                cache=answers,
                on_error=on_error,
                progress=tick,
                report_error=report,
            )
        plan.commit()  # a finished run (exit 0, 3 or 4): the labels replace OUTPUT now
    except AuthFailed as exc:  # a refused key: one line, nothing more sent
        plan.abort()
        raise _fail(str(exc)) from None
    except OutputWriteError as exc:
        plan.abort()
        raise _fail(printable(str(exc))) from None
    except KeyboardInterrupt:
        plan.abort()
        raise _fail(f"interrupted: {kept if plan.replacing else 'labels judged so far were kept'}", 130) from None
    except OSError as exc:  # reading the input
        plan.abort()
        raise _fail(f"cannot read {input}: {exc.strerror or exc}") from None
    except Exception as exc:
        plan.abort()
        raise _fail(f"judging failed ({type(exc).__name__}: {printable(str(exc))})") from None
    finally:
        if answers is not None:
            answers.close()
    stats = client.stats
    if not quiet:
        nulls = ", ".join(f"{k} {v}" for k, v in summary.null_labels.items() if v) or "none"
        _err(
            f"judged {summary.records} records in {summary.seconds:.1f} s: {stats.calls} requests "
            f"({stats.retries} retries, {stats.failed} failed), {stats.cached} answers from the cache, "
            f"{stats.input_tokens} input + {stats.output_tokens} output tokens billed; null labels: {nulls}"
        )
        if summary.failed_calls:
            _err(f"{summary.failed_calls} calls failed: their labels are null (see judge.*.problem in {out_path})")
    if summary.stopped_early:
        raise typer.Exit(EXIT_STOPPED)
    if summary.errors or summary.failed_calls:
        raise typer.Exit(EXIT_RECORD_ERRORS)


@app.command()
def distill(
    labels: Annotated[str, typer.Argument(help="Labels JSONL written by perm judge.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Model directory to write.")],
    init: Annotated[str, typer.Option(help="Start from: 'default' (the shipped model), a model dir, or 'base'.")] = (
        "default"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 300,
    name: Annotated[str, typer.Option(help="Model name in config.json.")] = "perm-lite-distilled",
    version: Annotated[str, typer.Option(help="Model version.")] = "0.1.0",
    max_length: Annotated[int, typer.Option(min=16, help="Max tokens per record.")] = 256,
    run_dir: Annotated[
        str | None, typer.Option(help="Checkpoints (a rerun resumes there); default OUTPUT.run.")
    ] = None,
    calibration_records: Annotated[int, typer.Option(min=1, help="Training records for int8 calibration.")] = 300,
) -> None:
    """Train a student on judge labels with the shipped recipe, export it to int8, evaluate it."""
    with _train_extra("perm distill"):
        from perm_lite.training.distill import distill as run_distill
    if not Path(labels).is_file():
        raise _fail(f"labels file {labels} does not exist", EXIT_USAGE)
    out = Path(output)
    try:
        report = run_distill(
            Path(labels),
            out,
            run_dir=Path(run_dir) if run_dir else out.with_name(out.name + ".run"),
            init=init,
            steps=steps,
            name=name,
            version=version,
            max_length=max_length,
            calibration_records=calibration_records,
        )
    except (ValueError, PermError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({"labels": report["labels"], "agreement_test": report["agreement_test"]}, indent=2))
    _err(f"model written to {out} (card: {out / 'README.md'}); use it with --model {out}")


# One module per command group (see ARCHITECTURE.md): explain and report live in their own.
from perm_lite.cli.explain_commands import explain as _explain_command  # noqa: E402
from perm_lite.cli.explain_commands import report as _report_command  # noqa: E402

app.command("explain")(_explain_command)
app.command("report")(_report_command)
