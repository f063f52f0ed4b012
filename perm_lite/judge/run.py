"""`perm judge`: four perspective judgements per record, in input order, with a dry run.

Output line = the input record + `labels` ({perspective: int or null}) + `judge` (model,
and per perspective the score, the judge's reason, the bystander's parts, the raw answer,
and why a score is null). Bad input lines are reported like `perm score` reports them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from perm_lite.batch import ParsedLine, error_record, read_records
from perm_lite.judge.client import CallFailed, ChatClient, JudgeConfig
from perm_lite.judge.parse import parse_answer
from perm_lite.records import RecordError
from perm_lite.rubric import PERSPECTIVE_ORDER, judge_messages

LABEL_FIELDS = ("labels", "judge")
# Typical answer lengths (tokens) of a compliant judge, for the dry run's estimate.
OUTPUT_TOKENS_ESTIMATE = {"resonation": 35, "expression": 35, "reception": 35, "bystander": 60}


@dataclass
class JudgeSummary:
    records: int = 0
    errors: int = 0
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
            key = request_key(config.model, messages, config.temperature)
            if cache is not None and cache.get(key) is not None:
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


async def _judge_record(client: ChatClient, parsed: ParsedLine, model: str) -> dict[str, Any]:
    async def one(perspective: str) -> dict[str, Any]:
        try:
            raw = await client.complete(judge_messages(parsed.dialogue, perspective))
        except CallFailed as exc:
            return {"score": None, "reason": None, "problem": f"request failed: {exc}", "raw": None}
        judgement = parse_answer(raw, perspective)
        return {**judgement.to_dict(), "raw": raw}

    answers = await asyncio.gather(*(one(p) for p in PERSPECTIVE_ORDER))
    per = dict(zip(PERSPECTIVE_ORDER, answers))
    out = {k: v for k, v in parsed.record.items() if k not in LABEL_FIELDS}
    out["labels"] = {p: per[p]["score"] for p in PERSPECTIVE_ORDER}
    out["judge"] = {"model": model, "line": parsed.line, "perspectives": per}
    return out


def judge_file(
    config: JudgeConfig,
    source: IO[bytes],
    sink: IO[str],
    errors_sink: IO[str] | None,
    *,
    cache=None,
    on_error: str = "skip",
    chunk_size: int = 64,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
) -> tuple[JudgeSummary, ChatClient]:
    """Judge every valid record of a JSONL stream; whole chunks are written in input order."""
    summary = JudgeSummary()
    started = time.perf_counter()

    async def main() -> ChatClient:
        client = ChatClient(config, cache)
        pending: list[ParsedLine] = []

        async def flush() -> None:
            if not pending:
                return
            outputs = await asyncio.gather(*(_judge_record(client, p, config.model) for p in pending))
            lines = []
            for out in outputs:
                for perspective, label in out["labels"].items():
                    if label is None:
                        summary.null_labels[perspective] += 1
                lines.append(json.dumps(out, ensure_ascii=False) + "\n")
            sink.write("".join(lines))
            sink.flush()
            summary.records += len(pending)
            if progress:
                progress(len(pending))
            pending.clear()

        try:
            for parsed in read_records(source):
                if parsed.error is not None:
                    summary.errors += 1
                    if errors_sink is not None:
                        errors_sink.write(json.dumps(error_record(parsed), ensure_ascii=False) + "\n")
                    if report_error:
                        report_error(parsed.error)
                    if on_error == "stop":
                        break
                    continue
                pending.append(parsed)
                if len(pending) >= chunk_size:
                    await flush()
            await flush()
        finally:
            await client.aclose()
        return client

    client = asyncio.run(main())
    summary.seconds = time.perf_counter() - started
    return summary, client
