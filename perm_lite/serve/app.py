"""`perm serve`: the scorer and the guardrail over HTTP (FastAPI; the `serve` extra).

    POST /v1/score   {"records": [RECORD, ...]}                  -> per-record scores
    POST /v1/check   {"record": RECORD, "thresholds": {...}}     -> guardrail verdict
    POST /v1/explain {"record": RECORD, "context": false}        -> each sentence's contribution
    GET  /healthz    liveness, queue depth, batching counters (503 while shutting down)
    GET  /v1/model   the model's name, version, perspectives, scales and limits

RECORD is the same object `perm score` reads from JSONL. A request fails only on its own
records: invalid input (a missing field, a lone surrogate, a number JSON cannot carry,
nesting deeper than MAX_DEPTH) is a 4xx naming the record index and field, never a 500
and never a failure of the requests batched with it. Strict JSON: NaN and Infinity are
refused. POST bodies must be `application/json` (415 otherwise, so a cross-site form or
`text/plain` post is never scored). A body over the size limit is 413.

Work is bounded, not just requests: `queue_size` waiting requests, `max_queue_records`
records and `max_queue_chars` characters (request-body bytes, counted as they arrive,
until the answer) held by requests in progress; beyond any of these, 503 with
Retry-After. A body must arrive within `body_timeout` seconds (408 otherwise), so slow
uploads hold neither a slot nor budget for long. A client that disconnects has its work
dropped. On shutdown every accepted request is answered or refused with 503 within
`shutdown_timeout` seconds.

Explanations (/v1/explain, and the culprit of a flagged /v1/check) are bounded by what the
model reads (`perm_lite.explain`): only sentences and turns the model reads are measured,
at most `max_explain_variants` forward passes per request (/v1/explain: 413 when the
record needs more, counted before any variant is built; /v1/check: the culprit is sought
among the first sentences). Planning and building variants run in worker threads, a chunk
at a time, and the scoring goes through the shared queue, so other clients are served
in between.

Optional bearer-token auth (`auth_token`): every path but /healthz, /openapi.json and the
docs pages needs `Authorization: Bearer <token>`, else 401. /docs and /redoc (which load their JavaScript
from a CDN) are off unless `docs=True`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from perm_lite import __version__
from perm_lite.errors import OptionError
from perm_lite.explain import MAX_SENTENCES, Occlusion, assemble, occlusion, response_origin
from perm_lite.guardrail import Guardrail, culprit
from perm_lite.records import RecordError, parse_record
from perm_lite.scorer import Scorer
from perm_lite.serve.batcher import MicroBatcher, QueueFull, RecordsFailed, ShuttingDown

log = logging.getLogger("perm_lite.serve")

MAX_DEPTH = 64  # JSON nesting inside one record
RETRY = {"Retry-After": "1"}
OPEN_PATHS = ("/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # docs: 404 unless on


class HTTPProblem(Exception):
    def __init__(self, status: int, error: str, details: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.details, self.headers = status, error, details, dict(headers or {})


# -- strict JSON ---------------------------------------------------------------------------


class _Invalid:
    """Stands in for a JSON value Python cannot carry faithfully; reported with its place."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_int(text: str) -> int | _Invalid:
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits()
        return _Invalid(f"an integer of {len(text.lstrip('-'))} digits is too large")


def _parse_float(text: str) -> float | _Invalid:
    value = float(text)
    return value if math.isfinite(value) else _Invalid(f"the number {text[:20]} is out of range")


def _parse_constant(name: str) -> _Invalid:
    return _Invalid(f"{name} is not valid JSON")


_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]')


def _safe(text: Any) -> str:
    """Text fit for a JSON answer (lone surrogates escaped)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _problem(value: Any) -> str | None:
    """Why a parsed JSON value cannot be used (None if it can); iterative, any depth."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return "a lone surrogate (\\ud800-\\udfff) is not valid Unicode"
        elif isinstance(item, _Invalid):
            return item.reason
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                stack.extend((k, depth + 1) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None


def _locate_nesting(text: str, limit: int) -> tuple[list[Any], int]:
    """Where `text` first nests deeper than `limit`: the path of keys/indexes to there."""
    stack: list[list[Any]] = []  # [kind, key or index, expecting a key]
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        top = stack[-1] if stack else None
        if token[0] == '"':
            if top is not None and top[0] == "{" and top[2]:
                try:
                    top[1] = json.loads(token)
                except ValueError:
                    top[1] = token[1:-1]
        elif token in "{[":
            if top is not None and top[0] == "[" and top[1] is None:
                top[1] = 0
            stack.append([token, None, token == "{"])
            if len(stack) > limit:
                break
        elif token in "}]":
            if stack:
                stack.pop()
        elif token == "," and top is not None:
            if top[0] == "[":
                top[1] = (top[1] or 0) + 1
            else:
                top[2] = True
        elif token == ":" and top is not None:
            top[2] = False
    return [entry[1] if entry[1] is not None else 0 for entry in stack], len(stack)


def _nesting_problem(text: str) -> HTTPProblem:
    path, _ = _locate_nesting(text, MAX_DEPTH + 2)
    reason = f"nested deeper than {MAX_DEPTH} levels"
    if len(path) >= 3 and path[0] == "records" and isinstance(path[1], int):
        return HTTPProblem(422, "1 invalid record(s); nothing was scored", [_detail(path[1], path[2], reason)])
    if len(path) >= 2 and path[0] == "record":
        return HTTPProblem(422, "1 invalid record(s); nothing was scored", [_detail(0, path[1], reason)])
    where = ".".join(_safe(p) for p in path[:3] if p is not None)
    return HTTPProblem(400, f"body is not valid JSON: {reason} (at {where or 'the top level'})")


def _detail(index: int, field: Any, reason: str) -> dict:
    return {"index": index, "field": None if field is None else _safe(field), "error": _safe(reason)}


def _loads(body: bytes | bytearray) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPProblem(400, f"body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise _nesting_problem(text) from None
    except ValueError as exc:
        raise HTTPProblem(400, f"body is not valid JSON: {_safe(exc)}") from None


# -- reading a body within the budget ------------------------------------------------------


class _Budget:
    """Request-body bytes held by requests in progress (read, waiting or being scored)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0


class _Hold:
    def __init__(self, budget: _Budget) -> None:
        self.budget, self.amount = budget, 0

    def grow(self, n: int) -> bool:
        others = self.budget.used - self.amount
        if others > 0 and self.budget.used + n > self.budget.limit:
            return False
        self.budget.used += n
        self.amount += n
        return True

    def release(self) -> None:
        self.budget.used -= self.amount
        self.amount = 0


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _drain(request: Request, limit: int, timeout: float) -> None:
    """Read and discard what is left of a body we refuse (at most `limit` bytes, for at most
    `timeout` seconds), so the client reads our answer."""
    seen = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    return
    except (ClientDisconnect, RuntimeError, TimeoutError):
        return


async def _read_json(request: Request, limit: int, hold: _Hold, timeout: float) -> Any:
    """The JSON body: at most `limit` bytes, all of it within `timeout` seconds; the bytes
    are counted in the shared budget as they arrive (a declared length reserves nothing)."""
    if not _is_json(request.headers.get("content-type")):
        raise HTTPProblem(415, "send the body as JSON with the header Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"request body is {declared} bytes; the limit is {limit} (send fewer records)")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout) as reading:
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise HTTPProblem(413, f"request body exceeds the limit of {limit} bytes (send fewer records)")
                if not hold.grow(len(chunk)):
                    await _drain(request, limit, timeout)
                    raise HTTPProblem(
                        503, "server busy: the queue holds its limit of request characters; retry later", headers=RETRY
                    )
                body += chunk
    except ClientDisconnect:
        raise HTTPProblem(499, "client closed the connection while sending") from None
    except TimeoutError:
        if not reading.expired():
            raise
        raise HTTPProblem(408, f"the request body did not arrive within {timeout:g} s") from None
    return _loads(body)


# -- records -------------------------------------------------------------------------------


def _parse(records: Any, max_records: int) -> list:
    if not isinstance(records, list) or not records:
        raise HTTPProblem(422, "'records' must be a non-empty list of record objects")
    if len(records) > max_records:
        raise HTTPProblem(422, f"{len(records)} records in one request; the limit is {max_records}")
    dialogues, problems = [], []
    for i, record in enumerate(records):
        problem = _record_problem(record)
        if problem is not None:
            problems.append(_detail(i, *problem))
            continue
        try:
            # passthrough fields are never answered; dropping them frees their memory now
            dialogues.append(dataclasses.replace(parse_record(record), passthrough={}))
        except RecordError as exc:
            problems.append(_detail(i, exc.field, exc.reason))
    if problems:
        raise HTTPProblem(422, f"{len(problems)} invalid record(s); nothing was scored", problems)
    return dialogues


def _record_problem(record: Any) -> tuple[Any, str] | None:
    """(field, reason) for a record holding a value that cannot be used, else None."""
    if not isinstance(record, dict):
        problem = _problem(record)
        return None if problem is None else (None, problem)
    for key, value in record.items():
        problem = _problem(key)
        if problem is not None:
            return key, f"field name: {problem}"
        problem = _problem(value)
        if problem is not None:
            return key, problem
    return None


def _thresholds(value: Any, checks: tuple[str, ...]) -> dict[str, float]:
    def bad(reason: str) -> HTTPProblem:
        return HTTPProblem(422, f"thresholds: {reason}", [{"index": None, "field": "thresholds", "error": reason}])

    if isinstance(value, _Invalid):
        raise bad(value.reason)
    if not isinstance(value, dict):
        raise bad(f'expected an object like {{"reception": 2.5}}, got {type(value).__name__}')
    unknown = sorted(_safe(k) for k in value if k not in checks)
    if unknown:
        raise bad(f"unknown threshold {', '.join(unknown)}; choose from {', '.join(checks)}")
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            reason = number.reason if isinstance(number, _Invalid) else f"got {type(number).__name__}"
            raise bad(f"{name} must be a finite number ({reason})")
    return {k: float(v) for k, v in value.items()}


# -- auth ----------------------------------------------------------------------------------


class BearerAuth:
    """ASGI middleware: `Authorization: Bearer <token>` on every path but `open_paths`."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = OPEN_PATHS) -> None:
        if not token:
            raise OptionError("the auth token is empty")
        self.app, self._token, self.open_paths = app, token.encode("utf-8"), open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, key = value.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._token):
                response = JSONResponse(
                    {"error": "missing or wrong API key: send Authorization: Bearer <key>"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the app -------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (call once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(
    scorer: Scorer | None = None,
    *,
    thresholds: Mapping[str, float] | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    queue_size: int = 64,
    max_body_bytes: int = 1_000_000,
    max_records: int = 256,
    max_queue_records: int = 4096,
    max_queue_chars: int = 16_000_000,
    shutdown_timeout: float = 10.0,
    auth_token: str | None = None,
    docs: bool = False,
    body_timeout: float = 30.0,
    max_explain_variants: int | None = None,
) -> FastAPI:
    """The ASGI app. `thresholds`: the guardrail's defaults for /v1/check.

    `body_timeout`: seconds a request body may take to arrive (408 after). `max_explain_variants`:
    forward passes per /v1/explain or flagged /v1/check (the full reply included; default
    65, the library's 64 sentences and the full reply, or `max_records` when lower).

    `app.state.begin_shutdown()` starts the graceful shutdown (perm serve calls it on
    SIGTERM): new requests get 503 and everything in progress is answered or refused
    within `shutdown_timeout` seconds."""
    if max_queue_records < max_records:
        raise OptionError(f"max_queue_records ({max_queue_records}) must be at least max_records ({max_records})")
    if max_queue_chars < max_body_bytes:
        raise OptionError(f"max_queue_chars ({max_queue_chars}) must be at least the body limit ({max_body_bytes})")
    if shutdown_timeout < 0:
        raise OptionError("shutdown_timeout must be >= 0")
    if not (isinstance(body_timeout, int | float) and math.isfinite(body_timeout) and body_timeout > 0):
        raise OptionError(f"body_timeout must be a number of seconds above 0, not {body_timeout!r}")
    explain_budget = min(max_records, 1 + MAX_SENTENCES) if max_explain_variants is None else max_explain_variants
    if isinstance(explain_budget, bool) or not isinstance(explain_budget, int) or explain_budget < 2:
        raise OptionError(f"max_explain_variants must be a whole number of at least 2, not {explain_budget!r}")
    scorer = scorer or Scorer()
    default_guard = Guardrail(thresholds, scorer) if thresholds else None
    batcher = MicroBatcher(
        scorer.score_dialogues,
        max_batch,
        max_wait_ms,
        queue_size,
        max_queue_records=max_queue_records,
        max_queue_chars=max_queue_chars,
    )
    budget = _Budget(max_queue_chars)
    state: dict[str, Any] = {"shutting_down": False, "deadline": None}
    timeouts: set = set()  # asyncio.timeout() of every request in progress

    def begin_shutdown() -> None:
        if state["shutting_down"]:
            return
        state["shutting_down"] = True
        loop = asyncio.get_running_loop()
        state["deadline"] = loop.time() + shutdown_timeout
        batcher.begin_shutdown(time.perf_counter() + shutdown_timeout)
        for timeout in timeouts:
            timeout.reschedule(state["deadline"])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        begin_shutdown()
        await batcher.stop(timeout=max(0.0, state["deadline"] - asyncio.get_running_loop().time()))

    app = FastAPI(
        title="perm-lite",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.batcher = batcher
    app.state.begin_shutdown = begin_shutdown
    if auth_token is not None:
        app.add_middleware(BearerAuth, token=auth_token)

    @app.exception_handler(HTTPProblem)
    async def problem(_: Request, exc: HTTPProblem) -> JSONResponse:
        content = {"error": exc.error}
        if exc.details is not None:
            content["details"] = exc.details
        return JSONResponse(content, status_code=exc.status, headers=exc.headers)

    async def guarded(request: Request, handle) -> Any:
        """Run a POST handler holding its body budget, bounded by the shutdown deadline."""
        hold = _Hold(budget)
        try:
            async with asyncio.timeout_at(state["deadline"]) as timeout:  # no deadline until shutdown
                timeouts.add(timeout)
                if state["shutting_down"]:
                    await _drain(request, max_body_bytes, body_timeout)  # so the client reads the 503, not a reset
                    raise HTTPProblem(503, "server is shutting down", headers=RETRY)
                return await handle(hold)
        except TimeoutError:
            if not timeout.expired():
                raise
            raise HTTPProblem(503, "server is shutting down; the request was not scored", headers=RETRY) from None
        finally:
            timeouts.discard(timeout)
            hold.release()

    async def run(request: Request, dialogues: list) -> list:
        if state["shutting_down"]:
            raise HTTPProblem(503, "server is shutting down", headers=RETRY)
        try:
            future = batcher.submit_nowait(dialogues)
        except QueueFull as exc:
            raise HTTPProblem(503, f"{exc}; retry later", headers=RETRY) from None
        except ShuttingDown as exc:
            raise HTTPProblem(503, str(exc), headers=RETRY) from None
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((future, gone), return_when=asyncio.FIRST_COMPLETED)
            if not future.done() and gone.exception() is not None:  # no disconnect news from this server
                await asyncio.wait((future,))
        finally:
            gone.cancel()
            future.cancel()  # no-op once answered: drops the work of a client that left
        if future.cancelled():
            raise HTTPProblem(499, "client closed the connection before the request was scored")
        exc = future.exception()
        if exc is None:
            return future.result()
        if isinstance(exc, ShuttingDown):
            raise HTTPProblem(503, str(exc), headers=RETRY)
        if isinstance(exc, RecordsFailed):
            details = [_detail(i, None, f"could not be scored: {reason}") for i, reason in exc.failures]
            raise HTTPProblem(422, f"{len(details)} record(s) could not be scored; nothing was returned", details)
        log.error("scoring failed", exc_info=exc)
        raise HTTPProblem(500, f"scoring failed ({type(exc).__name__}); the request was not scored")

    async def measure(request: Request, occ: Occlusion) -> list:
        """The results of `occ`'s variants: built in a worker thread a chunk at a time, each
        chunk scored through the queue before the next is built."""
        results: list = []
        step = min(max_batch, max_records)
        for start in range(0, len(occ), step):
            variants = await asyncio.to_thread(occ.variants, start, start + step)
            results.extend(await run(request, variants))
            del variants
        return results

    async def read_object(request: Request, hold: _Hold, key: str, shape: str) -> dict:
        """The request's JSON body, which must be an object holding `key`."""
        body = await _read_json(request, max_body_bytes, hold, body_timeout)
        if not isinstance(body, dict) or key not in body:
            raise HTTPProblem(422, f"body must be an object {shape}")
        return body

    @app.post("/v1/score")
    async def score(request: Request) -> dict:
        async def handle(hold: _Hold) -> dict:
            body = await read_object(request, hold, "records", '{"records": [...]}')
            dialogues = _parse(body["records"], max_records)
            del body
            results = await run(request, dialogues)
            return {
                "model": scorer.config.name,
                "version": scorer.config.version,
                "results": [
                    {"id": r.id, "scores": r.scores, "combined": r.combined, "truncated": r.truncated} for r in results
                ],
            }

        return await guarded(request, handle)

    @app.post("/v1/check")
    async def check(request: Request) -> dict:
        started = time.perf_counter()

        async def handle(hold: _Hold) -> dict:
            body = await read_object(request, hold, "record", '{"record": {...}, "thresholds": {...}}')
            guard = default_guard
            if body.get("thresholds") is not None:
                try:
                    guard = Guardrail(_thresholds(body["thresholds"], scorer.heads.checks), scorer)
                except (ValueError, TypeError) as exc:
                    raise HTTPProblem(422, f"thresholds: {_safe(exc)}") from None
            if guard is None:
                raise HTTPProblem(422, "no thresholds: send 'thresholds' or start perm serve with --threshold")
            record = body["record"]
            (dialogue,) = _parse([record], 1)
            origin = response_origin(record, dialogue)
            del body, record
            (result,) = await run(request, [dialogue])
            verdict = guard.verdict(result, dialogue.response, (time.perf_counter() - started) * 1000)
            if verdict.flagged:  # name the sentence that hurt most, among the first the budget allows
                occ = await asyncio.to_thread(
                    occlusion, scorer, dialogue, origin=origin, max_sentences=explain_budget - 1
                )
                explanation = assemble(occ, result, await measure(request, occ))
                verdict.culprit = culprit(explanation, verdict.failed[0])
            return verdict.to_dict()

        return await guarded(request, handle)

    @app.post("/v1/explain")
    async def explain(request: Request) -> dict:
        async def handle(hold: _Hold) -> dict:
            body = await read_object(request, hold, "record", '{"record": {...}, "context": false}')
            context = body.get("context", False)
            if not isinstance(context, bool):
                raise HTTPProblem(422, "context must be true or false")
            record = body["record"]
            (dialogue,) = _parse([record], 1)
            origin = response_origin(record, dialogue)
            del body, record
            cap = explain_budget - 1  # the full reply is one forward pass
            occ = await asyncio.to_thread(
                occlusion, scorer, dialogue, context=context, origin=origin, max_sentences=cap, max_turns=cap
            )
            needed = len(occ) + occ.omitted.sentences_over_cap + occ.omitted.turns_over_cap
            if needed > cap:  # refused before any variant is built
                raise HTTPProblem(
                    413, f"the model reads {needed} sentences/turns of this record; at most {cap} per request"
                )
            (full,) = await run(request, [dialogue])
            explanation = assemble(occ, full, await measure(request, occ))
            return {"model": scorer.config.name, "version": scorer.config.version, **explanation.to_dict()}

        return await guarded(request, handle)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status = 503 if state["shutting_down"] else 200
        content = {
            "status": "shutting down" if status == 503 else "ok",
            "queue_depth": batcher.depth,
            "queue_size": batcher.queue_size,
            "pending": {**batcher.pending, "body_bytes": budget.used},
            "batching": batcher.stats.to_dict(),
        }
        return JSONResponse(content, status_code=status)

    @app.get("/v1/model")
    async def model() -> dict:
        c = scorer.config
        return {
            "name": c.name,
            "version": c.version,
            "perspectives": list(scorer.heads.names),
            "scales": {p: list(r) for p, r in scorer.heads.scales.items()},
            "reward": scorer.reward.to_dict(),
            "max_length": c.max_length,
            "provider": scorer.provider,
            "variant": scorer.variant,
            "limits": {
                "max_records": max_records,
                "max_body_bytes": max_body_bytes,
                "queue_size": queue_size,
                "max_queue_records": max_queue_records,
                "max_queue_chars": max_queue_chars,
                "shutdown_timeout": shutdown_timeout,
                "body_timeout": body_timeout,
                "max_explain_variants": explain_budget,
            },
            "auth": auth_token is not None,
            "default_thresholds": dict(default_guard.thresholds) if default_guard else None,
        }

    return app
