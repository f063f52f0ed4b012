"""`perm report`: a self-contained HTML page, checked as text and in a real headless Chromium."""

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from perm_lite import Scorer
from perm_lite.html_report import read_scored, write_report

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dialogues.jsonl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    scorer = Scorer(provider="cpu")
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    scored = tmp / "scored.jsonl"
    with open(scored, "w") as fh:
        for n, (record, result) in enumerate(zip(records, scorer.score(records)), 1):
            row = {**record, "bot": "A" if n % 2 else "B", "scores": result.scores, "combined": result.combined}
            row["perm"] = {"model": result.model, "version": result.model_version, "line": n, "truncated": n == 3}
            fh.write(json.dumps(row) + "\n")
        fh.write("not json\n")
    errors = tmp / "scored.errors.jsonl"
    errors.write_text('{"line": 12, "field": "response", "error": "missing"}\n')
    out = tmp / "report.html"
    write_report(scored, out, scorer, by="bot", extremes=3, errors_path=errors)
    return out


def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    assert not re.search(r"https?://|//cdn|<script|<link|src=", page, re.IGNORECASE)
    assert page.count("<svg") == 5  # four perspectives and the combined score
    assert "By <code>bot</code>" in page and "A (5)" in page and "B (5)" in page
    # 10 scored, 1 truncated, 1 error in the errors file, 1 unreadable line
    assert "<td>10</td><td>1</td><td>1</td><td>1</td>" in page
    assert page.count("Lowest combined scores") == 1 and "Known limits" in page
    assert "title='combined " in page  # sentences coloured by their contribution


def test_unreadable_lines_are_counted(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"response": "hi", "scores": {"reception": 2}, "combined": 0.1}\n[1]\n{"response": "no scores"}\n')
    scored = read_scored(path)
    assert len(scored.rows) == 1 and scored.unreadable == [2, 3]


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    proc = subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1400", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    width, height, pixels = _png_pixels(shot)
    assert (width, height) == (1200, 1400)
    # not blank: a real share of the decoded bytes are neither white nor filter bytes
    assert sum(b not in (0, 255) for b in pixels) > 0.01 * len(pixels)
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<svg") == 5 and dom.stdout.count("<rect") >= 10
