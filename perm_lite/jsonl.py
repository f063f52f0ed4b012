"""JSON lines in and out: strict reading, result and error lines, and resume state.

Reading (`read_records` -> `parse_line`) turns one line of bytes into a strict JSON object
and a validated `Dialogue`, or into that line's `RecordError`; it never raises for a line.
Writing (`output_line`, `error_line`) produces one strict JSON line (no NaN, valid UTF-8).
Resume (`prepare_resume`, `previous_error_lines`) reads what an earlier run wrote.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from perm_lite.records import Dialogue, RecordError, parse_record

if TYPE_CHECKING:
    from perm_lite.scorer import Result

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


# -- input files and resume ---------------------------------------------------------------


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


def _result_line(raw: bytes) -> int:
    return int(strict_loads(raw)["perm"]["line"])


def prepare_resume(out_path: Path) -> set[int]:
    """Lines already scored in OUT. The whole file is checked first: one that is not perm
    output is refused (`RecordError`) untouched; then a torn last line (from a hard kill)
    is cut off, only after whole perm lines (a file holding nothing else is not known to
    be perm output: e.g. `{"loss": NaN}` without a newline is refused, not emptied)."""
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
            if not torn.startswith(b"{") or not done:
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
