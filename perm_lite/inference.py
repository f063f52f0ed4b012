"""Batching and inference: length-sorted, token-budgeted batches through one session.

Batch size and token budget are arguments of every call, never state: one model (a
`Scorer`) can serve callers with different settings at once (the TRL reward, serve, a
benchmark) without any of them changing what the others get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from perm_lite.errors import OptionError, require_count
from perm_lite.text import Encoding, pad_batch


def check_batching(batch_size: Any, max_tokens: Any) -> tuple[int, int | None]:
    """`batch_size` a whole number >= 1; `max_tokens` one too, or None (no budget)."""
    require_count(batch_size, "batch_size")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise OptionError(
            f"max_batch_tokens must be a positive whole number or None, not {max_tokens!r}", "max_batch_tokens"
        )
    return batch_size, max_tokens


def sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped shortest first: at most `batch_size` records and, when set, at most
    `max_tokens` padded tokens (records x longest) per batch; a longer record goes alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        grown = len(current) + 1
        if current and (grown > batch_size or (max_tokens is not None and grown * lengths[i] > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class Engine:
    """An onnxruntime session (anything with `run` and `get_inputs`) and the padding id
    of its tokenizer: runs encodings in length-sorted batches."""

    session: Any
    pad_id: int

    def run(self, encodings: Sequence[Encoding], batch_size: int, max_tokens: int | None = None) -> np.ndarray:
        """Raw head outputs (n, heads) in input order."""
        check_batching(batch_size, max_tokens)
        names = {i.name for i in self.session.get_inputs()}
        raw: np.ndarray | None = None
        for idx in sorted_batches([len(e) for e in encodings], batch_size, max_tokens):
            feed = pad_batch([encodings[i] for i in idx], self.pad_id)
            out = self.session.run(None, {k: v for k, v in feed.items() if k in names})[0]
            if raw is None:
                raw = np.zeros((len(encodings), out.shape[-1]), dtype=np.float32)
            raw[idx] = out
        return raw if raw is not None else np.zeros((0, 0), dtype=np.float32)
