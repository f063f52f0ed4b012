"""perm judge against a real local HTTP server that speaks OpenAI chat completions."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx")

from perm_lite.cli.main import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from perm_lite.judge.parse import parse_answer  # noqa: E402

SECRET = "sk-test-DO-NOT-LEAK-4f1c9a"
ANSWERS = {
    "resonation": "Reason: Names the fear and its cause.\nScore (1-5): 4",
    "expression": "Reason: Warm and natural.\nScore (1-5): 3",
    "reception": "Reason: I would feel heard.\nScore (1-5): 5",
    "bystander": "Reason: Clear.\nContent: 15\nStructure: 16\nEfficiency: 13\nObjectivity: 17\nAccuracy: 14\n"
    "Total (0-100): 75",
}
MARKERS = {
    "SUPPORTER's inner understanding": "resonation",
    "SUPPORTER's communication": "expression",
    "the SEEKER": "reception",
    "NEUTRAL BYSTANDER": "bystander",
}


class ScriptedJudge(BaseHTTPRequestHandler):
    """Answers by perspective; the reply text under judgement scripts misbehaviour."""

    requests: list = []
    seen: dict = {}
    lock = threading.Lock()
    mode = "normal"  # "401"/"403": refuse every call; "garbage": answer nothing parseable

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        perspective = next(p for marker, p in MARKERS.items() if marker in user)
        port = self.server.server_address[1]
        with self.lock:
            self.requests.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "body": body, "port": port}
            )
            key = (perspective, user, port)
            attempt = self.seen[key] = self.seen.get(key, 0) + 1
        auth = self.headers.get("Authorization")
        if self.mode in ("401", "403"):  # a refusing endpoint that echoes what it was sent
            return self._send(int(self.mode), {"error": {"message": f"bad key in Authorization: {auth}"}})
        if "ECHO-HEADERS" in user:  # a 400 whose body echoes the request headers, key included
            headers = {k: v for k, v in self.headers.items()}
            message = f"bad request; you sent Authorization: {auth}, api-key: {SECRET}, sk-proj-0therKey12345"
            return self._send(400, {"error": {"message": message}, "headers": headers})
        if "ECHO-ANSWER" in user:  # a 200 whose answer text echoes the key
            answer = f"Your request said Authorization: {auth} and {SECRET}.\nScore (1-5): 3"
            if perspective == "bystander":
                answer += "\nTotal (0-100): 50"
            return self._send(200, {"choices": [{"message": {"content": answer}}], "usage": {}})
        if "BAD-USAGE" in user:
            return self._send(
                200,
                {
                    "choices": [{"message": {"content": ANSWERS[perspective]}}],
                    "usage": {"prompt_tokens": "many", "completion_tokens": [1]},
                },
            )
        if "RATE-LIMITED" in user and attempt == 1:
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if "FLAKY" in user and attempt == 1:
            return self._send(500, {"error": {"message": "boom"}})
        if "SLOW" in user:
            time.sleep(1.0)
        garbage = "GARBAGE" in user or self.mode == "garbage"
        answer = "I think it is quite good overall!" if garbage else ANSWERS[perspective]
        payload = {
            "choices": [{"message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20},
        }
        self._send(200, payload)

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture()
def start_server():
    """Start loopback judges (each with its own mode); all share ScriptedJudge.requests."""
    ScriptedJudge.requests, ScriptedJudge.seen = [], {}
    servers = []

    def start(mode="normal"):
        handler = type("Judge", (ScriptedJudge,), {"mode": mode})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def server(start_server):
    return start_server()


def write_input(tmp_path, rows=None):
    path = tmp_path / "in.jsonl"
    if rows is not None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    rows = [
        {"id": "ok", "query": "I lost my job.", "response": "That is a real blow. How are you holding up?"},
        {"id": "limited", "query": "I am lonely.", "response": "RATE-LIMITED but kind reply"},
        {"id": "flaky", "query": "Exams.", "response": "FLAKY reply about exams"},
        {"id": "garbage", "query": "My cat died.", "response": "GARBAGE reply about the cat"},
        {"id": "slow", "query": "Hi.", "response": "SLOW reply"},
    ]
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n{not json\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    )
    return path


def run_judge(tmp_path, server, *extra, env=None, rows=None):
    out = tmp_path / "labels.jsonl"
    args = [
        "judge",
        str(write_input(tmp_path, rows)),
        "-o",
        str(out),
        "--base-url",
        server,
        "--model",
        "judge-x",
        "--timeout",
        "0.5",
        "--max-retries",
        "1",
        "--concurrency",
        "4",
        *extra,
    ]
    result = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET, **(env or {})})
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return result, {r["id"]: r for r in rows}


def test_labels_retries_nulls_and_order(tmp_path, server, caplog):
    with caplog.at_level(logging.DEBUG):
        result, rows = run_judge(tmp_path, server)
    assert result.exit_code == 3, result.output  # one bad line: reported, the rest judged
    assert list(rows) == ["ok", "limited", "flaky", "garbage", "slow"]  # input order
    assert rows["ok"]["labels"] == {"resonation": 4, "expression": 3, "reception": 5, "bystander": 75}
    by = rows["ok"]["judge"]["perspectives"]["bystander"]
    assert by["parts"] == {"content": 15, "structure": 16, "efficiency": 13, "objectivity": 17, "accuracy": 14}
    assert by["reason"] == "Clear." and by["raw"] == ANSWERS["bystander"]
    assert rows["limited"]["labels"]["reception"] == 5 and rows["flaky"]["labels"]["bystander"] == 75  # retried
    garbage = rows["garbage"]["judge"]["perspectives"]["expression"]
    assert rows["garbage"]["labels"]["expression"] is None  # null, never an average
    assert garbage["raw"] == "I think it is quite good overall!" and "no 'Score (1-5): N' line" in garbage["problem"]
    slow = rows["slow"]["judge"]["perspectives"]["resonation"]
    assert slow["score"] is None and "timed out after 0.5 s, after 1 retries" in slow["problem"]
    errors = [json.loads(x) for x in (tmp_path / "labels.jsonl.errors.jsonl").read_text().splitlines()]
    assert errors[0]["line"] == 3 and "invalid JSON" in errors[0]["error"]
    assert "4 retries" not in result.output and "retries" in result.output
    # the key went where it belongs, and nowhere else
    assert {r["auth"] for r in ScriptedJudge.requests} == {f"Bearer {SECRET}"}
    for path in tmp_path.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.output and SECRET not in caplog.text
    body = ScriptedJudge.requests[0]["body"]
    assert ScriptedJudge.requests[0]["path"] == "/v1/chat/completions"
    assert body["model"] == "judge-x" and body["temperature"] == 0.3


def test_rerun_is_served_from_the_cache(tmp_path, server):
    run_judge(tmp_path, server)
    first = len(ScriptedJudge.requests)
    result, rows = run_judge(tmp_path, server, "--overwrite")
    new = ScriptedJudge.requests[first:]
    # only the timed-out calls (never answered) and the unparseable answers (never cached) are sent again
    assert new and all(any(m in r["body"]["messages"][-1]["content"] for m in ("SLOW", "GARBAGE")) for r in new)
    assert any("SLOW" in r["body"]["messages"][-1]["content"] for r in new)
    assert rows["ok"]["labels"]["bystander"] == 75 and "answers from the cache" in result.output


def test_dry_run_sends_nothing(tmp_path, server):
    result = CliRunner().invoke(
        app, ["judge", str(write_input(tmp_path)), "--model", "gpt-4o-mini", "--dry-run"], env={}
    )
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.output)
    assert estimate["records"] == 5 and estimate["invalid_records"] == 1 and estimate["calls"] == 20
    assert estimate["input_tokens"] > 20 * 150 and estimate["estimated_cost"] > 0
    assert ScriptedJudge.requests == []


def test_existing_output_needs_overwrite(tmp_path, server):
    (tmp_path / "labels.jsonl").write_text('{"id": "keep"}\n')
    result, rows = run_judge(tmp_path, server)
    assert result.exit_code == 2 and "use --overwrite" in result.output
    assert list(rows) == ["keep"] and ScriptedJudge.requests == []  # untouched, nothing sent


@pytest.mark.parametrize(
    ("text", "perspective", "score", "problem"),
    [
        ("Reason: fine\nScore (1-5): 3", "expression", 3, None),
        ("**Score (1-5):** 5", "reception", 5, None),
        ("Score (1-5): 7", "reception", None, "outside 1-5"),
        ("Score: 2\nScore: 4", "resonation", None, "more than one"),
        ("Content: 10\nStructure: 10\nEfficiency: 10\nObjectivity: 10\nAccuracy: 10", "bystander", 50, None),
        (
            "Content: 10\nStructure: 10\nEfficiency: 10\nObjectivity: 10\nAccuracy: 10\nTotal (0-100): 70",
            "bystander",
            None,
            "parts sum to 50",
        ),
        ("Content: 25\nTotal: 60", "bystander", None, "outside 0-20"),
        ("Total (0-100): 60", "bystander", 60, None),
        ("", "bystander", None, "no 'Total"),
    ],
)
def test_parse_answer(text, perspective, score, problem):
    judgement = parse_answer(text, perspective)
    assert judgement.score == score
    assert (problem is None and judgement.problem is None) or problem in judgement.problem


# -- hardening (issue 12, item 4) --------------------------------------------------------------

GOOD_ROWS = [
    {"id": "a", "query": "I lost my job.", "response": "That is a real blow. How are you holding up?"},
    {"id": "b", "query": "I am lonely.", "response": "That sounds hard; I am here to listen."},
]


def read_all_files(tmp_path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_all_good_calls_exit_0(tmp_path, server):
    result, rows = run_judge(tmp_path, server, rows=GOOD_ROWS)
    assert result.exit_code == 0, result.output
    assert rows["b"]["labels"]["reception"] == 5


def test_failed_calls_exit_3_and_say_so(tmp_path, server):
    rows_in = [*GOOD_ROWS, {"id": "slow", "query": "Hi.", "response": "SLOW reply"}]
    result, rows = run_judge(tmp_path, server, rows=rows_in)
    assert result.exit_code == 3, result.output  # was 0: failed calls went unnoticed
    assert "calls failed" in result.output
    assert rows["a"]["labels"]["reception"] == 5 and rows["slow"]["labels"]["resonation"] is None


def test_on_error_stop_exits_4(tmp_path, server):
    result, rows = run_judge(tmp_path, server, "--on-error", "stop")
    assert result.exit_code == 4, result.output  # was 3
    assert list(rows) == ["ok", "limited"]  # the records before the bad line are judged and kept


@pytest.mark.parametrize("status", ["401", "403"])
def test_refused_key_stops_the_run_in_one_line(tmp_path, start_server, caplog, status):
    url = start_server(status)
    many = [{"id": f"r{i}", "query": "I am sad.", "response": f"I hear you ({i})."} for i in range(30)]
    with caplog.at_level(logging.DEBUG):
        result, rows = run_judge(tmp_path, url, rows=many)
    assert result.exit_code == 1, result.output  # was 0, every label null
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"HTTP {status}" in lines[0] and "Traceback" not in result.output, result.output
    assert len(ScriptedJudge.requests) <= 4  # at most the calls already in flight (--concurrency 4)
    assert SECRET not in result.output and SECRET not in caplog.text
    assert SECRET.encode() not in read_all_files(tmp_path)


def test_stored_errors_hold_no_key_or_header_values(tmp_path, server, caplog):
    rows_in = [
        GOOD_ROWS[0],
        {"id": "echo-headers", "query": "I am sad.", "response": "ECHO-HEADERS reply"},
        {"id": "echo-answer", "query": "I am sad.", "response": "ECHO-ANSWER reply"},
    ]
    with caplog.at_level(logging.DEBUG):
        result, rows = run_judge(tmp_path, server, rows=rows_in)
    assert result.exit_code == 3, result.output
    problem = rows["echo-headers"]["judge"]["perspectives"]["expression"]["problem"]
    assert problem.startswith("request failed: HTTP 400") and "[redacted]" in problem
    stored = read_all_files(tmp_path) + result.output.encode() + caplog.text.encode()
    for leak in (SECRET, "Bearer sk-", "sk-test", "DO-NOT-LEAK", "0therKey12345"):
        assert leak.encode() not in stored, leak
    echoed = rows["echo-answer"]["judge"]["perspectives"]["expression"]
    assert echoed["score"] == 3 and "[redacted]" in echoed["raw"]  # the answer is kept, the key is not


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {SECRET}",
        f'{{"headers": {{"Authorization": "Bearer {SECRET}", "api-key": "{SECRET}"}}}}',
        "api-key: 0123456789abcdef",
        "x-api-key=abcdef123456&model=gpt",
        "Incorrect API key provided: sk-proj-AbCdEf123456789. You can find your key at ...",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "Cookie: session=abc123def456",
    ],
)
def test_scrub_removes_header_and_key_like_values(text):
    from perm_lite.judge.client import scrub

    clean = scrub(text, [SECRET])
    for leak in (SECRET, "0123456789abcdef", "abcdef123456", "AbCdEf123456789", "dozjgNryP4J3jVmN", "abc123def456"):
        assert leak not in clean, clean
    assert "\n" not in scrub("line one\nAuthorization: x\nline three")


def test_malformed_usage_is_a_failed_call_and_nothing_is_lost(tmp_path, server):
    rows_in = [GOOD_ROWS[0], {"id": "usage", "query": "Hi.", "response": "BAD-USAGE reply"}, GOOD_ROWS[1]]
    result, rows = run_judge(tmp_path, server, rows=rows_in)
    assert result.exit_code == 3, result.output  # was a ValueError traceback, and no output
    assert "Traceback" not in result.output
    assert list(rows) == ["a", "usage", "b"]
    assert rows["a"]["labels"]["bystander"] == 75 and rows["b"]["labels"]["reception"] == 5
    bad = rows["usage"]["judge"]["perspectives"]["reception"]
    assert rows["usage"]["labels"]["reception"] is None and "malformed 'usage'" in bad["problem"]


def test_unparseable_answers_are_not_cached(tmp_path, start_server):
    garbage, good = start_server("garbage"), start_server()
    result, rows = run_judge(tmp_path, garbage, rows=GOOD_ROWS)
    assert all(v is None for v in rows["a"]["labels"].values())
    sent = len(ScriptedJudge.requests)
    run_judge(tmp_path, garbage, "--overwrite", rows=GOOD_ROWS)  # asked again, not replayed from the cache
    assert len(ScriptedJudge.requests) == 2 * sent
    result, rows = run_judge(tmp_path, good, "--overwrite", rows=GOOD_ROWS)
    assert result.exit_code == 0, result.output
    assert rows["a"]["labels"] == {"resonation": 4, "expression": 3, "reception": 5, "bystander": 75}


def test_cache_is_keyed_by_endpoint(tmp_path, start_server):
    first, second = start_server(), start_server()
    run_judge(tmp_path, first, rows=GOOD_ROWS)
    ports = [r["port"] for r in ScriptedJudge.requests]
    assert len(ports) == 8 and len(set(ports)) == 1
    result, rows = run_judge(tmp_path, second, "--overwrite", rows=GOOD_ROWS)
    assert result.exit_code == 0, result.output
    assert len(ScriptedJudge.requests) == 16  # the second endpoint is asked, not served the first one's answers
    run_judge(tmp_path, second, "--overwrite", rows=GOOD_ROWS)
    assert len(ScriptedJudge.requests) == 16  # and its own answers are cached
    # the dry run counts the cache for the endpoint it is given
    dry = CliRunner().invoke(
        app,
        ["judge", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "labels.jsonl"), "--model", "judge-x"]
        + ["--dry-run", "--base-url", second],
    )
    assert json.loads(dry.output)["cached_calls"] == 8


def test_key_never_goes_over_plain_http_to_another_host(tmp_path):
    remote = "http://192.0.2.10:9/v1"  # TEST-NET: nothing answers there
    result, rows = run_judge(tmp_path, remote, "--max-retries", "0", rows=GOOD_ROWS[:1])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--allow-insecure-http" in lines[0] and "192.0.2.10" in lines[0]
    assert not (tmp_path / "labels.jsonl").exists() and not (tmp_path / "labels.jsonl.cache.sqlite").exists()
    # said out loud: it is sent (and fails to connect here, which stops the run: issue 19, item 11)
    result, rows = run_judge(tmp_path, remote, "--max-retries", "0", "--allow-insecure-http", rows=GOOD_ROWS[:1])
    assert result.exit_code == 1 and "cannot reach http://192.0.2.10:9" in result.output, result.output


def test_check_endpoint():
    from perm_lite.judge.client import ChatClient, InsecureEndpoint, check_endpoint

    for url in ("https://api.openai.com/v1", "http://localhost:8000/v1", "http://127.0.0.2/v1", "http://[::1]:80"):
        check_endpoint(url, sends_key=True)
    check_endpoint("http://10.0.0.5/v1", sends_key=False)  # no key, nothing to protect
    check_endpoint("http://10.0.0.5/v1", sends_key=True, allow_insecure_http=True)
    for url in ("http://10.0.0.5/v1", "http://localhost.example.com/v1", "http://127.0.0.1.nip.io/v1"):
        with pytest.raises(InsecureEndpoint, match="plain http"):
            check_endpoint(url, sends_key=True)
    for url in ("ftp://example.com/v1", "example.com/v1", "file:///etc/passwd", ""):
        with pytest.raises(InsecureEndpoint, match="http:// or https://"):
            check_endpoint(url, sends_key=False)
    import os

    from perm_lite.judge.client import JudgeConfig

    os.environ["PERM_TEST_KEY"] = SECRET
    try:
        with pytest.raises(InsecureEndpoint):  # the library refuses too, not only the CLI
            ChatClient(JudgeConfig(base_url="http://192.0.2.10/v1", model="m", api_key_env="PERM_TEST_KEY"), None)
    finally:
        del os.environ["PERM_TEST_KEY"]


def test_output_that_is_the_input_is_refused(tmp_path, server):
    source = write_input(tmp_path, GOOD_ROWS)
    before = source.read_bytes()
    args = ["judge", str(source), "-o", str(source), "--overwrite", "--base-url", server, "--model", "judge-x"]
    result = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code == 2 and "is the input file" in result.output, result.output
    assert source.read_bytes() == before and ScriptedJudge.requests == []


def judge_args(source, out, server, *extra):
    return ["judge", str(source), "-o", str(out), "--base-url", server, "--model", "judge-x", *extra]


@pytest.mark.parametrize("how", ["symlink", "hardlink", "errors-path"])
def test_output_or_errors_path_that_is_the_input_under_another_name_is_refused(tmp_path, server, how):
    source = write_input(tmp_path, GOOD_ROWS)
    before = source.read_bytes()
    if how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(source)
    elif how == "hardlink":
        out = tmp_path / "hard.jsonl"
        out.hardlink_to(source)
    else:  # the input is where OUT's errors would go
        out = tmp_path / "labels.jsonl"
        source = source.rename(tmp_path / "labels.jsonl.errors.jsonl")
    result = CliRunner().invoke(app, judge_args(source, out, server, "--overwrite"), env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code == 2 and "is the input file" in result.output, result.output
    assert source.read_bytes() == before and ScriptedJudge.requests == []  # not emptied, nothing sent


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling-symlink"])
def test_output_that_is_not_a_regular_file_is_refused(tmp_path, server, kind):
    import os

    source = write_input(tmp_path, GOOD_ROWS)
    out = tmp_path / "target"
    if kind == "directory":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif kind == "fifo":
        os.mkfifo(out)  # opening it for writing would block forever
    else:
        out.symlink_to(tmp_path / "nowhere")
    args = judge_args(source, out, server, "--overwrite")
    result = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert out.is_symlink() or out.exists()  # nothing removed
    if kind == "directory":
        assert (out / "keep.txt").read_text() == "mine"
    assert ScriptedJudge.requests == []


def test_failing_run_with_overwrite_keeps_the_old_output(tmp_path, start_server):
    url = start_server("401")  # every call refused: the run fails after it started
    old_labels, old_errors = '{"id": "old", "labels": {}}\n', '{"line": 9, "error": "old"}\n'
    (tmp_path / "labels.jsonl").write_text(old_labels)
    (tmp_path / "labels.jsonl.errors.jsonl").write_text(old_errors)
    rows = [*GOOD_ROWS, "not json"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    args = judge_args(path, tmp_path / "labels.jsonl", url, "--overwrite")
    result = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code == 1, result.output
    assert ScriptedJudge.requests  # it did start
    assert (tmp_path / "labels.jsonl").read_text() == old_labels  # it used to be emptied at the start
    assert (tmp_path / "labels.jsonl.errors.jsonl").read_text() == old_errors
    assert not list(tmp_path.glob(".*perm-tmp")), list(tmp_path.iterdir())  # its temporary files are gone


def test_overwrite_replaces_output_and_errors_when_the_run_finishes(tmp_path, server):
    (tmp_path / "labels.jsonl").write_text('{"id": "old"}\n')
    (tmp_path / "labels.jsonl.errors.jsonl").write_text('{"line": 9, "error": "old"}\n')
    result, rows = run_judge(tmp_path, server, "--overwrite", rows=GOOD_ROWS)
    assert result.exit_code == 0, result.output
    assert list(rows) == ["a", "b"]
    assert (tmp_path / "labels.jsonl.errors.jsonl").read_text() == ""  # this run had no bad records
    assert not list(tmp_path.glob(".*perm-tmp"))


def test_existing_errors_file_needs_overwrite(tmp_path, server):
    errors = tmp_path / "labels.jsonl.errors.jsonl"
    errors.write_text('{"line": 9, "error": "old"}\n')
    result, rows = run_judge(tmp_path, server, rows=GOOD_ROWS)
    assert result.exit_code == 2 and "--overwrite" in result.output, result.output
    assert errors.read_text() == '{"line": 9, "error": "old"}\n' and rows == {} and ScriptedJudge.requests == []


def test_no_bad_records_and_no_errors_file_means_none_is_created(tmp_path, server):
    result, rows = run_judge(tmp_path, server, rows=GOOD_ROWS)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "labels.jsonl.errors.jsonl").exists()


def test_cache_that_is_the_input_is_refused(tmp_path, server):
    source = write_input(tmp_path, GOOD_ROWS)
    before = source.read_bytes()
    args = judge_args(source, tmp_path / "labels.jsonl", server, "--cache", str(source))
    result = CliRunner().invoke(app, args, env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code == 2 and "is the input file" in result.output, result.output
    assert source.read_bytes() == before and ScriptedJudge.requests == []


def test_judge_on_error_stop_runs_on_the_shared_runner(tmp_path, server, monkeypatch):
    from perm_lite import runner
    from perm_lite.judge import run as judge_run

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["on_error"], kwargs["on_interrupt"]))
        return runner.run_chunks(*args, **kwargs)

    monkeypatch.setattr(judge_run, "run_chunks", spy)
    result, rows = run_judge(tmp_path, server, "--on-error", "stop")
    assert result.exit_code == 4, result.output
    assert seen == [("stop", "raise")]  # the chunk loop perm score uses; Ctrl-C does not re-ask a chunk
    assert list(rows) == ["ok", "limited"]
    errors = [json.loads(x) for x in (tmp_path / "labels.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3]


def test_judge_path_refuses_outputs_before_sending_anything(tmp_path, server):
    from perm_lite.judge.client import JudgeConfig
    from perm_lite.judge.run import judge_path
    from perm_lite.outputs import TargetError

    src = write_input(tmp_path, GOOD_ROWS)
    config = JudgeConfig(base_url=server, model="judge-x", timeout=0.5, max_retries=1)
    with pytest.raises(TargetError, match="input"):
        judge_path(config, src, src)
    out = tmp_path / "labels.jsonl"
    out.write_text("precious\n")
    with pytest.raises(TargetError, match="--overwrite"):
        judge_path(config, src, out)
    with pytest.raises(TargetError, match="answer cache"):
        judge_path(config, src, tmp_path / "new.jsonl", cache_path=tmp_path / "new.jsonl.errors.jsonl")
    assert ScriptedJudge.requests == [] and out.read_text() == "precious\n"
    summary, client = judge_path(config, src, out, overwrite=True)
    assert summary.records == len(GOOD_ROWS) and client.stats.calls >= 4 * len(GOOD_ROWS)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in GOOD_ROWS]


def test_judge_on_error_choice_is_validated_by_typer(tmp_path, server):
    result, rows = run_judge(tmp_path, server, "--on-error", "ignore")
    assert result.exit_code == 2 and "ignore" in result.output and rows == {}
