"""The newcomer's path (issue 19, items 14-17): README lines that run as written from the
checkout, progress and a summary for long commands, one-line errors, no library warnings."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from perm_lite.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Run from the repository root, `import perm_lite` finds the checkout's perm_lite/ before the
# installed package (the working directory is first on sys.path). With a regular install
# (CI installs the wheel) nothing else maps perm_lite.models in; an editable install's finder
# would, so it is taken out here to test what a `pip install .` user gets.
FROM_CHECKOUT = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
)


def run_from_root(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FROM_CHECKOUT + code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def python_quickstart() -> str:
    """The README's Python quickstart, up to the lines that need the reader's own data."""
    section = README.split("## Python quickstart", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)[1]
    lines = []
    for line in block.splitlines():
        if "list_of_records" in line or "huge_iterable" in line:
            break
        lines.append(line)
    return "\n".join(lines)


# -- item 14: the quickstart and the thresholds module from the repository root ---------------


def test_readme_python_quickstart_runs_from_the_repository_root():
    code = python_quickstart()
    assert "Scorer()" in code and "score_one" in code
    done = run_from_root(
        code + "\nimport perm_lite\nprint(perm_lite.__file__)\nprint(sorted(result.scores), result.combined)\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]  # was ModuleNotFoundError: perm_lite.models
    where, scores = done.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve() == ROOT / "perm_lite" / "__init__.py"  # the checkout's, shadowing the install
    assert scores.startswith("['bystander', 'expression', 'reception', 'resonation']"), scores


def test_thresholds_module_runs_from_the_repository_root(tmp_path):
    run_module = (
        "import runpy\n"
        "sys.argv = ['thresholds', *{args!r}]\n"
        "runpy.run_module('perm_lite.training.thresholds', run_name='__main__', alter_sys=True)\n"
    )
    done = run_from_root(run_module.format(args=["--help"]))
    assert done.returncode == 0 and "--data" in done.stdout, done.stderr[-3000:]
    # with a data folder that has no mint files: it gets past loading the packaged model
    done = run_from_root(run_module.format(args=["--data", str(tmp_path)]))
    assert "perm_lite.models" not in done.stderr and "ModuleNotFoundError" not in done.stderr, done.stderr[-3000:]
    assert "mint" in done.stderr, done.stderr[-3000:]


def test_packaged_models_dir_falls_back_to_the_source_folder(monkeypatch):
    from perm_lite import model_dir

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(model_dir.resources, "files", missing)
    # the models/ folder beside the perm_lite/ that was imported: the checkout's own when
    # perm_lite comes from a source tree (the quickstart test above runs that for real)
    source_models = Path(model_dir.__file__).resolve().parent.parent / "models"
    assert model_dir.packaged_models_dir() == source_models
    if source_models == ROOT / "models":  # an editable install imports the checkout itself
        assert (model_dir.resolve_model("default") / "config.json").is_file()


# -- item 15: install lines that work from the checkout ----------------------------------------


def test_readme_install_lines_work_from_the_checkout():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    # perm-lite is on no package index: nothing may be installed by its name
    assert not re.search(r"pip install [\"']?perm-lite", README), re.findall(r".*pip install [\"']?perm-lite.*", README)
    assert not re.search(r"[\"']perm-lite\[", README)
    named = re.findall(r"(?:\.|\.whl\)?|\.whl)\[([a-z0-9,.]+)\]", README)
    assert named, "no install line with extras found"
    for group in named:
        for extra in group.split(","):
            if extra not in {"..."}:
                assert extra in extras, f"README installs an extra pyproject lacks: {extra}"
    for extra in ("serve", "ray", "trl", "gpu", "judge", "train"):
        assert f'".[{extra}' in README or f",{extra}" in README, extra


# -- item 17: fp32-variant without torch; library warnings ------------------------------------


def test_fp32_variant_without_the_train_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    out = tmp_path / "fp32"
    result = CliRunner().invoke(app, ["fp32-variant", "-o", str(out)])
    assert result.exit_code == 1, result.output  # was a 30-line traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: perm fp32-variant needs the train extra"), lines
    assert "Traceback" not in result.output and not out.exists()


def warn_as(module: str, message: str) -> None:
    """A warning attributed to `module`, as the warnings machinery sees one raised there."""
    exec(compile(f"import warnings\nwarnings.warn({message!r}, UserWarning)", "lib.py", "exec"), {"__name__": module})


def noisy_runner(dialogues, batch_size):
    warn_as("torch.nn.modules.module", "from torch: TypedStorage is deprecated")
    warn_as("transformers.modeling_utils", "from transformers: attention mask not set")
    warn_as("perm_lite.training.model", "from the traced model: TracerWarning")
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    return [0.001]


@pytest.mark.parametrize("command", ["bench", "fp32-variant"])
def test_library_warnings_do_not_reach_the_user(tmp_path, tiny_model_dir, monkeypatch, caplog, command):
    from perm_lite import bench

    if command == "bench":
        monkeypatch.setattr(bench, "build_backends", lambda *a: ({"noisy": noisy_runner}, []))
        args = ["bench", "--model", str(tiny_model_dir), "--records", "8", "--batch-sizes", "2", "--lengths", "16"]
        args += ["--repeats", "1", "--no-torch"]
    else:
        from perm_lite.training import dequantize

        def fake_write(model, out_dir):
            noisy_runner([], 1)
            return out_dir

        monkeypatch.setattr(dequantize, "write_fp32_variant", fake_write)
        args = ["fp32-variant", "-o", str(tmp_path / "fp32")]
    level = logging.getLogger("transformers").level
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_as("torch.cuda", "from torch, outside a command")  # not perm's to hide
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = [str(w.message) for w in caught]
    assert shown == ["from torch, outside a command"], shown
    assert "Some weights were not initialized" not in caplog.text + result.output
    assert logging.getLogger("transformers").level == level  # put back as it was


# -- item 16: progress and a summary -----------------------------------------------------------


def test_bench_reports_each_run_before_it_starts(tiny_model_dir):
    from perm_lite import Scorer
    from perm_lite.bench import fixed_length_dialogues, measure, measure_steps, scorer_runner

    run = scorer_runner(Scorer(tiny_model_dir, provider="cpu"))
    events: list[tuple[int, int, str]] = []
    announced: list[int] = []  # how many progress calls each run found when it started

    def runner(dialogues, batch_size):
        announced.append(len(events))
        return run(dialogues, batch_size)

    def progress(done: int, total: int, doing: str) -> None:
        events.append((done, total, doing))

    table = measure({"a": runner, "b": runner}, {"fixed": fixed_length_dialogues(6, 20)}, [1, 3], 2, progress)
    total = measure_steps(2, 1, 2, 2)
    assert len(table) == 4 and total == 12
    assert [done for done, _, _ in events] == list(range(total + 1)) and {t for _, t, _ in events} == {total}
    assert announced == list(range(1, total + 1))  # every run was announced before it ran
    assert events[0][2] == "fixed, batch 1: a (warm-up)" and events[2][2] == "fixed, batch 1: a (1/2)"
    assert events[-1][2] == "done"


def test_perm_bench_shows_progress_and_a_summary(tiny_model_dir, monkeypatch):
    from perm_lite.cli import model_commands

    monkeypatch.setattr(model_commands, "stderr_is_terminal", lambda: True)
    args = ["bench", "--model", str(tiny_model_dir), "--records", "8", "--batch-sizes", "1,4", "--lengths", "16"]
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "--no-torch", "--json"])
    assert result.exit_code == 0, result.output
    assert "benchmarking" in result.output  # the bar (drawn on stderr)
    summary = [line for line in result.output.splitlines() if line.startswith("benchmarked ")]
    assert len(summary) == 1 and "1 backends on 1 inputs x 2 batch sizes (1 repeats, 4 runs" in summary[0], summary


def test_perm_score_bar_moves_before_the_first_chunk_is_written(tmp_path, tiny_model_dir, monkeypatch):
    from contextlib import contextmanager

    from perm_lite.cli import score_commands

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": i, "query": "I lost my job.", "response": "That is hard. " * (1 + i % 7)} for i in range(600)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ticks: list[tuple[int, int]] = []

    @contextmanager
    def recording_bar(show, total, label="scoring"):  # stands in for the terminal's bar
        yield lambda n: ticks.append((n, out.stat().st_size if out.exists() else 0))

    monkeypatch.setattr(score_commands, "progress_bar", recording_bar)
    args = ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--batch-size", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ticks[0][0] <= 8, ticks[:3]  # the first batch, not the first 512-record chunk
    before_first_write = [n for n, size in ticks if size == 0]
    assert sum(before_first_write) >= 500, ticks[:5]  # it moved all through the first chunk
    assert sum(n for n, _ in ticks) == 600  # and ends at the record count exactly
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == list(range(600))


def test_perm_score_explain_bar_moves_per_explained_record(tmp_path, tiny_model_dir, monkeypatch):
    from contextlib import contextmanager

    from perm_lite.cli import score_commands

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": i, "query": "I lost my job.", "response": "That is hard. I am sorry. " * (1 + i % 3)} for i in range(520)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ticks: list[tuple[int, int]] = []

    @contextmanager
    def recording_bar(show, total, label="scoring"):
        yield lambda n: ticks.append((n, out.stat().st_size if out.exists() else 0))

    monkeypatch.setattr(score_commands, "progress_bar", recording_bar)
    args = ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--explain", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ticks[0][0] == 1  # the first explained record, not the first 512-record chunk
    assert sum(n for n, size in ticks if size == 0) >= 500
    assert sum(n for n, _ in ticks) == 520
    assert all("explain" in json.loads(x) for x in out.read_text().splitlines())
