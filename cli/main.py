"""The `perm` command: one module per command group, each only parsing options and calling
`perm_lite`; this module holds the app and registers them (in the order `perm --help` lists).

    score_commands    score (local engine and Ray)
    model_commands    info, env, fp32-variant, bench
    train_commands    train, export, eval, distill
    serve_commands    serve
    judge_commands    judge
    explain_commands  explain, report
    redteam_commands  redteam
    common            exit codes, one-line errors, option helpers, choices
"""

from __future__ import annotations

import typer
from perm_lite.cli import (
    explain_commands,
    judge_commands,
    model_commands,
    redteam_commands,
    score_commands,
    serve_commands,
    train_commands,
)

app = typer.Typer(
    name="perm",
    help="Score empathy in conversations from PERM's four perspectives, locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(score_commands.score)
app.command()(model_commands.info)
app.command()(model_commands.env)
app.command()(train_commands.train)
app.command("export")(train_commands.export_model)
app.command("eval")(train_commands.eval_model)
app.command("fp32-variant")(model_commands.fp32_variant)
app.command()(model_commands.bench)
app.command()(serve_commands.serve)
app.command()(judge_commands.judge)
app.command()(train_commands.distill)
app.command("explain")(explain_commands.explain)
app.command("report")(explain_commands.report)
app.command("redteam")(redteam_commands.redteam)
