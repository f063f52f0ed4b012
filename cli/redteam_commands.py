"""`perm redteam`: search, as a policy would, for degenerate replies a model overpays."""

from __future__ import annotations

import json
import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import EXIT_USAGE, err, fail, library_error, progress_bar

from perm_lite.errors import PermError

EXIT_CHECK_FAILED = 5


class SetChoice(StrEnum):
    contrastive = "contrastive"
    mint = "mint"
    ieval = "ieval"


MAX_INPUT_BYTES = 64 * 2**20


def _load_input(path: str) -> list:
    """Good replies in their contexts from a JSONL file in `perm score`'s format; a bad
    line is reported (line and reason) and skipped."""
    from perm_lite.jsonl import read_records

    if path != "-" and Path(path).is_file() and Path(path).stat().st_size > MAX_INPUT_BYTES:
        raise fail(f"{path} is over {MAX_INPUT_BYTES >> 20} MB; give the red team a sample of contexts", EXIT_USAGE)
    dialogues = []
    try:
        with open(path, "rb") if path != "-" else os.fdopen(os.dup(0), "rb") as fh:
            for parsed in read_records(fh):
                if parsed.error is not None:
                    err(f"skipped {parsed.error}")
                elif parsed.dialogue is not None:
                    dialogues.append(parsed.dialogue)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    return dialogues


def _load_set(name: SetChoice, data: str | None, split: str) -> list:
    from perm_lite.training import robustness

    if name is SetChoice.contrastive:
        return robustness.contrastive_originals()
    if not data:
        raise fail(f"--set {name.value} needs --data (the folder in the layout of ../shared/data)", EXIT_USAGE)
    if not (Path(data) / name.value).is_dir():
        raise fail(f"--data {data} has no {name.value}/ folder", EXIT_USAGE)
    loader = robustness.mint_originals if name is SetChoice.mint else robustness.ieval_originals
    return loader(Path(data), split)


def _write(path: str, text: str, overwrite: bool) -> None:
    target = Path(path)
    if target.exists() and not overwrite:
        raise fail(f"{path} exists; pass --overwrite to replace it", EXIT_USAGE)
    if target.exists() and not target.is_file():
        raise fail(f"{path} is not a regular file", EXIT_USAGE)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a report, not a secret: the usual permissions, not mkstemp's 0600
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise fail(f"cannot write {path}: {exc.strerror or exc}") from None


def redteam(
    input: Annotated[
        str | None,
        typer.Argument(help="JSONL of good replies in their contexts (perm score's format); default: --set."),
    ] = None,
    model: Annotated[str, typer.Option(help="Model to attack: 'default', a catalogue name or a model directory.")] = (
        "default"
    ),
    set_name: Annotated[
        SetChoice, typer.Option("--set", help="Built-in contexts when no INPUT: contrastive (packaged), mint, ieval.")
    ] = SetChoice.contrastive,
    data: Annotated[str | None, typer.Option(help="Data folder (for --set mint / ieval).")] = None,
    split: Annotated[str, typer.Option(help="Split of --set mint / ieval: test or val.")] = "test",
    contexts: Annotated[int, typer.Option(min=1, max=1000, help="Contexts to search from (the first N).")] = 40,
    budget: Annotated[int, typer.Option(min=2, max=5000, help="Model calls per context.")] = 500,
    objective: Annotated[str, typer.Option(help="What the search maximises: 'combined' or a head name.")] = (
        "combined"
    ),
    seed: Annotated[int, typer.Option(help="Search seed.")] = 0,
    pools: Annotated[
        str,
        typer.Option(
            help="Where inserted sentences come from, comma-separated: context, reply, cliche, other "
            "('reply' alone: repetition, deletion and order only)."
        ),
    ] = "context,reply,cliche,other",
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="Report file: .html for a page, else text.")
    ] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Every context's figures as JSON.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing report files.")] = False,
    max_hack_rate: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help=f"Exit {EXIT_CHECK_FAILED} when the share of contexts hacked is above."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Act as an RL policy would: from good replies, search (beam search over inserting,
    deleting, repeating and moving sentences from the context, the reply, stock sympathy and
    other replies) for the reply the model rewards most, within a budget of model calls per
    context. Reports how often a *degenerate* reply (repetition, echoed context, imported
    stock or foreign material) beats the original. Works on any model directory."""
    from perm_lite import redteam as rt
    from perm_lite import redteam_report
    from perm_lite.scorer import Scorer

    for path in (output, json_out):
        if path and Path(path).exists() and not overwrite:
            raise fail(f"{path} exists; pass --overwrite to replace it", EXIT_USAGE)
    pool_names = tuple(p.strip() for p in pools.split(",") if p.strip())
    if not pool_names or set(pool_names) - set(rt.POOLS):
        raise fail(f"--pools takes some of {', '.join(rt.POOLS)}, not {pools!r}", EXIT_USAGE)
    dialogues = _load_input(input) if input else _load_set(set_name, data, split)
    dialogues = dialogues[:contexts]
    if not dialogues:
        raise fail("no contexts to search from (the input has no readable record)", EXIT_USAGE)
    try:
        scorer = Scorer(model)
        with progress_bar(not quiet, len(dialogues), "red team") as tick:
            report = rt.run(
                scorer, dialogues, budget, objective, seed, tick, model_name=scorer.model_name, pools=pool_names
            )
    except PermError as exc:
        raise library_error(exc) from None
    if output:
        body = redteam_report.to_html(report) if output.lower().endswith((".html", ".htm")) else None
        _write(output, body or redteam_report.to_text(report), overwrite)
    if json_out:
        _write(json_out, json.dumps(redteam_report.to_json(report), indent=1) + "\n", overwrite)
    if not output:
        typer.echo(redteam_report.to_text(report, show=5))
    else:
        typer.echo(redteam_report.summary_line(report))
    if max_hack_rate is not None and report.hack_rate > max_hack_rate:
        err(f"redteam: hack rate {report.hack_rate:.1%} is above --max-hack-rate {max_hack_rate:.1%}")
        raise typer.Exit(EXIT_CHECK_FAILED)
