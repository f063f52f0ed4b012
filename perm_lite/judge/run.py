"""`perm judge`: four perspective judgements per record, in input order, with a dry run.

Output line = the input record + `labels` ({perspective: int or null}) + `judge` (model,
and per perspective the score, the judge's reason, the bystander's parts, the raw answer,
and why a score is null). Bad input lines are reported like `perm score` reports them.

A call that fails (after its retries, or with a reply that is not a chat completion) nulls
that one label and is counted in `failed_calls`; the run goes on. A refused key (401/403)
raises `AuthFailed`, an endpoint no connection opens to `EndpointUnreachable` (both
`RunStopped`), and either ends the run: chunks already written stay written.

`judge_file` is the shared chunked runner (`perm_lite.runner.run_chunks`) with the judge
calls of a chunk as its step; `judge_path` adds `perm judge`'s run policy for files.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from perm_lite.jsonl import ParsedLine, read_records
from perm_lite.judge.client import CallFailed, ChatClient, JudgeConfig, RunStopped
from perm_lite.judge.parse import parse_answer
from perm_lite.outputs import OutputPlan, TargetError, check_target, default_errors_path, input_identity, plan_outputs
from perm_lite.records import RecordError
from perm_lite.rubric import PERSPECTIVE_ORDER, judge_messages
from perm_lite.runner import Outcome, Sink, Written, check_on_error, run_chunks

LABEL_FIELDS = ("labels", "judge")
# Typical answer lengths (tokens) of a compliant judge, for the dry run's estimate.
OUTPUT_TOKENS_ESTIMATE = {"resonation": 35, "expression": 35, "reception": 35, "bystander": 60}


@dataclass
class JudgeSummary:
    records: int = 0
    errors: int = 0  # bad input lines
    failed_calls: int = 0  # judge calls that failed for good (their labels are null)
    stopped_early: bool = False  # --on-error stop ended the run at a bad line
    interrupted: bool = False  # SIGTERM ended the run after a chunk
    null_labels: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PERSPECTIVE_ORDER, 0))
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _token_counter() -> tuple[Callable[[str], int], str]:
    """Token counting with o200k_base when tiktoken has it locally, else ~4 characters a token
    (looked up once per dry run, not once per prompt)."""
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("o200k_base")
        return (lambda text: len(encoding.encode(text))), "o200k_base"
    except Exception:  # not installed, or its file is not cached and the network is closed
        return (lambda text: max(1, len(text) // 4)), "characters/4"


def dry_run(
    source: IO[bytes], config: JudgeConfig, price_input: float, price_output: float, cache=None
) -> dict[str, Any]:
    """Calls, tokens and estimated cost, without sending anything."""
    from perm_lite.judge.cache import request_key

    records = calls = cached = input_tokens = output_tokens = errors = 0
    count_tokens, method = _token_counter()
    for parsed in read_records(source):
        if parsed.dialogue is None:
            errors += 1
            continue
        records += 1
        for perspective in PERSPECTIVE_ORDER:
            messages = judge_messages(parsed.dialogue, perspective)
            key = request_key(config.endpoint(), config.model, messages, config.temperature, config.max_tokens)
            hit = cache.get(key) if cache is not None else None
            if hit is not None and parse_answer(hit[0], perspective).score is not None:
                cached += 1
                continue
            calls += 1
            input_tokens += count_tokens("\n".join(m["content"] for m in messages)) + 3 * len(messages) + 3
            output_tokens += OUTPUT_TOKENS_ESTIMATE[perspective]
    cost = (input_tokens * price_input + output_tokens * price_output) / 1e6
    return {
        "records": records,
        "invalid_records": errors,
        "calls": calls,
        "cached_calls": cached,
        "input_tokens": input_tokens,
        "output_tokens_estimate": output_tokens,
        "token_count_method": method if calls else "none needed",
        "price_per_million": {"input": price_input, "output": price_output},
        "estimated_cost": round(cost, 4),
    }


async def _judge_record(client: ChatClient, parsed: ParsedLine, model: str, summary: JudgeSummary) -> dict[str, Any]:
    def usable(perspective: str) -> Callable[[str], bool]:
        return lambda text: parse_answer(text, perspective).score is not None

    async def one(perspective: str) -> dict[str, Any]:
        try:
            raw = await client.complete(judge_messages(parsed.dialogue, perspective), accept=usable(perspective))
        except RunStopped:  # a refused key, an endpoint that cannot be reached
            raise
        except CallFailed as exc:
            summary.failed_calls += 1
            return {"score": None, "reason": None, "problem": f"request failed: {exc}", "raw": None}
        except Exception as exc:  # never let one call cost the others: it becomes this label's problem
            summary.failed_calls += 1
            problem = f"request failed: {type(exc).__name__}: {client.scrub(str(exc))}"
            return {"score": None, "reason": None, "problem": problem, "raw": None}
        judgement = parse_answer(raw, perspective)
        return {**judgement.to_dict(), "raw": raw}

    answers = await asyncio.gather(*(one(p) for p in PERSPECTIVE_ORDER))
    per = dict(zip(PERSPECTIVE_ORDER, answers))
    out = {k: v for k, v in parsed.record.items() if k not in LABEL_FIELDS}
    out["labels"] = {p: per[p]["score"] for p in PERSPECTIVE_ORDER}
    out["judge"] = {"model": model, "line": parsed.line, "perspectives": per}
    return out


NOT_JSON = "the record holds NaN or Infinity, which JSON does not allow; it was not judged"


def _json_line(out: dict[str, Any]) -> str | None:
    """One strict-JSON output line (lone surrogates escaped); None when the record holds NaN."""
    try:
        text = json.dumps(out, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(out, ensure_ascii=True, allow_nan=False)
    return text + "\n"


def judge_file(
    config: JudgeConfig,
    source: IO[bytes],
    sink: Sink,
    errors_sink: Sink | None,
    *,
    cache=None,
    on_error: str = "skip",
    chunk_size: int = 64,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
) -> tuple[JudgeSummary, ChatClient]:
    """Judge every valid record of a JSONL stream; whole chunks are written in input order.

    Bad lines go to `errors_sink` and `report_error`; `on_error="stop"` ends the run at the
    first. SIGTERM ends it after the current chunk (`interrupted`); Ctrl-C and a refused key
    (`AuthFailed`) end it at once, cancelling the calls in flight."""
    check_on_error(on_error)
    summary = JudgeSummary()
    started = time.perf_counter()

    async def open_client() -> ChatClient:
        return ChatClient(config, cache)

    with asyncio.Runner() as loop:  # one event loop (and one HTTP client) for every chunk
        client = loop.run(open_client())

        async def judge_chunk(chunk: list[ParsedLine]) -> list[Outcome]:
            tasks = [asyncio.ensure_future(_judge_record(client, p, config.model, summary)) for p in chunk]
            try:
                outputs = await asyncio.gather(*tasks)
            except BaseException:  # a refused key (or an interrupt): stop the other calls now
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            out: list[Outcome] = []
            for output in outputs:
                line = _json_line(output)
                out.append(RecordError(NOT_JSON) if line is None else Written(line, output["labels"]))
            return out

        def written(parsed: ParsedLine, labels: dict[str, int | None]) -> None:
            for perspective, label in labels.items():
                if label is None:
                    summary.null_labels[perspective] += 1

        try:
            stats = run_chunks(
                source,
                sink,
                errors_sink,
                lambda chunk: loop.run(judge_chunk(chunk)),
                on_error=on_error,
                chunk_size=chunk_size,
                progress=progress,
                report_error=report_error,
                on_written=written,
                on_interrupt="raise",  # a chunk in hand is not asked again (calls cost money)
            )
        finally:
            loop.run(client.aclose())
    summary.records, summary.errors = stats.written, stats.errors
    summary.stopped_early, summary.interrupted = stats.stopped_early, stats.interrupted
    summary.seconds = time.perf_counter() - started
    return summary, client


# -- the run policy for files -------------------------------------------------------------


def judge_outputs(
    input_path: str | os.PathLike, output_path: str | os.PathLike, cache_path: Path | None, overwrite: bool
) -> OutputPlan:
    """`perm judge`'s OUTPUT and OUTPUT.errors.jsonl, protected as `perm score` protects its
    outputs: refused (`TargetError`) when one is the input (links included) or not a regular
    file, another run is writing it (`OutputBusy`), or it exists without `overwrite`; with
    `overwrite` written beside the target and renamed over it only when the run finishes.
    Both are locked until the run ends. The answer cache must not be any of those files."""
    input_path = os.fspath(input_path)
    out_path = Path(output_path)
    errors_path = default_errors_path(str(out_path))
    source = input_identity(input_path)
    check_target(out_path, "output", source)
    check_target(errors_path, "errors file", source)
    if cache_path is not None and (cache_path.exists() or cache_path.is_symlink()):
        check_target(cache_path, "answer cache", source)
    if cache_path is not None and os.path.realpath(cache_path) in {
        os.path.realpath(out_path),
        os.path.realpath(errors_path),
    }:
        raise TargetError(f"the answer cache {cache_path} is an output of this run; give --cache another path")

    def refuse(what: str, path: Path) -> str:  # decided by plan_outputs once both files are locked
        if what == "output":
            return f"{path} exists: use --overwrite (answers already paid for come from the cache {cache_path})"
        return f"{path} exists (bad records of an earlier run): use --overwrite to replace it, or another -o"

    return plan_outputs(input_path, out_path, errors_path, overwrite=overwrite, refuse_existing=refuse)


def default_cache_path(output_path: str | os.PathLike) -> Path:
    """OUTPUT.cache.sqlite: the answers of a run, so that a rerun pays only for what is missing."""
    return Path(os.fspath(output_path) + ".cache.sqlite")


def judge_path(
    config: JudgeConfig,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    cache_path: str | os.PathLike | None = None,
    use_cache: bool = True,
    overwrite: bool = False,
    on_error: str = "skip",
    chunk_size: int = 64,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
) -> tuple[JudgeSummary, ChatClient]:
    """Judge a JSONL file into OUTPUT (and OUTPUT.errors.jsonl) the way `perm judge` does.

    The answer cache is `cache_path` (default OUTPUT.cache.sqlite; none with `use_cache=False`).
    Refused before anything is sent or written: outputs as `judge_outputs` refuses them and
    a cache that cannot be opened (`TargetError`). A finished run (bad lines or failed calls
    included) replaces OUTPUT; an exception (`AuthFailed`, `OutputWriteError`, Ctrl-C) or
    SIGTERM during an `overwrite` leaves the old files as they were."""
    from perm_lite.judge.cache import AnswerCache

    check_on_error(on_error)
    cache_file = None
    if use_cache:
        cache_file = Path(cache_path) if cache_path is not None else default_cache_path(output_path)
    plan = judge_outputs(input_path, output_path, cache_file, overwrite)
    try:
        answers = AnswerCache(cache_file) if cache_file is not None else None
    except (sqlite3.Error, OSError) as exc:
        plan.close()  # the outputs' locks
        raise TargetError(f"cannot use the answer cache {cache_file}: {exc}", 1) from None
    clients: list[ChatClient] = []

    def body(sink, errors_sink) -> JudgeSummary:
        summary, client = judge_file(
            config,
            source,
            sink,
            errors_sink,
            cache=answers,
            on_error=on_error,
            chunk_size=chunk_size,
            progress=progress,
            report_error=report_error,
        )
        clients.append(client)
        return summary

    try:
        with open(input_path, "rb") as source:
            summary = plan.run(body)
    finally:
        plan.close()  # the outputs' locks, whatever happened (a no-op after the run)
        if answers is not None:
            answers.close()
    return summary, clients[0]
