"""The chunked run over a JSONL stream that `perm score` and `perm judge` share.

`run_chunks` reads records, skips lines a resumed run already did, reports bad lines to
the errors sink, collects chunks of good records, hands each chunk to `process_chunk` and
writes the chunk's good lines in input order in one call. With `on_error="stop"` the run
ends at the first bad record, after writing every good record before it. SIGTERM (and,
with `on_interrupt="finish"`, Ctrl-C) ends the run after the current chunk is written.

With `aligned=True` (scoring) the chunks of a resumed run are those of a run that skipped
nothing: a record's batch neighbours, and so its score to the last written digit, do not
depend on where an earlier run stopped (see `run_chunks`).

What a chunk becomes is the caller's: `process_chunk(chunk)` returns one outcome per
record, in order: an output line (`str`), a `Written` (the line and a value handed to
`on_written` once the line is written), or the record's `RecordError`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple, Protocol

from perm_lite.errors import OptionError, require_count
from perm_lite.jsonl import ParsedLine, error_line, error_record, read_records
from perm_lite.records import RecordError

ON_ERROR = ("skip", "stop")
ON_INTERRUPT = ("finish", "raise")


class Sink(Protocol):
    def write(self, text: str) -> Any: ...

    def flush(self) -> Any: ...


class Written(NamedTuple):
    """One record's output line (newline included) and what `on_written` gets for it."""

    text: str
    value: Any = None


Outcome = str | Written | RecordError


@dataclass
class RunStats:
    written: int = 0  # records whose output line was written
    errors: int = 0  # bad records (unreadable, invalid, or failing in `process_chunk`)
    resumed: int = 0  # lines skipped because an earlier run did them
    stopped_early: bool = False  # on_error="stop" ended the run at a bad record
    interrupted: bool = False  # SIGTERM or Ctrl-C ended the run after a chunk


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


def check_chunk_size(chunk_size: int) -> int:
    """Records per chunk: a whole number of at least 1 (`OptionError` otherwise)."""
    return require_count(chunk_size, "chunk_size")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise OptionError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    return on_error


def run_chunks(
    source: IO[bytes] | Iterable[bytes],
    sink: Sink,
    errors_sink: Sink | None,
    process_chunk: Callable[[list[ParsedLine]], Sequence[Outcome]],
    *,
    on_error: str = "skip",
    skip_lines: set[int] | frozenset[int] = frozenset(),
    field_map: Mapping[str, str] | None = None,
    chunk_size: int = 512,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
    on_written: Callable[[ParsedLine, Any], None] | None = None,
    on_interrupt: str = "finish",
    aligned: bool = False,
) -> RunStats:
    """Run `process_chunk` over the good records of a JSONL byte stream (see the module).

    Bad records go to `errors_sink` (one JSON line each: line, field, reason, id) and to
    `report_error`. `progress(n)` is told how many lines each step handled. Ctrl-C with
    `on_interrupt="finish"` while a chunk is processed finishes and writes that chunk, then
    stops (`interrupted`); while the next chunk is still being read, it stops at once and
    leaves those records to a resumed run. With "raise" it propagates at once (chunks
    already written stay written). Only a failure of the sinks or of `process_chunk`
    itself raises.

    `aligned`: lines in `skip_lines` still count towards the chunks, so every record falls
    in the chunk it falls in when nothing is skipped; a chunk holding any record still to
    do is processed whole, and only those records' outcomes are written or reported (a
    chunk all done is not processed). A resumed run then writes what an uninterrupted one
    writes, at a cost of at most one chunk processed again.
    """
    check_on_error(on_error)
    if on_interrupt not in ON_INTERRUPT:
        raise OptionError(f"on_interrupt must be 'finish' or 'raise', not {on_interrupt!r}")
    check_chunk_size(chunk_size)
    stats = RunStats()
    pending: list[ParsedLine] = []
    processing = False  # inside process_chunk: Ctrl-C finishes this chunk

    def record_error(parsed: ParsedLine) -> None:
        stats.errors += 1
        if errors_sink is not None:
            errors_sink.write(error_line(error_record(parsed)))
            errors_sink.flush()
        if report_error:
            report_error(parsed.error)

    def flush() -> bool:
        """Process and write the pending chunk; True when `stop` ended the run at a record."""
        nonlocal processing
        if not pending:
            return False
        if all(p.line in skip_lines for p in pending):  # aligned: a chunk an earlier run did
            pending.clear()
            return False
        processing = True
        outcomes = process_chunk(list(pending))
        processing = False
        if len(outcomes) != len(pending):
            raise RuntimeError(f"process_chunk returned {len(outcomes)} outcomes for {len(pending)} records")
        lines: list[str] = []
        done: list[tuple[ParsedLine, Any]] = []
        stopped = False
        handled = 0
        for parsed, outcome in zip(pending, outcomes):
            if parsed.line in skip_lines:  # aligned: done by an earlier run, processed for its neighbours
                continue
            handled += 1
            if isinstance(outcome, RecordError):
                parsed.error = outcome.at(f"line {parsed.line}")
                record_error(parsed)
                if on_error == "stop":
                    stopped = True
                    break
                continue
            written = outcome if isinstance(outcome, Written) else Written(outcome)
            lines.append(written.text)
            done.append((parsed, written.value))
        if lines:
            sink.write("".join(lines))  # whole lines only: a chunk is written in one call
            sink.flush()
        stats.written += len(done)
        if on_written:
            for parsed, value in done:
                on_written(parsed, value)
        if progress:
            progress(handled)
        pending.clear()
        stats.stopped_early = stats.stopped_early or stopped
        return stopped

    with _StopFlag() as stop:
        try:
            for parsed in read_records(source, field_map):
                if parsed.line in skip_lines:
                    stats.resumed += 1
                    if not (aligned and parsed.error is None):
                        continue
                elif parsed.error is not None:
                    if on_error == "stop" and flush():
                        break  # an earlier record failed first
                    record_error(parsed)
                    if progress:
                        progress(1)
                    if on_error == "stop":
                        stats.stopped_early = True
                        break
                    continue
                pending.append(parsed)
                if len(pending) >= chunk_size:
                    if flush():
                        break
                    if stop.set:
                        stats.interrupted = True
                        break
            flush()
        except KeyboardInterrupt:
            if on_interrupt == "raise":
                raise
            stats.interrupted = True
            if processing:  # the chunk being processed is finished; one still being read is left to --resume
                processing = False
                flush()
    return stats
