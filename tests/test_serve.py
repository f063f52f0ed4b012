"""perm serve: endpoints, validation, limits, the bounded queue, micro-batching, shutdown."""

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from perm_lite import Scorer  # noqa: E402
from perm_lite.records import Dialogue  # noqa: E402
from perm_lite.serve.app import create_app  # noqa: E402
from perm_lite.serve.batcher import MicroBatcher, QueueFull  # noqa: E402

RECORDS = [
    {"id": "a", "query": "I failed my driving test again.", "response": "That's so frustrating. What happened?"},
    {"id": "b", "query": "My cat is sick.", "response": "Take it to the vet."},
]


@pytest.fixture(scope="module")
def scorer():
    return Scorer(provider="cpu")


@pytest.fixture(scope="module")
def client(scorer):
    with TestClient(create_app(scorer, thresholds={"reception": 1.5}, max_body_bytes=20_000, max_records=8)) as c:
        yield c


def test_score_matches_the_python_api(client, scorer):
    response = client.post("/v1/score", json={"records": RECORDS})
    assert response.status_code == 200
    body = response.json()
    expected = scorer.score(RECORDS)
    assert [r["id"] for r in body["results"]] == ["a", "b"]
    for got, want in zip(body["results"], expected):
        assert got["scores"] == pytest.approx(want.scores, abs=1e-5)
        assert got["combined"] == pytest.approx(want.combined, abs=1e-5)
    assert body["model"] == scorer.config.name


def test_invalid_records_name_index_and_field(client):
    bad = [RECORDS[0], {"query": "hi"}, {"response": 3}]
    response = client.post("/v1/score", json={"records": bad})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "2 invalid record(s); nothing was scored"
    assert [(d["index"], d["field"]) for d in body["details"]] == [(1, "response"), (2, "response")]
    assert "missing" in body["details"][0]["error"]


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"recs": []}).encode(), 422, '{"records": [...]}'),
        (json.dumps({"records": []}).encode(), 422, "non-empty list"),
        (json.dumps({"records": [RECORDS[0]] * 9}).encode(), 422, "9 records in one request; the limit is 8"),
        (json.dumps({"records": [{"response": "x" * 30_000}]}).encode(), 413, "limit is 20000"),
    ],
)
def test_request_errors(client, payload, status, message):
    response = client.post("/v1/score", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]


def test_body_limit_holds_without_content_length(client):
    def chunks():
        yield b'{"records": [{"response": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    response = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_check_uses_default_or_request_thresholds(client, scorer):
    record = RECORDS[0]
    reception = scorer.score([record])[0].scores["reception"]
    default = client.post("/v1/check", json={"record": record}).json()
    assert default["flagged"] is (reception < 1.5)
    strict = client.post("/v1/check", json={"record": record, "thresholds": {"reception": reception + 0.1}}).json()
    assert strict["flagged"] and strict["failed"] == ["reception"] and strict["latency_ms"] > 0
    bad = client.post("/v1/check", json={"record": record, "thresholds": {"warmth": 2}})
    assert bad.status_code == 422 and "unknown threshold warmth" in bad.json()["error"]
    invalid = client.post("/v1/check", json={"record": {"query": "x"}})
    assert invalid.status_code == 422 and invalid.json()["details"][0]["field"] == "response"


def test_health_and_model(client, scorer):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue_size"] == 64
    model = client.get("/v1/model").json()
    assert model["name"] == scorer.config.name and model["scales"]["bystander"] == [0.0, 100.0]
    assert model["limits"]["max_records"] == 8 and model["default_thresholds"] == {"reception": 1.5}
    assert model["limits"]["max_queue_records"] == 4096 and model["limits"]["max_queue_chars"] == 16_000_000
    assert model["auth"] is False
    assert health["pending"] == {"requests": 0, "records": 0, "chars": 0, "body_bytes": 0}


# -- the batcher, with a stand-in scoring function ---------------------------------------


def slow_score(calls, delay=0.05):
    def score(dialogues):
        calls.append(len(dialogues))
        time.sleep(delay)
        return [d.response for d in dialogues]

    return score


def test_concurrent_requests_are_merged_and_answered_in_order():
    calls = []

    async def main():
        batcher = MicroBatcher(slow_score(calls), max_batch=16, max_wait_ms=20, queue_size=64)
        await batcher.start()
        jobs = [batcher.submit([Dialogue(response=f"r{i}-{j}") for j in range(2)]) for i in range(10)]
        out = await asyncio.gather(*jobs)
        await batcher.stop()
        return out, batcher.stats

    out, stats = asyncio.run(main())
    assert out == [[f"r{i}-0", f"r{i}-1"] for i in range(10)]
    assert sum(calls) == 20 and len(calls) < 10 and max(calls) <= 16
    assert stats.requests == 10 and stats.batches == len(calls)


def test_full_queue_refuses_instead_of_growing():
    calls = []

    async def main():
        batcher = MicroBatcher(slow_score(calls, delay=0.2), max_batch=1, max_wait_ms=0, queue_size=2)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([Dialogue(response="x")]))
        await asyncio.sleep(0.05)  # the worker holds the first; the queue has room for two more
        waiting = [asyncio.ensure_future(batcher.submit([Dialogue(response="y")])) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 requests waiting"):
            await batcher.submit([Dialogue(response="z")])
        done = await asyncio.gather(first, *waiting)
        await batcher.stop()
        return done, batcher.stats

    done, stats = asyncio.run(main())
    assert done == [["x"], ["y"], ["y"]] and stats.rejected == 1


def test_http_503_when_queue_is_full(scorer):
    release = threading.Event()

    class Blocking:
        config = scorer.config
        provider, variant = "cpu", "int8"

        def score_dialogues(self, dialogues):
            release.wait(5)
            return scorer.score_dialogues(dialogues)

    app = create_app(Blocking(), max_batch=1, max_wait_ms=0, queue_size=1)
    with TestClient(app) as c:
        results = {}

        def post(name):
            results[name] = c.post("/v1/score", json={"records": [RECORDS[0]]})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        release.set()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in results.values())
    assert codes == [200, 200, 503]
    refused = next(r for r in results.values() if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "queue full" in refused.json()["error"]


def test_shutdown_answers_every_accepted_request():
    calls = []

    async def main():
        batcher = MicroBatcher(slow_score(calls, delay=0.05), max_batch=2, max_wait_ms=0, queue_size=16)
        await batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit([Dialogue(response=str(i))])) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.stop()  # drains the queue before returning
        return [j.done() and not j.exception() for j in jobs]

    assert all(asyncio.run(main()))


def test_explain_endpoint_matches_the_library(client, scorer):
    record = {"query": "My dog died today.", "response": "I am so sorry. That is really hard. How are you?"}
    got = client.post("/v1/explain", json={"record": record, "context": True})
    assert got.status_code == 200, got.text
    body = got.json()
    want = scorer.explain(record, context=True).to_dict()
    assert [s["text"] for s in body["sentences"]] == [s["text"] for s in want["sentences"]]
    for a, b in zip(body["sentences"], want["sentences"]):
        assert a["deltas"]["combined"] == pytest.approx(b["deltas"]["combined"], abs=1e-5)
    assert [c["part"] for c in body["context"]] == ["query"]
    assert client.post("/v1/explain", json={"record": record, "context": "yes"}).status_code == 422
    long = {"query": "x", "response": " ".join(["I am sorry."] * 20)}  # 21 variants > max_records 8
    assert client.post("/v1/explain", json={"record": long}).status_code == 413


def test_check_names_the_culprit_when_flagged(client, scorer):
    record = {"query": "My dog died today.", "response": "I am so sorry. That is really hard. How are you?"}
    verdict = client.post("/v1/check", json={"record": record, "thresholds": {"combined": 99}}).json()
    assert verdict["flagged"]
    worst = scorer.explain(record).most_harmful("combined")
    assert (verdict["culprit"] or {}).get("sentence") == (worst.text if worst else None)
