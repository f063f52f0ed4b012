"""Score corpora on Ray Data (the `ray` extra): one onnxruntime session per actor.

    import ray
    from perm_lite.integrations.ray import score_dataset
    scored = score_dataset(ray.data.read_json("s3://bucket/logs/"), workers=8, threads_per_worker=2)

`score_dataset` keeps every input column and adds `perm_resonation`, `perm_expression`,
`perm_reception`, `perm_bystander`, `perm_combined`, `perm_truncated` and `perm_error`
(null when the row was scored; else why it was not, with the field). Rows may take any
input form the CLI accepts (`query`/`response`, `messages`, `completion`, field maps).

`score_jsonl_lines` is what `perm score --engine ray` runs on JSONL: each line is parsed on
the workers exactly as the local path parses it, so a bad line is reported with its file
and line number and never stops the others.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from perm_lite.records import RecordError, parse_record
from perm_lite.scales import PERSPECTIVES

SCORE_COLUMNS = [f"perm_{p}" for p in PERSPECTIVES] + ["perm_combined", "perm_truncated", "perm_error"]
RETRY_ARGS = {"max_restarts": -1, "max_task_retries": -1}  # a killed actor restarts; its batch is retried


def _clean(value: Any) -> Any:
    """Arrow/pandas missing values -> None, so absent fields read as absent."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class _ActorScorer:
    """One Scorer per actor (loaded once, when Ray starts the actor)."""

    def __init__(
        self,
        model: str = "default",
        threads: int = 1,
        batch_size: int = 32,
        field_map: Mapping[str, str] | None = None,
        scorer_options: Mapping[str, Any] | None = None,
    ) -> None:
        from perm_lite.scorer import Scorer

        self.scorer = Scorer(model, provider="cpu", threads=threads, batch_size=batch_size, **(scorer_options or {}))
        self.field_map = dict(field_map or {})
        pid_dir = os.environ.get("PERM_LITE_RAY_PID_DIR")  # tests: lets a test kill a worker mid-run
        if pid_dir:
            Path(pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))


class ScoreRows(_ActorScorer):
    """map_batches callable: pyarrow batch of records in -> same columns + score columns out."""

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        dialogues, where = [], []
        errors: list[str | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            cleaned = {k: _clean(v) for k, v in row.items() if k not in SCORE_COLUMNS}
            record = {k: v for k, v in cleaned.items() if v is not None}
            try:
                dialogues.append(parse_record(record, self.field_map))
                where.append(i)
            except RecordError as exc:
                errors[i] = str(exc)
        columns: dict[str, list] = {c: [None] * len(rows) for c in SCORE_COLUMNS}
        for i, result in zip(where, self.scorer.score_dialogues(dialogues)):
            for p in PERSPECTIVES:
                columns[f"perm_{p}"][i] = result.scores[p]
            columns["perm_combined"][i] = result.combined
            columns["perm_truncated"][i] = result.truncated
        columns["perm_error"] = errors
        types = {"perm_truncated": pa.bool_(), "perm_error": pa.string()}
        out = batch.drop_columns([c for c in SCORE_COLUMNS if c in batch.column_names])
        for name, values in columns.items():
            out = out.append_column(name, pa.array(values, type=types.get(name, pa.float64())))
        return out


class ScoreLines(_ActorScorer):
    """map_batches callable for raw JSONL lines (path, line, raw) -> (path, line, output, error)."""

    def __call__(self, batch):
        import pyarrow as pa

        from perm_lite.batch import error_record, output_record, parse_line

        paths, lines, raws = (batch.column(c).to_pylist() for c in ("path", "line", "raw"))
        parsed = [parse_line(n, raw, self.field_map) for n, raw in zip(lines, raws)]
        outputs: list[str | None] = [None] * len(parsed)
        errors: list[str | None] = [None] * len(parsed)
        good = [i for i, p in enumerate(parsed) if p.error is None]
        results = self.scorer.score_dialogues([parsed[i].dialogue for i in good])
        for i, result in zip(good, results):
            outputs[i] = json.dumps(output_record(parsed[i].record, result, lines[i]), ensure_ascii=False)
        for i, p in enumerate(parsed):
            if p.error is not None:
                errors[i] = json.dumps({"file": paths[i], **error_record(p)}, ensure_ascii=False)
        return pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "line": pa.array(lines, pa.int64()),
                "output": pa.array(outputs, pa.string()),
                "error": pa.array(errors, pa.string()),
            }
        )


def line_ranges(path: str, lines_per_range: int) -> list[dict]:
    """Byte ranges of `lines_per_range` lines each, found by one pass over the file on the
    driver (no JSON parsing); each range becomes one block, read by whichever worker gets it."""
    ranges, start, first, count, line_no = [], 0, 1, 0, 0
    with open(path, "rb") as fh:
        offset = 0
        for raw in fh:
            line_no += 1
            count += 1
            offset += len(raw)
            if count == lines_per_range:
                ranges.append({"path": path, "start": start, "end": offset, "first_line": first})
                start, first, count = offset, line_no + 1, 0
        if count:
            ranges.append({"path": path, "start": start, "end": offset, "first_line": first})
    return ranges


def _read_range(item: dict) -> list[dict]:
    with open(item["path"], "rb") as fh:
        fh.seek(item["start"])
        data = fh.read(item["end"] - item["start"])
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=item["first_line"]):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            out.append({"path": item["path"], "line": number, "raw": raw})
    return out


def _map_options(
    model: str,
    workers: int,
    threads: int,
    batch_size: int,
    field_map: Mapping[str, str] | None,
    scorer_options: Mapping[str, Any],
) -> dict[str, Any]:
    """map_batches arguments shared by both entry points: the actor pool and its Scorer."""
    import ray

    return {
        "fn_constructor_kwargs": {
            "model": str(model),
            "threads": threads,
            "batch_size": 32,
            "field_map": field_map,
            "scorer_options": dict(scorer_options),
        },
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=workers),
        "num_cpus": threads,
        "ray_remote_args_fn": _retry_args,
    }


def _retry_args() -> dict[str, Any]:
    return dict(RETRY_ARGS)


def score_dataset(
    ds,
    *,
    model: str = "default",
    workers: int = 1,
    threads_per_worker: int = 1,
    batch_size: int = 64,
    field_map: Mapping[str, str] | None = None,
    **scorer_options: Any,
):
    """A Ray Dataset of records -> the same rows with score columns (lazy, like any map)."""
    return ds.map_batches(
        ScoreRows,
        **_map_options(model, workers, threads_per_worker, batch_size, field_map, scorer_options),
    )


def score_jsonl_lines(
    paths: list[str],
    *,
    model: str = "default",
    workers: int = 1,
    threads_per_worker: int = 1,
    batch_size: int = 64,
    field_map: Mapping[str, str] | None = None,
    **scorer_options: Any,
):
    """JSONL files -> a Dataset of (path, line, output JSON or null, error JSON or null), in order."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Blocks of `batch_size` lines, each read by a zero-CPU task (reading never waits
    # behind the scoring actors, which reserve one CPU slot per onnxruntime thread), at
    # most `workers` at a time (zero-CPU tasks are otherwise unbounded).
    # The files must be readable at the same path from every node (a shared filesystem).
    ranges = [r for path in paths for r in line_ranges(path, batch_size)]
    lines = ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges))).flat_map(
        _read_range, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, workers))
    )
    return lines.map_batches(
        ScoreLines,
        **_map_options(model, workers, threads_per_worker, batch_size, field_map, scorer_options),
    )
