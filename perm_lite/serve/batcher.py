"""Micro-batching for concurrent requests: one inference at a time, requests merged.

Requests wait in a bounded queue; a single worker scores what is waiting in slices of at
most `max_batch` records and `max_batch_chars` characters, one slice at a time in a worker
thread, waiting at most `max_wait_ms` for more requests to merge once it holds one. A large
request is scored over several slices, so a request that is cancelled (its client went
away) or refused at shutdown stops costing work after the current slice, and a cancelled
request still waiting is dropped without being scored.

Bounds, each refused at once with `QueueFull` rather than growing: `queue_size` requests
waiting, and `max_queue_records` records / `max_queue_chars` characters of text accepted
and not yet answered (waiting or being scored). A request is always accepted when nothing
else is pending, so one within the per-request limits is never refused for its size alone.

One request's failure is its own: when a slice fails, each request in it is scored alone
and, if that fails, record by record. A record whose scoring raises an input error
(ValueError, TypeError, ...) fails its request with `RecordsFailed` naming the records;
any other error fails only the request that holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from perm_lite.errors import OptionError, PermError
from perm_lite.records import Dialogue
from perm_lite.scorer import Result

# Exceptions raised while scoring one record that mean "this input", not "this server".
INPUT_ERRORS = (ValueError, TypeError, RecursionError, OverflowError)


class QueueFull(PermError):
    """The queue is at capacity (requests, records or characters); retry later."""


class ShuttingDown(PermError):
    """The server is stopping; the request was not (fully) scored."""


class RecordsFailed(PermError):
    """Some records of one request could not be scored: `failures` = [(index, reason)]."""

    def __init__(self, failures: list[tuple[int, str]]) -> None:
        super().__init__(f"{len(failures)} record(s) could not be scored")
        self.failures = failures


def dialogue_chars(d: Dialogue) -> int:
    """Characters of text the scorer reads from one dialogue."""
    return (
        len(d.response) + len(d.analysis) + len(d.persona) + len(d.scenario) + len(d.query)
        + sum(len(t.text) for t in d.history)
    )  # fmt: skip


@dataclass(eq=False)
class _Job:
    dialogues: Sequence[Dialogue]
    future: asyncio.Future
    records: int
    chars: int
    results: list = field(default_factory=list)
    failures: list = field(default_factory=list)


@dataclass
class BatcherStats:
    requests: int = 0
    records: int = 0
    batches: int = 0
    rejected: int = 0
    dropped: int = 0  # cancelled (client gone) before being fully scored
    refused_at_shutdown: int = 0
    failed: int = 0

    def to_dict(self) -> dict:
        return {**self.__dict__, "records_per_batch": round(self.records / self.batches, 2) if self.batches else 0}


class MicroBatcher:
    """Merges concurrent score requests into batched calls of `score`."""

    def __init__(
        self,
        score: Callable[[list[Dialogue]], list[Result]],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        *,
        max_queue_records: int | None = None,
        max_queue_chars: int | None = None,
        max_batch_chars: int = 262_144,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or max_batch_chars < 1:
            raise OptionError("max_batch, queue_size and max_batch_chars must be >= 1 and max_wait_ms >= 0")
        for name, value in (("max_queue_records", max_queue_records), ("max_queue_chars", max_queue_chars)):
            if value is not None and value < 1:
                raise OptionError(f"{name} must be >= 1")
        self._score, self.max_batch, self.max_wait = score, max_batch, max_wait_ms / 1000
        self.queue_size = queue_size
        self.max_queue_records, self.max_queue_chars = max_queue_records, max_queue_chars
        self.max_batch_chars = max_batch_chars
        self.stats = BatcherStats()
        self._waiting: deque[_Job] = deque()  # submitted, not yet taken by the worker
        self._jobs: set[_Job] = set()  # every job not yet answered
        self._records = self._chars = 0  # held by the jobs in self._jobs
        self._durations: deque[float] = deque(maxlen=8)  # recent slice times, for the shutdown plan
        self._closing = False
        self._deadline = math.inf
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._wakeup, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._worker = asyncio.create_task(self._run())

    @property
    def depth(self) -> int:
        """Requests waiting for the worker."""
        return sum(1 for job in self._waiting if not job.future.done())

    @property
    def pending(self) -> dict:
        return {"requests": len(self._jobs), "records": self._records, "chars": self._chars}

    # -- submitting ----------------------------------------------------------------------

    def submit_nowait(self, dialogues: Sequence[Dialogue]) -> asyncio.Future:
        """Queue a request; its future resolves to the results (cancel it to drop the work).

        Raises QueueFull or ShuttingDown at once."""
        if self._worker is None or self._wakeup is None or self._idle is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        if self._closing:
            raise ShuttingDown("server is shutting down; the request was not scored")
        records, chars = len(dialogues), sum(dialogue_chars(d) for d in dialogues)
        waiting = self.depth
        full = None
        if waiting >= self.queue_size:
            full = f"request queue full ({waiting} requests waiting)"
        elif self._jobs and self.max_queue_records is not None and self._records + records > self.max_queue_records:
            full = f"queue full ({self._records} records pending, limit {self.max_queue_records})"
        elif self._jobs and self.max_queue_chars is not None and self._chars + chars > self.max_queue_chars:
            full = f"queue full ({self._chars} characters pending, limit {self.max_queue_chars})"
        if full:
            self.stats.rejected += 1
            raise QueueFull(full)
        job = _Job(list(dialogues), asyncio.get_running_loop().create_future(), records, chars)
        self._jobs.add(job)
        self._records += records
        self._chars += chars
        self._idle.clear()
        job.future.add_done_callback(lambda _: self._finished(job))
        self.stats.requests += 1
        self._waiting.append(job)
        self._wakeup.set()
        return job.future

    async def submit(self, dialogues: Sequence[Dialogue]) -> list[Result]:
        if not dialogues:
            return []
        future = self.submit_nowait(dialogues)
        try:
            return await future
        finally:
            future.cancel()  # no-op once answered; drops the work if this caller was cancelled

    def _finished(self, job: _Job) -> None:
        self._jobs.discard(job)
        self._records -= job.records
        self._chars -= job.chars
        job.dialogues = ()  # a cancelled job still queued holds no text
        if job.future.cancelled():
            self.stats.dropped += 1
        elif isinstance(job.future.exception(), ShuttingDown):
            self.stats.refused_at_shutdown += 1
        elif job.future.exception() is not None:
            self.stats.failed += 1
        if not self._jobs and self._idle is not None:
            self._idle.set()

    # -- stopping ------------------------------------------------------------------------

    def begin_shutdown(self, deadline: float) -> None:
        """Refuse new requests; score what is pending while a slice still fits before
        `deadline` (time.perf_counter()); refuse the rest, at the latest at the deadline."""
        self._closing = True
        if deadline >= self._deadline:
            return
        self._deadline = deadline
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if math.isfinite(deadline):
            loop = asyncio.get_running_loop()
            self._deadline_timer = loop.call_later(max(0.0, deadline - time.perf_counter()), self._refuse_all)
        if self._wakeup is not None:
            self._wakeup.set()

    def _refuse_all(self) -> None:
        for job in list(self._jobs):
            if not job.future.done():
                job.future.set_exception(ShuttingDown("server is shutting down; the request was not scored"))
        self._waiting.clear()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; answer what is pending within `timeout` s (None: all of it),
        refuse the rest with ShuttingDown, then stop the worker."""
        if self._worker is None or self._idle is None:
            return
        self.begin_shutdown(math.inf if timeout is None else time.perf_counter() + timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), None if timeout is None else timeout + 1)
        self._refuse_all()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker

    # -- the worker ----------------------------------------------------------------------

    async def _take(self, timeout: float | None) -> _Job | None:
        """The next live waiting job, waiting up to `timeout` s (None: until one comes)."""
        assert self._wakeup is not None
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            while self._waiting:
                job = self._waiting.popleft()
                if not job.future.done():
                    return job
            remaining = None if deadline is None else deadline - time.perf_counter()
            if remaining is not None and remaining <= 0:
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return None

    def _fits_before_deadline(self) -> bool:
        if not self._closing or not math.isfinite(self._deadline):
            return True
        return time.perf_counter() + max(self._durations, default=0.0) < self._deadline

    async def _run(self) -> None:
        active: list[_Job] = []  # taken from the queue, records left to score
        while True:
            active = [job for job in active if not job.future.done()]
            if not active:
                job = await self._take(None)
                if job is None:
                    continue
                active.append(job)
            if not self._fits_before_deadline():
                self._refuse_all()
                active.clear()
                continue
            parts = self._fill(active)
            wait_until = time.perf_counter() + self.max_wait
            while self._room(parts):
                job = await self._take(max(0.0, wait_until - time.perf_counter()))
                if job is None:
                    break
                active.append(job)
                parts = self._fill(active)
            parts = [(job, a, b) for job, a, b in parts if not job.future.done()]  # client gone meanwhile
            if parts:
                await self._execute(parts)

    def _room(self, parts: list[tuple[_Job, int, int]]) -> bool:
        records = sum(b - a for _, a, b in parts)
        chars = sum(dialogue_chars(d) for job, a, b in parts for d in job.dialogues[a:b])
        return records < self.max_batch and chars < self.max_batch_chars

    def _fill(self, active: list[_Job]) -> list[tuple[_Job, int, int]]:
        """The next slice: (job, start, end) ranges from the active jobs, in order."""
        parts, records, chars = [], 0, 0
        for job in active:
            if job.future.done():
                continue
            start = end = len(job.results)
            while end < len(job.dialogues) and records < self.max_batch:
                size = dialogue_chars(job.dialogues[end])
                if records and chars + size > self.max_batch_chars:
                    break
                records, chars, end = records + 1, chars + size, end + 1
            if end > start:
                parts.append((job, start, end))
            if end < len(job.dialogues):
                break  # the slice is full; keep request order
        return parts

    async def _call(self, dialogues: list[Dialogue]) -> list[Result]:
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self._score, dialogues)
        finally:
            self._durations.append(time.perf_counter() - started)
        if len(results) != len(dialogues):
            raise RuntimeError(f"the scorer returned {len(results)} results for {len(dialogues)} records")
        return results

    async def _execute(self, parts: list[tuple[_Job, int, int]]) -> None:
        merged = [d for job, a, b in parts for d in job.dialogues[a:b]]
        try:
            results = await self._call(merged)
        except Exception:
            await self._isolate(parts)
            return
        self.stats.batches += 1
        self.stats.records += len(merged)
        offset = 0
        for job, a, b in parts:
            self._deliver(job, results[offset : offset + b - a])
            offset += b - a

    def _deliver(self, job: _Job, results: list[Result]) -> None:
        if job.future.done():
            return
        job.results.extend(results)
        if len(job.results) == len(job.dialogues):
            job.future.set_result(job.results)

    async def _isolate(self, parts: list[tuple[_Job, int, int]]) -> None:
        """A slice failed: score each request alone, then a failing one record by record."""
        for job, a, b in parts:
            if job.future.done():
                continue
            if len(parts) > 1:
                try:
                    self._deliver(job, await self._call(list(job.dialogues[a:b])))
                    continue
                except Exception:
                    pass
            results, failures, fatal = [], [], None
            for i in range(a, b):
                if job.future.done():
                    break
                try:
                    results.extend(await self._call([job.dialogues[i]]))
                except INPUT_ERRORS as exc:
                    failures.append((i, f"{type(exc).__name__}: {exc}"))
                except Exception as exc:
                    fatal = fatal or exc
            if job.future.done():
                continue
            if fatal is not None:
                job.future.set_exception(fatal)
            elif failures:
                job.future.set_exception(RecordsFailed(failures))
            else:  # flaky: every record passed alone
                self._deliver(job, results)
