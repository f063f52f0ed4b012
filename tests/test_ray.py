"""Ray Data engine on a local Ray cluster started by the test (2 CPUs).

Scores are compared between engines (Ray against the local engine, same model), never
against fixed values; the runs use the tiny test model, except the README's own snippet,
which runs as written (the shipped model)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from perm_lite.cli.main import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from perm_lite import Scorer  # noqa: E402
from perm_lite.integrations.ray import (  # noqa: E402
    RayResourceError,
    plan_actors,
    score_dataset,
    score_jsonl_lines,
)
from perm_lite.scales import PERSPECTIVES  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
EXAMPLES = [json.loads(x) for x in (ROOT / "examples" / "dialogues.jsonl").read_text().splitlines()]
CPUS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pid_dir = tmp_path_factory.mktemp("pids")
    # Ray puts the driver's working directory first on its workers' sys.path: started from
    # the checkout, they would import its perm_lite/ (no cli, no models), not the installed one.
    with contextlib.chdir(tmp_path_factory.mktemp("ray-cwd")):
        ray.init(
            num_cpus=CPUS,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PERM_LITE_RAY_PID_DIR": str(pid_dir)}},
        )
    yield pid_dir
    ray.shutdown()


def test_workers_import_the_package_under_test(cluster):
    import perm_lite

    assert ray.get(ray.remote(lambda: __import__("perm_lite").__file__).remote()) == perm_lite.__file__


def strict(text: str):
    """json.loads that fails on NaN/Infinity (not JSON)."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} written"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result) -> list[str]:
    """What a run said on stderr, less notes (a note says the CPUs are busy now: actors of
    the previous test may still be going away)."""
    return [x for x in result.output.strip().splitlines() if not x.startswith("note: ")]


def mixed_records():
    """The examples in every input form: query/response, messages, completion (and an extra column)."""
    rows = []
    for i, r in enumerate(EXAMPLES):
        row = dict(r, id=f"r{i}", meta=i * 10)
        if i % 3 == 1 and row.get("query"):
            row["messages"] = [{"role": "user", "content": row.pop("query")}]
        if i % 3 == 2 and row.get("response"):
            row["completion"] = f"# Analysis\nThey hurt.\n# Response\n{row.pop('response')}"
        rows.append(row)
    rows.append({"id": "bad", "meta": -1, "query": "no reply here"})
    return rows


def test_dataset_keeps_columns_and_matches_single_process(cluster, tiny_model_dir):
    rows = mixed_records()
    out = score_dataset(ray.data.from_items(rows), model=str(tiny_model_dir), workers=2).take_all()
    clean = [{k: v for k, v in r.items() if v is not None and k != "meta"} for r in rows if r["id"] != "bad"]
    expected = {r.id: r for r in Scorer(tiny_model_dir, provider="cpu").score(clean)}
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    for row in out:
        assert row["meta"] == next(r["meta"] for r in rows if r["id"] == row["id"])  # input columns kept
        if row["id"] == "bad":
            assert row["perm_error"].startswith("field 'response'") and row["perm_reception"] is None
            continue
        assert row["perm_error"] is None
        for p in PERSPECTIVES:
            assert row[f"perm_{p}"] == pytest.approx(expected[row["id"]].scores[p], abs=1e-5)
        assert row["perm_combined"] == pytest.approx(expected[row["id"]].combined, abs=1e-5)


HOSTILE = [  # each line costs only itself, on Ray as locally
    '{"id": "deep", "query": "hi", "response": "ok", "meta": ' + "[" * 10000 + "]" * 10000 + "}",
    '{"id": "bigint", "response": "ok", "n": 1' + "0" * 5000 + "}",
    '{"id": "surrogate", "query": "hi", "response": "sorry \\ud800 that is hard"}',
    '{"id": "surrogate-passthrough", "response": "that sounds hard", "note": "\\udfff"}',
    '{"id": "nan", "response": "that sounds hard", "x": NaN}',
    '{"id": "\\ud800", "response": "that sounds hard"}',
]


def write_inputs(folder: Path) -> Path:
    folder.mkdir()
    a = [json.dumps(r) for r in EXAMPLES[:6]]
    b = [json.dumps(r) for r in EXAMPLES[6:]]
    (folder / "a.jsonl").write_text("\n".join(a[:3] + ["{broken", json.dumps({"query": "x"})] + a[3:]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(b) + "\n")
    (folder / "c.jsonl").write_text("\n".join([a[0], *HOSTILE, b[0]]) + "\n")
    return folder


def test_cli_ray_equals_local_and_reports_bad_lines(cluster, tmp_path, tiny_model_dir):
    inputs = write_inputs(tmp_path / "in")
    model = ["--model", tiny_model_dir]
    result = invoke("score", inputs, "--engine", "ray", "-o", tmp_path / "out", *model)
    assert result.exit_code == 3, result.output  # finished, some records skipped
    ray_errors = [strict(x) for x in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        local = tmp_path / f"local-{name}"
        invoke("score", inputs / name, "-o", local, "--quiet", *model)
        want = [strict(x) for x in local.read_text().splitlines()]
        got = [strict(x) for x in (tmp_path / "out" / name).read_text().splitlines()]
        assert [g["id"] for g in got] == [w["id"] for w in want]  # same records, same order
        for g, w in zip(got, want):
            assert g["perm"]["line"] == w["perm"]["line"]
            for p in PERSPECTIVES:
                assert g["scores"][p] == pytest.approx(w["scores"][p], abs=1e-5)
        local_errors = Path(f"{local}.errors.jsonl")
        want_errors = [strict(x) for x in local_errors.read_text().splitlines()] if local_errors.exists() else []
        got_errors = [{k: v for k, v in e.items() if k != "file"} for e in ray_errors if e["file"].endswith(name)]
        assert got_errors == want_errors  # exactly as the local engine reports them
    assert [(Path(e["file"]).name, e["line"], e["field"]) for e in ray_errors if "a.jsonl" in e["file"]] == [
        ("a.jsonl", 4, None),
        ("a.jsonl", 5, "response"),
    ]
    c_lines = [e["line"] for e in ray_errors if e["file"].endswith("c.jsonl")]
    assert c_lines == list(range(2, 2 + len(HOSTILE)))  # every hostile line reported, the good ones scored
    assert [r["id"] for r in map(strict, (tmp_path / "out" / "c.jsonl").read_text().splitlines())] == [
        EXAMPLES[0]["id"],
        EXAMPLES[6]["id"],
    ]


def test_cli_ray_parquet_in_and_out(cluster, tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": r["id"], "query": r["query"], "response": r["response"]}
        for r in EXAMPLES
        if {"query", "response"} <= set(r)
    ]
    rows.append({"id": "empty", "query": "hi", "response": "   "})
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    out = tmp_path / "out"
    result = invoke("score", tmp_path / "in", "--engine", "ray", "-o", out, "--model", tiny_model_dir)
    assert result.exit_code == 3, result.output
    table = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in table) == sorted(r["id"] for r in rows if r["id"] != "empty")
    scorer = Scorer(tiny_model_dir, provider="cpu")
    expected = {r.id: r for r in scorer.score([r for r in rows if r["id"] != "empty"])}
    for row in table:
        assert row["perm_bystander"] == pytest.approx(expected[row["id"]].scores["bystander"], abs=1e-4)
    errors = [strict(x) for x in (out / "_errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["empty"] and "part.parquet" in errors[0]["file"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_run_survives_a_killed_worker(cluster, tmp_path, tiny_model_dir):
    path = tmp_path / "big.jsonl"
    n = 1200
    path.write_text("".join(json.dumps(dict(EXAMPLES[i % len(EXAMPLES)], id=i)) + "\n" for i in range(n)))
    for old in cluster.iterdir():
        old.unlink()
    ds = score_jsonl_lines([str(path)], model=str(tiny_model_dir), workers=2, batch_size=40)
    seen, killed = [], None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=40):
        seen += batch.column("line").to_pylist()
        assert all(e is None for e in batch.column("error").to_pylist())
        if killed is None:
            deadline = time.time() + 30
            while not list(cluster.iterdir()) and time.time() < deadline:
                time.sleep(0.1)
            alive = [int(p.stem) for p in cluster.iterdir() if Path(f"/proc/{p.stem}").exists()]
            killed = alive[0]
            os.kill(killed, signal.SIGKILL)  # a scoring worker dies mid-run
    assert killed is not None
    assert sorted(seen) == list(range(1, n + 1))  # nothing lost, nothing twice
    # Ray restarts the dead actor, but with a fast model the surviving one may finish the
    # job first, so a replacement process is not asserted (asserting it made this flaky).


# -- never hang: the README's snippet, and every impossible configuration ------------------


def readme_snippet() -> str:
    """The Python block of README.md's Ray section that calls ray.data.read_json."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Scale out on Ray", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return next(b for b in blocks if "read_json(" in b)


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    for name, code in json.loads(sys.argv[2]):
        print(json.dumps({"start": name}), flush=True)
        started = time.monotonic()
        try:
            scope = {}
            exec(code, scope)
            rows = scope["scored"].take_all()
            errors = [r["perm_error"] for r in rows if r["perm_error"] is not None]
            outcome = {"rows": len(rows), "errors": errors}
        except Exception as exc:
            outcome = {"refused": type(exc).__name__, "message": str(exc)}
        print(json.dumps({"name": name, "seconds": time.monotonic() - started, **outcome}), flush=True)
    """
)


def test_readme_read_json_snippet_finishes_or_refuses_quickly(cluster, tmp_path):
    """The README's `score_dataset(ray.data.read_json(...))`, run as written (only the path is
    local), and with the sizes of the issue (2 workers x 1 thread on 2 CPUs: the read tasks
    could never run) and one that fits. Each finishes or is refused at once with the numbers
    and the fix; it runs in a separate driver so that a hang fails the test, not CI."""
    data = tmp_path / "logs"
    data.mkdir()
    (data / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES[:5]))
    (data / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES[5:]))
    snippet = readme_snippet()
    assert "score_dataset(ray.data.read_json(" in snippet
    local = re.sub(r"read_json\((['\"]).*?\1", f"read_json({str(data)!r}", snippet)

    def sized(workers: int, threads: int) -> str:
        code = re.sub(r"workers=\d+", f"workers={workers}", local)
        return re.sub(r"threads_per_worker=\d+", f"threads_per_worker={threads}", code)

    variants = [["readme", local], ["2x1", sized(2, 1)], ["1x1", sized(1, 1)]]
    address = ray.get_runtime_context().gcs_address
    try:
        proc = subprocess.run(
            [sys.executable, "-P", "-c", DRIVER, address, json.dumps(variants)],
            cwd=tmp_path,  # not the checkout: this driver's job's workers get its cwd on sys.path
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the README's snippet hung; driver output so far:\n{exc.stdout}")
    results = {r["name"]: r for r in map(json.loads, re.findall(r"^\{.*\}$", proc.stdout, re.M)) if "name" in r}
    assert set(results) == {"readme", "2x1", "1x1"}, proc.stdout + proc.stderr[-3000:]
    readme_sizes = re.search(r"workers=(\d+), threads_per_worker=(\d+)", snippet).groups()
    for name, result in results.items():
        if "refused" in result:
            message = result["message"]
            assert result["refused"] == "RayResourceError" and result["seconds"] < 30, result
            workers, threads = readme_sizes if name == "readme" else name.split("x")
            assert f"workers={workers} x threads_per_worker={threads}" in message, message
            assert f"{CPUS} CPUs" in message and "wait forever" in message and "Use " in message, message
            assert "\n" not in message
        else:
            assert result["rows"] == len(EXAMPLES) and result["errors"] == [], result
    assert "refused" in results["2x1"]  # the hang of the issue
    assert "read" in results["2x1"]["message"] and "workers=1" in results["2x1"]["message"]
    assert "refused" not in results["1x1"], results["1x1"]  # what the message proposes works


def test_impossible_configurations_are_refused_before_anything_runs(cluster, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    started = time.monotonic()
    with pytest.raises(RayResourceError, match=r"workers=2 x threads_per_worker=1 .* read"):
        score_dataset(ray.data.read_json(str(path)), workers=2)
    with pytest.raises(RayResourceError, match=r"threads_per_worker=3: .* 2 CPUs"):
        score_dataset(ray.data.from_items(EXAMPLES), threads_per_worker=3)
    with pytest.raises(RayResourceError, match=r"workers=3 x threads_per_worker=1 need 3 CPUs"):
        score_dataset(ray.data.from_items(EXAMPLES), workers=3)
    with pytest.raises(RayResourceError, match="no GPUs"):
        score_dataset(ray.data.from_items(EXAMPLES), provider="cuda")
    with pytest.raises(RayResourceError):
        score_jsonl_lines([str(path)], workers=1, threads_per_worker=3)
    with pytest.raises(ValueError, match="threads_per_worker"):
        score_dataset(ray.data.from_items(EXAMPLES), threads=2)  # not silently dropped
    with pytest.raises(ValueError, match="unknown Scorer option 'provder'"):
        score_dataset(ray.data.from_items(EXAMPLES), provder="cpu")
    assert time.monotonic() - started < 60
    # sized from the cluster: the read tasks keep one CPU; data in memory needs none
    assert plan_actors(None, 1, task_cpus=1).workers == CPUS - 1
    assert plan_actors(None, 1).workers == CPUS
    assert plan_actors(None, 1, "auto").provider == "cpu"  # no GPU here


def test_plan_actors_packs_nodes_and_gpus():
    two_nodes = ([4.0, 4.0], 0.0, {"CPU": 8.0})
    assert plan_actors(None, 3, cluster=two_nodes).workers == 2  # one 3-thread actor per 4-CPU node
    with pytest.raises(RayResourceError, match="only 2 actors of 3 CPUs fit"):
        plan_actors(3, 3, cluster=two_nodes)
    with pytest.raises(RayResourceError, match="threads_per_worker=5: .* the largest 4"):
        plan_actors(1, 5, cluster=two_nodes)
    with pytest.raises(RayResourceError, match="leaving 0 for"):
        plan_actors(2, 2, task_cpus=1, held_cpus=4, cluster=two_nodes)
    gpu = ([8.0], 1.0, {"CPU": 8.0, "GPU": 1.0})
    plan = plan_actors(None, 2, "auto", cluster=gpu)
    assert (plan.workers, plan.gpus, plan.provider) == (1, 1, "auto")
    assert plan_actors(3, 2, "auto", cluster=gpu).gpus == 0  # not a GPU for each: CPU actors
    with pytest.raises(RayResourceError, match="each actor needs a GPU"):
        plan_actors(2, 1, "cuda", cluster=gpu)
    names = ("--workers", "--threads-per-worker")
    with pytest.raises(RayResourceError, match="--workers=9 x --threads-per-worker=1"):
        plan_actors(9, 1, names=names, cluster=two_nodes)


def test_cli_refuses_what_the_ray_engine_cannot_do_in_one_line(cluster, tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    out = tmp_path / "out"
    base = ("score", src, "--model", tiny_model_dir, "-o", out)
    cases = [
        (2, ("--engine", "ray", "--workers", "3"), "--workers=3 x --threads-per-worker=1 need 3 CPUs"),
        (2, ("--engine", "ray", "--threads-per-worker", "3"), "--threads-per-worker=3"),
        (2, ("--engine", "ray", "--threads", "3"), "--threads-per-worker=3"),  # --threads is per actor
        (2, ("--engine", "ray", "--provider", "cuda"), "no GPUs"),
        (2, ("--engine", "ray", "--errors", tmp_path / "e.jsonl"), "_errors.jsonl"),
        (2, ("--engine", "ray", "--threads", "2", "--threads-per-worker", "1"), "disagree"),
        (2, ("--workers", "2"), "--engine ray only"),
        (1, ("--engine", "ray", "--model", tmp_path / "no-such-model"), "no-such-model"),
    ]
    for code, extra, text in cases:
        result = invoke(*base, *extra)
        assert result.exit_code == code and text in result.output, (extra, result.output)
        assert len(said(result)) == 1 and "Traceback" not in result.output, result.output
        assert not out.exists()  # refused before anything was written


def test_cli_passes_scoring_options_to_the_actors(cluster, tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    for old in cluster.iterdir():
        old.unlink()
    cache = tmp_path / "hub-cache"
    result = invoke(
        "score", src, "--engine", "ray", "-o", tmp_path / "out", "--model", tiny_model_dir,
        "--threads", "2", "--batch-size", "3", "--provider", "cpu", "--cache-dir", cache, "--combine", "mean",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = [json.loads(p.read_text()) for p in cluster.iterdir()]
    assert settings, "no actor started"
    for s in settings:
        assert (s["threads"], s["batch_size"], s["provider"]) == (2, 3, "cpu")
        assert s["cache_dir"] == str(cache) and "mode='mean'" in s["reward"]  # the CLI's Reward, whole
    assert "1 actors x 2 threads" in result.output  # sized from the cluster: one 2-thread actor on 2 CPUs
    rows = [strict(x) for x in (tmp_path / "out" / "in.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in EXAMPLES]


def test_failed_ray_run_with_overwrite_keeps_the_earlier_output(cluster, tmp_path, tiny_model_dir, monkeypatch):
    import pyarrow as pa

    import perm_lite.integrations.ray as ray_module

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        "in.jsonl": '{"id": "old", "perm": {"line": 1}}\n',
        "gone.jsonl": '{"id": "older", "perm": {"line": 1}}\n',
        "_errors.jsonl": '{"file": "x", "line": 2, "error": "old"}\n',
    }
    for name, text in earlier.items():
        (out / name).write_text(text)
    from perm_lite.integrations.ray_engine import MANIFEST, _write_manifest

    _write_manifest(out, [out / name for name in earlier])  # an earlier perm Ray run wrote them

    def files() -> dict[str, str]:
        return {p.name: p.read_text() for p in out.iterdir() if p.name != MANIFEST}

    class Failing:  # one batch arrives, then the job dies
        def iter_batches(self, **_):
            yield pa.table({"path": [str(src.resolve())], "line": [1], "output": ['{"id": "new"}'], "error": [None]})
            raise RuntimeError("node lost\nTraceback (most recent call last):\n  File x\nRayTaskError: boom")

    monkeypatch.setattr(ray_module, "score_jsonl_lines", lambda *a, **k: Failing())
    args = ("score", src, "--engine", "ray", "-o", out, "--model", tiny_model_dir, "--overwrite")
    result = invoke(*args)
    assert result.exit_code == 1 and "left as it was" in result.output, result.output
    assert len(said(result)) == 1, result.output
    assert files() == earlier  # nothing replaced, nothing deleted
    monkeypatch.undo()
    result = invoke(*args)  # a run that finishes replaces the earlier output, and only then
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "in.jsonl"]
    assert [strict(x)["id"] for x in (out / "in.jsonl").read_text().splitlines()] == [r["id"] for r in EXAMPLES]
