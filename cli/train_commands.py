"""`perm train`, `perm export`, `perm eval` and `perm distill` (the `train` extra)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from perm_lite.cli.common import (
    EXIT_USAGE,
    err,
    fail,
    library_error,
    parse_mapping,
    progress_bar,
    quiet_torch,
    train_extra,
)

from perm_lite.errors import PermError


def train(
    config: Annotated[str | None, typer.Argument(help="JSON training config (see models/*/train_config.json).")] = None,
    data: Annotated[str | None, typer.Option(help="Data folder in the layout of ../shared/data.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (checkpoints, log, final/).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="Subsample the data (smoke runs).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads.")] = None,
) -> None:
    """Train a PERM reward model (needs the `train` extra). Reruns resume from the last checkpoint."""
    with train_extra("perm train"):
        from perm_lite.training.train import TrainConfig
        from perm_lite.training.train import train as run_training
    cfg = TrainConfig.from_file(
        config, data_dir=data, out_dir=out, steps=steps, max_examples=max_examples, threads=threads
    )
    with quiet_torch():
        final = run_training(cfg)
    typer.echo(str(final))


def export_model(
    checkpoint: Annotated[str, typer.Argument(help="Training output (final/ or checkpoint/).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Model directory to write.")],
    data: Annotated[str, typer.Option(help="Data folder: calibration, checks, score calibration.")],
    name: Annotated[str, typer.Option(help="Model name in config.json.")] = "perm-lite-minilm",
    version: Annotated[str, typer.Option(help="Model version.")] = "3.1.0",
    max_length: Annotated[int, typer.Option(help="Max tokens per record.")] = 384,
    keep_fp32: Annotated[bool, typer.Option(help="Also keep the fp32 variant (for CUDA).")] = False,
    max_check_records: Annotated[int, typer.Option(help="Limit val/test records checked (0 = all).")] = 0,
    calibration_records: Annotated[int, typer.Option(min=1, help="Training records for int8 calibration.")] = 300,
    ffn_blockwise_layers: Annotated[
        str,
        typer.Option(
            help="Layers whose FFN output projection runs blockwise 8-bit (MatMulNBits) instead of static "
            "int8: 'all', 'none' or e.g. '0,1' (default: the graph's own, 'none' for fused, '0' for qdq)."
        ),
    ] = "default",
    graph: Annotated[
        str,
        typer.Option(
            help="int8 graph: 'fused' (contrib operators written for speed), 'qdq' (the previous static QDQ "
            "export) or 'dynamic' (onnxruntime's optimizer + dynamic int8, a baseline that fails batch "
            "independence)."
        ),
    ] = "fused",
) -> None:
    """Export a checkpoint to ONNX, quantize to static int8, check it and calibrate it."""
    with train_extra("perm export"):
        from perm_lite.training.build import build_model_dir
    from perm_lite.training.export import GRAPHS

    if graph not in GRAPHS:
        raise fail(f"--graph takes {', '.join(GRAPHS)}, not {graph!r}", EXIT_USAGE)
    with quiet_torch():
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
            graph=graph,
        )
    typer.echo(json.dumps(report["quantization"], indent=2))


def _layer_list(text: str) -> list[int] | None | str:
    if text.strip() == "default":
        return "default"
    if text.strip() == "all":
        return None
    if text.strip() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        message = f"--ffn-blockwise-layers takes 'all', 'none' or comma-separated layer numbers, not {text!r}"
        raise fail(message, EXIT_USAGE) from None


def eval_model(
    data: Annotated[
        str | None, typer.Option(help="Data folder in the layout of ../shared/data (optional with --robustness).")
    ] = None,
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
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Only the robustness suite: degenerate rewrites of a good reply per context (contrastive set; "
            "with --data also held-out mint and iEval) and how often each scores above the original.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
) -> None:
    """Validity against baselines (length, TF-IDF ridge) in one run: held-out mint
    conversations, held-out iEval people, the contrastive check set and the older sources.
    With --robustness: the robustness suite only (no train extra needed)."""
    if robustness:
        _robustness(model, data, split, out, quiet)
        return
    if not data:
        raise fail("perm eval needs --data (the folder in the layout of ../shared/data)", EXIT_USAGE)
    with train_extra("perm eval"):
        from perm_lite.training.evaluate import run_evaluation, to_markdown
    checkpoints = parse_mapping(",".join(checkpoint or []), "--checkpoint") if checkpoint else {}
    with quiet_torch():
        result = _evaluate(model, data, split, no_model, checkpoints, max_length, chatbot_only, run_evaluation, quiet)
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(to_markdown(result))


def _evaluate(model, data, split, no_model, checkpoints, max_length, chatbot_only, run_evaluation, quiet=False):
    started = time.perf_counter()
    result = run_evaluation(
        "" if no_model else model,
        data,
        split,
        checkpoints=checkpoints,
        max_length=max_length,
        chatbot_only=chatbot_only,
        progress=None if quiet else (lambda message: err(f"perm eval: {message}")),
    )
    if not quiet:
        err(f"perm eval: done in {time.perf_counter() - started:.0f} s ({len(result.get('chatbot', {}))} predictors)")
    return result


def _robustness(model: str, data: str | None, split: str, out: str | None, quiet: bool) -> None:
    from perm_lite.scorer import Scorer
    from perm_lite.training import robustness as suite

    if data and not Path(data).is_dir():
        raise fail(f"--data {data} is not a folder", EXIT_USAGE)
    try:
        scorer = Scorer(model)
    except PermError as exc:
        raise library_error(exc) from None
    sets = suite.load_sets(Path(data) if data else None, split)
    if not data:
        err("perm eval --robustness: contrastive set only (give --data for held-out mint and iEval)")

    def predict(dialogues):
        import numpy as np

        results = []
        with progress_bar(not quiet, len(dialogues), "robustness") as tick:
            for start in range(0, len(dialogues), 256):
                results += scorer.score_dialogues(dialogues[start : start + 256])
                if tick:
                    tick(min(256, len(dialogues) - start))
        return np.array([[r.scores[h] for h in scorer.heads.names] + [r.combined] for r in results])

    report = suite.run_suite(predict, sets, outputs=(*scorer.heads.names, "combined"))
    if out:
        Path(out).write_text(json.dumps({"model": scorer.model_name, "split": split, "robustness": report}, indent=2))
    typer.echo(suite.to_markdown(report))
    verdict = all(r["passes"] for r in report.values())
    err(f"robustness: {'every rewrite at or below' if verdict else 'some rewrite above'} the {suite.TARGET:.0%} bar")


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
    with train_extra("perm distill"):
        from perm_lite.training.distill import distill as run_distill
    if not Path(labels).is_file():
        raise fail(f"labels file {labels} does not exist", EXIT_USAGE)
    out = Path(output)
    try:
        with quiet_torch():
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
        raise fail(str(exc)) from None
    typer.echo(json.dumps({"labels": report["labels"], "agreement_test": report["agreement_test"]}, indent=2))
    err(f"model written to {out} (card: {out / 'README.md'}); use it with --model {out}")
