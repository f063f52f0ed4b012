"""perm serve under careless and hostile input (issue 12, item 3): isolation, bounds,
disconnects, shutdown, auth, content type, docs, and the busy-port exit code.

Every test uses the tiny fixture model (or a stand-in scorer): no model score values are
asserted, and no wall-clock limits (timeouts below only keep a broken build from hanging).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from perm_lite.cli.main import app as cli  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from perm_lite.records import Dialogue  # noqa: E402
from perm_lite.serve.app import create_app  # noqa: E402
from perm_lite.serve.batcher import MicroBatcher, QueueFull, RecordsFailed  # noqa: E402

GOOD = {"query": "my dog died today", "response": "i am so sorry"}
JSON = {"content-type": "application/json"}


class Stub:
    """A scorer that records what it scored; `gate` holds it, `fail_on` raises TypeError."""

    def __init__(self, scorer, gate: threading.Event | None = None, delay: float = 0.0, fail_on: str | None = None):
        self.real, self.config, self.heads, self.reward = scorer, scorer.config, scorer.heads, scorer.reward
        self.provider, self.variant = "cpu", "int8"
        self.gate, self.delay, self.fail_on = gate, delay, fail_on
        self.calls: list[list[str]] = []

    def score_dialogues(self, dialogues):
        self.calls.append([d.response for d in dialogues])
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on and any(self.fail_on in d.response for d in dialogues):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return self.real.score_dialogues(dialogues)

    def scored(self) -> list[str]:
        return [r for call in self.calls for r in call]


def start_posts(url: str, body: bytes, n: int) -> tuple[list[threading.Thread], list]:
    """n threads each POSTing `body` to a live server's /v1/score; `results` fills with each
    status code (or the client error) as they return."""
    results: list = []

    def post() -> None:
        try:
            results.append(httpx.post(url + "/v1/score", content=body, headers=JSON, timeout=60).status_code)
        except httpx.HTTPError as exc:
            results.append(repr(exc))

    clients = [threading.Thread(target=post) for _ in range(n)]
    for t in clients:
        t.start()
    return clients, results


def post_concurrently(client, bodies: list[bytes], path: str = "/v1/score") -> list[httpx.Response]:
    out: list = [None] * len(bodies)

    def post(i):
        out[i] = client.post(path, content=bodies[i], headers=JSON)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# -- one bad record never costs another -----------------------------------------------------


def test_lone_surrogate_fails_only_its_own_request(scorer):
    """Issue: one request with "\\ud800" made 190 of 200 batched good requests answer 500."""
    stub = Stub(scorer, delay=0.02)
    good = [json.dumps({"records": [{**GOOD, "id": i}]}).encode() for i in range(40)]
    bad = b'{"records": [{"query": "hi", "response": "sorry \\ud800 really"}]}'
    bodies = good[:20] + [bad] + good[20:]
    with TestClient(create_app(stub, max_batch=32, max_wait_ms=20)) as client:
        responses = post_concurrently(client, bodies)
    bad_response = responses.pop(20)
    assert [r.status_code for r in responses] == [200] * 40
    assert sorted(r.json()["results"][0]["id"] for r in responses) == list(range(40))
    assert bad_response.status_code == 422
    assert [(d["index"], d["field"]) for d in bad_response.json()["details"]] == [(0, "response")]
    assert not any("\ud800" in r for r in stub.scored())


def test_a_record_that_breaks_the_scorer_fails_only_its_request(scorer):
    """A record valid on paper that makes scoring raise: its request 422 naming it, the
    requests batched with it 200."""
    stub = Stub(scorer, delay=0.02, fail_on="poison")
    good = [json.dumps({"records": [{**GOOD, "id": i}]}).encode() for i in range(12)]
    bad = json.dumps({"records": [GOOD, {"response": "poison pill"}, GOOD]}).encode()
    with TestClient(create_app(stub, max_batch=32, max_wait_ms=30)) as client:
        responses = post_concurrently(client, [*good[:6], bad, *good[6:]])
    bad_response = responses.pop(6)
    assert [r.status_code for r in responses] == [200] * 12
    assert bad_response.status_code == 422
    details = bad_response.json()["details"]
    assert [d["index"] for d in details] == [1] and "could not be scored" in details[0]["error"]


@pytest.mark.parametrize(
    ("body", "index", "field"),
    [
        ('{"records": [GOOD, {"response": "ok", "meta": ' + "[" * 10_000 + "]" * 10_000 + "}]}", 1, "meta"),
        ('{"records": [GOOD, {"response": "ok", "meta": ' + "[" * 100 + "]" * 100 + "}]}", 1, "meta"),
        ('{"records": [{"response": "ok", "n": ' + "7" * 5000 + "}]}", 0, "n"),
        ('{"records": [{"id": ' + "7" * 5000 + ', "response": "ok"}]}', 0, "id"),
        ('{"records": [GOOD, GOOD, {"response": "ok", "x": NaN}]}', 2, "x"),
        ('{"records": [{"response": "ok", "x": -Infinity}]}', 0, "x"),
        ('{"records": [{"response": "ok", "x": 1e999}]}', 0, "x"),
        ('{"records": [{"id": "\\udc00", "response": "ok"}]}', 0, "id"),
        ('{"records": [GOOD, {"response": "ok", "note": ["\\ud800"]}]}', 1, "note"),
        ('{"records": [{"response": "ok", "messages": [{"role": "user", "content": "\\ud800"}]}]}', 0, "messages"),
    ],
    ids=[
        "deep-10000",
        "deep-100",
        "int-5000-digits",
        "id-5000-digits",
        "nan",
        "infinity",
        "overflow-float",
        "surrogate-id",
        "surrogate-passthrough",
        "surrogate-messages",
    ],
)
def test_unusable_values_are_422_naming_record_and_field(scorer, body, index, field):
    stub = Stub(scorer)
    with TestClient(create_app(stub), raise_server_exceptions=False) as client:
        response = client.post("/v1/score", content=body.replace("GOOD", json.dumps(GOOD)).encode(), headers=JSON)
        assert response.status_code == 422, response.text
        details = response.json()["details"]
        assert [(d["index"], d["field"]) for d in details] == [(index, field)]
        assert client.post("/v1/score", json={"records": [GOOD]}).status_code == 200
    assert len(stub.scored()) == 1  # only the good request reached the model


def test_deep_nesting_outside_records_is_400(scorer):
    body = '{"records": [{"response": "ok"}], "junk": ' + "[" * 5000 + "]" * 5000 + "}"
    with TestClient(create_app(Stub(scorer)), raise_server_exceptions=False) as client:
        response = client.post("/v1/score", content=body.encode(), headers=JSON)
    assert response.status_code == 400 and "nested deeper" in response.json()["error"]


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ('["reception"]', "expected an object"),
        ('"reception=2"', "expected an object"),
        ('{"reception": NaN}', "NaN is not valid JSON"),
        ('{"reception": "2"}', "must be a finite number"),
        ('{"reception": true}', "must be a finite number"),
        ('{"reception": 1e999}', "must be a finite number"),
        ('{"\\ud800": 2}', "unknown threshold"),
        ("{}", "at least one threshold"),
    ],
)
def test_bad_thresholds_are_422(scorer, thresholds, message):
    body = '{"record": {"response": "ok"}, "thresholds": ' + thresholds + "}"
    with TestClient(create_app(Stub(scorer)), raise_server_exceptions=False) as client:
        response = client.post("/v1/check", content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("thresholds: ") and message in response.json()["error"]


def test_check_names_the_bad_record_field(scorer):
    body = b'{"record": {"response": "ok", "id": "\\ud800"}, "thresholds": {"reception": 2}}'
    with TestClient(create_app(Stub(scorer))) as client:
        response = client.post("/v1/check", content=body, headers=JSON)
    assert response.status_code == 422 and response.json()["details"][0]["field"] == "id"


# -- the queue is bounded by work, not just requests -----------------------------------------


def dialogues(n: int, text: str = "i am so sorry") -> list[Dialogue]:
    return [Dialogue(response=text) for _ in range(n)]


def test_batcher_bounds_records_and_characters():
    release = threading.Event()

    def score(ds):
        release.wait(10)
        return [d.response for d in ds]

    async def main():
        batcher = MicroBatcher(score, max_batch=4, max_wait_ms=0, queue_size=100, max_queue_records=10,
                               max_queue_chars=1000)  # fmt: skip
        await batcher.start()
        first = batcher.submit_nowait(dialogues(8))  # alone: always accepted
        with pytest.raises(QueueFull, match="records pending"):
            batcher.submit_nowait(dialogues(3))
        second = batcher.submit_nowait(dialogues(2))
        with pytest.raises(QueueFull, match="records pending"):
            batcher.submit_nowait(dialogues(1))
        release.set()
        await asyncio.gather(first, second)
        big = batcher.submit_nowait(dialogues(1, "x" * 5000))  # over the char bound, but alone
        with pytest.raises(QueueFull, match="characters pending"):
            batcher.submit_nowait(dialogues(1, "y"))
        assert len(await big) == 1
        await batcher.stop()
        return batcher.stats

    stats = asyncio.run(asyncio.wait_for(main(), 60))  # a guard against hanging, not a time limit
    assert stats.rejected == 3


def test_http_503_when_records_or_body_bytes_are_full(scorer):
    gate = threading.Event()
    stub = Stub(scorer, gate=gate)
    app = create_app(stub, max_records=4, max_queue_records=5, max_body_bytes=2000, max_queue_chars=3000)
    with TestClient(app) as client:
        results: dict = {}

        def post(name, records, pad=0):
            body = {"records": [{**GOOD, "pad": "x" * pad}] * records}
            results[name] = client.post("/v1/score", json=body)

        holder = threading.Thread(target=post, args=("holder", 4, 300))  # ~1.5 kB held
        holder.start()
        deadline = time.time() + 30
        while not stub.calls and time.time() < deadline:
            time.sleep(0.01)
        post("records", 2)  # 4 + 2 records > 5
        post("bytes", 1, 1700)  # 1.5 kB + 1.8 kB body bytes > 3000
        fits = threading.Thread(target=post, args=("fits", 1))  # 4 + 1 records, small body: queued
        fits.start()
        while app.state.batcher.depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        gate.set()
        holder.join(30)
        fits.join(30)
    assert results["holder"].status_code == 200 and results["fits"].status_code == 200
    for name in ("records", "bytes"):
        assert results[name].status_code == 503 and results[name].headers["retry-after"] == "1"
    assert "records pending" in results["records"].json()["error"]
    assert "request characters" in results["bytes"].json()["error"]
    assert len(stub.scored()) == 5


def test_queue_limits_are_validated(scorer):
    with pytest.raises(ValueError, match="max_queue_records"):
        create_app(Stub(scorer), max_records=300, max_queue_records=200)
    with pytest.raises(ValueError, match="max_queue_chars"):
        create_app(Stub(scorer), max_body_bytes=2_000_000, max_queue_chars=1_000_000)


# -- disconnected clients cost nothing -------------------------------------------------------


async def _lifespan(app):
    inbox, outbox = asyncio.Queue(), asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    assert (await outbox.get())["type"] == "lifespan.startup.complete"

    async def stop():
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return stop


async def _call(app, body: bytes, gone: asyncio.Event | None = None) -> int:
    """One POST /v1/score over raw ASGI; `gone` set = the client disconnects."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_work_of_disconnected_clients_is_dropped(scorer):
    """Issue: 61 abandoned requests stayed queued and were scored for nobody."""
    gate = threading.Event()
    stub = Stub(scorer, gate=gate)
    app = create_app(stub, max_batch=1, max_wait_ms=0)

    async def main():
        stop = await _lifespan(app)
        holder = asyncio.ensure_future(_call(app, json.dumps({"records": [{"response": "holder"}]}).encode()))
        while not stub.calls:
            await asyncio.sleep(0.01)
        gone = asyncio.Event()
        abandoned = [
            asyncio.ensure_future(_call(app, json.dumps({"records": [{"response": f"gone {i}"}]}).encode(), gone))
            for i in range(5)
        ]
        stayed = asyncio.ensure_future(_call(app, json.dumps({"records": [{"response": "stayed"}]}).encode()))
        while app.state.batcher.depth < 6:
            await asyncio.sleep(0.01)
        gone.set()  # five clients hang up while their requests wait
        while app.state.batcher.depth > 1:
            await asyncio.sleep(0.01)
        gate.set()
        codes = await asyncio.gather(holder, stayed, *abandoned)
        stats = app.state.batcher.stats
        await stop()
        return codes, stats

    codes, stats = asyncio.run(asyncio.wait_for(main(), 60))  # a guard against hanging, not a time limit
    assert codes[:2] == [200, 200]
    assert stub.scored() == ["holder", "stayed"]
    assert stats.dropped == 5


def test_a_cancelled_large_request_stops_after_the_current_slice():
    calls = []
    started = threading.Event()
    release = threading.Event()

    def score(ds):
        calls.append(len(ds))
        started.set()
        release.wait(10)
        return [d.response for d in ds]

    async def main():
        batcher = MicroBatcher(score, max_batch=4, max_wait_ms=0, queue_size=4)
        await batcher.start()
        future = batcher.submit_nowait(dialogues(40))
        while not started.is_set():
            await asyncio.sleep(0.01)
        future.cancel()
        release.set()
        await asyncio.sleep(0.2)
        assert (await batcher.submit(dialogues(2))) == ["i am so sorry"] * 2
        await batcher.stop()
        return batcher.stats

    stats = asyncio.run(asyncio.wait_for(main(), 60))  # a guard against hanging, not a time limit
    assert calls == [4, 2] and stats.dropped == 1


def test_batcher_isolates_failing_records():
    def score(ds):
        if any(d.response == "bad" for d in ds):
            raise ValueError("cannot tokenize")
        return [d.response for d in ds]

    async def main():
        batcher = MicroBatcher(score, max_batch=16, max_wait_ms=20)
        await batcher.start()
        jobs = [
            batcher.submit([Dialogue(response="a"), Dialogue(response="b")]),
            batcher.submit([Dialogue(response="c"), Dialogue(response="bad"), Dialogue(response="bad")]),
            batcher.submit([Dialogue(response="d")]),
        ]
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return out

    first, failed, last = asyncio.run(asyncio.wait_for(main(), 60))  # a guard against hanging, not a time limit
    assert first == ["a", "b"] and last == ["d"]
    assert isinstance(failed, RecordsFailed) and [i for i, _ in failed.failures] == [1, 2]


# -- graceful shutdown -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_answers_or_refuses_everything_and_stops_scoring(scorer):
    """Issue: SIGTERM with 30 x 256-record requests in flight: 9 answered 500 and cancelled
    jobs kept running. Now: every request 200 or 503, and no slice starts after the deadline."""
    from perm_lite.serve.server import bind, make_server

    stub = Stub(scorer, delay=0.1)
    app = create_app(stub, max_batch=8, max_wait_ms=0, max_records=64, shutdown_timeout=1.0)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(app, shutdown_timeout=1.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    clients, results = start_posts(url, json.dumps({"records": [GOOD] * 64}).encode(), 12)
    stats = app.state.batcher.stats
    while (len(stub.calls) < 3 or stats.requests + stats.rejected < 12) and time.time() < deadline:
        time.sleep(0.01)  # every request read and queued: all accepted
    server.handle_exit(signal.SIGTERM, None)
    for t in clients:
        t.join(60)
    thread.join(60)
    calls_then = len(stub.calls)
    time.sleep(0.3)
    assert not thread.is_alive()
    assert len(results) == 12 and set(results) <= {200, 503}, results
    assert 503 in results  # 12 x 64 records cannot be scored at 0.1 s per 8 within 1 s
    assert len(stub.calls) == calls_then  # nothing keeps running after the server has gone
    assert app.state.batcher.stats.batches < 12 * 64 / 8  # refused work was never scored


def test_after_shutdown_begins_new_requests_get_503(scorer):
    stub = Stub(scorer)
    with TestClient(create_app(stub)) as client:
        assert client.post("/v1/score", json={"records": [GOOD]}).status_code == 200
        client.portal.call(client.app.state.begin_shutdown)
        refused = client.post("/v1/score", json={"records": [GOOD]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 503
    assert len(stub.scored()) == 1


def _perm(*args):
    return [sys.executable, "-P", "-c", "from perm_lite.cli.main import app; app()", *args]


def test_sigterm_on_perm_serve(tiny_model_dir):
    port = _free_port()
    proc = subprocess.Popen(
        _perm("serve", "--port", str(port), "--model", str(tiny_model_dir), "--max-batch", "4",
              "--shutdown-timeout", "1", "--max-wait-ms", "0"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        long = {"query": " ".join(["i feel so sad and lost today"] * 40), "response": "i am so sorry " * 40}
        clients, results = start_posts(url, json.dumps({"records": [long] * 256}).encode(), 20)
        while time.time() < deadline:  # every request read and queued (or refused): all accepted
            stats = httpx.get(url + "/healthz", timeout=5).json()["batching"]
            if stats["requests"] + stats["rejected"] == 20 and stats["batches"] >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(60)
        code = proc.wait(60)
    finally:
        proc.kill()
    assert len(results) == 20 and set(results) <= {200, 503}, results
    assert code in (0, -signal.SIGTERM)
    assert "Traceback" not in proc.stderr.read()


# -- CLI: busy port, auth key, docs ----------------------------------------------------------


def test_busy_port_is_one_line_and_exit_1(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--port", str(port), "--model", str(tiny_model_dir)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot listen on 127.0.0.1" in lines[0] and "in use" in lines[0]


@pytest.mark.parametrize(
    "args",
    [["--port", "70000"], ["--provider", "tpu"], ["--auth-token-env", "PERM_TEST_UNSET_KEY"],
     ["--max-records", "500", "--max-queue-records", "100"], ["--threshold", "reception=nan"]],
)  # fmt: skip
def test_serve_usage_errors_exit_2(tiny_model_dir, args):
    os.environ.pop("PERM_TEST_UNSET_KEY", None)
    result = CliRunner().invoke(cli, ["serve", "--port", "0", "--model", str(tiny_model_dir), *args])
    assert result.exit_code == 2, result.output


def test_bearer_token_auth(scorer):
    app = create_app(Stub(scorer), auth_token="s3cret-key")
    with TestClient(app) as client:
        body = {"records": [GOOD]}
        assert client.post("/v1/score", json=body).status_code == 401
        wrong = client.post("/v1/score", json=body, headers={"Authorization": "Bearer s3cret-kez"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/score", json=body, headers={"Authorization": "Basic s3cret-key"}).status_code == 401
        assert client.get("/v1/model").status_code == 401
        ok = client.post("/v1/score", json=body, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert "s3cret" not in wrong.text


def test_auth_token_from_environment_in_perm_serve(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "PERM_TEST_KEY": "k3y-from-env"}
    proc = subprocess.Popen(
        _perm("serve", "--port", str(port), "--model", str(tiny_model_dir), "--auth-token-env", "PERM_TEST_KEY"),
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.post(url + "/v1/score", json={"records": [GOOD]}).status_code == 401
        auth = {"Authorization": "Bearer k3y-from-env"}
        assert httpx.post(url + "/v1/score", json={"records": [GOOD]}, headers=auth).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert "k3y-from-env" not in proc.stderr.read()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_non_json_posts_are_415(scorer, content_type):
    """Issue: a cross-site text/plain POST (no CORS preflight) was scored."""
    stub = Stub(scorer)
    headers = {"content-type": content_type} if content_type else {}
    with TestClient(create_app(stub)) as client:
        for path in ("/v1/score", "/v1/check"):
            body = json.dumps({"records": [GOOD], "record": GOOD, "thresholds": {"reception": 2}}).encode()
            response = client.post(path, content=body, headers=headers)
            assert response.status_code == 415 and "application/json" in response.json()["error"]
        ok = client.post("/v1/score", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200
    assert len(stub.scored()) == 1


def test_docs_are_off_by_default(scorer):
    with TestClient(create_app(Stub(scorer))) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200
    with TestClient(create_app(Stub(scorer), docs=True)) as client:
        assert client.get("/docs").status_code == 200
