"""`perm judge`: options in, `perm_lite.judge.run.judge_path` (or its dry run), exit codes out."""

from __future__ import annotations

import json
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
    OnErrorChoice,
    err,
    fail,
    library_error,
    progress_bar,
)

from perm_lite.errors import PermError
from perm_lite.rubric import JUDGE_TEMPERATURE


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
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds per request, all of it: connecting, sending, the whole reply.")
    ] = 60.0,
    max_answer_kb: Annotated[
        int, typer.Option(min=1, help="Largest reply read (KB); a larger one is a failed call, not read further.")
    ] = 1024,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (PERM: 0.3).")] = JUDGE_TEMPERATURE,
    cache: Annotated[str | None, typer.Option(help="Answer cache (SQLite); default OUTPUT.cache.sqlite.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print calls, tokens and estimated cost; send nothing.")] = False,
    price_input: Annotated[float, typer.Option(help="USD per 1M input tokens (default: gpt-4o-mini).")] = 0.15,
    price_output: Annotated[float, typer.Option(help="USD per 1M output tokens (default: gpt-4o-mini).")] = 0.60,
    on_error: Annotated[
        OnErrorChoice, typer.Option(help="skip: report bad records and go on; stop: end at the first.")
    ] = OnErrorChoice.skip,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT.")] = False,
    allow_insecure_http: Annotated[
        bool, typer.Option(help="Send the API key over plain http to a host other than this machine.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """Label records PERM's way: four rubric judgements per record from an LLM endpoint."""
    import sqlite3

    from perm_lite.jsonl import count_lines, printable
    from perm_lite.outputs import OutputWriteError

    try:
        from perm_lite.judge.cache import AnswerCache
        from perm_lite.judge.client import InsecureEndpoint, JudgeConfig, RunStopped, check_endpoint
        from perm_lite.judge.run import default_cache_path, judge_path
        from perm_lite.judge.run import dry_run as judge_dry_run
    except ImportError as exc:
        raise fail(f"perm judge needs the judge extra: pip install '.[judge]' in the checkout ({exc})") from None
    on_error_mode = on_error.value
    if not Path(input).is_file():
        raise fail(f"input file {input} does not exist", EXIT_USAGE)
    if not model:
        raise fail("--model is required (the judge model's name at the endpoint)", EXIT_USAGE)
    if not base_url and not dry_run:
        raise fail("--base-url is required (an OpenAI-compatible endpoint)", EXIT_USAGE)
    if not output and not dry_run:
        raise fail("-o OUTPUT is required", EXIT_USAGE)
    config = JudgeConfig(
        base_url=base_url or "",
        model=model,
        api_key_env=api_key_env,
        concurrency=concurrency,
        max_retries=max_retries,
        timeout=timeout,
        temperature=temperature,
        allow_insecure_http=allow_insecure_http,
        max_answer_bytes=max_answer_kb * 1024,
    )
    cache_path = Path(cache) if cache else (default_cache_path(output) if output else None)
    if dry_run:
        try:
            answers = AnswerCache(cache_path) if cache_path else None
        except (sqlite3.Error, OSError) as exc:
            raise fail(f"cannot use the answer cache {cache_path}: {exc}") from None
        try:
            with open(input, "rb") as source:
                estimate = judge_dry_run(source, config, price_input, price_output, answers)
        finally:
            if answers is not None:
                answers.close()
        typer.echo(json.dumps(estimate, indent=2))
        return
    try:
        check_endpoint(config.base_url, bool(os.environ.get(api_key_env)), allow_insecure_http)
    except InsecureEndpoint as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if not os.environ.get(api_key_env):
        err(f"note: ${api_key_env} is not set; requests go without an API key (fine for local servers)")
    out_path = Path(output)
    show = not quiet and sys.stderr.isatty()

    def report(error) -> None:
        if not quiet:
            err(printable(f"skipped {error}" if on_error_mode == "skip" else f"error: {error}"))

    replacing = overwrite and out_path.is_file() and out_path.stat().st_size > 0
    kept = f"{out_path} was left as it was (--overwrite replaces it only when a run finishes)"
    stopped = f"interrupted: {kept if replacing else 'labels judged so far were kept'}"
    try:
        with progress_bar(show, count_lines(input) if show else None, "judging") as tick:
            summary, client = judge_path(
                config,
                input,
                out_path,
                cache_path=cache_path,
                overwrite=overwrite,
                on_error=on_error_mode,
                progress=tick,
                report_error=report,
            )
    except PermError as exc:  # refused outputs or cache (before anything is sent), a refused key or
        # unreachable endpoint, a full disk
        if not isinstance(exc, RunStopped | OutputWriteError):
            raise library_error(exc) from None
        raise fail(printable(str(exc))) from None
    except KeyboardInterrupt:
        raise fail(stopped, EXIT_INTERRUPTED) from None
    except OSError as exc:  # reading the input
        raise fail(f"cannot read {input}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise fail(f"judging failed ({type(exc).__name__}: {printable(str(exc))})") from None
    stats = client.stats
    if not quiet:
        nulls = ", ".join(f"{k} {v}" for k, v in summary.null_labels.items() if v) or "none"
        err(
            f"judged {summary.records} records in {summary.seconds:.1f} s: {stats.calls} requests "
            f"({stats.retries} retries, {stats.failed} failed), {stats.cached} answers from the cache, "
            f"{stats.input_tokens} input + {stats.output_tokens} output tokens billed; null labels: {nulls}"
        )
        if summary.failed_calls:
            err(f"{summary.failed_calls} calls failed: their labels are null (see judge.*.problem in {out_path})")
    if summary.interrupted:
        raise fail(stopped, EXIT_INTERRUPTED)
    if summary.stopped_early:
        raise typer.Exit(EXIT_STOPPED)
    if summary.errors or summary.failed_calls:
        raise typer.Exit(EXIT_RECORD_ERRORS)
