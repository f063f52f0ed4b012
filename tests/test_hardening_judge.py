"""perm judge against hostile or broken endpoints (issue 19, item 11): the size of a reply is
capped, --timeout bounds a whole request, a percent-encoded key is scrubbed, and an endpoint
no connection opens to stops the run at once."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import pytest

pytest.importorskip("httpx")

from perm_lite.cli.main import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

ROWS = [{"id": f"r{i}", "query": "I lost my job.", "response": f"That is a real blow ({i})."} for i in range(6)]
GOOD = "Reason: fine.\nScore (1-5): 4\nTotal (0-100): 70"
# a key with characters URL and form encoders change
SECRET = "sk-live/Q9+aB=c d~4f1c9a!zz"


def lower_hex(text: str) -> str:
    """Percent-encoding with lowercase hex digits (`%2f`), as some encoders write it."""
    return re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), text)


class Endpoint(BaseHTTPRequestHandler):
    """`mode` scripts the reply: huge (streamed or declared), dripped, or echoing the key encoded."""

    mode = "normal"
    sent: list = []  # bytes of body each request got out before the client left
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        auth = self.headers.get("Authorization", "")
        if self.mode == "echo-encoded":
            key = auth.removeprefix("Bearer ")
            forms = [lower_hex(quote(key, safe="")), quote_plus(key), "".join(f"%{b:02X}" for b in key.encode())]
            body = json.dumps({"error": {"message": "bad request from " + " and ".join(forms)}}).encode()
            return self._reply(400, body)
        if self.mode == "declared-huge":  # says 200 MB up front, then sends it
            return self._stream(200 * 2**20, declare=True)
        if self.mode == "huge":  # 200 MB of answer text, chunk by chunk, no length given
            return self._stream(200 * 2**20, declare=False)
        if self.mode == "slow":
            time.sleep(0.3)
        if self.mode == "drip":  # a valid answer, but one byte every 0.1 s (each read well inside --timeout)
            payload = self._payload(GOOD)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(60 + len(payload)))
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b" ")  # leading whitespace: still valid JSON when it is all sent
                    self.wfile.flush()
                    time.sleep(0.1)
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        self._reply(200, self._payload(GOOD))

    @staticmethod
    def _payload(answer: str) -> bytes:
        return json.dumps({"choices": [{"message": {"content": answer}}], "usage": {}}).encode()

    def _reply(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stream(self, size: int, declare: bool) -> None:
        head = b'{"choices": [{"message": {"content": "Score (1-5): 3 '
        tail = b'"}}], "usage": {}}'
        piece = b"x" * 65536
        sent = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if declare:
                self.send_header("Content-Length", str(len(head) + size + len(tail)))
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def write(data: bytes) -> None:
                nonlocal sent
                if declare:
                    self.wfile.write(data)
                else:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                sent += len(data)

            write(head)
            while sent < size:
                write(piece)
            write(tail)
            if not declare:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.lock:
                self.sent.append(sent)


@pytest.fixture()
def endpoint():
    Endpoint.sent = []
    servers = []

    def start(mode: str = "normal") -> str:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("E", (Endpoint,), {"mode": mode}))
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def judge(tmp_path, url, *extra, rows=ROWS, key=SECRET):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labels.jsonl"
    args = ["judge", str(source), "-o", str(out), "--base-url", url, "--model", "m", "--concurrency", "4", *extra]
    started = time.monotonic()
    result = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": key})
    elapsed = time.monotonic() - started
    rows_out = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return result, {r["id"]: r for r in rows_out}, elapsed


def all_files(tmp_path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


# -- a cap on the size of a reply ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["huge", "declared-huge"])
def test_a_huge_reply_is_not_read_past_the_cap(tmp_path, endpoint, mode):
    url = endpoint(mode)
    result, rows, elapsed = judge(tmp_path, url, "--max-answer-kb", "64", "--max-retries", "0", rows=ROWS[:1])
    assert result.exit_code == 3, result.output  # a failed call: its label is null, the run finishes
    problem = rows["r0"]["judge"]["perspectives"]["reception"]["problem"]
    assert "larger than 65536 bytes" in problem and "--max-answer-kb" in problem, problem
    assert rows["r0"]["labels"] == dict.fromkeys(("resonation", "expression", "reception", "bystander"))
    # nothing of it stored: not in OUTPUT, not in the cache (was a 200 MB output line and cache entry)
    assert sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file()) < 200_000
    deadline = time.monotonic() + 10
    while len(Endpoint.sent) < 4 and time.monotonic() < deadline:  # the server threads notice the client left
        time.sleep(0.05)
    assert len(Endpoint.sent) == 4 and max(Endpoint.sent) < 32 * 2**20, Endpoint.sent  # it stopped reading


def test_a_reply_within_the_cap_is_read_whole(tmp_path, endpoint):
    result, rows, _ = judge(tmp_path, endpoint(), "--max-answer-kb", "1", rows=ROWS[:1])
    assert result.exit_code == 0, result.output
    assert rows["r0"]["labels"]["reception"] == 4 and rows["r0"]["labels"]["bystander"] == 70


# -- --timeout is the whole request's deadline -------------------------------------------------


def test_timeout_bounds_the_whole_request_not_each_read(tmp_path, endpoint):
    url = endpoint("drip")  # 6 s to send a reply, each byte 0.1 s after the last
    result, rows, elapsed = judge(tmp_path, url, "--timeout", "1", "--max-retries", "0", rows=ROWS[:1])
    assert result.exit_code == 3, result.output  # was 0 after 6 s: every read beat the 1 s timeout
    problem = rows["r0"]["judge"]["perspectives"]["resonation"]["problem"]
    assert "timed out after 1 s" in problem, problem
    assert elapsed < 4.5, elapsed  # the first call alone, then the other three at once


# -- a percent-encoded key -------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        lambda k: quote(k, safe=""),
        lambda k: lower_hex(quote(k, safe="")),
        lambda k: quote(k),  # "/" left as it is
        quote_plus,
        lambda k: "".join(f"%{b:02x}" for b in k.encode()),  # every character encoded
        lambda k: quote(quote(k, safe=""), safe=""),  # encoded twice
    ],
)
def test_scrub_removes_a_percent_encoded_key(encode):
    from perm_lite.judge.client import redact_secrets, scrub

    text = f"upstream said: bad key {encode(SECRET)} in query ?api_key_value={encode(SECRET)}&x=1"
    for clean in (scrub(text, [SECRET], limit=None), redact_secrets(text, [SECRET])):
        decoded = unquote(unquote(clean))
        assert SECRET not in decoded and SECRET not in unquote_plus(clean), clean
        assert "[redacted]" in clean
    assert scrub("a 50% chance, 100%+ sure", [SECRET]) == "a 50% chance, 100%+ sure"  # nothing else touched


def test_an_endpoint_echoing_the_key_encoded_leaks_nothing(tmp_path, endpoint, caplog):
    with caplog.at_level(logging.DEBUG):
        result, rows, _ = judge(tmp_path, endpoint("echo-encoded"), "--max-retries", "0", rows=ROWS[:1])
    assert result.exit_code == 3, result.output
    problem = rows["r0"]["judge"]["perspectives"]["reception"]["problem"]
    assert problem.startswith("request failed: HTTP 400") and "[redacted]" in problem, problem
    stored = all_files(tmp_path).decode("utf-8", "replace") + result.output + caplog.text
    for form in (SECRET, lower_hex(quote(SECRET, safe="")), quote_plus(SECRET), quote(SECRET, safe="")):
        assert form not in stored, form
    assert SECRET not in unquote(stored) and SECRET not in unquote_plus(stored)


# -- an endpoint no connection opens to --------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_sends(monkeypatch) -> list[int]:
    from perm_lite.judge import client

    sends = [0]
    real = client.ChatClient._send

    async def counted(self, body, on_open):
        sends[0] += 1
        return await real(self, body, on_open)

    monkeypatch.setattr(client.ChatClient, "_send", counted)
    return sends


def test_connection_refused_stops_the_run_after_one_calls_retries(tmp_path, monkeypatch):
    sends = count_sends(monkeypatch)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    result, rows, elapsed = judge(tmp_path, url, "--max-retries", "2")
    assert result.exit_code == 1, result.output  # was 3, with a file of null labels
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach {url}/chat/completions"), lines
    assert "could not connect (ConnectError" in lines[0] and "3 attempts" in lines[0], lines
    assert sends[0] == 3  # one call and its 2 retries (was 6 records x 4 perspectives x 3 = 72)
    assert rows == {}  # no rows of nulls
    assert SECRET not in result.output


def test_library_raises_endpoint_unreachable(tmp_path):
    from perm_lite.judge.client import EndpointUnreachable, JudgeConfig, RunStopped
    from perm_lite.judge.run import judge_path

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = JudgeConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1", model="m", max_retries=1, backoff=0.01)
    with pytest.raises(EndpointUnreachable, match="cannot reach") as caught:
        judge_path(config, source, tmp_path / "out.jsonl")
    assert isinstance(caught.value, RunStopped)


def test_a_connection_that_hangs_until_the_deadline_stops_the_run(tmp_path, monkeypatch):
    """A listener whose accept queue is full drops new SYNs: connecting hangs, as with a
    firewalled host, and the run stops instead of waiting on every record."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            hangs = False
        except OSError:
            hangs = True
        finally:
            probe.close()
        if not hangs:
            pytest.skip("this kernel completes connections beyond the accept queue")
        sends = count_sends(monkeypatch)
        result, rows, elapsed = judge(tmp_path, f"http://127.0.0.1:{port}/v1", "--timeout", "0.5", "--max-retries", "1")
        assert result.exit_code == 1 and "cannot reach" in result.output, result.output
        assert sends[0] == 2 and rows == {} and elapsed < 5, (sends, elapsed)
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_requests_go_in_parallel_once_the_endpoint_answered(tmp_path, endpoint):
    """Until a connection has opened, calls go one at a time; after that, --concurrency."""
    url = endpoint("slow")  # 0.3 s a request: 24 calls take 7.2 s one at a time, about 2 s four at a time
    result, rows, elapsed = judge(tmp_path, url, "--concurrency", "4")
    assert result.exit_code == 0 and len(rows) == len(ROWS), result.output
    assert elapsed < 4.5, elapsed


def test_unreachable_after_answering_stops_too(tmp_path, monkeypatch):
    """The endpoint answered the first chunk's calls, then went away: the first call that
    cannot connect in any attempt stops the run; the chunk already written stays."""
    from perm_lite.judge.client import EndpointUnreachable, JudgeConfig
    from perm_lite.judge.run import judge_path

    port = closed_port()
    arrived = []

    class GoesAway(Endpoint):
        def do_POST(self):
            with self.lock:
                arrived.append(1)
                last = len(arrived) == 8  # the first chunk (two records) has all arrived
            if last:  # nothing listens on the port any more: later connections are refused
                self.server.shutdown()
                self.server.server_close()
            super().do_POST()

    httpd = ThreadingHTTPServer(("127.0.0.1", port), GoesAway)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    sends = count_sends(monkeypatch)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff=0.01, timeout=5)
    try:
        with pytest.raises(EndpointUnreachable):
            judge_path(config, source, tmp_path / "out.jsonl", chunk_size=2, use_cache=False)
    finally:
        httpd.server_close()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["r0", "r1"]  # the first chunk was written, nothing after
    # at most the calls in flight (--concurrency 8) tried twice; no later record is asked (was 8 + 4 x 8 x 2)
    assert sends[0] <= 8 + 8 * 2, sends
