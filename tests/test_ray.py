"""Ray Data engine on a local Ray cluster started by the test (2 CPUs)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from perm_lite.cli.main import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from perm_lite import Scorer  # noqa: E402
from perm_lite.integrations.ray import score_dataset, score_jsonl_lines  # noqa: E402
from perm_lite.scales import PERSPECTIVES  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES = [
    json.loads(x) for x in (Path(__file__).parents[1] / "examples" / "dialogues.jsonl").read_text().splitlines()
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pid_dir = tmp_path_factory.mktemp("pids")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PERM_LITE_RAY_PID_DIR": str(pid_dir)}},
    )
    yield pid_dir
    ray.shutdown()


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


def local_scores(rows):
    clean = [{k: v for k, v in r.items() if v is not None and k != "meta"} for r in rows if r["id"] != "bad"]
    return {r.id: r for r in Scorer(provider="cpu").score(clean)}


def test_dataset_keeps_columns_and_matches_single_process(cluster):
    rows = mixed_records()
    out = score_dataset(ray.data.from_items(rows), workers=2).take_all()
    expected = local_scores(rows)
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


def write_inputs(folder: Path) -> Path:
    folder.mkdir()
    a = [json.dumps(r) for r in EXAMPLES[:6]]
    b = [json.dumps(r) for r in EXAMPLES[6:]]
    (folder / "a.jsonl").write_text("\n".join(a[:3] + ["{broken", json.dumps({"query": "x"})] + a[3:]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(b) + "\n")
    return folder


def test_cli_ray_equals_local_and_reports_bad_lines(cluster, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    result = CliRunner().invoke(app, ["score", str(inputs), "--engine", "ray", "-o", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output  # finished, some records skipped
    for name in ("a.jsonl", "b.jsonl"):
        local = tmp_path / f"local-{name}"
        CliRunner().invoke(app, ["score", str(inputs / name), "-o", str(local), "--quiet"])
        want = [json.loads(x) for x in local.read_text().splitlines()]
        got = [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]
        assert [g["id"] for g in got] == [w["id"] for w in want]  # same records, same order
        for g, w in zip(got, want):
            assert g["perm"]["line"] == w["perm"]["line"]
            for p in PERSPECTIVES:
                assert g["scores"][p] == pytest.approx(w["scores"][p], abs=1e-5)
    errors = [json.loads(x) for x in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert [(Path(e["file"]).name, e["line"], e["field"]) for e in errors] == [
        ("a.jsonl", 4, None),
        ("a.jsonl", 5, "response"),
    ]


def test_cli_ray_parquet_in_and_out(cluster, tmp_path):
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
    result = CliRunner().invoke(app, ["score", str(tmp_path / "in"), "--engine", "ray", "-o", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    table = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(r["id"] for r in rows if r["id"] != "empty")
    expected = {r.id: r for r in Scorer(provider="cpu").score([r for r in rows if r["id"] != "empty"])}
    for row in table:
        assert row["perm_bystander"] == pytest.approx(expected[row["id"]].scores["bystander"], abs=1e-4)
    errors = [json.loads(x) for x in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["empty"] and "part.parquet" in errors[0]["file"]


def test_run_survives_a_killed_worker(cluster, tmp_path):
    path = tmp_path / "big.jsonl"
    n = 1200
    path.write_text("".join(json.dumps(dict(EXAMPLES[i % len(EXAMPLES)], id=i)) + "\n" for i in range(n)))
    for old in cluster.iterdir():
        old.unlink()
    ds = score_jsonl_lines([str(path)], workers=2, batch_size=40)
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
    assert len(list(cluster.iterdir())) >= 3  # the dead actor was replaced by a new process
