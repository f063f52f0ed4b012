"""Bounded load test of `perm serve` on loopback: micro-batching on/off, then 2x overload.

    python benchmarks/load_serve.py [--seconds 15]   # prints JSON; run.py puts it in RESULTS.md

Each scenario starts its own `perm serve` process (the serve extra), waits for /healthz,
drives it with httpx from this process and stops it with SIGTERM. Requests are one record
each (the guardrail's case: a chatbot checking one draft). Closed loop: N clients, each
sending its next request when the previous one is answered. Open loop (overload): requests
sent at a fixed rate, twice the closed-loop throughput with batching, whatever happens;
a full queue answers 503 at once instead of letting latency grow without end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


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


def run(seconds: float = 15, clients: int = 32) -> dict:
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
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.clients), indent=2))
