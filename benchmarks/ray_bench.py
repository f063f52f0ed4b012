"""Ray engine: records/s with 1 vs 2 local scoring actors, against one local process, and
the per-actor overhead (start-up and model load), on a local 2-CPU Ray cluster.

    python benchmarks/ray_bench.py [--records 3000]     # prints JSON; run.py puts it in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(records: int = 3000, cache: Path | None = None) -> dict:
    import ray

    from perm_lite import Scorer
    from perm_lite.integrations.ray import score_jsonl_lines
    from perm_lite.jsonl import open_input, read_records

    cache = cache or Path(__file__).resolve().parent / ".cache"
    cache.mkdir(exist_ok=True)
    examples = [json.loads(x) for x in (ROOT / "examples" / "dialogues.jsonl").read_text().splitlines()]
    path = cache / "ray-input.jsonl"
    path.write_text("".join(json.dumps(dict(examples[i % len(examples)], id=i)) + "\n" for i in range(records)))
    out: dict = {"records": records, "cluster": "local, 2 CPUs"}

    started = time.perf_counter()
    scorer = Scorer(provider="cpu")
    with open_input(str(path)) as fh:
        dialogues = [p.dialogue for p in read_records(fh)]
    scorer.score_dialogues(dialogues)
    out["single process (2 threads)"] = round(records / (time.perf_counter() - started), 1)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for workers, threads in ((1, 2), (2, 1)):
            started = time.perf_counter()
            n = sum(
                len(b["line"])
                for b in score_jsonl_lines([str(path)], workers=workers, threads_per_worker=threads).iter_batches()
            )
            assert n == records
            out[f"ray {workers} worker(s) x {threads} thread(s)"] = round(records / (time.perf_counter() - started), 1)
        tiny = cache / "ray-tiny.jsonl"
        tiny.write_text("".join(json.dumps(e) + "\n" for e in examples))
        started = time.perf_counter()
        list(score_jsonl_lines([str(tiny)], workers=1, threads_per_worker=2).iter_batches())
        job = time.perf_counter() - started
        rate = out["single process (2 threads)"]
        out["per_job_overhead_seconds"] = round(job - len(examples) / rate, 2)
    finally:
        ray.shutdown()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    print(json.dumps(run(parser.parse_args().records), indent=2))
