"""A content-hash cache of judge answers (SQLite), so reruns and resumed runs do not pay twice.

The key is a hash of what determines the answer: the endpoint (base URL, without any
user:password part), the model, the messages and the sampling settings, so answers from one
endpoint are never replayed for another. Only answers the caller could use are stored (see
`ChatClient.complete`). Nothing secret is part of the key or the stored value.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def public_endpoint(endpoint: str) -> str:
    """The endpoint URL without credentials or a trailing slash."""
    try:
        parts = urlsplit(endpoint.strip())
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))
    except ValueError:
        return endpoint.strip().rstrip("/")


def request_key(endpoint: str, model: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
    blob = json.dumps(
        {
            "endpoint": public_endpoint(endpoint),
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class AnswerCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT, usage TEXT)")
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[str, dict] | None:
        with self._lock:
            row = self._db.execute("SELECT answer, usage FROM answers WHERE key = ?", (key,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def put(self, key: str, answer: str, usage: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, answer, json.dumps(usage)))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
