"""perm serve under hostile explanations and slow uploads (issue 19: items 1, 2, 4, parts of 17).

A counting stand-in around the tiny fixture model records every forward pass; bounds are
asserted as counts (passes, variants per call, characters per variant, traced memory) and
by other clients being answered meanwhile, never as wall-clock limits (the timeouts below
only keep a broken build from hanging).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from perm_lite.cli.main import app as cli  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import perm_lite  # noqa: E402
from perm_lite import Scorer  # noqa: E402
from perm_lite.serve import app as app_module  # noqa: E402
from perm_lite.serve.app import create_app  # noqa: E402
from perm_lite.text import CHARS_PER_TOKEN  # noqa: E402

JSON = {"content-type": "application/json"}
GOOD = {"query": "my dog died today", "response": "i am so sorry"}


class Counting:
    """A scorer that counts what it scores (text characters per dialogue, per call)."""

    def __init__(self, scorer, delay: float = 0.0):
        self.real, self.config, self.heads, self.reward = scorer, scorer.config, scorer.heads, scorer.reward
        self.tokenizer, self.provider, self.variant = scorer.tokenizer, "cpu", "fp32"
        self.delay = delay
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def encode(self, dialogues):
        return self.real.encode(dialogues)

    def score_dialogues(self, dialogues):
        with self.lock:
            self.calls.append([len(d.response) + len(d.query) + sum(len(t.text) for t in d.history) for d in dialogues])
        if self.delay:
            time.sleep(self.delay)
        return self.real.score_dialogues(dialogues)

    @property
    def scored(self) -> int:
        return sum(len(c) for c in self.calls)

    def big(self, limit: int) -> int:
        """Dialogues scored holding more text than a variant may (the full records)."""
        return sum(n > 2 * limit + 100 for c in self.calls for n in c)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The tiny model reading 512 tokens: a few hundred "Hi." sentences are visible."""
    from fixture_model import build_model_dir

    return Scorer(build_model_dir(tmp_path_factory.mktemp("wide") / "tiny512", max_length=512), provider="cpu")


def _limit(scorer) -> int:
    return CHARS_PER_TOKEN * scorer.config.max_length


def _post(client, path: str, body: dict, out: list) -> threading.Thread:
    def go() -> None:
        out.append(client.post(path, content=json.dumps(body).encode(), headers=JSON))

    thread = threading.Thread(target=go)
    thread.start()
    return thread


# -- item 1: /v1/explain bounded, off the loop, others served ---------------------------------


def test_megabyte_explanations_are_bounded_and_others_are_served(wide):
    """Issue: POST /v1/explain with a 1 MB body of "Hi. " (or 27,001 one-character turns with
    context) took the server past 6 GB; every other client waited."""
    counting = Counting(wide, delay=0.01)
    app = create_app(counting, max_body_bytes=1_100_000, max_batch=8, max_wait_ms=0, max_explain_variants=256)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(27_001)]
    reply = {"record": {"query": "my dog died", "response": "Hi. " * 262_144}}
    context = {"record": {"messages": turns, "response": "so sorry. that is hard."}, "context": True}
    tracemalloc.start()
    try:
        with TestClient(app) as client:
            explained: list = []
            threads = [_post(client, "/v1/explain", body, explained) for body in (reply, reply, context)]
            while not counting.calls:
                time.sleep(0.01)
            served = []
            while any(t.is_alive() for t in threads) and len(served) < 50:  # other clients, meanwhile
                served.append((client.post("/v1/score", json={"records": [GOOD]}).status_code, len(explained)))
                served.append((client.get("/healthz").status_code, len(explained)))
            for t in threads:
                t.join(120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted(r.status_code for r in explained) == [200, 200, 200], [r.text[:200] for r in explained]
    assert {code for code, _ in served} == {200}
    assert any(done < 3 for _, done in served)  # answered while the explanations were running
    budget = 256
    assert counting.scored <= 3 * budget + len(served)
    assert max(len(c) for c in counting.calls) <= 8  # the chunks, never every variant at once
    assert counting.big(_limit(wide)) == 3  # only the three full records: no variant holds more than the model reads
    assert peak < 150_000_000, peak  # bytes, all threads; the old code needed gigabytes
    body = next(r.json() for r in explained if r.json()["omitted"]["turns_unseen"])
    assert body["omitted"]["turns_unseen"] > 26_000 and len(body["context"]) <= budget


def test_explain_budget_is_checked_before_any_work(scorer, monkeypatch):
    """The per-request budget refuses a record before any variant is built or scored; the
    planning runs in a worker thread, not on the event loop."""
    counting = Counting(scorer)
    planned_on_loop = []
    real = app_module.occlusion

    def watched(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            planned_on_loop.append(True)
        except RuntimeError:
            planned_on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "occlusion", watched)
    app = create_app(counting, max_explain_variants=4)
    record = {"query": "x", "response": "i am sorry. " * 3 + "how are you?"}  # 4 sentences + the full: 5 passes
    with TestClient(app) as client:
        refused = client.post("/v1/explain", json={"record": record})
        assert refused.status_code == 413 and "at most 3" in refused.json()["error"]
        assert counting.calls == []  # nothing scored, not even the full record
        ok = client.post("/v1/explain", json={"record": {**record, "response": "i am sorry. how are you?"}})
        assert ok.status_code == 200 and len(ok.json()["sentences"]) == 2
        assert client.get("/v1/model").json()["limits"]["max_explain_variants"] == 4
    assert planned_on_loop == [False, False]


# -- item 2: /v1/check's culprit bounded ------------------------------------------------------


def test_check_culprit_search_is_bounded_and_others_are_served(wide):
    """Issue: a 29 KB /v1/check of 1,000 sentences with a failing threshold took 157 s
    (1,001 forward passes) while every other client got 503."""
    counting = Counting(wide, delay=0.01)
    app = create_app(counting, max_batch=8, max_wait_ms=0)  # the default budget: 65 forward passes
    record = {"query": "my dog died", "response": "i am so sorry. " * 1_000}
    with TestClient(app) as client:
        checked: list = []
        thread = _post(client, "/v1/check", {"record": record, "thresholds": {"combined": 99}}, checked)
        while not counting.calls:
            time.sleep(0.01)
        served = []
        while thread.is_alive() and len(served) < 50:
            served.append(client.post("/v1/score", json={"records": [GOOD]}).status_code)
        thread.join(120)
    assert checked[0].status_code == 200, checked[0].text
    verdict = checked[0].json()
    assert verdict["flagged"] and set(served) <= {200}
    own = counting.scored - len(served)
    assert own <= 65  # the score and at most 64 sentences, not 1,001
    assert max(len(c) for c in counting.calls) <= 8


def test_check_culprit_search_stays_within_the_budget(wide):
    counting = Counting(wide)
    record = {"query": "my dog died", "response": "i am so sorry. " * 1_000}
    with TestClient(create_app(counting, max_explain_variants=16)) as client:
        verdict = client.post("/v1/check", json={"record": record, "thresholds": {"combined": 99}}).json()
    assert verdict["flagged"] and counting.scored <= 16
    if verdict["culprit"] is not None:
        culprit = verdict["culprit"]
        assert record["response"][culprit["start"] : culprit["end"]] == culprit["sentence"]
        assert culprit["unmeasured"] > 0  # the model reads more sentences than the budget allowed


def test_check_and_explain_offsets_index_the_record_field(scorer):
    raw = "   I am so sorry.  That sounds hard. "
    with TestClient(create_app(scorer)) as client:
        body = client.post("/v1/explain", json={"record": {"query": "x", "response": raw}}).json()
        assert body["field"] == "response"
        assert [raw[s["start"] : s["end"]] for s in body["sentences"]] == [s["text"] for s in body["sentences"]]
        verdict = client.post("/v1/check", json={"record": {"response": raw}, "thresholds": {"combined": 99}}).json()
        if verdict["culprit"]:
            assert raw[verdict["culprit"]["start"] : verdict["culprit"]["end"]] == verdict["culprit"]["sentence"]


# -- item 4: bodies counted as they arrive, read with a timeout --------------------------------


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


async def _call(app, first: bytes, declared: int, gone: asyncio.Event | None = None) -> int:
    """POST /v1/score over raw ASGI declaring `declared` bytes; `gone` given: only `first`
    arrives, then the client stalls until `gone` is set and disconnects."""
    messages = [{"type": "http.request", "body": first, "more_body": gone is not None}]

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
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(declared).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    return next((m["status"] for m in sent if m["type"] == "http.response.start"), 499)


def test_slow_uploads_declaring_a_megabyte_do_not_starve_other_posts(scorer):
    """Issue: 16 slow uploads declaring 1 MB each reserved the default 16 MB body budget, so
    every other POST got 503 for as long as they stayed open."""
    app = create_app(scorer)  # the defaults: 1 MB bodies, 16 MB of body bytes in progress
    good = json.dumps({"records": [GOOD]}).encode()

    async def main():
        stop = await _lifespan(app)
        gone = asyncio.Event()
        slow = [asyncio.ensure_future(_call(app, b'{"records": [', 1_000_000, gone)) for _ in range(16)]
        await asyncio.sleep(0.2)  # every slow upload has started
        codes = [await _call(app, good, len(good)) for _ in range(5)]
        gone.set()
        await asyncio.gather(*slow)
        await stop()
        return codes

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [200] * 5


def test_a_body_that_does_not_arrive_in_time_is_408(scorer):
    app = create_app(scorer, body_timeout=0.3)

    async def main():
        stop = await _lifespan(app)
        stalled = await _call(app, b'{"records": [', 1_000, asyncio.Event())  # never set: the client stalls
        health = app.state.batcher.pending
        await stop()
        return stalled, health

    stalled, pending = asyncio.run(asyncio.wait_for(main(), 60))
    assert stalled == 408 and pending["requests"] == 0


def test_slow_uploads_over_real_sockets(scorer):
    """Load: 16 sockets declaring 1 MB and sending a few bytes, against uvicorn; other
    clients are answered at once and the stalled ones get 408 after the body timeout."""
    from perm_lite.serve.server import bind, make_server

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(create_app(scorer, body_timeout=1.0), 1.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    slow = []
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        head = (
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
        for _ in range(16):
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(head + b'{"records": [')
            slow.append(conn)
        time.sleep(0.2)
        codes = [httpx.post(url + "/v1/score", json={"records": [GOOD]}, timeout=30).status_code for _ in range(5)]
        answers = [conn.recv(200) for conn in slow]  # after the body timeout
    finally:
        for conn in slow:
            conn.close()
        server.should_exit = True
        thread.join(30)
    assert codes == [200] * 5
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers


# -- item 17: the version and the help ----------------------------------------------------------


def test_openapi_version_and_serve_help(scorer):
    with TestClient(create_app(scorer)) as client:
        assert client.get("/openapi.json").json()["info"]["version"] == perm_lite.__version__
        limits = client.get("/v1/model").json()["limits"]
        assert limits["max_explain_variants"] == 65 and limits["body_timeout"] == 30.0
    help_text = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    assert "/v1/explain" in help_text and "--body-timeout" in help_text
