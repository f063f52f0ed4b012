"""The library's run policy (`batch.score_path` / `ScoreRun`) and the chunked runner that
`score_file` and `judge_file` share (`perm_lite.runner.run_chunks`)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from perm_lite import batch, runner
from perm_lite.batch import ScoreRun, Summary, score_path
from perm_lite.errors import OptionError, PermError
from perm_lite.outputs import TargetError
from perm_lite.records import RecordError
from perm_lite.runner import Written, run_chunks

ROWS = [
    {"id": "a", "query": "I lost my job today.", "response": "That sounds really hard. How are you holding up?"},
    {"id": "b", "query": "My exam went badly.", "response": "I'm sorry. One exam doesn't define you."},
    {"id": "c", "query": "I feel alone.", "response": "You reached out, and I'm glad you did."},
]


def write_rows(path, rows=ROWS, bad_line_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if bad_line_after is not None:
        lines.insert(bad_line_after, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# -- score_path: the run policy as a library function ----------------------------------------


def test_score_path_writes_results_and_an_errors_file(tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl", bad_line_after=1)
    out = tmp_path / "out.jsonl"
    seen = []
    summary = score_path(scorer, src, out, report_error=seen.append)
    assert [r["id"] for r in rows(out)] == ["a", "b", "c"]
    assert summary.scored == 3 and summary.errors == 1 and not summary.interrupted
    assert [e["line"] for e in rows(tmp_path / "out.jsonl.errors.jsonl")] == [2]
    assert len(seen) == 1 and isinstance(seen[0], RecordError)


def test_score_path_refuses_the_input_as_output_before_writing(tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl")
    before = src.read_bytes()
    with pytest.raises(TargetError) as info:
        score_path(scorer, src, src)
    assert info.value.code == 2 and "input" in str(info.value)
    assert isinstance(info.value, PermError)
    (tmp_path / "link.jsonl").symlink_to(src)
    with pytest.raises(TargetError):
        score_path(scorer, src, tmp_path / "link.jsonl", overwrite=True)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl"]


def test_score_path_refuses_an_existing_output_without_overwrite_or_resume(tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(TargetError, match="--overwrite"):
        score_path(scorer, src, out)
    assert out.read_text() == "precious\n"


def test_bad_arguments_are_option_errors(tmp_path, scorer):
    with pytest.raises(OptionError, match="does not exist"):
        ScoreRun(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(OptionError, match="directory"):
        ScoreRun(tmp_path, tmp_path / "out.jsonl")
    src = write_rows(tmp_path / "in.jsonl")
    with pytest.raises(OptionError, match="stdout"):
        ScoreRun(src, None, resume=True)
    with pytest.raises(OptionError, match="on_error"):
        score_path(scorer, src, tmp_path / "out.jsonl", on_error="ignore")
    assert not (tmp_path / "out.jsonl").exists()


def test_overwrite_replaces_only_when_the_run_succeeds(tmp_path, scorer, monkeypatch):
    src = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    original = batch.score_isolated

    def broken(scorer_, dialogues):
        raise RuntimeError("the model is gone")

    monkeypatch.setattr(batch, "score_isolated", broken)
    with pytest.raises(RuntimeError, match="the model is gone"):
        score_path(scorer, src, out, overwrite=True)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary left

    calls = []

    def interrupted_once(scorer_, dialogues):
        calls.append(len(dialogues))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(scorer_, dialogues)

    monkeypatch.setattr(batch, "score_isolated", interrupted_once)
    summary = score_path(scorer, src, out, overwrite=True)
    assert summary.interrupted and out.read_text() == "precious\n"  # interrupted: the old file stays
    monkeypatch.setattr(batch, "score_isolated", original)

    summary = score_path(scorer, src, out, overwrite=True)
    assert not summary.interrupted and [r["id"] for r in rows(out)] == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_resume_skips_the_lines_already_done(tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl", bad_line_after=3)  # line 4 is bad
    out = tmp_path / "out.jsonl"
    score_path(scorer, src, out)
    first = out.read_text().splitlines(keepends=True)
    out.write_text(first[0] + first[1][:20])  # a kill mid-line: the torn line is cut off on resume
    run = ScoreRun(src, out, resume=True)
    assert run.skip_lines == {1, 4}  # done in OUT, and reported in the errors file
    summary = run.run(scorer)
    assert summary.resumed == 2 and summary.scored == 2 and summary.errors == 0
    assert [r["id"] for r in rows(out)] == ["a", "b", "c"]
    assert [r["perm"]["line"] for r in rows(out)] == [1, 2, 3]


def test_resume_refuses_an_output_that_is_not_perm_output(tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "notes.jsonl"
    out.write_text('{"mine": 1}\n')
    with pytest.raises(TargetError, match="not a perm-lite result") as info:
        score_path(scorer, src, out, resume=True)
    assert info.value.code == 2 and out.read_text() == '{"mine": 1}\n'


def test_stdout_output_goes_to_the_given_stream(tmp_path, scorer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_rows(tmp_path / "in.jsonl")
    stream = io.StringIO()
    summary = ScoreRun(src, "-").run(scorer, stdout=stream)
    assert summary.scored == 3 and [json.loads(x)["id"] for x in stream.getvalue().splitlines()] == ["a", "b", "c"]


# -- Summary: the model's perspectives, not four hard-coded ones ------------------------------


def test_summary_takes_perspectives_from_the_results():
    summary = Summary()
    assert summary.means == {} and summary.to_dict()["means"] == {}
    summary.add(SimpleNamespace(scores={"warmth": 2.0, "clarity": 4.0}, combined=0.5))
    summary.add(SimpleNamespace(scores={"warmth": 4.0, "clarity": 2.0}, combined=0.7))
    assert summary.means == {"warmth": 3.0, "clarity": 3.0, "combined": 0.6}
    assert list(summary.means) == ["warmth", "clarity", "combined"]


# -- the shared runner ---------------------------------------------------------------------------


def jsonl_source(records: list) -> io.BytesIO:
    return io.BytesIO(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))


def echo(chunk):
    return [Written(json.dumps({"id": p.record["id"], "line": p.line}) + "\n", p.record["id"]) for p in chunk]


def test_run_chunks_writes_whole_chunks_in_order_and_reports_bad_lines():
    source = jsonl_source([ROWS[0], b"{oops", ROWS[1], ROWS[2]])
    sink, errors, written, ticks, reported, writes = io.StringIO(), io.StringIO(), [], [], [], []

    class CountingSink(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    sink = CountingSink()
    stats = run_chunks(
        source,
        sink,
        errors,
        echo,
        chunk_size=2,
        skip_lines={4},
        progress=ticks.append,
        report_error=reported.append,
        on_written=lambda parsed, value: written.append(value),
    )
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == ["a", "b"]
    assert len(writes) == 1  # one chunk of two, written in one call
    assert written == ["a", "b"] and sum(ticks) == 3
    assert stats.written == 2 and stats.errors == 1 and stats.resumed == 1 and not stats.stopped_early
    assert json.loads(errors.getvalue())["line"] == 2 and len(reported) == 1


def test_run_chunks_stop_at_a_record_error_keeps_the_records_before_it():
    def fail_b(chunk):
        return [RecordError("no b", "response") if p.record["id"] == "b" else echo([p])[0] for p in chunk]

    sink, errors = io.StringIO(), io.StringIO()
    stats = run_chunks(jsonl_source(ROWS), sink, errors, fail_b, on_error="stop", chunk_size=8)
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == ["a"]
    entry = json.loads(errors.getvalue())
    assert entry == {"line": 2, "field": "response", "error": "no b", "id": "b"}
    assert stats.stopped_early and stats.errors == 1 and stats.written == 1


def test_run_chunks_stop_at_a_bad_line_writes_the_chunk_before_it_first():
    order = []
    sink = io.StringIO()

    class Errors(io.StringIO):
        def write(self, text):
            order.append("error")
            return super().write(text)

    def process(chunk):
        order.append("chunk")
        return echo(chunk)

    stats = run_chunks(jsonl_source([ROWS[0], b"[1, 2]", ROWS[1]]), sink, Errors(), process, on_error="stop")
    assert order == ["chunk", "error"] and stats.stopped_early
    assert [json.loads(x)["id"] for x in sink.getvalue().splitlines()] == ["a"]


def test_run_chunks_interrupt_finishes_the_chunk_or_raises():
    calls = []

    def interrupted_once(chunk):
        calls.append(len(chunk))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return echo(chunk)

    sink = io.StringIO()
    stats = run_chunks(jsonl_source(ROWS), sink, None, interrupted_once, chunk_size=2)
    assert stats.interrupted and calls == [2, 2] and len(sink.getvalue().splitlines()) == 2
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_chunks(jsonl_source(ROWS), io.StringIO(), None, interrupted_once, chunk_size=2, on_interrupt="raise")


def test_run_chunks_refuses_bad_settings():
    for kwargs in ({"on_error": "ignore"}, {"on_interrupt": "later"}, {"chunk_size": 0}):
        with pytest.raises(OptionError):
            run_chunks(jsonl_source(ROWS), io.StringIO(), None, echo, **kwargs)


def test_score_file_runs_on_the_shared_runner(tmp_path, scorer, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["on_error"])
        return runner.run_chunks(*args, **kwargs)

    monkeypatch.setattr(batch, "run_chunks", spy)
    src = write_rows(tmp_path / "in.jsonl", bad_line_after=1)
    summary = score_path(scorer, src, tmp_path / "out.jsonl", on_error="stop")
    assert seen == ["stop"]
    assert summary.stopped_early and summary.scored == 1 and summary.errors == 1
    assert [r["id"] for r in rows(tmp_path / "out.jsonl")] == ["a"]
