"""`perm explain` and `perm report`: why replies scored as they did, for one record or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import EXIT_FATAL, EXIT_RECORD_ERRORS, EXIT_USAGE, err, library_error

from perm_lite.errors import PermError


def _scorer(model: str, provider: str = "cpu"):
    from perm_lite.scorer import Scorer

    try:
        return Scorer(model, provider=provider)
    except (PermError, ValueError, OSError) as exc:  # one line, exit 2 for OptionError, else 1
        raise library_error(exc) from None


def _check_paths(input: str, out_path: Path | None, overwrite: bool) -> None:
    """Input must be a file (or -); OUTPUT must not be the input, nor exist without --overwrite."""
    from perm_lite.outputs import TargetError, check_target, input_identity

    if input != "-" and not Path(input).is_file():
        err(f"input {input} does not exist or is not a file")
        raise typer.Exit(EXIT_USAGE)
    if out_path is None:
        return
    try:
        check_target(out_path, "output", input_identity(input))
    except TargetError as exc:
        err(str(exc))
        raise typer.Exit(exc.code) from None
    if out_path.exists() and not overwrite:
        err(f"{out_path} exists; pass --overwrite to replace it")
        raise typer.Exit(EXIT_USAGE)


def render_terminal(explanation, check: str = "combined") -> None:
    """One explained record on a terminal: each sentence coloured by its contribution."""
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=False)
    result = explanation.result
    scores = ", ".join(f"{k} {v:.2f}" for k, v in result.scores.items())
    console.print(f"[bold]combined {result.combined:.3f}[/bold]  ({scores})")
    deltas = [c.deltas[check] for c in explanation.sentences]
    scale = max([abs(d) for d in deltas] + [1e-9])
    text = Text()
    for c in explanation.sentences:
        strength = abs(c.deltas[check]) / scale
        style = ("green" if c.deltas[check] > 0 else "red") + (" bold" if strength > 0.5 else "")
        text.append(c.text, style=style if strength > 0.1 else "")
        text.append(" ")
    console.print(text)
    for c in sorted(explanation.sentences, key=lambda c: c.deltas[check]):
        console.print(f"  {c.deltas[check]:+.3f}  {c.text}")
    console.print(f"[dim]green raised, red lowered the {check} score (change when the sentence is removed)[/dim]")


def explain(
    input: Annotated[str, typer.Argument(help="JSONL file of dialogues, or - for stdin.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output JSONL, or - for stdout.")] = "-",
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    context: Annotated[bool, typer.Option(help="Also measure each context turn.")] = False,
    check: Annotated[str, typer.Option(help="Score the terminal view colours by (a perspective or combined).")] = (
        "combined"
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT.")] = False,
) -> None:
    """Sentence-level explanations: how much each reply sentence moves every score (occlusion)."""
    from perm_lite.jsonl import open_input, printable, read_records
    from perm_lite.outputs import OutputWriteError

    out_path = None if output == "-" else Path(output)
    _check_paths(input, out_path, overwrite)
    scorer = _scorer(model)
    checks = scorer.heads.checks  # the model's perspectives, then the combined score
    if check not in checks:
        err(f"--check must be one of {', '.join(checks)}, not {check!r}")
        raise typer.Exit(EXIT_USAGE)
    explanations, errors = [], 0
    try:
        with open_input(input) as source:
            for parsed in read_records(source):
                if parsed.error is not None:
                    errors += 1
                    err(printable(f"skipped {parsed.error}"))
                    continue
                explanation = scorer.explain(parsed.dialogue, context=context)
                explanations.append((parsed, explanation))
    except OSError as exc:
        err(f"cannot read {input}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_FATAL) from None
    if out_path is None and len(explanations) == 1 and sys.stdout.isatty():
        render_terminal(explanations[0][1], check)
    else:
        lines = []
        for parsed, explanation in explanations:
            row = {"line": parsed.line, "id": parsed.dialogue.id, **explanation.to_dict()}
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        try:
            if out_path is None:
                sys.stdout.write("".join(lines))
            else:
                tmp = out_path.with_name(f".{out_path.name}.perm-tmp")
                tmp.write_text("".join(lines), encoding="utf-8")
                tmp.replace(out_path)
        except (OSError, OutputWriteError) as exc:
            err(f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}")
            raise typer.Exit(EXIT_FATAL) from None
    if errors:
        err(f"{errors} records skipped")
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
) -> None:
    """One self-contained HTML page about a scored file: distributions, groups, worst and best replies."""
    from perm_lite.html_report import write_report
    from perm_lite.outputs import default_errors_path

    source, out_path = Path(scored), Path(output)
    _check_paths(scored, out_path, overwrite)
    scorer = _scorer(model)
    errors_path = Path(errors) if errors else default_errors_path(scored)
    try:
        result = write_report(source, out_path, scorer, by=by, extremes=extremes, errors_path=errors_path)
    except OSError as exc:
        err(f"cannot write {output}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_FATAL) from None
    err(f"report of {len(result.rows)} scored records written to {out_path}")
    if result.unreadable:
        err(f"{len(result.unreadable)} lines were not scored records (first: line {result.unreadable[0]})")
