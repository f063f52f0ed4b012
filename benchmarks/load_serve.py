"""Bounded load test of `perm serve` on loopback: micro-batching on/off, 2x overload, and
2x overload with ~1 MB bodies and clients that disconnect.

    python benchmarks/load_serve.py [--seconds 15]   # prints JSON; run.py puts it in RESULTS.md
    python benchmarks/load_serve.py --only large --large-seconds 60 --burst 60

Each scenario starts its own `perm serve` process (the serve extra), waits for /healthz,
drives it with httpx from this process and stops it with SIGTERM. Requests are one record
each (the guardrail's case: a chatbot checking one draft). Closed loop: N clients, each
sending its next request when the previous one is answered. Open loop (overload): requests
sent at a fixed rate, twice the closed-loop throughput with batching, whatever happens;
a full queue answers 503 at once instead of letting latency grow without end.

Large bodies (`--only large`, also part of the default run): requests of ~1 MB (16 long
records), first a burst of `--burst` at once, then open loop: well-formed requests at twice
the closed-loop rate for that body, plus one client in three (on top) that disconnects,
half while uploading, half while waiting for the answer. Reported: the server process's RSS (idle at start,
after the capacity probe, peak sampled every 0.1 s during the overload, once idle again,
and the kernel's high-water mark), the status codes of the well-formed requests (5xx
other than 503 + Retry-After must be 0) and how much abandoned work the server dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _records() -> list[dict]:
    lines = (ROOT / "examples" / "dialogues.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "id"} for x in lines if x.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *options: str) -> None:
        self.port = _free_port()
        perm = Path(sys.executable).parent / "perm"
        self.proc = subprocess.Popen(
            [str(perm), "serve", "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"perm serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("perm serve did not become ready")

    def stop(self) -> int | str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "still running 60 s after SIGTERM: killed"

    def rss_mb(self) -> dict[str, float]:
        """The server process's resident memory now (VmRSS) and its peak so far (VmHWM)."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
        return fields


def _summary(latencies: list[float], codes: list[int], seconds: float) -> dict:
    ok = [lat for lat, code in zip(latencies, codes) if code == 200]
    errors: dict[str, int] = {}
    for code in codes:
        if code != 200:
            errors[str(code)] = errors.get(str(code), 0) + 1
    return {
        "requests": len(codes),
        "ok": len(ok),
        "errors": errors,
        "ok_per_second": round(len(ok) / seconds, 1),
        "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 1) if ok else None,
    }


async def _closed_loop(url: str, clients: int, seconds: float) -> dict:
    import httpx

    records = _records()
    latencies: list[float] = []
    codes: list[int] = []
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = i
        while time.perf_counter() < stop_at:
            body = {"records": [records[n % len(records)]]}
            n += clients
            t = time.perf_counter()
            response = await http.post(url + "/v1/score", json=body)
            latencies.append(time.perf_counter() - t)
            codes.append(response.status_code)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        return _summary(latencies, codes, time.perf_counter() - started)


async def _open_loop(url: str, rate: float, seconds: float) -> dict:
    import httpx

    records = _records()
    latencies: list[float] = []
    codes: list[int] = []

    async def one(i: int, http: httpx.AsyncClient) -> None:
        t = time.perf_counter()
        try:
            response = await http.post(url + "/v1/score", json={"records": [records[i % len(records)]]})
            codes.append(response.status_code)
        except httpx.HTTPError:
            codes.append(0)
        latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        tasks = []
        i = 0
        while time.perf_counter() - started < seconds:
            tasks.append(asyncio.ensure_future(one(i, http)))
            i += 1
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        return {"offered_per_second": round(rate, 1), **_summary(latencies, codes, time.perf_counter() - started)}


def _large_body(records: int = 16, chars: int = 70_000) -> bytes:
    """~1 MB: `records` examples/ records whose reply is repeated to about `chars` characters."""
    out = []
    for i in range(records):
        record = dict(_records()[i % len(_records())])
        if "response" in record:
            record["response"] = " ".join([record["response"]] * (chars // (len(record["response"]) + 1)))
        out.append(record)
    return json.dumps({"records": out}).encode()


async def _abandon(host: str, port: int, body: bytes, while_uploading: bool) -> None:
    """A client that goes away: mid-upload, or after sending the whole body and waiting a little."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        head = (
            f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer.write(head + (body[: len(body) // 2] if while_uploading else body))
        await writer.drain()
        await asyncio.sleep(random.uniform(0.05, 0.3) if while_uploading else random.uniform(0.2, 1.5))
        writer.transport.abort()
    except OSError:
        pass


async def _large_overload(server: Server, rate: float, seconds: float, burst: int, body: bytes) -> dict:
    import httpx

    latencies: list[float] = []
    codes: list[int] = []
    peak = {"rss": 0.0}
    abandoned = {"while uploading": 0, "while waiting": 0}
    host, port = "127.0.0.1", server.port

    async def sample() -> None:
        while True:
            peak["rss"] = max(peak["rss"], server.rss_mb()["VmRSS"])
            await asyncio.sleep(0.1)

    async def one(i: int, http: httpx.AsyncClient) -> None:
        if i % 3 == 2:  # one arrival in three disconnects
            while_uploading = i % 2 == 0
            abandoned["while uploading" if while_uploading else "while waiting"] += 1
            await _abandon(host, port, body, while_uploading)
            return
        t = time.perf_counter()
        try:
            response = await http.post(
                server.url + "/v1/score", content=body, headers={"content-type": "application/json"}
            )
            codes.append(response.status_code)
            if response.status_code == 503 and "retry-after" not in response.headers:
                codes[-1] = 5031  # a 503 without Retry-After counts as a server error
        except httpx.HTTPError:
            codes.append(0)
        latencies.append(time.perf_counter() - t)

    sampler = asyncio.ensure_future(sample())
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        stats_before = (await http.get(server.url + "/healthz")).json()["batching"]
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i, http)) for i in range(burst)]
        i = 0
        while time.perf_counter() - started < seconds:
            tasks.append(asyncio.ensure_future(one(burst + i, http)))
            i += 1
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        idle_after = None
        while time.perf_counter() - started < elapsed + 120:  # until the server holds nothing
            try:
                health = (await http.get(server.url + "/healthz", timeout=5)).json()
            except httpx.HTTPError:
                continue  # an unresponsive server: keep asking until the 120 s are up
            pending = health.get("pending", {"requests": health["queue_depth"], "body_bytes": 0})
            if pending["requests"] == 0 and pending["body_bytes"] == 0:
                idle_after = round(time.perf_counter() - started - elapsed, 1)
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        try:
            batching = (await http.get(server.url + "/healthz", timeout=5)).json()["batching"]
        except httpx.HTTPError:
            batching = None
    sampler.cancel()
    summary = _summary(latencies, codes, elapsed)
    server_errors = sum(n for code, n in summary["errors"].items() if code not in ("503", "0") and code >= "500")
    return {
        "offered_per_second": round(2 * rate / 3, 2),  # well-formed requests (report.py reads this key)
        "offered_disconnecting_per_second": round(rate / 3, 2),
        "burst": burst,
        "server_idle_s_after_last_answer": idle_after,
        **summary,
        "well_formed_5xx_other_than_503": server_errors,
        "refused_503_retry_after": summary["errors"].get("503", 0),
        "connection_errors": summary["errors"].get("0", 0),
        "abandoned_clients": abandoned,
        "server_dropped_requests": batching.get("dropped", 0) - stats_before.get("dropped", 0) if batching else None,
        "server_records_scored": batching["records"] - stats_before["records"] if batching else None,
        "records_answered_200": summary["ok"] * 16,
        "rss_peak_mb": peak["rss"],
        "rss_after_mb": server.rss_mb()["VmRSS"],
        "rss_hwm_mb": server.rss_mb()["VmHWM"],
    }


def run_large(seconds: float = 60, burst: int = 60, probe_seconds: float = 10) -> dict:
    """2x overload with ~1 MB bodies and disconnecting clients, on a fresh default perm serve."""
    body = _large_body()
    server = Server()
    server.wait_ready()
    rss_idle = server.rss_mb()["VmRSS"]
    probe = asyncio.run(_closed_loop_body(server.url, 2, probe_seconds, body))
    rss_before = server.rss_mb()["VmRSS"]
    capacity = probe["ok_per_second"]
    result = asyncio.run(_large_overload(server, 3 * capacity, seconds, burst, body))
    result = {
        "body_bytes": len(body),
        "records_per_body": 16,
        "closed_loop_capacity_per_second": capacity,
        "rss_idle_at_start_mb": rss_idle,
        "rss_before_mb": rss_before,
        **result,
    }
    result["exit_code"] = server.stop()
    return result


async def _closed_loop_body(url: str, clients: int, seconds: float, body: bytes) -> dict:
    import httpx

    latencies: list[float] = []
    codes: list[int] = []
    stop_at = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            response = await http.post(url + "/v1/score", content=body, headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - t)
            codes.append(response.status_code)

    async with httpx.AsyncClient(timeout=120) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return _summary(latencies, codes, time.perf_counter() - started)


LARGE = "2x overload, ~1 MB bodies, 1 in 3 clients disconnect (defaults)"


def run(seconds: float = 15, clients: int = 32, large_seconds: float | None = None, burst: int = 60) -> dict:
    out: dict = {"clients": clients, "seconds": seconds, "record": "one examples/ record per request"}
    for name, options in (("no batching (max-batch 1)", ["--max-batch", "1"]), ("micro-batching (max-batch 32)", [])):
        server = Server(*options, "--queue-size", "64")
        server.wait_ready()
        asyncio.run(_closed_loop(server.url, clients, 2))  # warm-up
        out[name] = asyncio.run(_closed_loop(server.url, clients, seconds))
        out[name]["exit_code"] = server.stop()
    capacity = out["micro-batching (max-batch 32)"]["ok_per_second"]
    server = Server("--queue-size", "64")
    server.wait_ready()
    out["2x overload, open loop (max-batch 32, queue 64)"] = asyncio.run(_open_loop(server.url, 2 * capacity, seconds))
    out["2x overload, open loop (max-batch 32, queue 64)"]["exit_code"] = server.stop()
    out["batching_speedup"] = round(capacity / out["no batching (max-batch 1)"]["ok_per_second"], 2)
    out[LARGE] = run_large(large_seconds or 4 * seconds, burst)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--only", choices=["all", "large"], default="all", help="large: only the ~1 MB scenario")
    parser.add_argument("--large-seconds", type=float, default=None, help="open-loop time (default 4x --seconds)")
    parser.add_argument("--burst", type=int, default=60, help="~1 MB requests sent at once before the open loop")
    args = parser.parse_args()
    if args.only == "large":
        result = {LARGE: run_large(args.large_seconds or 4 * args.seconds, args.burst)}
    else:
        result = run(args.seconds, args.clients, args.large_seconds, args.burst)
    print(json.dumps(result, indent=2))
