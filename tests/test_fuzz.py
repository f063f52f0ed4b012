"""Seeded fuzzing of the JSONL reader and `perm score` (issue 12, item 8).

Random bytes and mutated valid records, from plain `random` with a fixed seed (set
PERM_FUZZ_SEED to explore others). Whatever the input: no traceback, every non-blank line
ends up exactly once in the output or in the errors file, every untouched good record is
in the output (its fields untouched), and every line written is strict JSON in valid UTF-8.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest
from perm_lite.cli.main import app
from typer.testing import CliRunner

from perm_lite.jsonl import OUTPUT_FIELDS, error_line, error_record, read_records

SEED = int(os.environ.get("PERM_FUZZ_SEED", "12"))
runner = CliRunner()

WORDS = "i you my feel sad lost job sorry that sounds hard really dog died today alone here".split()
ODD_TEXT = [
    "caf\u00e9",
    "\u4f60\u597d",
    "\U0001f622",
    "e\u0301",
    "\u202eevil",
    "\u200b",
    "\u2028",
    "\x00",
    "\t",
    "\\",
    '"',
    "\ufeff",
    "\U0010ffff",
]


def _forbid(name):
    raise ValueError(f"bare {name}")


def _text(rng: random.Random, words: int = 8) -> str:
    parts = [rng.choice(WORDS) for _ in range(rng.randint(1, words))]
    if rng.random() < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(ODD_TEXT))
    return " ".join(parts)


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-(10**30), 10**30)
    if kind == 1:
        return rng.uniform(-1e300, 1e300)
    if kind == 2:
        return _text(rng, 3)
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.random()
    if kind in (5, 6):
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {_text(rng, 1): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def good_record(rng: random.Random, n: int) -> dict:
    record: dict = {"id": f"g{n}" if rng.random() < 0.7 else 10_000 + n}
    form = rng.randrange(3)
    if form == 0:
        record["query"] = _text(rng)
        record["response"] = _text(rng)
    elif form == 1:
        turns = rng.randint(0, 3)
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": _text(rng)})
        for _ in range(turns):
            messages += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
        messages.append({"role": "user", "content": _text(rng)})
        record["messages"] = messages
        record["response"] = _text(rng)
    else:
        record["completion"] = f"# Analysis\n{_text(rng)}\n# Response\n{_text(rng)}"
    for name in ("persona", "scenario", "analysis"):
        if rng.random() < 0.2 and "completion" not in record:
            record[name] = _text(rng)
    for _ in range(rng.randint(0, 3)):
        record[f"x_{rng.choice(WORDS)}"] = _value(rng)
    return record


def _encode(record: dict, rng: random.Random) -> bytes:
    return json.dumps(record, ensure_ascii=rng.random() < 0.5).encode("utf-8")


HOSTILE_VALUES = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"9" * 5000,
    b"[" * 5000 + b"]" * 5000,
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"\\ud83d\\ude22"',
    b'{"\\udfff": 1}',
    b"null",
    b"[]",
    b"{}",
    b"12",
    b'"',
]
BAD_BYTES = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"\r", b"\\", b'"', b"{", b"}"]


def mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # cut short
            del data[pos:]
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            data[pos:pos] = rng.choice(BAD_BYTES)
        elif op == 4:  # a hostile value in place of a field's value
            text = bytes(data)
            colon = text.find(b'": ', pos)
            if colon >= 0:
                end = colon + 3
                stop = min(x for x in (text.find(b",", end), text.find(b"}", end), len(text)) if x >= 0)
                data[end:stop] = rng.choice(HOSTILE_VALUES)
        elif op == 5:  # the reply as the wrong type
            text = bytes(data).replace(b'"response": "', b'"response": ' + rng.choice(HOSTILE_VALUES) + b', "r": "', 1)
            data = bytearray(text)
        elif op == 6 and data:  # duplicate a span
            a = rng.randrange(len(data))
            data[a:a] = data[a : a + rng.randint(1, 40)]
        elif op == 7:  # a pass-through field no writer can encode
            text = bytes(data)
            if text.startswith(b"{"):
                data = bytearray(b'{"p": ' + rng.choice(HOSTILE_VALUES) + b", " + text[1:])
        else:
            del data[pos : pos + rng.randint(1, 20)]
    return bytes(data)


def build_input(rng: random.Random, n: int) -> tuple[bytes, dict[int, dict]]:
    """JSONL bytes and {line number: record} for the lines left untouched."""
    fragments: list[bytes] = []
    good: dict[int, dict] = {}
    line_no = 0
    for i in range(n):
        roll = rng.random()
        record = good_record(rng, i)
        raw = _encode(record, rng)
        if roll < 0.55:
            fragment = raw
        elif roll < 0.85:
            fragment = mutate(rng, raw)
        elif roll < 0.95:
            fragment = rng.randbytes(rng.randint(0, 200))
        else:
            fragment = rng.choice([b"", b"   ", b"\r", b"\t \x0c"])
        start = line_no + 1
        line_no += fragment.count(b"\n") + 1
        if fragment is raw:
            good[start] = record
        fragments.append(fragment)
    ending = b"\n" if rng.random() < 0.8 else b""
    return b"\n".join(fragments) + ending, good


def nonblank_lines(data: bytes) -> set[int]:
    return {n for n, raw in enumerate(io.BytesIO(data), start=1) if raw.strip()}


def strict_lines(data: bytes) -> list[dict]:
    rows = []
    assert data == b"" or data.endswith(b"\n")
    for line in data.decode("utf-8").split("\n")[:-1]:
        row = json.loads(line, parse_constant=_forbid)
        assert isinstance(row, dict)
        rows.append(row)
    return rows


def check_run(data: bytes, good: dict[int, dict], out_rows: list[dict], error_rows: list[dict]) -> None:
    scored = [r["perm"]["line"] for r in out_rows]
    failed = [e["line"] for e in error_rows]
    assert len(scored) == len(set(scored)), "a line was written twice"
    assert scored == sorted(scored), "output is not in input order"
    assert not set(scored) & set(failed), "a line is both scored and an error"
    assert set(scored) | set(failed) == nonblank_lines(data), "a line was lost"
    by_line = {r["perm"]["line"]: r for r in out_rows}
    for line, record in good.items():
        assert line in by_line, f"good line {line} was not scored: {[e for e in error_rows if e['line'] == line]}"
        row = by_line[line]
        assert {k: v for k, v in row.items() if k not in OUTPUT_FIELDS} == record
        assert set(row["scores"]) == {"resonation", "expression", "reception", "bystander"}


@pytest.mark.parametrize("seed", [SEED, SEED + 1, SEED + 2])
def test_reader_never_raises_and_accounts_for_every_line(seed):
    rng = random.Random(seed)
    data, good = build_input(rng, 3000)
    data += (b"" if data.endswith(b"\n") else b"\n") + rng.randbytes(20_000)  # and a tail of pure noise
    seen = []
    for parsed in read_records(io.BytesIO(data)):
        seen.append(parsed.line)
        if parsed.error is None:
            assert parsed.dialogue is not None
            json.dumps(parsed.record, ensure_ascii=False, allow_nan=False).encode("utf-8")  # writable as is
        else:
            assert parsed.dialogue is None
            line = error_line(error_record(parsed))
            entry = json.loads(line.encode("utf-8"), parse_constant=_forbid)
            assert entry["line"] == parsed.line and entry["error"]
    assert seen == sorted(nonblank_lines(data))
    ok = {p.line: p.record for p in read_records(io.BytesIO(data)) if p.error is None}
    for line, record in good.items():
        assert ok.get(line) == record


@pytest.mark.parametrize("seed", [SEED, SEED + 1, SEED + 2])
def test_cli_never_loses_a_good_record(tmp_path, tiny_model_dir, seed):
    rng = random.Random(seed)
    data, good = build_input(rng, 1000)
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--batch-size", "7"])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors_path = Path(str(out) + ".errors.jsonl")
    error_rows = strict_lines(errors_path.read_bytes()) if errors_path.exists() else []
    assert res.exit_code == (3 if error_rows else 0), res.stderr
    check_run(data, good, strict_lines(out.read_bytes()), error_rows)


def test_cli_stdin_to_stdout_and_stop(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED + 10)
    data, good = build_input(rng, 200)
    res = runner.invoke(app, ["score", "-", "--model", str(tiny_model_dir), "-q"], input=data)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    said = res.stderr.splitlines()  # --quiet: no bar, no summary; the skipped lines are still said
    assert all(x.startswith(("skipped line ", "... more errors in ")) for x in said), res.stderr
    errors = tmp_path / "perm-errors.jsonl"
    error_rows = strict_lines(errors.read_bytes()) if errors.exists() else []
    check_run(data, good, strict_lines(res.stdout_bytes), error_rows)

    out = tmp_path / "stop.jsonl"
    args = ["score", "-", "-o", str(out), "--model", str(tiny_model_dir), "-q", "--on-error", "stop"]
    res = runner.invoke(app, args, input=data)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    rows = strict_lines(out.read_bytes())
    stop_errors = strict_lines(Path(str(out) + ".errors.jsonl").read_bytes()) if error_rows else []
    if not error_rows:
        assert res.exit_code == 0
        return
    assert res.exit_code == 4 and len(stop_errors) == 1
    first_bad = stop_errors[0]["line"]
    assert first_bad == min(e["line"] for e in error_rows)
    assert [r["perm"]["line"] for r in rows] == sorted(n for n in nonblank_lines(data) if n < first_bad)
