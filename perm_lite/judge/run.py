"""`perm judge`: four perspective judgements per record, in input order, with a dry run.

Output line = the input record + `labels` ({perspective: int or null}) + `judge` (model,
and per perspective the score, the judge's reason, the bystander's parts, the raw answer,
and why a score is null). Bad input lines are reported like `perm score` reports them.

A call that fails (after its retries, or with a reply that is not a chat completion) nulls
that one label and is counted in `failed_calls`; the run goes on. A refused key (401/403)
raises `AuthFailed` and ends the run: chunks already written stay written.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from perm_lite.batch import ParsedLine, error_line, error_record, read_records
from perm_lite.judge.client import AuthFailed, CallFailed, ChatClient, JudgeConfig
from perm_lite.judge.parse import parse_answer
from perm_lite.records import RecordError
from perm_lite.rubric import PERSPECTIVE_ORDER, judge_messages

LABEL_FIELDS = ("labels", "judge")
# Typical answer lengths (tokens) of a compliant judge, for the dry run's estimate.
OUTPUT_TOKENS_ESTIMATE = {"resonation": 35, "expression": 35, "reception": 35, "bystander": 60}


@dataclass
class JudgeSummary:
    records: int = 0
    errors: int = 0  # bad input lines
    failed_calls: int = 0  # judge calls that failed for good (their labels are null)
    stopped_early: bool = False  # --on-error stop ended the run at a bad line
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
        except AuthFailed:
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
            tasks = [asyncio.ensure_future(_judge_record(client, p, config.model, summary)) for p in pending]
            try:
                outputs = await asyncio.gather(*tasks)
            except BaseException:  # a refused key (or an interrupt): stop the other calls now
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            lines, bad = [], []
            for parsed, out in zip(pending, outputs):
                line = _json_line(out)
                if line is None:
                    bad.append({"line": parsed.line, "field": None, "error": NOT_JSON})
                    continue
                for perspective, label in out["labels"].items():
                    if label is None:
                        summary.null_labels[perspective] += 1
                lines.append(line)
            sink.write("".join(lines))
            sink.flush()
            summary.records += len(lines)
            summary.errors += len(bad)
            if errors_sink is not None and bad:
                errors_sink.write("".join(json.dumps(b) + "\n" for b in bad))
            if progress:
                progress(len(pending))
            pending.clear()

        try:
            for parsed in read_records(source):
                if parsed.error is not None:
                    summary.errors += 1
                    if errors_sink is not None:
                        errors_sink.write(error_line(error_record(parsed)))
                    if report_error:
                        report_error(parsed.error)
                    if on_error == "stop":
                        summary.stopped_early = True
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
