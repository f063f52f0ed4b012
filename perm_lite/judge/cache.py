"""A content-hash cache of judge answers (SQLite), so reruns and resumed runs do not pay twice.

The key is a hash of what determines the answer: the model, the messages and the sampling
settings. Nothing secret is part of the key or the stored value.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


def request_key(model: str, messages: list[dict], temperature: float) -> str:
    blob = json.dumps({"model": model, "messages": messages, "temperature": temperature}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


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

    def close(self) -> None:
        with self._lock:
            self._db.close()
