"""`perm serve`: the scorer and the guardrail over HTTP (FastAPI; the `serve` extra).

    POST /v1/score   {"records": [RECORD, ...]}                  -> per-record scores
    POST /v1/check   {"record": RECORD, "thresholds": {...}}     -> guardrail verdict
    GET  /healthz    liveness, queue depth, batching counters (503 while shutting down)
    GET  /v1/model   the model's name, version, perspectives, scales and limits

RECORD is the same object `perm score` reads from JSONL. Invalid input is a 4xx naming the
record index and field; a body over the size limit is 413; a full request queue is 503
with Retry-After. Concurrent requests are merged into batches (see batcher.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from perm_lite.guardrail import Guardrail
from perm_lite.records import RecordError, parse_record
from perm_lite.scales import PERSPECTIVES, SCALES
from perm_lite.scorer import Scorer
from perm_lite.serve.batcher import MicroBatcher, QueueFull


class HTTPProblem(Exception):
    def __init__(self, status: int, error: str, details: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.details, self.headers = status, error, details, dict(headers or {})


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"request body is {declared} bytes; the limit is {limit} (send fewer records)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPProblem(413, f"request body exceeds the limit of {limit} bytes (send fewer records)")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPProblem(400, f"body is not valid JSON: {exc}") from None


def _parse(records: Any, max_records: int) -> list:
    if not isinstance(records, list) or not records:
        raise HTTPProblem(422, "'records' must be a non-empty list of record objects")
    if len(records) > max_records:
        raise HTTPProblem(422, f"{len(records)} records in one request; the limit is {max_records}")
    dialogues, problems = [], []
    for i, record in enumerate(records):
        try:
            dialogues.append(parse_record(record))
        except RecordError as exc:
            problems.append({"index": i, "field": exc.field, "error": exc.reason})
    if problems:
        raise HTTPProblem(422, f"{len(problems)} invalid record(s); nothing was scored", problems)
    return dialogues


def create_app(
    scorer: Scorer | None = None,
    *,
    thresholds: Mapping[str, float] | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    queue_size: int = 64,
    max_body_bytes: int = 1_000_000,
    max_records: int = 256,
) -> FastAPI:
    """The ASGI app. `thresholds`: the guardrail's defaults for /v1/check."""
    scorer = scorer or Scorer()
    default_guard = Guardrail(thresholds, scorer) if thresholds else None
    batcher = MicroBatcher(scorer.score_dialogues, max_batch, max_wait_ms, queue_size)
    state = {"shutting_down": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        state["shutting_down"] = True
        await batcher.stop()  # every accepted request is answered before exit

    app = FastAPI(title="perm-lite", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(HTTPProblem)
    async def problem(_: Request, exc: HTTPProblem) -> JSONResponse:
        content = {"error": exc.error}
        if exc.details is not None:
            content["details"] = exc.details
        return JSONResponse(content, status_code=exc.status, headers=exc.headers)

    async def run(dialogues: list) -> list:
        if state["shutting_down"]:
            raise HTTPProblem(503, "server is shutting down", headers={"Retry-After": "1"})
        try:
            return await batcher.submit(dialogues)
        except QueueFull as exc:
            raise HTTPProblem(503, f"{exc}; retry later", headers={"Retry-After": "1"}) from None

    @app.post("/v1/score")
    async def score(request: Request) -> dict:
        body = await _read_json(request, max_body_bytes)
        if not isinstance(body, dict) or "records" not in body:
            raise HTTPProblem(422, 'body must be an object {"records": [...]}')
        results = await run(_parse(body["records"], max_records))
        return {
            "model": scorer.config.name,
            "version": scorer.config.version,
            "results": [
                {"id": r.id, "scores": r.scores, "combined": r.combined, "truncated": r.truncated} for r in results
            ],
        }

    @app.post("/v1/check")
    async def check(request: Request) -> dict:
        started = time.perf_counter()
        body = await _read_json(request, max_body_bytes)
        if not isinstance(body, dict) or "record" not in body:
            raise HTTPProblem(422, 'body must be an object {"record": {...}, "thresholds": {...}}')
        guard = default_guard
        if body.get("thresholds") is not None:
            try:
                guard = Guardrail(body["thresholds"], scorer)
            except (ValueError, TypeError) as exc:
                raise HTTPProblem(422, f"thresholds: {exc}") from None
        if guard is None:
            raise HTTPProblem(422, "no thresholds: send 'thresholds' or start perm serve with --threshold")
        (dialogue,) = _parse([body["record"]], 1)
        (result,) = await run([dialogue])
        return guard.verdict(result, dialogue.response, (time.perf_counter() - started) * 1000).to_dict()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status = 503 if state["shutting_down"] else 200
        content = {
            "status": "shutting down" if status == 503 else "ok",
            "queue_depth": batcher.depth,
            "queue_size": batcher.queue_size,
            "batching": batcher.stats.to_dict(),
        }
        return JSONResponse(content, status_code=status)

    @app.get("/v1/model")
    async def model() -> dict:
        c = scorer.config
        return {
            "name": c.name,
            "version": c.version,
            "perspectives": list(PERSPECTIVES),
            "scales": {p: list(SCALES[p]) for p in PERSPECTIVES},
            "max_length": c.max_length,
            "provider": scorer.provider,
            "variant": scorer.variant,
            "limits": {"max_records": max_records, "max_body_bytes": max_body_bytes, "queue_size": queue_size},
            "default_thresholds": dict(default_guard.thresholds) if default_guard else None,
        }

    return app
