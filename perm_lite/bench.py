"""Throughput and latency of perm-lite against the baselines a user would otherwise write.

Every backend scores the same records, interleaved repeat by repeat so machine drift hits
all alike; the table reports medians and spreads and every ratio against PyTorch fp32
eager (unsorted, per-batch padding: the usual way). Backends that need torch are skipped,
and said to be skipped, when it is not installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from perm_lite.records import Dialogue
from perm_lite.scorer import Scorer
from perm_lite.text import pad_batch

Runner = Callable[[Sequence[Dialogue], int], list[float]]  # (dialogues, batch) -> batch latencies (s)
Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)


@dataclass
class Measurement:
    backend: str
    inputs: str
    batch_size: int
    records_per_second: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        rps = self.records_per_second
        lat = np.array(self.latencies_ms)
        return {
            "backend": self.backend,
            "inputs": self.inputs,
            "batch_size": self.batch_size,
            "records_per_second": round(statistics.median(rps), 1),
            "spread": [round(min(rps), 1), round(max(rps), 1)],
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p95_ms": round(float(np.percentile(lat, 95)), 2),
        }


class _TimedSession:
    """Wraps an onnxruntime session and records how long each batch took."""

    def __init__(self, session) -> None:
        self._session = session
        self.durations: list[float] = []

    def get_inputs(self):
        return self._session.get_inputs()

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        out = self._session.run(*args, **kwargs)
        self.durations.append(time.perf_counter() - t)
        return out


def scorer_runner(scorer: Scorer) -> Runner:
    """The public API end to end (validation, rendering, tokenization, length sorting,
    inference) over the whole input; per-batch latency is inference time plus an equal
    share of the tokenization and Python time."""

    def run(dialogues: Sequence[Dialogue], batch_size: int) -> list[float]:
        timed = _TimedSession(scorer.session)
        engine = replace(scorer.engine, session=timed)  # the scorer's engine, batches timed
        t = time.perf_counter()
        encodings = scorer.encode(dialogues)  # the steps of Scorer.score_dialogues
        scorer.results(dialogues, encodings, engine.run(encodings, batch_size, scorer.max_batch_tokens))
        total = time.perf_counter() - t
        share = (total - sum(timed.durations)) / max(1, len(timed.durations))
        return [d + share for d in timed.durations]

    return run


def torch_runner(model, scorer: Scorer, sort: bool) -> Runner:
    """PyTorch fp32 eager, per-batch padding to the longest. Unsorted: batches in arrival
    order (the usual way). Sorted: the whole input is tokenized and grouped exactly as
    perm-lite groups it (length-sorted, same batch size and token budget), so only the
    engine differs."""
    import torch

    from perm_lite.inference import sorted_batches

    def forward(encodings) -> None:
        feed = pad_batch(encodings, 0)
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})

    def run(dialogues: Sequence[Dialogue], batch_size: int) -> list[float]:
        out = []
        with torch.inference_mode():
            if sort:
                t = time.perf_counter()
                encodings = scorer.encode(dialogues)
                groups = sorted_batches([len(e) for e in encodings], batch_size, scorer.max_batch_tokens)
                tokenize = time.perf_counter() - t
                for idx in groups:
                    t = time.perf_counter()
                    forward([encodings[i] for i in idx])
                    out.append(time.perf_counter() - t)
                share = tokenize / max(1, len(out))  # tokenization time spread over the batches
                return [x + share for x in out]
            for start in range(0, len(dialogues), batch_size):
                t = time.perf_counter()
                forward(scorer.encode(dialogues[start : start + batch_size]))
                out.append(time.perf_counter() - t)
        return out

    return run


def fixed_length_dialogues(n: int, tokens: int) -> list[Dialogue]:
    """Records that encode to exactly `tokens` tokens with the default tokenizer
    ([CLS] seeker : ... [SEP] response : ... [SEP]); every word is one token."""
    body = tokens - 7  # specials (3) and the two labels with colons (4)
    query_words, response_words = body // 2, body - body // 2
    return [
        Dialogue(response=" ".join(["sure"] * response_words), query=" ".join(["okay"] * query_words)) for _ in range(n)
    ]


def build_backends(model: str, with_torch: bool, fp32_dir: Path | None) -> tuple[dict[str, Runner], list[str]]:
    int8 = Scorer(model, provider="cpu")
    backends: dict[str, Runner] = {"perm-lite int8": scorer_runner(int8)}
    skipped = []
    if fp32_dir is not None:
        backends["onnx fp32"] = scorer_runner(Scorer(fp32_dir, provider="cpu", variant="fp32"))
    if with_torch:
        try:
            import torch

            from perm_lite.session import available_cores
            from perm_lite.training.dequantize import torch_model_from_int8

            torch.set_num_threads(available_cores())
            net = torch_model_from_int8(int8.config.path)
            backends["pytorch fp32 eager"] = torch_runner(net, int8, sort=False)
            backends["pytorch fp32 sorted"] = torch_runner(net, int8, sort=True)
        except ImportError as exc:
            skipped.append(f"pytorch baselines: {exc}")
    return backends, skipped


def measure_steps(backends: int, inputs: int, batch_sizes: int, repeats: int) -> int:
    """How many runs `measure` makes: per input and batch size, a warm-up and `repeats`
    timed runs of every backend."""
    return inputs * batch_sizes * backends * (repeats + 1)


def measure(
    backends: dict[str, Runner],
    inputs: dict[str, Sequence[Dialogue]],
    batch_sizes: Sequence[int],
    repeats: int = 3,
    progress: Progress | None = None,
) -> list[dict]:
    """Measure every backend on every input and batch size. `progress(done, total, doing)`
    is told before each run what it is (and once more at the end); it is called between
    the timed runs, never inside one."""
    results: list[Measurement] = []
    total = measure_steps(len(backends), len(inputs), len(batch_sizes), repeats)
    done = 0

    def step(doing: str) -> None:
        if progress is not None:
            progress(done, total, doing)

    for input_name, dialogues in inputs.items():
        for batch_size in batch_sizes:
            row = {name: Measurement(name, input_name, batch_size) for name in backends}
            for name, run in backends.items():  # warm-up
                step(f"{input_name}, batch {batch_size}: {name} (warm-up)")
                run(dialogues[: batch_size * 2], batch_size)
                done += 1
            for repeat in range(repeats):
                for name, run in backends.items():
                    step(f"{input_name}, batch {batch_size}: {name} ({repeat + 1}/{repeats})")
                    started = time.perf_counter()
                    lat = run(dialogues, batch_size)
                    row[name].records_per_second.append(len(dialogues) / (time.perf_counter() - started))
                    row[name].latencies_ms.extend(x * 1000 for x in lat)
                    done += 1
            results.extend(row.values())
    step("done")
    table = [m.summary() for m in results]
    base = {
        (r["inputs"], r["batch_size"]): r["records_per_second"] for r in table if r["backend"] == "pytorch fp32 eager"
    }
    for r in table:
        ref = base.get((r["inputs"], r["batch_size"]))
        r["vs_pytorch_eager"] = round(r["records_per_second"] / ref, 2) if ref else None
    return table


def to_markdown(table: list[dict]) -> str:
    lines = [
        "| inputs | batch | backend | records/s (median, min-max) | p50 ms | p95 ms | x PyTorch eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ratio = f"{r['vs_pytorch_eager']:.2f}" if r["vs_pytorch_eager"] else "-"
        lines.append(
            f"| {r['inputs']} | {r['batch_size']} | {r['backend']} | {r['records_per_second']} "
            f"({r['spread'][0]}-{r['spread'][1]}) | {r['p50_ms']} | {r['p95_ms']} | {ratio} |"
        )
    return "\n".join(lines) + "\n"
