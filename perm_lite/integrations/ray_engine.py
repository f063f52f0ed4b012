"""`perm score --engine ray`: JSONL or Parquet files/directories in, a directory out.

JSONL: every input file gives an output file of the same name in OUTPUT (input order), and
bad lines go to OUTPUT/_errors.jsonl with their file and line, as the local path reports
them. Parquet: good rows, with the score columns added, are written as Parquet files in
OUTPUT; bad rows go to OUTPUT/_errors.jsonl with their file and `id` (Parquet rows have no
line numbers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RaySummary:
    scored: int = 0
    errors: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


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
        raise ValueError(f"{path} holds no .jsonl or .parquet files")
    kinds = {"parquet" if f.suffix == ".parquet" else "jsonl" for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes JSONL and Parquet files; score them separately")
    return [str(f.resolve()) for f in files], kinds.pop()


def run(
    input_path: str,
    output_dir: str,
    *,
    address: str | None,
    model: str,
    workers: int,
    threads_per_worker: int,
    field_map: Mapping[str, str] | None,
    scorer_options: Mapping[str, Any],
    on_error: str = "skip",
) -> RaySummary:
    import ray

    from perm_lite.integrations.ray import score_dataset, score_jsonl_lines

    files, kind = input_files(input_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    summary = RaySummary()
    started = time.perf_counter()
    options = {"model": model, "workers": workers, "threads_per_worker": threads_per_worker, "field_map": field_map}
    with open(out / "_errors.jsonl", "w", encoding="utf-8") as errors:
        if kind == "jsonl":
            handles: dict[str, Any] = {}
            try:
                ds = score_jsonl_lines(files, **options, **scorer_options)
                for batch in ds.iter_batches(batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        if row["error"] is not None:
                            summary.errors += 1
                            errors.write(row["error"] + "\n")
                            if on_error == "stop":
                                raise _Stop
                            continue
                        path = row["path"]
                        if path not in handles:
                            handles[path] = open(out / Path(path).name, "w", encoding="utf-8")
                            summary.outputs.append(str(out / Path(path).name))
                        handles[path].write(row["output"] + "\n")
                        summary.scored += 1
            except _Stop:
                pass
            finally:
                for handle in handles.values():
                    handle.close()
        else:
            ds = score_dataset(_parquet_dataset(files), **options, **scorer_options)
            scored = ds.materialize()
            bad = scored.filter(lambda row: row["perm_error"] is not None).take_all()
            for row in bad:
                entry = {"file": row.get("path"), "id": row.get("id"), "error": row["perm_error"]}
                errors.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
            summary.errors = len(bad)
            good = scored.filter(lambda row: row["perm_error"] is None)
            summary.scored = good.count()
            good.drop_columns(["perm_error"]).write_parquet(str(out))
            summary.outputs = sorted(str(p) for p in out.glob("*.parquet"))
    if summary.errors == 0:
        (out / "_errors.jsonl").unlink()
    summary.seconds = time.perf_counter() - started
    return summary


class _Stop(Exception):
    pass


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
