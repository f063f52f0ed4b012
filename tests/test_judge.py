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

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        perspective = next(p for marker, p in MARKERS.items() if marker in user)
        with self.lock:
            self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            key = (perspective, user)
            attempt = self.seen[key] = self.seen.get(key, 0) + 1
        if "RATE-LIMITED" in user and attempt == 1:
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if "FLAKY" in user and attempt == 1:
            return self._send(500, {"error": {"message": "boom"}})
        if "SLOW" in user:
            time.sleep(1.0)
        answer = "I think it is quite good overall!" if "GARBAGE" in user else ANSWERS[perspective]
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
def server():
    ScriptedJudge.requests, ScriptedJudge.seen = [], {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def write_input(tmp_path):
    rows = [
        {"id": "ok", "query": "I lost my job.", "response": "That is a real blow. How are you holding up?"},
        {"id": "limited", "query": "I am lonely.", "response": "RATE-LIMITED but kind reply"},
        {"id": "flaky", "query": "Exams.", "response": "FLAKY reply about exams"},
        {"id": "garbage", "query": "My cat died.", "response": "GARBAGE reply about the cat"},
        {"id": "slow", "query": "Hi.", "response": "SLOW reply"},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n{not json\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    )
    return path


def run_judge(tmp_path, server, *extra, env=None):
    out = tmp_path / "labels.jsonl"
    args = [
        "judge",
        str(write_input(tmp_path)),
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
    # only the timed-out calls (never answered, so never cached) are sent again
    assert new and all("SLOW" in r["body"]["messages"][-1]["content"] for r in new)
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
