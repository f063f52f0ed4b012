"""Issue 19: one writer per output (item 3), `--resume` onto a foreign file (8), Ray
`--overwrite` only over what the engine wrote (12), resumed output equal to an uninterrupted
run (13), and the consistency items of 17 that concern outputs (`-o -` beside an old
perm-errors.jsonl, `--errors /dev/null`, `--quiet` and skipped lines, Ray's own log lines).
No test asserts a model score value."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from perm_lite.cli.main import app
from typer.testing import CliRunner

from perm_lite import batch
from perm_lite.batch import ScoreRun, score_file, score_path
from perm_lite.outputs import OutputBusy, OutputLock, TargetError, lock_path
from perm_lite.scorer import Result

runner = CliRunner()

GOOD = [
    {"id": "a", "query": "my dog died today", "response": "i am so sorry"},
    {"id": "b", "messages": [{"role": "user", "content": "i lost my job"}], "response": "that sounds hard"},
    {"id": "c", "completion": "# Analysis\nsad\n# Response\nyou are not alone"},
]


def write_lines(path: Path, lines) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def strict_rows(data: bytes | str) -> list[dict]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"bare {c}")) for x in text.splitlines()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res


def one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def _perm(*args) -> list[str]:
    return [sys.executable, "-P", "-c", "from perm_lite.cli.main import app; app()", *map(str, args)]


def _wait_for(check, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.02)
    pytest.fail("timed out waiting")


# -- item 3: one writer per output -----------------------------------------------------------


def test_a_second_run_onto_one_output_is_refused_and_the_first_output_is_intact(tmp_path, tiny_model_dir):
    """The issue's race: the first run has not written a line yet (it loads its model or waits
    for input), so its OUT is empty; a second run onto OUT must not start, whatever its flags."""
    records = [{"id": i, "query": "my dog died", "response": f"so sorry {i}"} for i in range(1500)]
    src = write_lines(tmp_path / "in.jsonl", records)
    out = tmp_path / "o.jsonl"
    first = subprocess.Popen(
        _perm("score", "-", "-o", out, "--model", tiny_model_dir, "-q"),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lock = lock_path(out)
    try:
        _wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid))
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = invoke("score", src, "--model", tiny_model_dir, "-o", out, "-q", *extra)
            assert res.exit_code == 2, (extra, res.output)
            line = one_line(res)
            assert line.startswith("error: output") and "being written by another perm run" in line
            assert f"pid {first.pid}" in line
        # its errors file is locked too: another output, the same errors file
        res = invoke("score", src, "--model", tiny_model_dir, "-o", tmp_path / "x.jsonl", "--errors", out)
        assert res.exit_code == 2 and not (tmp_path / "x.jsonl").exists()
        first.stdin.write(src.read_bytes())
        first.stdin.close()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    rows = strict_rows(out.read_bytes())  # every line whole
    assert [r["id"] for r in rows] == list(range(len(records)))  # none duplicated, none missing
    assert not lock.exists()  # released: the next run may start
    res = invoke("score", src, "--model", tiny_model_dir, "-o", out, "-q")
    assert res.exit_code == 2 and "use --resume" in one_line(res)


def test_the_lock_is_taken_before_anything_is_read_and_released_after(tmp_path, scorer):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    out.touch()  # empty: "loses nothing", but it is locked while the first run holds it
    first = ScoreRun(src, out)
    with pytest.raises(OutputBusy) as info:
        ScoreRun(src, out, overwrite=True)
    assert info.value.code == 2 and isinstance(info.value, TargetError)
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)  # another name for the same output: the same lock
    with pytest.raises(OutputBusy):
        ScoreRun(src, link, resume=True)
    summary = first.run(scorer)
    assert summary.scored == 3 and not lock_path(out).exists()
    with ScoreRun(src, out, overwrite=True) as again:  # unrun: closing it lets the next one in
        assert lock_path(out).exists() and lock_path(out) in again.plan.locks
    assert not lock_path(out).exists()
    assert score_path(scorer, src, out, overwrite=True).scored == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl", "out.jsonl"]


def test_a_symlink_planted_as_the_lock_file_is_refused_and_its_target_kept(tmp_path, scorer):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    out = tmp_path / "out.jsonl"
    lock_path(out).symlink_to(victim)
    with pytest.raises(TargetError, match="symbolic link"):
        score_path(scorer, src, out)
    assert victim.read_text() == "mine\n" and not out.exists()


def test_a_stale_lock_file_of_a_killed_run_does_not_block(tmp_path, scorer):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    lock_path(out).write_text("999999\n")  # left by a run killed with SIGKILL: nobody holds it
    assert score_path(scorer, src, out).scored == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_where_no_lock_file_can_be_made_the_output_itself_is_locked(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("")
    real_open = os.open

    def read_only_dir(path, flags, *args):
        if str(path).endswith(".perm-lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_dir)
    with OutputLock(out) as first:
        assert first.held and first.lock_file is None
        with pytest.raises(OutputBusy):
            OutputLock(out)
    OutputLock(out).release()  # free again


def test_judge_report_and_ray_refuse_an_output_another_run_is_writing(tmp_path, tiny_model_dir):
    from perm_lite.judge.run import judge_outputs

    src = write_lines(tmp_path / "in.jsonl", GOOD)
    labels = tmp_path / "labels.jsonl"
    with OutputLock(labels):
        with pytest.raises(OutputBusy):
            judge_outputs(src, labels, None, overwrite=True)
    plan = judge_outputs(src, labels, None, overwrite=False)  # free again
    with pytest.raises(OutputBusy):
        judge_outputs(src, labels, None, overwrite=True)
    plan.close()

    scored = tmp_path / "scored.jsonl"
    assert invoke("score", src, "--model", tiny_model_dir, "-o", scored, "-q").exit_code == 0
    page = tmp_path / "report.html"
    with OutputLock(page):
        res = invoke("report", scored, "--model", tiny_model_dir, "-o", page)
    assert res.exit_code == 2 and "being written by another perm run" in one_line(res)
    assert one_line(res).startswith("error: ") and not page.exists()

    out_dir = tmp_path / "scored-dir"
    with OutputLock(out_dir, "output directory"):
        res = invoke("score", src, "--model", tiny_model_dir, "--engine", "ray", "-o", out_dir)
    assert res.exit_code == 2 and "being written by another perm run" in one_line(res)
    assert not out_dir.exists()


# -- item 8: --resume onto a file that is not perm output ---------------------------------------


@pytest.mark.parametrize("content", [b'{"loss": NaN}', b'{"loss": NaN}\n', b'{"loss": 1', b'{"line": 3'])
def test_resume_onto_a_one_line_foreign_file_is_refused_untouched(tmp_path, tiny_model_dir, content):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "metrics.jsonl"
    out.write_bytes(content)
    res = invoke("score", src, "--model", tiny_model_dir, "-o", out, "--resume")
    assert res.exit_code == 2 and "cannot resume" in one_line(res) and "untouched" in one_line(res)
    assert out.read_bytes() == content
    assert not lock_path(out).exists()


# -- item 13: a resumed run writes what an uninterrupted one writes ------------------------------


class NeighbourScorer:
    """Scores that move in the 6th decimal with the batch a record is scored in, as padding
    and batch size move the real model's (see the README on resume)."""

    def score_dialogues(self, dialogues):
        noise = sum(len(d.response) for d in dialogues) % 97 * 1e-6
        return [
            Result(
                scores={"warmth": round(len(d.response) / 10 + noise, 6)},
                combined=round(len(d.response) / 100 + noise, 6),
                truncated=False,
                tokens={},
                model="neighbours",
                model_version="0",
            )
            for d in dialogues
        ]


def _records(n: int) -> list[dict]:
    return [{"id": i, "query": "hi", "response": "x" * (1 + (i * 7) % 23)} for i in range(n)]


def test_resume_after_a_torn_chunk_equals_the_uninterrupted_run(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [*_records(6), b"{bad", *_records(14)[6:]])
    full = tmp_path / "full.jsonl"
    score_path(NeighbourScorer(), src, full, chunk_size=4)
    lines = full.read_bytes().splitlines(keepends=True)
    for cut in (1, 5, 6, 9):  # mid-chunk, and just after a chunk
        part = tmp_path / f"part{cut}.jsonl"
        part.write_bytes(b"".join(lines[:cut]) + lines[cut][:17])  # a hard kill mid-write
        (tmp_path / f"part{cut}.jsonl.errors.jsonl").write_bytes((tmp_path / "full.jsonl.errors.jsonl").read_bytes())
        summary = score_path(NeighbourScorer(), src, part, resume=True, chunk_size=4)
        assert part.read_bytes() == full.read_bytes(), cut
        assert summary.scored == len(lines) - cut and summary.errors == 0


def test_ctrl_c_while_reading_leaves_the_chunk_to_resume(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", _records(10))
    full, part = io.StringIO(), io.StringIO()
    score_file(NeighbourScorer(), open(src, "rb"), full, None, chunk_size=4)

    def interrupted(n):
        with open(src, "rb") as fh:
            for i, raw in enumerate(fh):
                if i == n:
                    raise KeyboardInterrupt
                yield raw

    summary = score_file(NeighbourScorer(), interrupted(6), part, None, chunk_size=4)
    assert summary.interrupted and summary.scored == 4  # lines 5-6 were read, not scored
    done = {json.loads(x)["perm"]["line"] for x in part.getvalue().splitlines()}
    score_file(NeighbourScorer(), open(src, "rb"), part, None, chunk_size=4, skip_lines=done)
    assert part.getvalue() == full.getvalue()


def test_ctrl_c_while_scoring_still_finishes_that_chunk(tmp_path, monkeypatch):
    src = write_lines(tmp_path / "in.jsonl", _records(10))
    real, calls = batch.score_isolated, []

    def interrupted_once(scorer, dialogues):
        calls.append(len(dialogues))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(scorer, dialogues)

    monkeypatch.setattr(batch, "score_isolated", interrupted_once)
    out = tmp_path / "out.jsonl"
    summary = score_path(NeighbourScorer(), src, out, chunk_size=4)
    assert summary.interrupted and calls == [4, 4, 4] and len(strict_rows(out.read_bytes())) == 8


# -- item 17: the errors file of -o -, --errors /dev/null, --quiet --------------------------------


def test_stdout_run_replaces_an_earlier_runs_perm_errors_file(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"query": "no reply"}])
    earlier = tmp_path / "perm-errors.jsonl"
    earlier.write_text('{"line": 7, "field": "response", "error": "missing", "id": "old"}\n')
    res = invoke("score", src, "--model", tiny_model_dir, "-q")
    assert res.exit_code == 3, res.output
    assert [r["id"] for r in strict_rows(res.stdout)] == ["a"]
    assert [r["line"] for r in strict_rows(earlier.read_bytes())] == [2]  # this run's bad records
    res = invoke("score", write_lines(tmp_path / "ok.jsonl", GOOD), "--model", tiny_model_dir, "-q")
    assert res.exit_code == 0 and earlier.read_text() == ""  # no bad records this time
    earlier.write_text("my notes\n")  # not an errors file perm wrote: never replaced
    res = invoke("score", src, "--model", tiny_model_dir, "-q")
    assert res.exit_code == 2 and "not a perm errors file" in one_line(res)
    assert earlier.read_text() == "my notes\n"


def test_errors_dev_null_discards_bad_records_and_keeps_the_device(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"query": "no reply"}, GOOD[1]])
    out = tmp_path / "out.jsonl"
    res = invoke("score", src, "--model", tiny_model_dir, "-o", out, "--errors", os.devnull)
    assert res.exit_code == 3, res.output
    assert "skipped line 2" in res.stderr and "errors not kept" in res.stderr
    assert [r["id"] for r in strict_rows(out.read_bytes())] == ["a", "b"]
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    res = invoke("score", src, "--model", tiny_model_dir, "-o", out, "--errors", os.devnull, "--resume", "-q")
    assert res.exit_code == 3 and "skipped line 2" in res.stderr  # not kept, so said again
    assert [r["id"] for r in strict_rows(out.read_bytes())] == ["a", "b"]


def test_quiet_still_says_which_lines_were_skipped(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], b"{not json", GOOD[1]])
    res = invoke("score", src, "--model", tiny_model_dir, "-o", tmp_path / "o.jsonl", "-q")
    assert res.exit_code == 3
    assert res.stderr.startswith("skipped line 2") and "scored" not in res.stderr  # no summary


# -- item 12: Ray --overwrite replaces only what the engine wrote --------------------------------


def _ray_run_args(src, tiny_model_dir, out, *more):
    return ["score", src, "--model", tiny_model_dir, "--engine", "ray", "-o", out, *more]


def test_ray_overwrite_refuses_perm_looking_files_the_engine_did_not_write(tmp_path, tiny_model_dir):
    from perm_lite.cli.score_commands import _check_ray_paths

    from perm_lite.integrations.ray_engine import MANIFEST, _write_manifest

    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    mine = write_lines(out / "results.jsonl", [{"id": 1, "scores": {}, "perm": {"line": 1}}])  # perm score's
    (out / "empty.jsonl").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for _ in range(2):
        with pytest.raises(typer.Exit):  # the old rule deleted both (integer perm.line; empty)
            _check_ray_paths(str(src), out, overwrite=True)
        res = invoke(*_ray_run_args(src, tiny_model_dir, out, "--overwrite"))
        assert res.exit_code == 2 and "perm did not write" in one_line(res)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _write_manifest(out, [out / "empty.jsonl"])  # an earlier run wrote empty.jsonl only
    with pytest.raises(typer.Exit):
        _check_ray_paths(str(src), out, overwrite=True)  # results.jsonl is still not its
    mine.unlink()
    assert sorted(p.name for p in _check_ray_paths(str(src), out, overwrite=True)) == [MANIFEST, "empty.jsonl"]
    (out / "empty.jsonl").write_text("edited since\n")  # no longer the file the engine wrote
    with pytest.raises(typer.Exit):
        _check_ray_paths(str(src), out, overwrite=True)
    (out / "empty.jsonl").unlink()
    (out / "link.jsonl").symlink_to(src)
    with pytest.raises(typer.Exit):
        _check_ray_paths(str(src), out, overwrite=True)
    assert strict_rows(src.read_bytes()) == GOOD


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")
def test_ray_run_says_only_perms_lines_and_overwrites_only_its_own_files(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "a.jsonl", [*GOOD, {"query": "no reply"}])
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    cwd = tmp_path  # never the checkout: Ray's workers would import its perm_lite/ first

    def run(*more):
        args = _perm(*_ray_run_args(data, tiny_model_dir, out, "--workers", "1", *more))
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)

    proc = run()
    assert proc.returncode == 3, proc.stderr
    said = [x for x in proc.stderr.splitlines() if not x.startswith("note: ")]
    assert len(said) == 1 and said[0].startswith("scored 3 records"), proc.stderr  # no Ray log lines
    assert "Deprecat" not in proc.stderr and "ray_remote_args" not in proc.stderr
    assert [r["id"] for r in strict_rows((out / "a.jsonl").read_bytes())] == ["a", "b", "c"]
    manifest = json.loads((out / "_perm_manifest.json").read_text())
    assert sorted(manifest["files"]) == ["_errors.jsonl", "a.jsonl"] and manifest["pending"] == []
    assert not lock_path(out).exists()
    write_lines(data / "a.jsonl", GOOD)  # no bad line now: _errors.jsonl of the first run goes
    proc = run("--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["_perm_manifest.json", "a.jsonl"]
