"""`perm explain` and `perm report`: why replies scored as they did, for one record or a file."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_RECORD_ERRORS,
    EXIT_USAGE,
    err,
    fail,
    library_error,
    parse_mapping,
    progress_bar,
)

from perm_lite.errors import OptionError, PermError
from perm_lite.jsonl import open_input
from perm_lite.records import RecordError


def _scorer(model: str, provider: str = "cpu"):
    from perm_lite.scorer import Scorer

    try:
        return Scorer(model, provider=provider)
    except (PermError, ValueError, OSError) as exc:  # one line, exit 2 for OptionError, else 1
        raise library_error(exc) from None


# Characters that would act on a terminal instead of showing: C0/C1 controls (ESC starts
# escape sequences), line and paragraph separators, and bidirectional overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """User text fit for a terminal: each control character written as its escape (`\\x1b`)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def render_terminal(explanation, check: str = "combined", console=None, title: str | None = None) -> None:
    """One explained record on a terminal: each sentence coloured by its contribution. User
    text is printed as text (never Rich markup), control characters shown as escapes."""
    from rich.console import Console
    from rich.text import Text

    if console is None:
        console = Console(stderr=False, markup=False, emoji=False, highlight=False)
    result = explanation.result
    header = Text()
    if title:
        header.append(shown(title) + "  ", style="dim")
    header.append(f"combined {result.combined:.3f}", style="bold")
    header.append("  (" + ", ".join(f"{shown(k)} {v:.2f}" for k, v in result.scores.items()) + ")")
    console.print(header)
    deltas = [c.deltas[check] for c in explanation.sentences]
    scale = max([abs(d) for d in deltas] + [1e-9])
    text = Text()
    for c in explanation.sentences:
        strength = abs(c.deltas[check]) / scale
        style = ("green" if c.deltas[check] > 0 else "red") + (" bold" if strength > 0.5 else "")
        text.append(shown(c.text), style=style if strength > 0.1 else "")
        text.append(" ")
    console.print(text)
    for c in sorted(explanation.sentences, key=lambda c: c.deltas[check]):
        console.print(Text(f"  {c.deltas[check]:+.3f}  {shown(c.text)}"))
    omitted = explanation.omitted
    if omitted.sentences_unseen or omitted.sentences_over_cap:
        note = f"{omitted.sentences_unseen} later sentences are past what the model reads (they cannot move the score)"
        if omitted.sentences_over_cap:
            note += f"; {omitted.sentences_over_cap} more were not measured (--max-sentences)"
        console.print(Text(note, style="dim"))
    console.print(
        Text(f"green raised, red lowered the {shown(check)} score (change when the sentence is removed)", style="dim")
    )


def _is_terminal(stream) -> bool:
    return stream.isatty()


def _row(parsed, explanation, scorer) -> str:
    """One output line: the record's line and id, `perm` (model, line: what --resume reads) and the explanation."""
    from perm_lite.jsonl import printable

    row = {
        "line": parsed.line,
        "id": parsed.dialogue.id,
        "perm": {"model": scorer.config.name, "version": scorer.config.version, "line": parsed.line},
        **explanation.to_dict(),
    }
    try:
        return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
    except (ValueError, TypeError, RecursionError) as exc:
        raise RecordError(f"cannot be written as JSON ({printable(str(exc))[:300]})") from None


def explain(
    input: Annotated[str, typer.Argument(help="JSONL file of dialogues, or - for stdin.")],
    output: Annotated[
        str, typer.Option("-o", "--output", help="Output JSONL, or - for stdout (a terminal gets a coloured view).")
    ] = "-",
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    context: Annotated[bool, typer.Option(help="Also measure each context turn.")] = False,
    check: Annotated[str, typer.Option(help="Score the terminal view colours by (a perspective or combined).")] = (
        "combined"
    ),
    fields: Annotated[
        str | None, typer.Option(help="Map field names, e.g. response=reply,query=question (ours=theirs).")
    ] = None,
    errors: Annotated[
        str | None,
        typer.Option(help="Where bad records are reported (default OUTPUT.errors.jsonl; perm-errors.jsonl with -o -)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run: skip lines already in OUTPUT.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing OUTPUT (and its errors file) once the run succeeds.")
    ] = False,
    max_sentences: Annotated[
        int, typer.Option(min=1, help="Reply sentences measured per record (the first the model reads).")
    ] = 64,  # perm_lite.explain.MAX_SENTENCES (not imported here: it pulls in the tokenizer)
    max_turns: Annotated[
        int, typer.Option(min=1, help="With --context: history turns measured per record (the newest it reads).")
    ] = 64,  # perm_lite.explain.MAX_TURNS
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """Sentence-level explanations: how much each reply sentence moves every score (occlusion).

    Only sentences the model reads are measured (later ones cannot move a score), at most
    --max-sentences per record. Lines are written as each record is explained; --resume
    continues an interrupted run; bad records go to the errors file."""
    from perm_lite.batch import ScoreRun
    from perm_lite.explain import explain_dialogue
    from perm_lite.jsonl import count_lines, printable
    from perm_lite.outputs import OutputWriteError, StreamSink
    from perm_lite.records import check_field_map
    from perm_lite.runner import Written, run_chunks

    if input != "-" and not Path(input).is_file():
        raise fail(f"input {input} does not exist or is not a file", EXIT_USAGE)
    try:
        field_map = check_field_map(parse_mapping(fields, "--fields"))
    except typer.BadParameter as exc:
        raise fail(f"--fields: {exc.message}", EXIT_USAGE) from None
    except OptionError as exc:
        raise fail(f"--fields: {exc}", EXIT_USAGE) from None
    try:  # every path checked (and locked, and a resumed output read) before the model loads
        run = ScoreRun(input, output, errors_path=errors, resume=resume, overwrite=overwrite)
    except PermError as exc:
        raise library_error(exc) from None
    try:
        scorer = _scorer(model)
        checks = scorer.heads.checks  # the model's perspectives, then the combined score
        if check not in checks:
            raise fail(f"--check must be one of {', '.join(checks)}, not {check!r}", EXIT_USAGE)
        terminal = run.output_path is None and _is_terminal(sys.stdout)
        show = not quiet and not terminal and _is_terminal(sys.stderr)
        error_count = 0

        def report_error(error) -> None:
            nonlocal error_count
            error_count += 1
            if error_count <= 20:
                err(printable(f"skipped {error}"))
            elif error_count == 21:
                err(f"... more errors in {run.errors_path}")

        def process(chunk) -> list:
            out = []
            for parsed in chunk:
                try:
                    explanation = explain_dialogue(
                        scorer,
                        parsed.dialogue,
                        context=context,
                        source=parsed.record,
                        field_map=field_map,
                        max_sentences=max_sentences,
                        max_turns=max_turns,
                    )
                    if terminal:
                        render_terminal(explanation, check, title=f"line {parsed.line}")
                        out.append(Written("", explanation))
                    else:
                        out.append(Written(_row(parsed, explanation, scorer), explanation))
                except RecordError as exc:
                    out.append(exc)
                except Exception as exc:  # one record's explanation must not end the run
                    out.append(
                        RecordError(f"could not be explained ({type(exc).__name__}: {printable(str(exc))[:300]})")
                    )
            return out

        started = time.perf_counter()
        with (
            open_input(input) as source,
            progress_bar(show, count_lines(input) if show else None, "explaining") as tick,
        ):
            stats = run.plan.run(
                lambda sink, errors_sink: run_chunks(
                    source,
                    sink,
                    errors_sink,
                    process,
                    skip_lines=run.skip_lines,
                    field_map=field_map,
                    chunk_size=1,  # each record written as soon as it is explained
                    progress=tick,
                    report_error=report_error,
                )
            )
    except OutputWriteError as exc:
        if run.output_path is None:
            StreamSink(sys.stdout).silence()  # a closed pipe: no second error when Python flushes at exit
        raise fail(printable(str(exc))) from None
    except OSError as exc:  # reading the input
        raise fail(f"cannot read {input}: {exc.strerror or exc}") from None
    finally:
        run.close()
    if not quiet:
        seconds = time.perf_counter() - started
        err(
            f"explained {stats.written} records in {seconds:.1f} s, {stats.errors} errors"
            + (f", {stats.resumed} already done" if resume else "")
        )
        if stats.errors and not (stats.interrupted and run.replacing):
            err(f"errors written to {run.errors_path}")
    if stats.interrupted:
        if run.replacing:
            err(f"interrupted: {run.output_path} was left as it was (--overwrite replaces it only when a run finishes)")
        else:
            err("interrupted: output holds every record explained so far; rerun with --resume to finish")
        raise typer.Exit(EXIT_INTERRUPTED)
    if stats.errors:
        raise typer.Exit(EXIT_RECORD_ERRORS)


def report(
    scored: Annotated[str, typer.Argument(help="Output of perm score (JSONL).")],
    output: Annotated[str, typer.Option("-o", "--output", help="HTML file to write.")] = "report.html",
    by: Annotated[str | None, typer.Option(help="Split the charts by this field, e.g. --by model.")] = None,
    model: Annotated[str, typer.Option(help="Model that explains the extremes (the one that scored).")] = "default",
    extremes: Annotated[int, typer.Option(min=0, help="Lowest and highest replies shown, each.")] = 5,
    errors: Annotated[
        str | None, typer.Option(help="perm score's errors file (default SCORED.errors.jsonl when present).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT.")] = False,
    fields: Annotated[
        str | None, typer.Option(help="The --fields SCORED was scored with, e.g. response=reply (ours=theirs).")
    ] = None,
) -> None:
    """One self-contained HTML page about a scored file: distributions, groups, worst and best replies."""
    from perm_lite.html_report import ReportRun

    try:
        field_map = parse_mapping(fields, "--fields")
    except typer.BadParameter as exc:
        raise fail(f"--fields: {exc.message}", EXIT_USAGE) from None
    try:  # paths checked and OUTPUT locked, then the file read, before the model loads
        run = ReportRun(scored, output, errors_path=errors, overwrite=overwrite, field_map=field_map)
    except PermError as exc:
        raise library_error(exc) from None
    try:
        run.read()
        scorer = _scorer(model)
        result = run.write(scorer, by=by, extremes=extremes)
    except PermError as exc:  # no scored record; writing the page (a full disk): OUTPUT left as it was
        raise library_error(exc) from None
    except OSError as exc:
        raise fail(f"cannot read {scored}: {exc.strerror or exc}", EXIT_FATAL) from None
    finally:
        run.close()
    err(f"report of {len(result.rows)} scored records written to {output}")
    if result.unreadable:
        err(f"{len(result.unreadable)} lines were not scored records (first: line {result.unreadable[0]})")
