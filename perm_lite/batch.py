"""Scoring JSONL: a stream (`score_file`) or files with the whole run policy (`score_path`).

`score_file` is the shared chunked runner (`perm_lite.runner.run_chunks`) with scoring as
its chunk step; `score_path` / `ScoreRun` add what `perm score` does around it: the output
and errors files checked and planned (`perm_lite.outputs`), a resumed run's done lines
skipped, the outputs committed when the run succeeds and a replacement dropped when it
fails or is interrupted. Reading and writing JSON lines is `perm_lite.jsonl`.

Two rules hold everywhere here. One bad record never costs another: whatever goes wrong
while reading, checking, scoring or writing one record becomes that record's error (line,
field, reason) and the run goes on. And a run never destroys what it did not create:
outputs are created exclusively, appended to (resume), or written to a temporary file
beside the target and renamed over it only when the run succeeds (`OutputFile`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from perm_lite.errors import OptionError
from perm_lite.jsonl import (
    OUTPUT_FIELDS,
    ParsedLine,
    open_input,
    output_line,
    prepare_resume,
    previous_error_lines,
    printable,
)
from perm_lite.outputs import TargetError, default_errors_path, plan_outputs
from perm_lite.records import Dialogue, RecordError, check_field_map
from perm_lite.runner import Outcome, Sink, Written, check_chunk_size, check_on_error, run_chunks
from perm_lite.scorer import Result, Scorer


@dataclass
class Summary:
    scored: int = 0
    errors: int = 0
    resumed: int = 0  # lines already done in a previous run
    seconds: float = 0.0
    stopped_early: bool = False
    interrupted: bool = False
    sums: dict[str, float] = field(default_factory=dict)  # per perspective (the model's), then "combined"
    replaced_fields: int = 0

    def add(self, result: Result) -> None:
        """Count a scored record; perspectives are the result's own (any model heads), in order."""
        self.scored += 1
        for name, value in result.scores.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.sums["combined"] = self.sums.pop("combined", 0.0) + result.combined  # kept last

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


def _failure(exc: Exception) -> RecordError:
    return RecordError(f"could not be scored ({type(exc).__name__}: {printable(str(exc))[:300]})")


def score_isolated(scorer: Scorer, dialogues: Sequence[Dialogue]) -> list[Result | RecordError]:
    """Score dialogues so that one that fails costs no other: the batch is scored at once,
    and only when that fails is each scored alone, a failure becoming that record's
    `RecordError`. When every record of a batch of two or more fails alone, the fault is
    not in the records (the model, the machine) and the first exception is raised."""
    if not dialogues:
        return []
    try:
        return list(scorer.score_dialogues(dialogues))
    except Exception as exc:
        if len(dialogues) == 1:
            return [_failure(exc)]
        first = exc
    out: list[Result | RecordError] = []
    for dialogue in dialogues:
        try:
            out.append(scorer.score_dialogues([dialogue])[0])
        except Exception as exc:
            out.append(_failure(exc))
    if all(isinstance(o, RecordError) for o in out):
        raise first
    return out


def score_file(
    scorer: Scorer,
    source: IO[bytes],
    sink: Sink,
    errors_sink: Sink | None,
    *,
    on_error: str = "skip",
    skip_lines: set[int] | frozenset[int] = frozenset(),
    field_map: Mapping[str, str] | None = None,
    chunk_size: int = 512,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
    annotate: Callable[[Dialogue, Result], Mapping[str, Any]] | None = None,
) -> Summary:
    """Score a JSONL stream into `sink`, one output line per good record, in input order.

    `annotate(dialogue, result)` returns extra output fields for a record (`perm score
    --explain`); a failure there is that record's error.

    Bad records (unreadable, invalid, or failing to score or to be written as strict
    JSON) go to `errors_sink` (JSON lines with line, field and reason) and to
    `report_error`; with `on_error="stop"` the run ends at the first one, after writing
    every good record before it. Lines in `skip_lines` (a resumed run) are not written
    again; they still count towards the chunks, so that every record is scored in the same
    batches as in an uninterrupted run (a chunk an earlier run left half done is scored
    again whole). SIGTERM and Ctrl-C end the run after the chunk being scored
    (`Summary.interrupted`).
    Only a failure of the sinks themselves (a full disk) or of the model for every
    record raises.
    """
    check_on_error(on_error)
    summary = Summary()
    started = time.perf_counter()

    def process(chunk: list[ParsedLine]) -> list[Outcome]:
        outcomes = score_isolated(scorer, [p.dialogue for p in chunk])
        out: list[Outcome] = []
        for parsed, outcome in zip(chunk, outcomes):
            if parsed.line in skip_lines:  # scored only as a neighbour of the others: dropped
                out.append("")
                continue
            if isinstance(outcome, Result):
                try:
                    extra = annotate(parsed.dialogue, outcome) if annotate else None
                    out.append(Written(output_line(parsed.record, outcome, parsed.line, extra), outcome))
                    continue
                except RecordError as exc:
                    outcome = exc
            out.append(outcome)
        return out

    def written(parsed: ParsedLine, result: Result) -> None:
        summary.add(result)
        if any(k in parsed.record for k in OUTPUT_FIELDS):
            summary.replaced_fields += 1

    stats = run_chunks(
        source,
        sink,
        errors_sink,
        process,
        on_error=on_error,
        skip_lines=skip_lines,
        field_map=field_map,
        chunk_size=chunk_size,
        progress=progress,
        report_error=report_error,
        on_written=written,
        aligned=True,  # a resumed run's batches are an uninterrupted run's: the same scores
    )
    summary.errors, summary.resumed = stats.errors, stats.resumed
    summary.stopped_early, summary.interrupted = stats.stopped_early, stats.interrupted
    summary.seconds = time.perf_counter() - started
    return summary


# -- the run policy for files -------------------------------------------------------------


class ScoreRun:
    """One `perm score` run on files, checked before anything is loaded or written.

    `input_path`: a JSONL file, or "-" for stdin. `output_path`: a file, or None / "-" for
    stdout. `errors_path`: where bad records go (default OUTPUT.errors.jsonl, or
    perm-errors.jsonl in the working directory when writing to stdout).

    Refused here, before the model is needed: an input that is missing or a directory
    (`OptionError`), `resume` without an output file (`OptionError`), an output or errors
    path that is the input, not a regular file, the same path for both, or an existing
    non-empty file without `resume` or `overwrite` (`TargetError`, `code` 2; a missing
    directory is code 1), an output or errors file another run is writing (`OutputBusy`,
    code 2), and with `resume` an output that is not perm output (`TargetError`, code 2).
    `resume` skips the lines already in OUTPUT and those already in the errors file;
    `overwrite` writes beside the old files and replaces them only when the run finishes.
    The outputs are locked from here until the run ends: run it once with `run(scorer)`,
    or `close()` it (or use it as a context manager) to give them up unrun. With stdout
    and the default errors file, an errors file of an earlier run there is replaced by this
    run's; `errors_path` may be /dev/null (bad records are only reported).
    """

    def __init__(
        self,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike | None = None,
        *,
        errors_path: str | os.PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.input_path = os.fspath(input_path)
        if self.input_path != "-":
            if not os.path.exists(self.input_path):
                raise OptionError(f"input file {self.input_path} does not exist")
            if os.path.isdir(self.input_path):
                raise OptionError(
                    f"input {self.input_path} is a directory; give a JSONL file (or --engine ray for directories)"
                )
        out = None if output_path is None or os.fspath(output_path) == "-" else Path(output_path)
        if resume and overwrite:
            raise OptionError("give --resume (continue OUTPUT) or --overwrite (replace it), not both")
        if out is None and resume:
            raise OptionError("--resume needs an output file (-o OUT.jsonl), not stdout")
        self.output_path = out
        self.errors_path = Path(errors_path) if errors_path is not None else default_errors_path(str(out or "-"))
        self.resume = resume
        self.plan = plan_outputs(
            self.input_path,
            out,
            self.errors_path,
            resume=resume,
            overwrite=overwrite,
            replace_earlier_errors=out is None and errors_path is None,
        )
        try:  # read (and a torn last line cut) only once the outputs are locked
            skip = prepare_resume(out) if (resume and out is not None) else set()
            if resume:
                skip |= previous_error_lines(self.errors_path)
        except RecordError as exc:  # OUT is not perm output: left untouched
            self.plan.close()
            raise TargetError(str(exc), 2) from None
        except OSError as exc:
            self.plan.close()
            raise TargetError(f"cannot read {exc.filename or out}: {exc.strerror or exc}", 1) from None
        except BaseException:
            self.plan.close()
            raise
        self.skip_lines = frozenset(skip)

    def close(self) -> None:
        """Give the run up unrun: nothing is written and the outputs' locks are released."""
        self.plan.close()

    def __enter__(self) -> ScoreRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def discards_errors(self) -> bool:
        """Whether bad records are only reported, not kept (`errors_path` /dev/null)."""
        return self.plan.errors.mode == "discard"

    @property
    def replacing(self) -> bool:
        """Whether the run writes beside an existing output and replaces it only on success."""
        return self.plan.replacing

    def run(
        self,
        scorer: Scorer,
        *,
        on_error: str = "skip",
        field_map: Mapping[str, str] | None = None,
        chunk_size: int = 512,
        progress: Callable[[int], None] | None = None,
        report_error: Callable[[RecordError], None] | None = None,
        annotate: Callable[[Dialogue, Result], Mapping[str, Any]] | None = None,
        stdout: IO[str] | None = None,
    ) -> Summary:
        """Score the input into the planned outputs (see `score_file`). The outputs are
        committed when the run ends, even with bad records or stopped at one; an interrupted
        run keeps an appended or new output (resume it later) and leaves a replaced one
        as it was. Any exception (`OutputWriteError`, an unreadable input, the model failing
        on every record) aborts the outputs the same way and is raised."""
        try:
            check_on_error(on_error)
            field_map = check_field_map(field_map)
            check_chunk_size(chunk_size)
            return self._run(scorer, on_error, field_map, chunk_size, progress, report_error, annotate, stdout)
        finally:
            self.plan.close()  # the locks, whatever happened

    def _run(
        self,
        scorer: Scorer,
        on_error: str,
        field_map: Mapping[str, str],
        chunk_size: int,
        progress: Callable[[int], None] | None,
        report_error: Callable[[RecordError], None] | None,
        annotate: Callable[[Dialogue, Result], Mapping[str, Any]] | None,
        stdout: IO[str] | None,
    ) -> Summary:
        with open_input(self.input_path) as source:
            return self.plan.run(
                lambda sink, errors_sink: score_file(
                    scorer,
                    source,
                    sink,
                    errors_sink,
                    on_error=on_error,
                    skip_lines=self.skip_lines,
                    field_map=field_map,
                    chunk_size=chunk_size,
                    progress=progress,
                    report_error=report_error,
                    annotate=annotate,
                ),
                stdout,
            )


def score_path(
    scorer: Scorer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    errors_path: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_error: str = "skip",
    field_map: Mapping[str, str] | None = None,
    chunk_size: int = 512,
    progress: Callable[[int], None] | None = None,
    report_error: Callable[[RecordError], None] | None = None,
    annotate: Callable[[Dialogue, Result], Mapping[str, Any]] | None = None,
) -> Summary:
    """Score a JSONL file into an output file the way `perm score` does: `ScoreRun(input_path,
    output_path, errors_path=..., resume=..., overwrite=...).run(scorer, ...)`.

        summary = score_path(Scorer(), "in.jsonl", "out.jsonl", resume=True)

    Refusals raise `OptionError` or `TargetError` before anything is written; see `ScoreRun`.
    """
    return ScoreRun(input_path, output_path, errors_path=errors_path, resume=resume, overwrite=overwrite).run(
        scorer,
        on_error=on_error,
        field_map=field_map,
        chunk_size=chunk_size,
        progress=progress,
        report_error=report_error,
        annotate=annotate,
    )
