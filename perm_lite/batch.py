"""Scoring JSONL files: streaming, per-record errors, resume, safe output files, summaries.

The CLI is a thin layer over `score_file`; other front ends (services, Ray) reuse
`read_records`, `score_isolated`, `output_line` and `error_line`.

Two rules hold everywhere here. One bad record never costs another: whatever goes wrong
while reading, checking, scoring or writing one record becomes that record's error (line,
field, reason) and the run goes on. And a run never destroys what it did not create:
outputs are created exclusively, appended to (resume), or written to a temporary file
beside the target and renamed over it only when the run succeeds (`OutputFile`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from perm_lite.errors import PermError
from perm_lite.records import Dialogue, RecordError, parse_record
from perm_lite.scales import PERSPECTIVES
from perm_lite.scorer import Result, Scorer

OUTPUT_FIELDS = ("scores", "combined", "perm")


# -- reading ----------------------------------------------------------------------------


@dataclass
class ParsedLine:
    line: int
    record: dict[str, Any] | None = None
    dialogue: Dialogue | None = None
    error: RecordError | None = None


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def strict_loads(text: str | bytes) -> Any:
    """`json.loads` that refuses NaN, Infinity and -Infinity, which are not JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def printable(text: str) -> str:
    """`text` with lone surrogates written as `\\udXXX`, so it can always be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unwritable(value: Any) -> str | None:
    """Why `value` cannot be written as strict UTF-8 JSON, or None when it can."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (e.g. \\ud800): not valid Unicode, cannot be written as UTF-8"
    except RecursionError:
        return "nested too deeply to be written as JSON"
    except ValueError:
        return "holds a number too large for a float (it would be written as Infinity, which is not JSON)"
    except TypeError as exc:
        return f"cannot be written as JSON ({printable(str(exc))})"
    return None


def json_problem(value: Any) -> RecordError | None:
    """A `RecordError` naming the field that keeps `value` from being written as strict
    UTF-8 JSON (lone surrogates, overflowing floats, too deep nesting), or None."""
    reason = _unwritable(value)
    if reason is None:
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _unwritable(key) is not None:
                return RecordError(f"the field name {reason}", printable(str(key)))
            item_reason = _unwritable(item)
            if item_reason is not None:
                return RecordError(item_reason, printable(str(key)))
    return RecordError(reason)


def _json_error(exc: Exception) -> str:
    if isinstance(exc, _NonFinite):
        return f"invalid JSON: {exc} is not a JSON value (numbers must be finite)"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at column {exc.colno}; each line must be one JSON object"
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply"
    if "integer string conversion" in str(exc):
        return f"invalid JSON: an integer with more than {sys.get_int_max_str_digits()} digits"
    return f"invalid JSON: {printable(str(exc))[:300]}"


def parse_line(line_no: int, raw: bytes, field_map: Mapping[str, str] | None = None) -> ParsedLine:
    """Decode and validate one JSONL line; errors name the line and field. Never raises
    for anything about the line itself: a failure becomes the line's error."""
    where = f"line {line_no}"
    try:
        return _parse_line(line_no, raw, field_map, where)
    except Exception as exc:  # one line's failure is that line's error
        err = RecordError(f"cannot read this record ({type(exc).__name__}: {printable(str(exc))[:300]})")
        return ParsedLine(line_no, error=err.at(where))


def _parse_line(line_no: int, raw: bytes, field_map: Mapping[str, str] | None, where: str) -> ParsedLine:
    try:
        text = raw.decode("utf-8")
        if line_no == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as exc:
        err = RecordError(f"not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8", None, where)
        return ParsedLine(line_no, error=err)
    try:
        record = strict_loads(text)
    except (ValueError, RecursionError) as exc:
        return ParsedLine(line_no, error=RecordError(_json_error(exc)).at(where))
    rec = record if isinstance(record, dict) else None
    try:
        dialogue = parse_record(record, field_map)
    except RecordError as exc:
        return ParsedLine(line_no, record=rec, error=exc.at(where))
    problem = json_problem(record)  # a pass-through field that cannot be written back
    if problem is not None:
        return ParsedLine(line_no, record=rec, error=problem.at(where))
    return ParsedLine(line_no, record=record, dialogue=dialogue)


def read_records(stream: IO[bytes], field_map: Mapping[str, str] | None = None) -> Iterator[ParsedLine]:
    """Yield every non-blank line of a JSONL byte stream, parsed or with its error."""
    for line_no, raw in enumerate(stream, start=1):
        if raw.strip():
            yield parse_line(line_no, raw.rstrip(b"\r\n"), field_map)


# -- results and errors as JSON lines -----------------------------------------------------


def output_record(
    record: Mapping[str, Any], result: Result, line: int | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The input record, untouched, plus `scores`, `combined`, `perm` (model, truncation,
    line) and any `extra` fields (e.g. `explain`)."""
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
    if extra:
        out.update(extra)
    return out


def output_line(
    record: Mapping[str, Any], result: Result, line: int | None, extra: Mapping[str, Any] | None = None
) -> str:
    """`output_record` as one strict JSON line (no NaN, valid UTF-8), or `RecordError`."""
    bad = [k for k, v in (*result.scores.items(), ("combined", result.combined)) if not math.isfinite(v)]
    if bad:
        raise RecordError(f"the model gave a non-finite score ({', '.join(bad)}); nothing written", "scores")
    out = output_record(record, result, line, extra)
    try:
        text = json.dumps(out, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, RecursionError, TypeError) as exc:
        raise (json_problem(out) or RecordError(f"cannot be written as JSON ({printable(str(exc))})")) from None
    return text + "\n"


def error_record(parsed: ParsedLine) -> dict[str, Any]:
    """The errors-file entry of a bad line: line, field, reason, and the record's id if it has one."""
    err = parsed.error
    out: dict[str, Any] = {
        "line": parsed.line,
        "field": printable(err.field) if err.field is not None else None,
        "error": printable(err.reason),
    }
    if parsed.record is not None and "id" in parsed.record:
        out["id"] = _safe_id(parsed.record["id"])
    return out


def _safe_id(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if _unwritable(value) is None:
        return value
    return printable(repr(value))[:200]


def error_line(entry: Mapping[str, Any]) -> str:
    """One errors-file line; always strict JSON and valid UTF-8."""
    try:
        text = json.dumps(entry, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, RecursionError, TypeError):
        text = json.dumps({k: printable(str(v)) for k, v in entry.items()}, ensure_ascii=False)
    return text + "\n"


# -- scoring ------------------------------------------------------------------------------


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
    annotate: Callable[[Dialogue, Result], Mapping[str, Any]] | None = None,
) -> Summary:
    """Score a JSONL stream into `sink`, one output line per good record, in input order.

    `annotate(dialogue, result)` returns extra output fields for a record (`perm score
    --explain`); a failure there is that record's error.

    Bad records (unreadable, invalid, or failing to score or to be written as strict
    JSON) go to `errors_sink` (JSON lines with line, field and reason) and to
    `report_error`; with `on_error="stop"` the run ends at the first one, after writing
    every good record before it. Lines in `skip_lines` (a resumed run) are not scored.
    Only a failure of the sinks themselves (a full disk) or of the model for every
    record raises.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError("on_error must be 'skip' or 'stop'")
    summary = Summary()
    started = time.perf_counter()
    pending: list[ParsedLine] = []

    def record_error(parsed: ParsedLine) -> None:
        summary.errors += 1
        if errors_sink is not None:
            errors_sink.write(error_line(error_record(parsed)))
            errors_sink.flush()
        if report_error:
            report_error(parsed.error)

    def flush() -> bool:
        """Score and write the pending chunk; True when `stop` ended the run at a record."""
        if not pending:
            return False
        outcomes = score_isolated(scorer, [p.dialogue for p in pending])
        lines: list[str] = []
        good: list[Result] = []
        stopped = False
        handled = 0
        for parsed, outcome in zip(pending, outcomes):
            handled += 1
            if isinstance(outcome, Result):
                try:
                    extra = annotate(parsed.dialogue, outcome) if annotate else None
                    lines.append(output_line(parsed.record, outcome, parsed.line, extra))
                    good.append(outcome)
                    if any(k in parsed.record for k in OUTPUT_FIELDS):
                        summary.replaced_fields += 1
                    continue
                except RecordError as exc:
                    outcome = exc
            parsed.error = outcome.at(f"line {parsed.line}")
            record_error(parsed)
            if on_error == "stop":
                stopped = True
                break
        if lines:
            sink.write("".join(lines))  # whole lines only: a chunk is written in one call
            sink.flush()
        for result in good:
            summary.add(result)
        if progress:
            progress(handled)
        pending.clear()
        summary.stopped_early = summary.stopped_early or stopped
        return stopped

    with _StopFlag() as stop:
        try:
            for parsed in read_records(source, field_map):
                if parsed.line in skip_lines:
                    summary.resumed += 1
                    continue
                if parsed.error is not None:
                    if on_error == "stop" and flush():
                        break  # an earlier record failed first
                    record_error(parsed)
                    if progress:
                        progress(1)
                    if on_error == "stop":
                        summary.stopped_early = True
                        break
                    continue
                pending.append(parsed)
                if len(pending) >= chunk_size:
                    if flush():
                        break
                    if stop.set:
                        summary.interrupted = True
                        break
            flush()
        except KeyboardInterrupt:
            summary.interrupted = True
            flush()
    summary.seconds = time.perf_counter() - started
    return summary


# -- files ------------------------------------------------------------------------------


class TargetError(PermError):
    """An output path perm refuses to use; `code` is the exit code (2 usage, 1 fatal)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class OutputWriteError(PermError):
    """Writing an output failed (disk full, permissions, a closed pipe)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@dataclass(frozen=True)
class _Identity:
    dev: int
    ino: int
    real: str


def _identity(path: str | os.PathLike) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Identity(st.st_dev, st.st_ino, os.path.realpath(path))


def input_identity(input_path: str) -> _Identity | None:
    """What the input is on disk (stdin too, when it is a redirected regular file)."""
    if input_path != "-":
        return _identity(input_path)
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return _Identity(st.st_dev, st.st_ino, "") if stat.S_ISREG(st.st_mode) else None


def _same(a: _Identity | None, b: _Identity | None) -> bool:
    if a is None or b is None:
        return False
    return (a.dev, a.ino) == (b.dev, b.ino) or bool(a.real and a.real == b.real)


def check_target(path: Path, what: str, source: _Identity | None = None) -> os.stat_result | None:
    """Refuse a path to write that is the input (under any name: links included) or that
    exists and is not a regular file (a directory, a device, a dangling link); a missing
    directory is fatal. Returns the stat of an existing regular file, None when absent."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        parent = Path(os.path.abspath(path)).parent
        if not parent.is_dir():
            raise TargetError(f"cannot write {what} {path}: directory {parent} does not exist", 1) from None
        return None
    except OSError as exc:
        raise TargetError(f"cannot use {what} {path}: {exc.strerror or exc}", 1) from None
    try:
        st = os.stat(path)
    except OSError:
        raise TargetError(f"{what} {path} is a broken symbolic link; remove it or choose another path") from None
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(f"{what} {path} exists and is {_kind(st.st_mode)}; choose a regular file path")
    if _same(_identity(path), source):
        raise TargetError(f"{what} {path} is the input file; choose another path")
    return st


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputFile:
    """A text output (write/flush) that never destroys what the run did not create.

    mode "new": created exclusively when first opened (never truncates anything);
    "append": an existing file continued (resume, or an empty file); "replace": written to
    a temporary file beside the target and renamed over it by `commit()`, so the old
    file stays whole until the run succeeds, and `abort()` leaves it untouched. A symlink
    target is followed: the file it points to is replaced, the link kept.
    `publish_empty` (replace mode): commit even if nothing was written; otherwise an
    untouched replacement of a file that did not exist is dropped.
    """

    def __init__(self, path: str | os.PathLike, mode: str, *, publish_empty: bool = True) -> None:
        if mode not in ("new", "append", "replace"):
            raise ValueError(f"unknown output mode {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.publish_empty = publish_empty
        self.target = Path(os.path.realpath(path)) if mode == "replace" else self.path
        try:
            self._existing = os.stat(self.target) if mode == "replace" else None
        except FileNotFoundError:
            self._existing = None
        self._fh: IO[bytes] | None = None
        self._tmp: Path | None = None
        self.created = False

    @property
    def opened(self) -> bool:
        return self._fh is not None

    def _error(self, exc: OSError) -> OutputWriteError:
        return OutputWriteError(f"cannot write {self.path}: {exc.strerror or exc}")

    def _open_fd(self, path: Path, flags: int) -> int:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)

    def open(self) -> None:
        if self._fh is not None:
            return
        try:
            newline = b""
            if self.mode == "new":
                fd = self._open_fd(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                self.created = True
            elif self.mode == "append":
                with open(self.path, "rb") as fh:  # never glue a line onto a torn last one
                    if fh.seek(0, os.SEEK_END):
                        fh.seek(-1, os.SEEK_END)
                        newline = b"" if fh.read(1) == b"\n" else b"\n"
                fd = self._open_fd(self.path, os.O_WRONLY | os.O_APPEND)
            else:
                fd = self._temp_fd()
            self._fh = self._wrap(fd)
            if newline:
                self._fh.write(newline)
        except FileExistsError:
            raise OutputWriteError(f"{self.path} appeared while perm was starting; it was left untouched") from None
        except OSError as exc:
            raise self._error(exc) from None

    @staticmethod
    def _wrap(fd: int) -> IO[bytes]:
        return os.fdopen(fd, "wb")

    def _temp_fd(self) -> int:
        for _ in range(100):
            tmp = self.target.parent / f".{self.target.name[:80]}.{secrets.token_hex(6)}.perm-tmp"
            try:
                fd = self._open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            self._tmp = tmp
            if self._existing is not None:
                try:
                    os.fchmod(fd, stat.S_IMODE(self._existing.st_mode))
                except OSError:
                    pass
            return fd
        raise FileExistsError(self.target)

    def write(self, text: str) -> None:
        self.open()
        try:
            self._fh.write(text.encode("utf-8"))
        except OSError as exc:
            raise self._error(exc) from None

    def flush(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.flush()
        except OSError as exc:
            raise self._error(exc) from None

    def commit(self) -> None:
        """Make the output final: flush and fsync; a replacement is renamed over the target."""
        if self.mode == "replace" and self._fh is None and (self.publish_empty or self._existing is not None):
            self.open()
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.target)
                self._tmp = None
            _fsync_dir(self.target.parent)
        except OSError as exc:
            _close_quietly(fh)
            self._drop_temp()
            raise self._error(exc) from None

    def abort(self) -> None:
        """Give up: a replacement's temporary file is removed and the target left as it
        was; a new or appended file keeps what was written (a later --resume continues it)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            if self.mode != "replace":
                try:
                    fh.flush()
                except OSError:
                    pass
            _close_quietly(fh)
        self._drop_temp()

    def _drop_temp(self) -> None:
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None


def _close_quietly(fh: IO[bytes]) -> None:
    try:
        fh.close()
    except OSError:
        pass


class StreamSink:
    """A stream (stdout) written as UTF-8 whatever the locale, whose write failures
    (a closed pipe) become `OutputWriteError`."""

    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.stream = stream
        self.name = name
        self.binary = getattr(stream, "buffer", None)

    def write(self, text: str) -> None:
        try:
            if self.binary is not None:
                self.binary.write(text.encode("utf-8"))
            else:
                self.stream.write(text)
        except OSError as exc:
            raise OutputWriteError(f"cannot write {self.name}: {exc.strerror or exc}") from None

    def flush(self) -> None:
        try:
            (self.binary if self.binary is not None else self.stream).flush()
        except OSError as exc:
            raise OutputWriteError(f"cannot write {self.name}: {exc.strerror or exc}") from None

    def silence(self) -> None:
        """After a closed pipe: point the stream at /dev/null so that Python's own flush at
        exit does not print a second error."""
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self.stream.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):  # a stream without a file descriptor
            pass


@dataclass
class OutputPlan:
    output: OutputFile | None  # None: stdout
    errors: OutputFile

    @property
    def replacing(self) -> bool:
        return self.output is not None and self.output.mode == "replace"

    def commit(self) -> None:
        if self.output is not None:
            self.output.commit()
        self.errors.commit()

    def abort(self) -> None:
        if self.output is not None:
            self.output.abort()
        self.errors.abort()


def plan_outputs(
    input_path: str, output: Path | None, errors_path: Path, *, resume: bool = False, overwrite: bool = False
) -> OutputPlan:
    """Check the output and errors paths and decide how each is written (see `OutputFile`).

    Refused (`TargetError`, code 2): a path that is the input or not a regular file, the
    same path for both, an existing non-empty output or errors file without --overwrite
    (or --resume). A missing directory is code 1.
    """
    source = input_identity(input_path)
    out_st = check_target(output, "output", source) if output is not None else None
    err_st = check_target(errors_path, "errors file", source)
    if output is not None and (
        os.path.realpath(output) == os.path.realpath(errors_path) or _same(_identity(output), _identity(errors_path))
    ):
        raise TargetError(f"the errors file {errors_path} is the output; give --errors another path")
    out_mode = None
    if output is not None:
        if resume:
            out_mode = "append" if out_st is not None else "new"
        elif out_st is not None and out_st.st_size:
            if not overwrite:
                raise TargetError(f"{output} exists: use --resume to continue it or --overwrite to replace it")
            out_mode = "replace"
        else:
            out_mode = "append" if out_st is not None else "new"  # an empty file loses nothing
    if resume:
        err_mode = "append" if err_st is not None else "new"
    elif err_st is not None and err_st.st_size and not overwrite:
        raise TargetError(
            f"{errors_path} exists (bad records of an earlier run): use --overwrite to replace it, or --errors PATH"
        )
    elif out_mode == "replace" or (err_st is not None and err_st.st_size):
        err_mode = "replace"
    else:
        err_mode = "append" if err_st is not None else "new"
    return OutputPlan(
        OutputFile(output, out_mode) if output is not None else None,
        OutputFile(errors_path, err_mode, publish_empty=False),
    )


def _result_line(raw: bytes) -> int:
    return int(strict_loads(raw)["perm"]["line"])


def prepare_resume(out_path: Path) -> set[int]:
    """Lines already scored in OUT. The whole file is checked first: one that is not perm
    output is refused (`RecordError`) untouched; then a torn last line (from a hard kill)
    is cut off."""
    done: set[int] = set()
    if not out_path.exists():
        return done
    end = 0
    torn = b""
    n = 0
    with open(out_path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):  # noqa: B007
            if not raw.endswith(b"\n"):
                torn = raw
                break
            end += len(raw)
            if not raw.strip():
                continue
            try:
                done.add(_result_line(raw))
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise RecordError(
                    f"cannot resume: {out_path} line {n} is not a perm-lite result ({type(exc).__name__}); "
                    "it was left untouched: pass a different -o or --overwrite"
                ) from None
    if torn:
        try:
            last = strict_loads(torn)
        except (ValueError, RecursionError):  # cut short by a hard kill (our lines start with "{")
            if not torn.startswith(b"{"):
                raise RecordError(
                    f"cannot resume: {out_path} line {n} is not a perm-lite result; "
                    "it was left untouched: pass a different -o or --overwrite"
                ) from None
            with open(out_path, "rb+") as fh:
                fh.truncate(end)
            return done
        try:
            done.add(int(last["perm"]["line"]))  # whole, only its newline missing
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(
                f"cannot resume: {out_path} line {n} is not a perm-lite result ({type(exc).__name__}); "
                "it was left untouched: pass a different -o or --overwrite"
            ) from None
        with open(out_path, "ab") as fh:
            fh.write(b"\n")
    return done


def previous_error_lines(errors_path: Path | None) -> set[int]:
    lines: set[int] = set()
    if errors_path is None or not errors_path.exists():
        return lines
    with open(errors_path, "rb") as fh:
        for raw in fh:
            try:
                lines.add(int(json.loads(raw)["line"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
    return lines


def open_input(path: str) -> IO[bytes]:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def count_lines(path: str) -> int | None:
    """Non-blank line count for a progress total (None for stdin, pipes and devices)."""
    if path == "-" or not os.path.isfile(path):
        return None
    total = 0
    with open(path, "rb") as fh:
        for raw in fh:
            total += bool(raw.strip())
    return total


def default_errors_path(output: str) -> Path:
    """OUT.errors.jsonl, or perm-errors.jsonl in the working directory for `-o -`."""
    return Path("perm-errors.jsonl") if output == "-" else Path(output + ".errors.jsonl")


def fsync_close(handle: IO[str]) -> None:
    handle.flush()
    try:
        os.fsync(handle.fileno())
    except (OSError, ValueError):
        pass
    handle.close()
