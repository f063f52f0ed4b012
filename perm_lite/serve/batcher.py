"""Micro-batching for concurrent requests: one inference at a time, requests merged.

Requests wait in a bounded queue; a single worker takes whatever is waiting (up to
`max_batch` records, waiting at most `max_wait_ms` for more once it holds one request) and
scores it as one call in a worker thread. A full queue is refused at once (`QueueFull`)
rather than growing without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from perm_lite.records import Dialogue
from perm_lite.scorer import Result


class QueueFull(Exception):
    """The request queue is at capacity; the caller should retry later."""


@dataclass
class _Job:
    dialogues: Sequence[Dialogue]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    requests: int = 0
    records: int = 0
    batches: int = 0
    rejected: int = 0

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
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self._score, self.max_batch, self.max_wait = score, max_batch, max_wait_ms / 1000
        self.queue_size = queue_size
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self.stats = BatcherStats()

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        if self._queue is None or self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def submit(self, dialogues: Sequence[Dialogue]) -> list[Result]:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        job = _Job(dialogues, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise QueueFull(f"request queue full ({self.queue_size} requests waiting)") from None
        self.stats.requests += 1
        return await job.future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].dialogues)
            deadline = time.perf_counter() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    job = (
                        self._queue.get_nowait()
                        if remaining <= 0
                        else await asyncio.wait_for(self._queue.get(), remaining)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                jobs.append(job)
                size += len(job.dialogues)
            await self._execute(jobs)

    async def _execute(self, jobs: list[_Job]) -> None:
        assert self._queue is not None
        merged = [d for job in jobs for d in job.dialogues]
        try:
            results = await asyncio.to_thread(self._score, merged)
        except Exception as exc:  # every waiting request hears about it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            self.stats.batches += 1
            self.stats.records += len(merged)
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(results[start : start + len(job.dialogues)])
                start += len(job.dialogues)
        finally:
            for _ in jobs:
                self._queue.task_done()
