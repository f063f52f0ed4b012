"""An OpenAI-compatible chat-completions client for the judge: concurrency, retries, cache.

The API key is read from the environment variable named in `JudgeConfig.api_key_env` and
only ever placed in the Authorization header; it is not logged, echoed, cached or written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass, field

from perm_lite.judge.cache import AnswerCache, request_key

log = logging.getLogger("perm_lite.judge")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 60.0
    temperature: float = 0.3
    backoff: float = 0.5  # first retry delay (s); doubles each time, with jitter
    max_tokens: int = 300

    def endpoint(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


@dataclass
class CallStats:
    calls: int = 0  # HTTP requests sent (retries included)
    cached: int = 0
    retries: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)


class CallFailed(Exception):
    """A request that still failed after every retry (the message never holds the key)."""


class ChatClient:
    def __init__(self, config: JudgeConfig, cache: AnswerCache | None) -> None:
        import httpx

        self.config, self.cache = config, cache
        self.stats = CallStats()
        key = os.environ.get(config.api_key_env)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.AsyncClient(timeout=config.timeout, headers=headers)
        self._semaphore = asyncio.Semaphore(config.concurrency)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, messages: list[dict]) -> str:
        """The answer text for these messages (from the cache when it has them)."""
        key = request_key(self.config.model, messages, self.config.temperature)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cached += 1
                return hit[0]
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        answer, usage = await self._post_with_retries(body)
        if self.cache is not None:
            self.cache.put(key, answer, usage)
        return answer

    async def _post_with_retries(self, body: dict) -> tuple[str, dict]:
        import httpx

        last, hint = "no attempt", None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._delay(attempt, hint))
                hint = None
            async with self._semaphore:
                self.stats.calls += 1
                try:
                    response = await self._http.post(self.config.endpoint(), json=body)
                except httpx.TimeoutException:
                    last = f"timed out after {self.config.timeout:g} s"
                    self._count("timeout")
                    continue
                except httpx.TransportError as exc:
                    last = f"connection error ({type(exc).__name__})"
                    self._count("connection")
                    continue
            self._count(str(response.status_code))
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                hint = response.headers.get("retry-after")
                continue
            if response.status_code != 200:
                self.stats.failed += 1
                raise CallFailed(f"HTTP {response.status_code}: {response.text[:200]}")
            try:
                payload = response.json()
                answer = payload["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                self.stats.failed += 1
                raise CallFailed("the endpoint's reply is not a chat completion") from None
            usage = payload.get("usage") or {}
            self.stats.input_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.output_tokens += int(usage.get("completion_tokens") or 0)
            return answer if isinstance(answer, str) else "", usage
        self.stats.failed += 1
        raise CallFailed(f"{last}, after {self.config.max_retries} retries")

    def _delay(self, attempt: int, hint: str | None) -> float:
        """Retry-After when the server sends one (capped at 60 s), else jittered doubling."""
        if hint and hint.replace(".", "", 1).isdigit():
            return min(float(hint), 60.0)
        return self.config.backoff * 2 ** (attempt - 1) * (0.5 + random.random())

    def _count(self, what: str) -> None:
        self.stats.status_counts[what] = self.stats.status_counts.get(what, 0) + 1
