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

Never a silent hang: before anything runs, the actors (each reserving one CPU slot per
onnxruntime thread, and one GPU with a GPU provider) are sized against the cluster's
resources. A configuration Ray could never schedule (more threads than a node has CPUs,
more actors than fit, or actors holding every CPU that the dataset's own read or map tasks
need) is refused with `RayResourceError`, naming the numbers and the fix. `workers=None`
picks the most actors that fit.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perm_lite import providers as provider_table
from perm_lite.errors import OptionError, PermError
from perm_lite.records import RecordError, parse_record
from perm_lite.scales import PERSPECTIVES

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import ray

# A killed actor restarts and its batch is retried: Ray Data's actor pools default to
# max_restarts=-1 and max_task_retries=-1 (passing them again is deprecated in Ray 2.60).
# Scorer options the actors set themselves (threads from threads_per_worker, batch size
# from inference_batch_size, provider from the resource plan).
_RESERVED_OPTIONS = {
    "threads": "threads_per_worker",
    "batch_size": "inference_batch_size",
}


class RayResourceError(PermError, ValueError):
    """A Ray configuration that could never be scheduled (it would wait forever)."""


def score_columns(perspectives: tuple[str, ...] = PERSPECTIVES) -> list[str]:
    """The columns Parquet scoring adds: `perm_<perspective>` per head of the model, then
    `perm_combined`, `perm_truncated` and `perm_error`."""
    return [f"perm_{p}" for p in perspectives] + ["perm_combined", "perm_truncated", "perm_error"]


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
        provider: str = "cpu",
    ) -> None:
        from perm_lite.scorer import Scorer

        self.scorer = Scorer(model, provider=provider, threads=threads, batch_size=batch_size, **(scorer_options or {}))
        self.field_map = dict(field_map or {})
        pid_dir = os.environ.get("PERM_LITE_RAY_PID_DIR")  # tests: kill a worker mid-run, see its settings
        if pid_dir:
            settings = {"provider": provider, "threads": threads, "batch_size": batch_size, **(scorer_options or {})}
            Path(pid_dir, f"{os.getpid()}.pid").write_text(json.dumps(settings, default=str))


def _failure(exc: Exception) -> RecordError:
    from perm_lite.jsonl import printable

    return RecordError(f"cannot read this record ({type(exc).__name__}: {printable(str(exc))[:300]})")


class ScoreRows(_ActorScorer):
    """map_batches callable: pyarrow batch of records in -> same columns + score columns out.
    A row that cannot be parsed or scored gets its reason in `perm_error`; the others are scored."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from perm_lite.batch import score_isolated
        from perm_lite.jsonl import printable
        from perm_lite.scorer import Result

        rows = batch.to_pylist()
        heads = self.scorer.heads.names
        added = score_columns(heads)
        dialogues, where = [], []
        errors: list[str | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            try:
                cleaned = {k: _clean(v) for k, v in row.items() if k not in added}
                record = {k: v for k, v in cleaned.items() if v is not None}
                dialogues.append(parse_record(record, self.field_map))
                where.append(i)
            except RecordError as exc:
                errors[i] = printable(str(exc))
            except Exception as exc:  # one row's failure is that row's error
                errors[i] = printable(str(_failure(exc)))
        columns: dict[str, list] = {c: [None] * len(rows) for c in added}
        for i, outcome in zip(where, score_isolated(self.scorer, dialogues)):
            if isinstance(outcome, Result):
                values = [outcome.scores[p] for p in heads] + [outcome.combined]
                if all(math.isfinite(v) for v in values):
                    for p in heads:
                        columns[f"perm_{p}"][i] = outcome.scores[p]
                    columns["perm_combined"][i] = outcome.combined
                    columns["perm_truncated"][i] = outcome.truncated
                    continue
                outcome = RecordError("the model gave a non-finite score; nothing written", "scores")
            errors[i] = printable(str(outcome))
        columns["perm_error"] = errors
        types = {"perm_truncated": pa.bool_(), "perm_error": pa.string()}
        out = batch.drop_columns([c for c in added if c in batch.column_names])
        for name, values in columns.items():
            out = out.append_column(name, pa.array(values, type=types.get(name, pa.float64())))
        return out


class ScoreLines(_ActorScorer):
    """map_batches callable for raw JSONL lines (path, line, raw) -> (path, line, output, error).

    `output` is one strict JSON line (no NaN, valid UTF-8) and `error` one errors-file line,
    both as the local engine writes them; a line that cannot be read, parsed, scored or
    written is that line's error and never costs another."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from perm_lite.batch import score_isolated
        from perm_lite.jsonl import error_line, error_record, output_line, parse_line
        from perm_lite.scorer import Result

        paths, lines, raws = (batch.column(c).to_pylist() for c in ("path", "line", "raw"))
        parsed = [parse_line(n, raw, self.field_map) for n, raw in zip(lines, raws)]
        outputs: list[str | None] = [None] * len(parsed)
        good = [i for i, p in enumerate(parsed) if p.error is None]
        outcomes = score_isolated(self.scorer, [parsed[i].dialogue for i in good])
        for i, outcome in zip(good, outcomes):
            p = parsed[i]
            if isinstance(outcome, Result):
                try:
                    outputs[i] = output_line(p.record, outcome, lines[i]).removesuffix("\n")
                    continue
                except RecordError as exc:
                    outcome = exc
            p.error = outcome.at(f"line {p.line}")
        errors: list[str | None] = [None] * len(parsed)
        for i, p in enumerate(parsed):
            if p.error is not None:
                errors[i] = error_line({"file": paths[i], **error_record(p)}).removesuffix("\n")
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


# -- sizing the actors from the cluster -----------------------------------------------------


@dataclass(frozen=True)
class ActorPlan:
    """How many scoring actors, and what each reserves and runs."""

    workers: int
    threads: int  # onnxruntime threads = CPU slots per actor
    gpus: int  # GPUs per actor (0 or 1)
    provider: str  # what each actor's Scorer is asked for


_NO_TASKS = {"InputData", "Limit", "Union", "Count", "StreamingSplit"}


def _task_cpus(args: Mapping[str, Any]) -> float:
    cpus = args.get("num_cpus")
    return 1.0 if cpus is None else float(cpus)  # Ray Data's default for read and map tasks


def pending_cpus(ds: ray.data.Dataset) -> tuple[float, float]:
    """(CPU slots one task of the dataset's pending operators needs, CPU slots its own actor
    pools hold) from the dataset's logical plan: (0, 0) for data already in memory
    (`from_items`, `from_arrow`, a materialized dataset); (1, 0) for `read_json` and
    friends (each read task takes one CPU). What cannot be read from the plan counts as a
    task of one CPU."""
    try:
        root = ds._logical_plan.dag
    except AttributeError:
        return 1.0, 0.0
    need, held, seen, stack = 0.0, 0.0, set(), [root]
    while stack:
        op = stack.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        stack.extend(getattr(op, "input_dependencies", None) or [])
        names = {cls.__name__ for cls in type(op).__mro__}
        args = getattr(op, "ray_remote_args", None)
        if isinstance(args, Mapping):
            compute = getattr(op, "compute", None)
            if type(compute).__name__ == "ActorPoolStrategy":
                held += _task_cpus(args) * float(getattr(compute, "min_size", 1) or 1)
            else:
                need = max(need, _task_cpus(args))
        elif "AbstractFrom" in names or names & _NO_TASKS:
            continue
        else:  # shuffles, sorts, joins, file listing: tasks of (at least) one CPU
            need = max(need, 1.0)
    return need, held


def _cluster() -> tuple[list[float], float, dict[str, float]]:
    """(CPUs of each alive node, GPUs in all, available resources now)."""
    import ray

    if not ray.is_initialized():
        ray.init()  # what Ray Data would do when the dataset runs
    nodes = [n for n in ray.nodes() if n.get("Alive", n.get("alive", False))]
    cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes]
    total = ray.cluster_resources()
    if not cpus:
        cpus = [float(total.get("CPU", 0.0))]
    return cpus, float(total.get("GPU", 0.0)), dict(ray.available_resources())


def _fmt(x: float) -> str:
    return f"{x:g}"


def plan_actors(
    workers: int | None,
    threads: int,
    provider: str = "cpu",
    *,
    task_cpus: float = 0.0,
    held_cpus: float = 0.0,
    names: tuple[str, str] = ("workers", "threads_per_worker"),
    task_what: str = "this dataset's read and map tasks",
    cluster: tuple[list[float], float, dict[str, float]] | None = None,
) -> ActorPlan:
    """Size the scoring actors from the cluster's resources, or refuse a configuration that
    Ray could never schedule (`RayResourceError`: it would wait forever).

    Each actor reserves `threads` CPU slots on one node (and one GPU when it runs on a GPU);
    `task_cpus` CPU slots must stay free for the dataset's own tasks (a read task takes 1),
    `held_cpus` are already held by the dataset's other actor pools. `workers=None`: as
    many actors as fit. `names`: how the two settings are spelled in messages."""
    w_name, t_name = names
    needs_gpu = provider != provider_table.AUTO and provider_table.get(provider).gpu  # unknown: OptionError
    if threads < 1 or (workers is not None and workers < 1):
        raise OptionError(f"{w_name} and {t_name} must be at least 1")
    node_cpus, total_gpus, available = cluster or _cluster()
    total = sum(node_cpus) - held_cpus
    biggest = max(node_cpus, default=0.0)
    where = f"the Ray cluster has {_fmt(sum(node_cpus))} CPUs" + (
        f" ({len(node_cpus)} nodes, the largest {_fmt(biggest)})" if len(node_cpus) > 1 else ""
    )
    if held_cpus:
        where += f", {_fmt(held_cpus)} of them held by the dataset's other actors"
    if threads > biggest:
        raise RayResourceError(
            f"{t_name}={threads}: each scoring actor reserves {threads} CPUs on one node, but {where}; "
            f"it could never start and the run would wait forever. Use {t_name} <= {_fmt(biggest)}, "
            "or add bigger nodes."
        )
    fit_nodes = sum(int(c // threads) for c in node_cpus)  # actors that fit, node by node
    room = math.floor((total - task_cpus) / threads + 1e-9)  # leaving task_cpus free
    fit = min(fit_nodes, max(room, 0))
    gpus = 0
    use_provider = provider_table.CPU.name if provider == provider_table.AUTO else provider
    if needs_gpu or (provider == provider_table.AUTO and total_gpus >= (workers or 1)):
        if total_gpus < 1:
            raise RayResourceError(
                f"provider {provider!r}: the Ray cluster has no GPUs; each scoring actor would wait for one forever. "
                "Use provider 'cpu' (or 'auto'), or add GPU nodes."
            )
        gpus, use_provider = 1, provider
        fit = min(fit, int(total_gpus))
    budget = total - task_cpus  # CPUs the actors may hold
    materialize = " A dataset already in memory (ds.materialize()) needs no read tasks." if task_cpus else ""
    if workers is None:
        if fit < 1:
            keep = f" and {_fmt(task_cpus)} must stay free for {task_what}" if task_cpus else ""
            raise RayResourceError(
                f"{t_name}={threads}: no scoring actor fits: {where}{keep}; Ray would wait forever. "
                + (f"Use {t_name} <= {int(budget)}, or add CPUs." if budget >= 1 else "Add CPUs to the cluster.")
                + materialize
            )
        workers = fit
    elif workers > fit:
        need = workers * threads
        if gpus and workers > total_gpus:
            raise RayResourceError(
                f"{w_name}={workers} with provider {provider!r}: each actor needs a GPU, but the Ray cluster has "
                f"{_fmt(total_gpus)}; Ray would wait forever. Use {w_name} <= {int(total_gpus)}, or provider 'cpu'."
            )
        if workers > fit_nodes:
            problem = f"{where}: only {fit_nodes} actors of {threads} CPUs fit"
        else:
            problem = (
                f"they would hold {_fmt(need)} of the {_fmt(total)} CPUs, leaving {_fmt(max(total - need, 0))} "
                f"for {task_what}, which need {_fmt(task_cpus)} CPU each: those tasks could never run"
            )
        if budget >= 1:
            example = (fit, threads) if fit >= 1 else (int(budget), 1)
            hint = f"Use {w_name} x {t_name} <= {_fmt(budget)} (e.g. {w_name}={example[0]}, {t_name}={example[1]})"
        else:
            hint = "Add CPUs to the cluster"
        raise RayResourceError(
            f"{w_name}={workers} x {t_name}={threads} need {_fmt(need)} CPUs ({threads} per actor, on one node), "
            f"but {problem}; Ray would wait forever. {hint}, or leave {w_name} unset to size it from the cluster."
            + materialize
        )
    if available.get("CPU", 0.0) < workers * threads + task_cpus:
        warnings.warn(
            f"{w_name}={workers} x {t_name}={threads} need {workers * threads} CPUs and "
            f"{_fmt(available.get('CPU', 0.0))} are free now: the run waits until other Ray work releases them",
            RuntimeWarning,
            stacklevel=3,
        )
    return ActorPlan(workers=workers, threads=threads, gpus=gpus, provider=use_provider)


def check_scorer_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The Scorer options each actor gets; refuses (OptionError) one the Scorer does not take
    or one the actors set themselves, so that nothing passed is silently ignored."""
    import inspect

    from perm_lite.scorer import Scorer

    accepted = set(inspect.signature(Scorer.__init__).parameters) - {"self", "model", "provider"}
    for name in options:
        if name in _RESERVED_OPTIONS:
            raise OptionError(f"{name!r}: on Ray, pass {_RESERVED_OPTIONS[name]}= instead (it sizes each actor)")
        if name not in accepted:
            raise OptionError(f"unknown Scorer option {name!r}; accepted: {', '.join(sorted(accepted))}")
    return dict(options)


def _map_options(
    model: str,
    plan: ActorPlan,
    batch_size: int,
    inference_batch_size: int,
    field_map: Mapping[str, str] | None,
    scorer_options: Mapping[str, Any],
) -> dict[str, Any]:
    """map_batches arguments shared by both entry points: the actor pool and its Scorer."""
    import ray

    if batch_size < 1 or inference_batch_size < 1:
        raise OptionError("batch_size and inference_batch_size must be at least 1")
    options: dict[str, Any] = {
        "fn_constructor_kwargs": {
            "model": str(model),
            "threads": plan.threads,
            "batch_size": inference_batch_size,
            "field_map": field_map,
            "scorer_options": dict(scorer_options),
            "provider": plan.provider,
        },
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=plan.workers),
        "num_cpus": plan.threads,
    }
    if plan.gpus:
        options["num_gpus"] = plan.gpus
    return options


def score_dataset(
    ds: ray.data.Dataset,
    *,
    model: str = "default",
    workers: int | None = None,
    threads_per_worker: int = 1,
    batch_size: int = 64,
    inference_batch_size: int = 32,
    provider: str = "cpu",
    field_map: Mapping[str, str] | None = None,
    **scorer_options: Any,
):
    """A Ray Dataset of records -> the same rows with score columns (lazy, like any map).

    `workers` actors (None: as many as the cluster holds) each load the model once and run
    `threads_per_worker` onnxruntime threads (one CPU slot each); `batch_size` rows go to an
    actor per call, scored `inference_batch_size` at a time. `provider`: 'cpu', 'cuda' (one
    GPU per actor) or 'auto' (a GPU per actor when the cluster has one for each, else CPU).
    Other keywords go to each actor's `Scorer` (combine, weights, bystander_coef, cache_dir,
    max_batch_tokens, variant, revision). An impossible configuration raises
    `RayResourceError` here, before anything runs, instead of waiting forever."""
    options = check_scorer_options(scorer_options)
    task_cpus, held_cpus = pending_cpus(ds)
    plan = plan_actors(workers, threads_per_worker, provider, task_cpus=task_cpus, held_cpus=held_cpus)
    return ds.map_batches(ScoreRows, **_map_options(model, plan, batch_size, inference_batch_size, field_map, options))


def score_jsonl_lines(
    paths: list[str],
    *,
    model: str = "default",
    workers: int | None = None,
    threads_per_worker: int = 1,
    batch_size: int = 64,
    inference_batch_size: int = 32,
    provider: str = "cpu",
    field_map: Mapping[str, str] | None = None,
    **scorer_options: Any,
):
    """JSONL files -> a Dataset of (path, line, output JSON or null, error JSON or null), in order.
    Arguments as for `score_dataset`."""
    import ray

    options = check_scorer_options(scorer_options)
    # Reading takes no CPU slot (below), so the actors may hold every CPU.
    plan = plan_actors(workers, threads_per_worker, provider)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Blocks of `batch_size` lines, each read by a zero-CPU task (reading never waits
    # behind the scoring actors, which reserve one CPU slot per onnxruntime thread), at
    # most `workers` at a time (zero-CPU tasks are otherwise unbounded).
    # The files must be readable at the same path from every node (a shared filesystem).
    ranges = [r for path in paths for r in line_ranges(path, batch_size)]
    lines = ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges))).flat_map(
        _read_range, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=plan.workers)
    )
    return lines.map_batches(
        ScoreLines, **_map_options(model, plan, batch_size, inference_batch_size, field_map, options)
    )
