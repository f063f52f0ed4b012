"""Scoring JSONL files: streaming, per-record errors, resume, summaries.

The CLI is a thin layer over `score_file`; other front ends (services, Ray) reuse
`read_records` and `output_record`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from perm_lite.records import Dialogue, RecordError, parse_record
from perm_lite.scales import PERSPECTIVES
from perm_lite.scorer import Result, Scorer

OUTPUT_FIELDS = ("scores", "combined", "perm")


@dataclass
class ParsedLine:
    line: int
    record: dict[str, Any] | None = None
    dialogue: Dialogue | None = None
    error: RecordError | None = None


@dataclass
class Summary:
    scored: int = 0
    errors: int = 0
    resumed: int = 0  # lines already done in a previous run
    seconds: float = 0.0
    stopped_early: bool = False
    interrupted: bool = False
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*PERSPECTIVES, "combined"), 0.0))
    replaced_fields: int = 0

    def add(self, result: Result) -> None:
        self.scored += 1
        for name in PERSPECTIVES:
            self.sums[name] += result.scores[name]
        self.sums["combined"] += result.combined

    @property
    def means(self) -> dict[str, float]:
        return {k: round(v / self.scored, 4) for k, v in self.sums.items()} if self.scored else {}

    def to_dict(self) -> dict[str, Any]:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        return {
            "scored": self.scored,
            "errors": self.errors,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "records_per_second": round(rate, 2),
            "means": self.means,
            "stopped_on_error": self.stopped_early,
            "interrupted": self.interrupted,
        }


def parse_line(line_no: int, raw: bytes, field_map: Mapping[str, str] | None = None) -> ParsedLine:
    """Decode and validate one JSONL line; errors name the line and field."""
    where = f"line {line_no}"
    try:
        text = raw.decode("utf-8")
        if line_no == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as exc:
        err = RecordError(f"not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8", None, where)
        return ParsedLine(line_no, error=err)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        err = RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}; each line must be one JSON object")
        return ParsedLine(line_no, error=err.at(where))
    try:
        dialogue = parse_record(record, field_map)
    except RecordError as exc:
        rec = record if isinstance(record, dict) else None
        return ParsedLine(line_no, record=rec, error=exc.at(where))
    return ParsedLine(line_no, record=record, dialogue=dialogue)


def read_records(stream: IO[bytes], field_map: Mapping[str, str] | None = None) -> Iterator[ParsedLine]:
    """Yield every non-blank line of a JSONL byte stream, parsed or with its error."""
    for line_no, raw in enumerate(stream, start=1):
        if raw.strip():
            yield parse_line(line_no, raw.rstrip(b"\r\n"), field_map)


def output_record(record: Mapping[str, Any], result: Result, line: int | None) -> dict[str, Any]:
    """The input record, untouched, plus `scores`, `combined` and `perm` (model, truncation, line)."""
    out = {k: v for k, v in record.items() if k not in OUTPUT_FIELDS}
    out["scores"] = result.scores
    out["combined"] = result.combined
    out["perm"] = {
        "model": result.model,
        "version": result.model_version,
        "line": line,
        "truncated": result.truncated,
        "tokens": result.tokens,
    }
    return out


def prepare_resume(out_path: Path) -> set[int]:
    """Lines already scored in OUT; a torn last line (from a hard kill) is cut off first."""
    done: set[int] = set()
    if not out_path.exists():
        return done
    with open(out_path, "rb+") as fh:
        data = fh.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            fh.truncate(end)
    for n, raw in enumerate(data[:end].splitlines(), start=1):
        try:
            done.add(int(json.loads(raw)["perm"]["line"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(
                f"cannot resume: output line {n} is not a perm-lite result ({exc}); "
                "pass a different -o or remove the file"
            ) from None
    return done


def previous_error_lines(errors_path: Path | None) -> set[int]:
    lines: set[int] = set()
    if errors_path is None or not errors_path.exists():
        return lines
    with open(errors_path, "rb") as fh:
        for raw in fh:
            try:
                lines.add(int(json.loads(raw)["line"]))
            except (ValueError, KeyError, TypeError):
                continue
    return lines


class _StopFlag:
    """Turns SIGTERM into a clean stop after the current chunk is written."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def score_file(
    scorer: Scorer,
    source: IO[bytes],
    sink: IO[str],
    errors_sink: IO[str] | None,
    *,
    on_error: str = "skip",
    skip_lines: set[int] | frozenset[int] = frozenset(),
    field_map: Mapping[str, str] | None = None,
    chunk_size: int = 512,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
) -> Summary:
    """Score a JSONL stream into `sink`, one output line per good record, in input order.

    Bad records go to `errors_sink` (JSON lines with line, field and reason) and to
    `report_error`; with `on_error="stop"` the run ends at the first one, after writing
    every good record before it. Lines in `skip_lines` (a resumed run) are not scored.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError("on_error must be 'skip' or 'stop'")
    summary = Summary()
    started = time.perf_counter()
    pending: list[ParsedLine] = []

    def flush() -> None:
        if not pending:
            return
        results = scorer.score_dialogues([p.dialogue for p in pending])
        lines = []
        for parsed, result in zip(pending, results):
            if any(k in parsed.record for k in OUTPUT_FIELDS):
                summary.replaced_fields += 1
            lines.append(json.dumps(output_record(parsed.record, result, parsed.line), ensure_ascii=False) + "\n")
            summary.add(result)
        sink.write("".join(lines))  # whole lines only: a chunk is written in one call
        sink.flush()
        if progress:
            progress(len(pending))
        pending.clear()

    with _StopFlag() as stop:
        try:
            for parsed in read_records(source, field_map):
                if parsed.line in skip_lines:
                    summary.resumed += 1
                    continue
                if parsed.error is not None:
                    summary.errors += 1
                    if errors_sink is not None:
                        errors_sink.write(json.dumps(error_record(parsed), ensure_ascii=False) + "\n")
                        errors_sink.flush()
                    if report_error:
                        report_error(parsed.error)
                    if progress:
                        progress(1)
                    if on_error == "stop":
                        summary.stopped_early = True
                        break
                    continue
                pending.append(parsed)
                if len(pending) >= chunk_size:
                    flush()
                    if stop.set:
                        summary.interrupted = True
                        break
            flush()
        except KeyboardInterrupt:
            summary.interrupted = True
            flush()
    summary.seconds = time.perf_counter() - started
    return summary


def error_record(parsed: ParsedLine) -> dict[str, Any]:
    """The errors-file entry of a bad line: line, field, reason, and the record's id if it has one."""
    err = parsed.error
    out: dict[str, Any] = {"line": parsed.line, "field": err.field, "error": err.reason}
    if parsed.record is not None and "id" in parsed.record:
        out["id"] = parsed.record["id"]
    return out


def open_input(path: str) -> IO[bytes]:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def count_lines(path: str) -> int | None:
    """Non-blank line count for a progress total (None for stdin)."""
    if path == "-":
        return None
    total = 0
    with open(path, "rb") as fh:
        for raw in fh:
            total += bool(raw.strip())
    return total


def default_errors_path(output: str) -> Path:
    return Path("perm-errors.jsonl") if output == "-" else Path(output + ".errors.jsonl")


def fsync_close(handle: IO[str]) -> None:
    handle.flush()
    try:
        os.fsync(handle.fileno())
    except (OSError, ValueError):
        pass
    handle.close()
