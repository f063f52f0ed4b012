"""An OpenAI-compatible chat-completions client for the judge: concurrency, retries, cache.

The API key is read from the environment variable named in `JudgeConfig.api_key_env` and
only ever placed in the Authorization header; it is not logged, echoed, cached or written.
Error text that came from the endpoint is scrubbed of the key and of anything header- or
key-like before it is stored, since an endpoint may echo what it was sent. The key is never
sent over plain http to a host other than this machine unless `allow_insecure_http` is set.

Every request is bounded: `timeout` is its whole deadline (connecting, sending, and reading
the reply), and at most `max_answer_bytes` of a reply are read. A 401 or 403 stops every
call at once (`AuthFailed`), and so does an endpoint no connection ever opens to
(`EndpointUnreachable`): retrying them for every record only repeats the failure. Until the
endpoint has answered once, requests go one at a time, so an unreachable one costs one
call's retries, not every record's.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from perm_lite.errors import PermError
from perm_lite.judge.cache import AnswerCache, public_endpoint, request_key
from perm_lite.rubric import JUDGE_TEMPERATURE

log = logging.getLogger("perm_lite.judge")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
AUTH_STATUS = {401: "unauthorized", 403: "forbidden"}
REDACTED = "[redacted]"
ERROR_TEXT_LIMIT = 200  # characters of an endpoint's error body kept in a stored error
MAX_ANSWER_BYTES = 1 << 20  # a reply body larger than this is not read (a judge's answer is a few KB)


@dataclass
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 60.0
    temperature: float = JUDGE_TEMPERATURE
    backoff: float = 0.5  # first retry delay (s); doubles each time, with jitter
    max_tokens: int = 300
    allow_insecure_http: bool = False  # send the key over plain http to a non-loopback host
    max_answer_bytes: int = MAX_ANSWER_BYTES  # most bytes of one reply read; more is a failed call

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


class CallFailed(PermError):
    """A request that still failed after every retry (the message never holds the key)."""


class RunStopped(CallFailed):
    """A failure no other call can escape: the whole run stops, nothing more is sent."""


class AuthFailed(RunStopped):
    """The endpoint refused the credentials (401/403): the whole run stops."""


class EndpointUnreachable(RunStopped):
    """No connection to the endpoint opened in any attempt of a call: the whole run stops."""


class InsecureEndpoint(PermError, ValueError):
    """A base URL the key must not be sent to (plain http to another host, or not http at all)."""


# -- scrubbing ------------------------------------------------------------------------------

_SECRET_NAMES = (
    r"authorization|proxy-authorization|api[-_]?key|apikey|access[-_]?token|refresh[-_]?token|"
    r"id[-_]?token|token|secret|client[-_]?secret|password|passwd|pwd|cookie|set-cookie|"
    r"credentials?|session[-_]?id|signature|sig|key"
)
# `name: value`, `"name": "value"`, `name=value`: the value goes, the name stays.
_KEY_VALUE = re.compile(
    rf"""(?ix)
    (?P<name>["']?\b[\w.-]*?(?:{_SECRET_NAMES})\b["']?)
    (?P<sep>\s*[:=]\s*["']?)
    (?:(?:bearer|basic|token|digest|apikey)\s+)?
    (?:\[redacted\]|[^\s"',;&}}\])]+)
    """
)
_SCHEME_TOKEN = re.compile(r"(?i)\b(bearer|basic|digest)(\s+)[A-Za-z0-9._~+/=\-]{4,}")
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|ak|key)-[A-Za-z0-9_\-]{6,}")  # sk-..., sk-proj-..., sk-ant-...
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]*)?")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=]{40,}")  # hex or base64 keys


def _secret_forms(secrets: Iterable[str]) -> list[str]:
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= 4:
            forms.update({secret, quote(secret, safe=""), json.dumps(secret)[1:-1]})
    return sorted(forms, key=len, reverse=True)


@functools.lru_cache(maxsize=8)
def _encoded_pattern(secret: str) -> re.Pattern:
    """The secret with any of its characters percent-encoded (either case, once or twice),
    or a space as `+`: however a URL or form encoder wrote it."""
    parts = []
    for char in secret:
        encoded = "".join(f"%(?:25)?{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))
        alternatives = [re.escape(char), f"(?i:{encoded})"] + (["\\+"] if char == " " else [])
        parts.append(f"(?:{'|'.join(alternatives)})")
    return re.compile("".join(parts))


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """Only the exact secret strings (and their URL/JSON-escaped forms) replaced: for answer
    text, which must otherwise stay as the judge wrote it."""
    for form in _secret_forms(secrets):
        text = text.replace(form, REDACTED)
    if "%" in text or "+" in text:
        for secret in secrets:
            if secret and len(secret) >= 4:
                text = _encoded_pattern(secret).sub(REDACTED, text)
    return text


def scrub(text: str, secrets: Iterable[str] = (), limit: int | None = ERROR_TEXT_LIMIT) -> str:
    """Error text safe to store and print: one line, without the key, header values,
    `name: value` pairs whose name looks secret, `sk-...` keys or long opaque tokens."""
    text = redact_secrets(str(text), secrets)
    text = _KEY_VALUE.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)
    text = _SCHEME_TOKEN.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    text = _KEY_LIKE.sub(REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    text = _LONG_TOKEN.sub(REDACTED, text)
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return redact_secrets(text, secrets)


# -- where the key may go ---------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(base_url: str, sends_key: bool, allow_insecure_http: bool = False) -> None:
    """Raise `InsecureEndpoint` for a base URL that is not http(s), or plain http to another
    machine while an API key would be sent (unless explicitly allowed)."""
    try:
        parts = urlsplit(base_url)
        host = parts.hostname or ""
    except ValueError:
        raise InsecureEndpoint(f"--base-url {base_url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InsecureEndpoint(f"--base-url must be an http:// or https:// URL with a host, not {base_url!r}")
    if parts.scheme == "http" and sends_key and not allow_insecure_http and not _is_loopback(host):
        raise InsecureEndpoint(
            f"refusing to send the API key over plain http to {host}: use https, a loopback address, "
            "or pass --allow-insecure-http if this network is trusted"
        )


def _usage_counts(payload: dict) -> dict[str, int]:
    """The token counts of a reply's `usage`; ValueError when they are not numbers."""
    usage = payload.get("usage")
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        raise ValueError("usage is not an object")
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"usage.{name} is not a count")
        counts[name] = int(value)
    return counts


@dataclass
class _Reply:
    """One request's outcome: the status, headers and (at most the cap of) the body."""

    status: int
    headers: Any
    body: bytes
    cut: bool = False  # the body was longer than the cap; only its start was read

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class _NoConnection(Exception):
    """This attempt never got a usable connection (refused, unresolvable, or nothing before the deadline)."""


class ChatClient:
    def __init__(self, config: JudgeConfig, cache: AnswerCache | None) -> None:
        import httpx

        key = os.environ.get(config.api_key_env)
        check_endpoint(config.base_url, bool(key), config.allow_insecure_http)
        self.config, self.cache = config, cache
        self.stats = CallStats()
        self._secrets = [key] if key else []
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.AsyncClient(timeout=config.timeout, headers=headers, follow_redirects=False)
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._refused: RunStopped | None = None
        self._reached = False  # a connection to the endpoint has opened (until one fails to)
        self._probe = asyncio.Lock()  # while not reached: one call (with its retries) at a time

    async def aclose(self) -> None:
        await self._http.aclose()

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    async def complete(self, messages: list[dict], accept: Callable[[str], bool] | None = None) -> str:
        """The answer text for these messages (from the cache when it has a usable one).

        Only answers `accept` approves (default: non-empty ones) are cached, so an answer
        that could not be used is asked for again next time rather than replayed.
        """
        usable = accept or (lambda text: bool(text.strip()))
        key = request_key(
            self.config.endpoint(), self.config.model, messages, self.config.temperature, self.config.max_tokens
        )
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and usable(hit[0]):
                self.stats.cached += 1
                return hit[0]
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        answer, usage = await self._post_with_retries(body)
        answer = redact_secrets(answer, self._secrets)  # an endpoint that echoes the key
        answer = answer.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be stored
        if self.cache is not None and usable(answer):
            self.cache.put(key, answer, usage)
        return answer

    def _refuse(self, status: int, reply: _Reply) -> AuthFailed:
        detail = ""
        try:
            error = reply.json().get("error")
            message = error.get("message") if isinstance(error, dict) else error
            if isinstance(message, str) and message.strip():
                detail = f": {self.scrub(message)}"
        except Exception:  # not JSON, or not the usual shape: the status says enough
            pass
        hint = (
            f"check ${self.config.api_key_env}"
            if self._secrets
            else f"no API key was sent (${self.config.api_key_env} is not set)"
        )
        return AuthFailed(
            f"the endpoint answered HTTP {status} ({AUTH_STATUS[status]}){detail}; {hint} and --base-url; "
            "stopped without sending the remaining requests"
        )

    async def _send(self, body: dict, on_open: Callable[[], None]) -> _Reply:
        """POST once within the deadline, reading at most `max_answer_bytes` of the reply;
        `on_open()` once the request goes out on an open connection.

        Raises `_NoConnection` when no connection opened, `TimeoutError` when the deadline
        passed after one did, and httpx's other transport errors as they come."""
        import httpx

        opened = False

        async def trace(event: str, info: dict) -> None:
            nonlocal opened
            if not opened and event.startswith(("http11.", "http2.")):
                opened = True
                on_open()

        cap = self.config.max_answer_bytes
        try:
            async with asyncio.timeout(self.config.timeout):
                async with self._http.stream(
                    "POST", self.config.endpoint(), json=body, extensions={"trace": trace}
                ) as response:
                    data, cut = bytearray(), False
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > cap:
                        cut = True  # not worth reading at all
                    else:
                        async for piece in response.aiter_bytes():
                            data += piece
                            if len(data) > cap:  # stop reading here: the rest is never downloaded
                                cut = True
                                del data[cap:]
                                break
                    return _Reply(response.status_code, response.headers, bytes(data), cut)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _NoConnection(f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            if not opened:
                raise _NoConnection(f"no connection within {self.config.timeout:g} s") from None
            raise

    async def _post_with_retries(self, body: dict) -> tuple[str, dict]:
        held = False
        if not self._reached:  # until a connection has opened, one call (and its retries) at a time
            await self._probe.acquire()
            held = True

        def reached() -> None:
            nonlocal held
            self._reached = True
            if held:  # the endpoint answers: the calls waiting behind this one may go
                held = False
                self._probe.release()

        try:
            if self._reached:
                reached()
            return await self._attempts(body, reached)
        finally:
            if held:
                self._probe.release()

    async def _attempts(self, body: dict, reached: Callable[[], None]) -> tuple[str, dict]:
        import httpx

        last, hint, unreachable = "no attempt", None, True
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._delay(attempt, hint))
                hint = None
            async with self._semaphore:
                if self._refused is not None:  # the run was stopped: send nothing more
                    raise self._refused
                self.stats.calls += 1
                try:
                    reply = await self._send(body, reached)
                except _NoConnection as exc:
                    last = f"could not connect ({self.scrub(str(exc))})"
                    self._count("connection")
                    self._reached = False  # later calls wait for this one's verdict
                    continue
                except (TimeoutError, httpx.TimeoutException):
                    last = f"timed out after {self.config.timeout:g} s"
                    self._count("timeout")
                    reached()
                    unreachable = False
                    continue
                except httpx.TransportError as exc:
                    last = f"connection error ({type(exc).__name__})"
                    self._count("connection")
                    reached()
                    unreachable = False
                    continue
            reached()
            unreachable = False
            self._count(str(reply.status))
            if reply.status in AUTH_STATUS:
                self.stats.failed += 1
                if self._refused is None:
                    self._refused = self._refuse(reply.status, reply)
                raise self._refused
            if reply.status in RETRY_STATUS:
                last = f"HTTP {reply.status}"
                hint = reply.headers.get("retry-after")
                continue
            if reply.status != 200:
                self.stats.failed += 1
                raise CallFailed(f"HTTP {reply.status}: {self.scrub(reply.text()[:4000])}")
            if reply.cut:
                self.stats.failed += 1
                raise CallFailed(
                    f"the endpoint's reply is larger than {self.config.max_answer_bytes} bytes "
                    "(--max-answer-kb); it was not read past that"
                )
            try:
                payload = reply.json()
                answer = payload["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
                self.stats.failed += 1
                raise CallFailed("the endpoint's reply is not a chat completion") from None
            try:
                usage = _usage_counts(payload)
            except ValueError as exc:
                self.stats.failed += 1
                raise CallFailed(f"the endpoint's reply has a malformed 'usage' field ({exc})") from None
            self.stats.input_tokens += usage.get("prompt_tokens", 0)
            self.stats.output_tokens += usage.get("completion_tokens", 0)
            return answer if isinstance(answer, str) else "", usage
        self.stats.failed += 1
        if unreachable:  # not one attempt reached the endpoint: no other call would either
            if self._refused is None:
                self._refused = EndpointUnreachable(
                    f"cannot reach {public_endpoint(self.config.endpoint())}: {last}, "
                    f"{self.config.max_retries + 1} attempts; check --base-url and that the server is up; "
                    "stopped without sending the remaining requests"
                )
            raise self._refused
        raise CallFailed(f"{last}, after {self.config.max_retries} retries")

    def _delay(self, attempt: int, hint: str | None) -> float:
        """Retry-After when the server sends one (capped at 60 s), else jittered doubling."""
        if hint and hint.replace(".", "", 1).isdigit():
            return min(float(hint), 60.0)
        return self.config.backoff * 2 ** (attempt - 1) * (0.5 + random.random())

    def _count(self, what: str) -> None:
        self.stats.status_counts[what] = self.stats.status_counts.get(what, 0) + 1
