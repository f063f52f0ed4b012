"""Issue 19, items 5 and 6: `perm report` escapes every value, counts crafted rows as
unreadable, honours --fields, refuses `-o -` and an -o that is a file it reads, reads a
byte-order mark, fails when no line is a scored record, colours on one scale, renders the
card's limits, and replaces an existing page only when the new one is complete.
No test asserts a model score value."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
from perm_lite.cli.main import app
from typer.testing import CliRunner

from perm_lite import outputs
from perm_lite.errors import PermError
from perm_lite.html_report import ReportRun, ScoredFile, markdown_html, read_scored, render_report

runner = CliRunner()
XSS = "<script>alert(1)</script>"


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res


def row(n: int, **extra) -> dict:
    out = {
        "id": f"r{n}",
        "query": "my dog died today",
        "response": f"I am so sorry. That is a real loss. Tell me about them {n}.",
        "scores": {"resonation": 3.0 + n / 10, "expression": 3.0, "reception": 3.5, "bystander": 60.0},
        "combined": 0.1 * n,
        "perm": {"model": "tiny-test", "version": "0.0.1", "line": n, "truncated": False},
    }
    out.update(extra)
    return out


def write_rows(path: Path, rows, prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def report(scored: Path, tiny_model_dir: Path, *more):
    return invoke("report", scored, "--model", tiny_model_dir, *more)


def no_markup_from_the_file(page: str) -> None:
    assert "<script" not in page.lower() and "<img" not in page.lower()


# -- item 5 ------------------------------------------------------------------------------------


def test_every_value_from_the_file_is_escaped(tmp_path, tiny_model_dir):
    img = "<img src=x onerror=alert(2)>"
    rows = [
        row(1, id=XSS, bot=img, response=f"Sorry. {XSS} I hear you."),
        row(2, query=img, perm={"model": img, "version": XSS, "line": 2, "truncated": False}),
        row(3, perm={"model": "m", "version": "v", "line": XSS}),  # perm.line that is not a line number
        row(4, scores={img: 3.0, "reception": 2.0}),
    ]
    scored = write_rows(tmp_path / "scored.jsonl", rows)
    page_path = tmp_path / "page.html"
    res = report(scored, tiny_model_dir, "-o", page_path, "--by", "bot")
    assert res.exit_code == 0, res.output
    page = page_path.read_text()
    no_markup_from_the_file(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<td>3</td><td>0</td><td>0</td><td>1</td>" in page  # the row with a bad perm.line is unreadable


def test_crafted_rows_are_unreadable_not_a_traceback(tmp_path, tiny_model_dir):
    rows = [
        row(1),
        row(2, combined="0.5"),
        row(3, scores={"reception": "high"}),
        row(4, query=None, messages=[{"role": "user", "content": ["a", "list"]}]),
        row(5, scores={"reception": True}),
        row(6, perm=[1, 2]),
        row(7, combined=None),
        b'{"response": "hi", "scores": {"reception": 2}, "combined": NaN}',
        row(9),
    ]
    scored = write_rows(tmp_path / "scored.jsonl", rows)
    assert read_scored(scored).unreadable == [2, 3, 4, 5, 6, 7, 8]
    res = report(scored, tiny_model_dir, "-o", tmp_path / "page.html")
    assert res.exit_code == 0, res.output
    assert "7 lines were not scored records (first: line 2)" in res.stderr
    assert "<td>2</td><td>0</td><td>0</td><td>7</td>" in (tmp_path / "page.html").read_text()


def test_a_file_scored_with_fields_needs_and_honours_fields(tmp_path, tiny_model_dir):
    rows = []
    for n in (1, 2):
        r = row(n)
        r["reply"], r["question"] = r.pop("response"), r.pop("query")
        rows.append(r)
    scored = write_rows(tmp_path / "scored.jsonl", rows)
    page = tmp_path / "page.html"
    res = report(scored, tiny_model_dir, "-o", page)
    assert res.exit_code == 1 and not page.exists()  # not one reply without the map: refused, not blank
    line = res.stderr.strip()
    assert line.startswith("error: ") and "no scored records" in line and "--fields" in line
    res = report(scored, tiny_model_dir, "-o", page, "--fields", "response=reply,query=question")
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert "Tell me about them 1." in html and "Tell me about them 2." in html and "my dog died today" in html


def test_dash_output_is_refused_up_front(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scored = write_rows(tmp_path / "scored.jsonl", [row(1)])
    res = report(scored, tmp_path / "no-such-model", "-o", "-")  # refused before the model is looked for
    assert res.exit_code == 2 and res.stdout == ""
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "-o FILE.html" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl"]


def test_a_byte_order_mark_on_the_first_line_is_read(tmp_path, tiny_model_dir):
    scored = write_rows(tmp_path / "scored.jsonl", [row(1), row(2)], prefix="\ufeff".encode())
    assert len(read_scored(scored).rows) == 2 and read_scored(scored).unreadable == []
    res = report(scored, tiny_model_dir, "-o", tmp_path / "page.html")
    assert res.exit_code == 0 and "were not scored records" not in res.stderr


def test_no_scored_record_at_all_fails_without_a_page(tmp_path, tiny_model_dir):
    scored = write_rows(tmp_path / "scored.jsonl", [b"not json", {"response": "hi"}, b"[1]"])
    res = report(scored, tiny_model_dir, "-o", tmp_path / "page.html")
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "no scored records" in res.stderr
    assert not (tmp_path / "page.html").exists()
    run = ReportRun(scored, tmp_path / "page.html")
    with pytest.raises(PermError, match="no scored records"):
        run.read()
    run.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl"]  # nor a lock file


def _alphas(page: str) -> dict[str, float]:
    return {
        m.group(2): float(m.group(1))
        for m in re.finditer(r"rgba\(\d+,\d+,\d+,([0-9.]+)\)' title='combined [+-][0-9.]+'>([^<]*)<", page)
    }


def test_one_colour_scale_for_the_whole_report():
    rows = [row(1, response="Tiny help. Big help."), row(2, response="Small one. Other one.")]
    scored = read_scored_rows(rows)

    def sentences(text, deltas):
        out, start = [], 0
        for sentence, d in zip(text.split(". "), deltas):
            sentence = sentence if sentence.endswith(".") else sentence + "."
            begin = text.index(sentence, start)
            out.append({"text": sentence, "start": begin, "end": begin + len(sentence), "deltas": {"combined": d}})
            start = begin + len(sentence)
        return {"sentences": out}

    explanations = {
        0: sentences("Tiny help. Big help.", [0.006, 0.338]),
        1: sentences("Small one. Other one.", [0.006, 0.003]),
    }
    page = render_report(scored, explanations=explanations, extremes=2)
    alphas = _alphas(page)
    assert alphas["Big help."] == 0.75
    assert alphas["Tiny help."] == alphas["Small one."] <= 0.02  # +0.006 is faint everywhere, not full colour
    assert "full colour at a change of 0.338" in page


def read_scored_rows(rows) -> ScoredFile:
    return ScoredFile(rows=rows)


def test_the_cards_limits_are_rendered_not_raw_markdown(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(
        "# Card\n\nA small model.\n\n## Limits\n\n- **It does not beat length.** On held-out people,\n"
        "  pairs as rated: 0.674 vs `0.690`.\n- English only; see [the paper](https://example.org/x).\n"
        "\nA closing *note*.\n"
    )
    page = render_report(read_scored_rows([row(1)]), card=card)
    assert "<li><strong>It does not beat length.</strong> On held-out people, pairs as rated: 0.674 vs " in page
    assert "<code>0.690</code>" in page and "<em>note</em>" in page and "<p>A closing" in page
    assert "**" not in page and "https://" not in page and "<pre" not in page
    assert markdown_html("- <b>x</b> & y") == "<ul><li>&lt;b&gt;x&lt;/b&gt; &amp; y</li></ul>"


# -- item 6: --overwrite through outputs.py -----------------------------------------------------


class _FullDisk:
    """A file object on a disk that fills up after `room` bytes (ENOSPC)."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_overwrite_keeps_the_old_page_whole_when_the_disk_is_full(tmp_path, tiny_model_dir, monkeypatch):
    scored = write_rows(tmp_path / "scored.jsonl", [row(1), row(2)])
    page = tmp_path / "page.html"
    page.write_text("<p>the old report</p>")
    monkeypatch.setattr(outputs.OutputFile, "_wrap", staticmethod(lambda fd: _FullDisk(os.fdopen(fd, "wb"), 4096)))
    res = report(scored, tiny_model_dir, "-o", page, "--overwrite")
    assert res.exit_code == 1 and "No space left on device" in res.stderr and res.stderr.startswith("error: ")
    assert page.read_text() == "<p>the old report</p>"  # not a 4 KB partial page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "scored.jsonl"]  # no temporary left
    monkeypatch.undo()
    res = report(scored, tiny_model_dir, "-o", page, "--overwrite")
    assert res.exit_code == 0 and page.read_text().startswith("<!doctype html>")


def test_output_that_is_a_file_the_report_reads_is_refused(tmp_path, tiny_model_dir):
    scored = write_rows(tmp_path / "scored.jsonl", [row(1)])
    errors = tmp_path / "scored.jsonl.errors.jsonl"
    errors.write_text('{"line": 2, "field": "response", "error": "missing"}\n')
    (tmp_path / "alias.jsonl").symlink_to(errors)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.is_symlink()}
    for out, extra in (
        (errors, []),
        (tmp_path / "alias.jsonl", []),
        (scored, []),
        (tmp_path / "mine.jsonl", ["--errors", tmp_path / "mine.jsonl"]),
    ):
        res = report(scored, tiny_model_dir, "-o", out, "--overwrite", *extra)
        assert res.exit_code == 2, (out, res.output)
        assert res.stderr.startswith("error: ") and "reads" in res.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.is_symlink()} == before
