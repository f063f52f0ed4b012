"""`perm score` probed as a careless or hostile user would (issue 12): never destroy what the
run did not create, one bad record never costs another, strict JSON in and out, and every
failure is one line with the documented exit code. No test asserts a model score value."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from perm_lite.cli.main import app
from typer.testing import CliRunner

from perm_lite import batch, outputs

runner = CliRunner()

GOOD = [
    {"id": "a", "query": "my dog died today", "response": "i am so sorry", "source": "x"},
    {"id": "b", "messages": [{"role": "user", "content": "i lost my job"}], "response": "that sounds hard"},
    {"id": "c", "completion": "# Analysis\nsad\n# Response\nyou are not alone"},
]


def _forbid_constant(name):
    raise ValueError(f"bare {name} in output")


def strict_rows(path_or_text):
    """Parse JSONL strictly: valid UTF-8, no NaN/Infinity, every line one JSON object."""
    data = path_or_text.read_bytes() if isinstance(path_or_text, Path) else path_or_text.encode("utf-8")
    rows = []
    for line in data.decode("utf-8").splitlines():
        row = json.loads(line, parse_constant=_forbid_constant)
        assert isinstance(row, dict)
        rows.append(row)
    return rows


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def invoke(*args, **kwargs):
    res = runner.invoke(app, [str(a) for a in args], **kwargs)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res


def one_line(res):
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def score_args(src, tiny_model_dir, *more):
    return ["score", src, "--model", tiny_model_dir, *more]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


# -- Deletes data ---------------------------------------------------------------------------


def test_output_that_is_the_input_is_refused_links_included(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "p.jsonl", GOOD)
    before = src.read_bytes()
    (tmp_path / "soft.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    for target in (src, tmp_path / "soft.jsonl", tmp_path / "hard.jsonl", f"{tmp_path}/sub/../p.jsonl"):
        res = invoke(*score_args(src, tiny_model_dir, "-o", target, "--overwrite"))
        assert res.exit_code == 2, res.output
        assert "is the input" in one_line(res)
        assert src.read_bytes() == before
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "o.jsonl", "--resume", "--errors", src))
    assert res.exit_code == 2 and src.read_bytes() == before
    res = invoke(*score_args(src, tiny_model_dir, "-o", src, "--resume"))
    assert res.exit_code == 2 and src.read_bytes() == before
    assert not (tmp_path / "o.jsonl").exists()


def test_errors_path_that_is_the_input_is_refused(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    before = src.read_bytes()
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "out.jsonl", "--errors", src))
    assert res.exit_code == 2 and "is the input" in one_line(res)
    assert src.read_bytes() == before
    assert not (tmp_path / "out.jsonl").exists()


def test_errors_path_that_is_the_output_is_refused(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--errors", out))
    assert res.exit_code == 2 and "is the output" in one_line(res)


def test_paths_that_are_not_regular_files_are_refused_and_kept(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", [*GOOD, {"query": "no reply"}])
    null_link = tmp_path / "null-link"
    null_link.symlink_to(os.devnull)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for option in ("-o", "--errors"):
        for path in (null_link, fifo, folder, dangling, Path(os.devnull)):
            if option == "--errors" and path in (null_link, Path(os.devnull)):
                continue  # --errors /dev/null discards bad records (tests/test_hardening_outputs.py)
            other = ["--errors", tmp_path / "e.jsonl"] if option == "-o" else ["-o", tmp_path / "o.jsonl"]
            res = invoke(*score_args(src, tiny_model_dir, option, path, *other, "--overwrite"))
            assert res.exit_code == 2, (option, path, res.output)
            line = one_line(res)
            assert "regular file" in line or "broken symbolic link" in line
    assert null_link.is_symlink() and os.readlink(null_link) == os.devnull
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert (folder / "keep.txt").read_text() == "keep"
    assert dangling.is_symlink()
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "e.jsonl").exists()


def test_errors_path_on_a_device_node_is_refused_and_the_node_kept(tmp_path, tiny_model_dir):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here: {exc}")
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"query": "no reply"}])
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "o.jsonl", "--errors", node))
    assert res.exit_code == 2 and "character device" in one_line(res)
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_overwrite_replaces_only_when_the_run_succeeds(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    res = invoke(*score_args(src, tmp_path / "no-model", "-o", out, "--overwrite"))
    assert res.exit_code == 1 and out.read_text() == "precious\n"  # the model failed to load
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--overwrite", "-q"))
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in strict_rows(out)] == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_overwrite_keeps_the_file_mode_and_the_symlink(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    real.chmod(0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    res = invoke(*score_args(src, tiny_model_dir, "-o", link, "--overwrite", "-q"))
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and len(strict_rows(real)) == 3
    assert stat.S_IMODE(real.stat().st_mode) == 0o640


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


def test_full_disk_is_one_line_exit_1_and_overwrite_keeps_the_old_file(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(outputs.OutputFile, "_wrap", staticmethod(lambda fd: _FullDisk(os.fdopen(fd, "wb"), 0)))
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--overwrite"))
    assert res.exit_code == 1
    assert "No space left on device" in one_line(res) and str(out) in one_line(res)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    fresh = tmp_path / "fresh.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", fresh))
    assert res.exit_code == 1 and "No space left on device" in one_line(res)


def _limited(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def _perm(*args):
    return [sys.executable, "-P", "-c", "from perm_lite.cli.main import app; app()", *map(str, args)]


def test_a_real_write_failure_is_one_line_exit_1(tmp_path, tiny_model_dir):
    """The operating system refuses the write (file size limit: EFBIG, as a full disk gives ENOSPC)."""
    src = write_lines(tmp_path / "in.jsonl", [{"id": i, "response": "so sorry"} for i in range(2000)])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    args = _perm("score", src, "--model", tiny_model_dir, "-o", out, "--overwrite", "-q")
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limited(50_000), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_closed_stdout_is_one_line_exit_1(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", [{"id": i, "response": "so sorry"} for i in range(3000)])
    proc = subprocess.Popen(
        _perm("score", src, "--model", tiny_model_dir, "-q"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # like `perm score ... | head -0`
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err.count("\n") == 1 and "cannot write stdout" in err and "Traceback" not in err


def test_missing_output_directory_is_one_line_exit_1(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "nodir" / "out.jsonl"))
    assert res.exit_code == 1 and "does not exist" in one_line(res)
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "o.jsonl", "--errors", tmp_path / "no" / "e"))
    assert res.exit_code == 1 and "does not exist" in one_line(res)


def test_dev_full_is_refused_in_one_line(tmp_path, tiny_model_dir):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    res = invoke(*score_args(src, tiny_model_dir, "-o", "/dev/full"))
    assert res.exit_code == 2 and "character device" in one_line(res)


def test_existing_errors_file_is_protected_like_the_output(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    old_errors = tmp_path / "out.jsonl.errors.jsonl"
    old_errors.write_text('{"line": 9, "error": "from another run"}\n')
    res = invoke(*score_args(src, tiny_model_dir, "-o", out))
    assert res.exit_code == 2 and "--overwrite" in one_line(res)
    assert old_errors.read_text() == '{"line": 9, "error": "from another run"}\n' and not out.exists()
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--overwrite", "-q"))
    assert res.exit_code == 0 and len(strict_rows(out)) == 3
    assert old_errors.read_text() == ""  # replaced by this run's errors: none


def test_stdout_errors_file_is_protected_and_documented(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"query": "no reply"}])
    mine = tmp_path / "perm-errors.jsonl"
    mine.write_text("mine\n")
    res = invoke(*score_args(src, tiny_model_dir))
    assert res.exit_code == 2 and "perm-errors.jsonl exists" in one_line(res)
    assert mine.read_text() == "mine\n" and res.stdout == ""
    mine.unlink()
    res = invoke(*score_args(src, tiny_model_dir, "-q"))
    assert res.exit_code == 3 and [r["id"] for r in strict_rows(res.stdout)] == ["a"]
    assert strict_rows(mine)[0]["line"] == 2
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "perm-errors.jsonl" in readme


def test_errors_file_is_never_created_when_there_are_no_errors(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    errors = tmp_path / "e.jsonl"
    errors.write_text("")  # an empty file the user made: kept
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "o.jsonl", "--errors", errors, "-q"))
    assert res.exit_code == 0 and errors.exists() and errors.read_text() == ""


def test_resume_on_a_file_that_is_not_perm_output_leaves_it_untouched(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    for content in (
        b'{"a": 1}\n{"b": 2}\n{"c": 3',  # a torn-looking last line after foreign lines
        b"just some notes\nno newline at the end",
        b'{"id": 1, "scores": {}, "perm": {"line": 1}}\nplain text\n',
        b'{"a": 1}',  # one whole JSON line without a newline
    ):
        out = tmp_path / "notes.jsonl"
        out.write_bytes(content)
        res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--resume"))
        assert res.exit_code == 2, res.output
        assert "cannot resume" in one_line(res) and "untouched" in one_line(res)
        assert out.read_bytes() == content


def test_resume_cuts_only_a_torn_perm_line_and_keeps_a_whole_one(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    full = tmp_path / "full.jsonl"
    assert invoke(*score_args(src, tiny_model_dir, "-o", full, "-q")).exit_code == 0
    lines = full.read_bytes().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(lines[0] + lines[1][:20])
    res = invoke(*score_args(src, tiny_model_dir, "-o", torn, "--resume", "-q"))
    assert res.exit_code == 0 and [r["id"] for r in strict_rows(torn)] == ["a", "b", "c"]
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(lines[0] + lines[1].rstrip(b"\n"))
    res = invoke(*score_args(src, tiny_model_dir, "-o", whole, "--resume", "-q"))
    assert res.exit_code == 0 and [r["id"] for r in strict_rows(whole)] == ["a", "b", "c"]


def test_interrupted_overwrite_keeps_the_old_file(tmp_path, tiny_model_dir, monkeypatch):
    calls = []
    real = batch.score_isolated

    def interrupted_once(scorer, dialogues):
        calls.append(len(dialogues))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(scorer, dialogues)

    monkeypatch.setattr(batch, "score_isolated", interrupted_once)
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--overwrite"))
    assert res.exit_code == 130 and "left as it was" in res.stderr
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_ray_output_that_is_the_input_directory_is_refused_before_anything_is_deleted(tmp_path, tiny_model_dir):
    data = tmp_path / "d"
    data.mkdir()
    write_lines(data / "a.jsonl", GOOD)
    (data / "unrelated.txt").write_text("mine")
    before = snapshot(data)
    for out in (data, tmp_path / "d" / "."):
        res = invoke(*score_args(data, tiny_model_dir, "--engine", "ray", "-o", out, "--overwrite"))
        assert res.exit_code == 2 and "input" in one_line(res)
        assert snapshot(data) == before
    res = invoke(*score_args(data / "a.jsonl", tiny_model_dir, "--engine", "ray", "-o", data, "--overwrite"))
    assert res.exit_code == 2 and snapshot(data) == before


def test_ray_overwrite_of_a_project_directory_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\n")
    (project / "src" / "code.py").write_text("x = 1\n")
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    monkeypatch.chdir(project)
    res = invoke(*score_args(src, tiny_model_dir, "--engine", "ray", "-o", ".", "--overwrite"))
    assert res.exit_code == 2 and "perm did not write" in one_line(res)
    assert (project / "pyproject.toml").read_text() == "[project]\n"
    assert (project / "src" / "code.py").read_text() == "x = 1\n"


def test_ray_overwrite_replaces_only_an_earlier_perm_output(tmp_path, tiny_model_dir):
    import importlib.util

    from perm_lite.cli.score_commands import _check_ray_paths

    from perm_lite.integrations.ray_engine import _write_manifest

    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    write_lines(out / "in.jsonl", [{"id": "a", "scores": {}, "perm": {"line": 1}}])
    (out / "_errors.jsonl").write_text('{"file": "x", "line": 2, "error": "e"}\n')
    _write_manifest(out, [out / "in.jsonl", out / "_errors.jsonl"])  # what the engine writes at the end
    assert sorted(p.name for p in _check_ray_paths(str(src), out, overwrite=True)) == [
        "_errors.jsonl",
        "_perm_manifest.json",
        "in.jsonl",
    ]
    (out / "notes.jsonl").write_text('{"mine": true}\n')
    with pytest.raises(typer.Exit):
        _check_ray_paths(str(src), out, overwrite=True)
    (out / "notes.jsonl").unlink()
    if importlib.util.find_spec("ray") is None:  # the extra is missing: nothing may be deleted first
        res = invoke(*score_args(src, tiny_model_dir, "--engine", "ray", "-o", out, "--overwrite"))
        assert res.exit_code == 1 and "ray extra" in one_line(res)
        assert sorted(p.name for p in out.iterdir()) == ["_errors.jsonl", "_perm_manifest.json", "in.jsonl"]


def test_local_output_that_is_a_directory_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("keep")
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    res = invoke(*score_args(src, tiny_model_dir, "-o", ".", "--overwrite"))
    assert res.exit_code == 2 and "directory" in one_line(res)
    assert (tmp_path / "keep.txt").read_text() == "keep"


# -- One line kills the run -------------------------------------------------------------------


HOSTILE = [
    ("deep nesting", b'{"response": "ok", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", None),
    ("5000-digit integer", b'{"response": "ok", "n": ' + b"7" * 5000 + b"}", None),
    ("surrogate in response", b'{"id": "s1", "response": "so sorry \\ud800"}', "response"),
    ("surrogate in a pass-through field", b'{"id": "s2", "response": "so sorry", "meta": ["\\udfff"]}', "meta"),
    ("surrogate in the id", b'{"id": "\\ud800", "response": "so sorry"}', "id"),
    ("surrogate in a field name", b'{"response": "so sorry", "\\ud800": 1}', "\\ud800"),
    ("surrogate in messages", b'{"messages": [{"role": "user", "content": "\\ud83d"}], "response": "ok"}', "messages"),
    ("NaN literal", b'{"response": "so sorry", "w": NaN}', None),
    ("Infinity literal", b'{"response": "so sorry", "w": [-Infinity]}', None),
    ("float overflow", b'{"response": "so sorry", "w": 1e400}', "w"),
    ("deep nesting at the top", b"[" * 100_000 + b"]" * 100_000, None),
]


@pytest.mark.parametrize("name, bad, field", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_one_hostile_line_costs_only_itself(tmp_path, tiny_model_dir, name, bad, field):
    lines = [GOOD[0], GOOD[1], bad, GOOD[2], {"id": "d", "response": "you are not alone"}]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out))
    assert res.exit_code == 3, res.output
    assert [r["id"] for r in strict_rows(out)] == ["a", "b", "c", "d"]
    errors = strict_rows(tmp_path / "out.jsonl.errors.jsonl")
    assert len(errors) == 1 and errors[0]["line"] == 3
    if field is not None:
        assert errors[0]["field"] == field
    assert "line 3" in res.stderr and "1 errors" in res.stderr


def test_hostile_lines_with_stop_end_the_run_cleanly(tmp_path, tiny_model_dir):
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], b'{"id": "\\ud800", "response": "x"}', GOOD[1]])
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "--on-error", "stop"))
    assert res.exit_code == 4
    assert [r["id"] for r in strict_rows(out)] == ["a"]
    assert strict_rows(tmp_path / "out.jsonl.errors.jsonl")[0]["id"] == "\\ud800"


def test_surrogate_in_stdin_to_stdout(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = json.dumps(GOOD[0]) + "\n" + '{"response": "x \\ud800"}\n' + json.dumps(GOOD[1]) + "\n"
    res = invoke("score", "-", "--model", tiny_model_dir, "-q", input=data)
    assert res.exit_code == 3
    assert [r["id"] for r in strict_rows(res.stdout)] == ["a", "b"]


def test_a_record_that_fails_to_score_costs_only_itself(tmp_path, tiny_model_dir, monkeypatch):
    from perm_lite.scorer import Scorer

    real = Scorer.score_dialogues

    def fragile(self, dialogues):
        if any("boom" in d.response for d in dialogues):
            raise RuntimeError("tokenizer exploded")
        return real(self, dialogues)

    monkeypatch.setattr(Scorer, "score_dialogues", fragile)
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"id": "x", "response": "boom"}, GOOD[1]])
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out))
    assert res.exit_code == 3
    assert [r["id"] for r in strict_rows(out)] == ["a", "b"]
    err = strict_rows(tmp_path / "out.jsonl.errors.jsonl")[0]
    assert err["line"] == 2 and err["id"] == "x" and "tokenizer exploded" in err["error"]


def test_a_model_failing_every_record_is_fatal_in_one_line(tmp_path, tiny_model_dir, monkeypatch):
    from perm_lite.scorer import Scorer

    def broken(self, dialogues):
        raise RuntimeError("onnxruntime: device lost")

    monkeypatch.setattr(Scorer, "score_dialogues", broken)
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "o.jsonl"))
    assert res.exit_code == 1 and "device lost" in one_line(res)


def test_long_fields_are_cut_before_tokenizing_and_reported(tmp_path, tiny_model_dir):
    """A many-megabyte line costs a bounded amount of tokenizer work; truncation is reported."""
    from fixture_model import build_tokenizer

    from perm_lite.records import parse_record
    from perm_lite.text import CHARS_PER_TOKEN, encode_dialogues

    class Recording:
        def __init__(self, tok):
            self.tok, self.longest = tok, 0

        def encode_batch(self, texts, **kw):
            self.longest = max(self.longest, *(len(t) for t in texts))
            return self.tok.encode_batch(texts, **kw)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    tok = Recording(build_tokenizer())
    huge = "so sorry " * 1_000_000
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 20_000
    record = {"query": huge, "analysis": huge, "persona": huge, "scenario": huge, "response": huge}
    enc = encode_dialogues([parse_record(record)], tok, 64)[0]
    assert tok.longest <= CHARS_PER_TOKEN * 64
    assert enc.truncated and len(enc) == 64
    messages = [*history, {"role": "user", "content": "my dog died"}]
    enc = encode_dialogues([parse_record({"messages": messages, "response": "so sorry"})], tok, 64)[0]
    assert enc.truncated and "history" in enc.clipped
    # A single word longer than the budget: cut, so truncated although few tokens remain.
    enc = encode_dialogues([parse_record({"response": "x" * 100_000})], tok, 64)[0]
    assert enc.truncated and enc.clipped == frozenset({"response"})

    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"id": "big", "response": huge, "query": huge}, GOOD[1]])
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, "-q"))
    assert res.exit_code == 0, res.output
    rows = strict_rows(out)
    assert [r["id"] for r in rows] == ["a", "big", "b"]
    assert rows[1]["perm"]["truncated"] is True and rows[0]["perm"]["truncated"] is False


def test_short_records_are_not_changed_by_the_character_budget():
    from perm_lite.records import parse_record
    from perm_lite.text import clip, render

    d = parse_record({"query": "my dog died " * 50, "response": "so sorry " * 50})
    rendered = render(d)
    assert clip(rendered, 16 * 256) == (rendered, frozenset())


# -- Invalid output -----------------------------------------------------------------------------


def test_non_finite_scores_are_record_errors_never_bare_nan(tmp_path, tiny_model_dir, monkeypatch):
    import dataclasses

    from perm_lite.scorer import Scorer

    real = Scorer.score_dialogues

    def nan_for_x(self, dialogues):
        out = real(self, dialogues)
        return [dataclasses.replace(r, combined=float("nan")) if d.id == "x" else r for d, r in zip(dialogues, out)]

    monkeypatch.setattr(Scorer, "score_dialogues", nan_for_x)
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], {"id": "x", "response": "so sorry"}, GOOD[1]])
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out))
    assert res.exit_code == 3
    assert [r["id"] for r in strict_rows(out)] == ["a", "b"]
    err = strict_rows(tmp_path / "out.jsonl.errors.jsonl")[0]
    assert err["line"] == 2 and err["field"] == "scores" and "non-finite" in err["error"]


@pytest.mark.parametrize(
    "option",
    [
        ["--bystander-coef", "nan"],
        ["--bystander-coef", "inf"],
        ["--weights", "resonation=nan"],
        ["--weights", "resonation=inf"],
        ["--weights", "x=abc"],
        ["--weights", "resonation=abc"],
        ["--weights", "resonation=-1"],
        ["--weights", "resonation=0,reception=0"],
        ["--weights", "resonation"],
        ["--fields", "nonsense=x"],
    ],
)
def test_bad_numbers_are_one_line_usage_errors(tmp_path, tiny_model_dir, option):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    res = invoke(*score_args(src, tiny_model_dir, "-o", out, *option))
    assert res.exit_code == 2, res.output
    assert one_line(res).startswith("error: ")
    assert not out.exists()


# -- Exit codes and messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [["--combine", "median"], ["--provider", "tpu"], ["--on-error", "ignore"], ["--engine", "spark"]],
)
def test_bad_choices_exit_2(tmp_path, tiny_model_dir, option):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    res = invoke(*score_args(src, tiny_model_dir, "-o", tmp_path / "o.jsonl", *option))
    assert res.exit_code == 2, res.output
    assert option[1] in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_input_that_is_a_directory_is_a_usage_error(tmp_path, tiny_model_dir):
    res = invoke(*score_args(tmp_path, tiny_model_dir, "-o", tmp_path / "o.jsonl"))
    assert res.exit_code == 2 and "directory" in one_line(res)


def test_onnxruntime_telemetry_is_switched_off_before_the_first_session(tiny_model_dir, monkeypatch):
    import onnxruntime as ort

    from perm_lite import session
    from perm_lite.scorer import Scorer

    calls = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"), raising=False)
    monkeypatch.setattr(session, "_telemetry_off", False)
    real = ort.InferenceSession

    def checked(*args, **kwargs):
        assert calls == ["off"], "a session was created before telemetry was switched off"
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", checked)
    Scorer(tiny_model_dir, provider="cpu", threads=1)
    Scorer(tiny_model_dir, provider="cpu", threads=1)
    assert calls == ["off"]
