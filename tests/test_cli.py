import json
import os
import signal
import subprocess
import sys
import time

import pytest
from perm_lite.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


GOOD = [
    {"id": "a", "query": "my dog died today", "response": "i am so sorry", "source": "x"},
    {"id": "b", "messages": [{"role": "user", "content": "i lost my job"}], "response": "that sounds hard"},
    {"id": "c", "completion": "# Analysis\nsad\n# Response\nyou are not alone"},
]


def test_score_file_writes_results_and_keeps_fields(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["source"] == "x" and rows[0]["query"] == "my dog died today"
    assert set(rows[0]["scores"]) == {"resonation", "expression", "reception", "bystander"}
    assert rows[1]["perm"]["line"] == 2 and rows[1]["perm"]["model"] == "tiny-test"
    assert "scored 3 records" in res.stderr and "0 errors" in res.stderr
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_bad_records_are_reported_and_counted(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps(GOOD[0]).encode(),
        b"{not json",
        json.dumps({"id": "e", "query": "x"}).encode(),
        json.dumps({"id": "f", "response": ""}).encode(),
        b'{"response": "caf\xe9"}',
        json.dumps({"response": 5}).encode(),
        b"",
        json.dumps(GOOD[1]).encode(),
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 3
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b"]
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["line"], e["field"]) for e in errors] == [
        (2, None),
        (3, "response"),
        (4, "response"),
        (5, None),
        (6, "response"),
    ]
    assert errors[1]["id"] == "e"
    assert "invalid JSON" in errors[0]["error"] and "not valid UTF-8" in errors[3]["error"]
    assert "line 3, field 'response': missing" in res.stderr
    assert "5 errors" in res.stderr


def test_utf8_bom_and_crlf_are_accepted(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\r\n" + json.dumps(GOOD[1]).encode() + b"\r\n")
    res = runner.invoke(app, ["score", str(src), "--model", str(tiny_model_dir), "-q"])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["id"] for line in res.stdout.splitlines()] == ["a", "b"]


def test_stop_on_error_keeps_records_before_it(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], {"query": "no reply"}, GOOD[1]])
    out = tmp_path / "out.jsonl"
    args = ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--on-error", "stop"]
    res = runner.invoke(app, args)
    assert res.exit_code == 4
    assert [r["id"] for r in read_jsonl(out)] == ["a"]
    assert "error: line 2, field 'response'" in res.stderr


def test_stdin_stdout_and_field_mapping(tiny_model_dir):
    data = json.dumps({"reply": "so sorry", "question": "my dog died", "k": 1}) + "\n"
    args = ["score", "-", "--model", str(tiny_model_dir), "--fields", "response=reply,query=question", "-q"]
    res = runner.invoke(app, args, input=data)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert row["reply"] == "so sorry" and row["k"] == 1 and "scores" in row
    assert res.stderr == ""


def test_refuses_to_overwrite_without_flag(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    out.write_text("something\n")
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "use --resume to continue it or --overwrite" in res.stderr
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--overwrite"])
    assert res.exit_code == 0 and len(read_jsonl(out)) == 3


def test_usage_errors(tmp_path, tiny_model_dir):
    res = runner.invoke(app, ["score", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    res = runner.invoke(app, ["score", str(src), "--model", str(tmp_path)])
    assert res.exit_code == 1 and "not a perm-lite model directory" in res.stderr
    res = runner.invoke(app, ["score", str(src), "--model", str(tiny_model_dir), "--fields", "reply"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["score", str(src), "--model", str(tiny_model_dir), "--provider", "cuda", "-q"])
    assert res.exit_code == 1 and "cuda" in res.stderr


def test_combine_and_weights_options(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    args = ["score", str(src), "--model", str(tiny_model_dir), "-q", "--combine", "mean"]
    row = json.loads(runner.invoke(app, [*args, "--weights", "reception=1", "--bystander-coef", "0"]).stdout)
    assert row["combined"] == pytest.approx(row["scores"]["reception"] / 5, abs=1e-5)
    res = runner.invoke(app, [*args, "--weights", "bystander=1"])
    assert res.exit_code == 2


def test_info_and_env(tiny_model_dir):
    res = runner.invoke(app, ["info", "--model", str(tiny_model_dir), "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["name"] == "tiny-test" and "model.fp32.onnx" in data["files"]
    assert data["summary"] == "A random tiny model for runtime tests. Not a real scorer."
    res = runner.invoke(app, ["env", "--json"])
    assert res.exit_code == 0 and "CPUExecutionProvider" in json.loads(res.stdout)["providers"]


def test_env_warns_when_both_onnxruntime_packages_are_installed(monkeypatch):
    from perm_lite import report

    monkeypatch.setattr(report, "_version", lambda dist: "1.0")
    assert "both installed" in report.environment()["warnings"][0]


def _perm(*args):
    code = "from perm_lite.cli.main import app; app()"
    return [sys.executable, "-P", "-c", code, *args]  # -P: never the source tree over the installed package


def test_kill_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    words = "i you feel sad lost job sorry that sounds hard really my dog died today".split()
    records = [
        {"id": i, "query": " ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 25)), "response": "so sorry"}
        for i in range(60_000)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    full = tmp_path / "full.jsonl"
    subprocess.run(_perm("score", str(src), "-o", str(full), "--model", str(tiny_model_dir), "-q"), check=True)
    part = tmp_path / "part.jsonl"
    proc = subprocess.Popen(_perm("score", str(src), "-o", str(part), "--model", str(tiny_model_dir), "-q"))
    deadline = time.time() + 60
    while time.time() < deadline and (not part.exists() or part.stat().st_size < 200_000):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(part.read_bytes().splitlines())
    assert 0 < done_before < len(records), "the run was not interrupted mid-way"
    res = subprocess.run(
        _perm("score", str(src), "-o", str(part), "--model", str(tiny_model_dir), "--resume"),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    resumed, expected = read_jsonl(part), read_jsonl(full)  # every line parses: none torn
    assert [r["id"] for r in resumed] == list(range(len(records)))  # no gaps, no duplicates
    for a, b in zip(resumed, expected):  # equal as written: the same chunks, the same batches
        assert (a["scores"], a["combined"]) == (b["scores"], b["combined"])
    assert "already done" in res.stderr


def test_sigterm_stops_cleanly_between_chunks(tmp_path, tiny_model_dir):
    records = [{"id": i, "query": "my dog died", "response": "so sorry"} for i in range(200_000)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        _perm("score", str(src), "-o", str(out), "--model", str(tiny_model_dir)), stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 100_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun with --resume" in err
    data = out.read_bytes()
    assert data.endswith(b"\n")
    assert len(read_jsonl(out)) < len(records)


def test_training_commands_name_the_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "perm_lite.training.evaluate", None)  # import fails
    res = runner.invoke(app, ["eval", "--data", "x"])
    assert res.exit_code == 1
    assert "perm eval needs the train extra: pip install '.[train]' in the checkout" in res.stderr


def _capture_scorer_options(monkeypatch):
    """Record the keyword arguments every Scorer is built with (the real one is still built)."""
    from perm_lite.scorer import Scorer

    seen = []
    real = Scorer.__init__

    def init(self, *args, **kwargs):
        seen.append(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "__init__", init)
    return seen


def test_max_batch_tokens_reaches_the_scorer(tmp_path, tiny_model_dir, monkeypatch):
    seen = _capture_scorer_options(monkeypatch)
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    args = ["score", str(src), "--model", str(tiny_model_dir), "-q"]
    assert runner.invoke(app, [*args, "--max-batch-tokens", "64"]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    assert [s["max_batch_tokens"] for s in seen] == [64, "auto"]
    res = runner.invoke(app, [*args, "--max-batch-tokens", "0"])
    assert res.exit_code == 2 and len(seen) == 2


def test_max_batch_tokens_reaches_the_ray_actors(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from perm_lite.integrations import ray_engine

    calls = []

    def fake_run(input_path, output_dir, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(scored=0, errors=0, seconds=0.0, workers=1, threads_per_worker=1, provider="cpu")

    monkeypatch.setattr(ray_engine, "run", fake_run)
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    args = ["score", str(src), "--model", str(tiny_model_dir), "-q", "--engine", "ray", "-o", str(tmp_path / "out")]
    assert runner.invoke(app, [*args, "--max-batch-tokens", "128"]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    assert calls[0]["scorer_options"]["max_batch_tokens"] == 128
    assert "max_batch_tokens" not in calls[1]["scorer_options"]  # the actors' own "auto"


def test_option_error_from_the_library_is_a_usage_error(tmp_path, tiny_model_dir, monkeypatch):
    from perm_lite.errors import ModelError, OptionError
    from perm_lite.scorer import Scorer

    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    for exc, code in ((OptionError("weights: unknown perspective 'expresion'"), 2), (ModelError("corrupt"), 1)):

        def refuse(self, *args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(Scorer, "__init__", refuse)
        res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
        assert res.exit_code == code and res.stderr.strip() == f"error: {exc}"
        assert not out.exists()


def test_serve_provider_is_a_choice_and_max_batch_tokens_reaches_the_scorer(tiny_model_dir, monkeypatch):
    pytest.importorskip("uvicorn")
    from perm_lite.serve import server

    res = runner.invoke(app, ["serve", "--model", str(tiny_model_dir), "--provider", "tpu"])
    assert res.exit_code == 2 and "tpu" in res.stderr
    served = []
    monkeypatch.setattr(server, "serve", lambda app_, sock, timeout: (served.append(app_), sock.close()))
    seen = _capture_scorer_options(monkeypatch)
    args = ["serve", "--model", str(tiny_model_dir), "--port", "0", "--provider", "cpu", "--max-batch-tokens", "256"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert served and seen == [{"provider": "cpu", "threads": None, "max_batch_tokens": 256}]
