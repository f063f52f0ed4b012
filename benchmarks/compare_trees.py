"""Scorer throughput of two source trees (e.g. before and after a refactor), interleaved.

    git worktree add /tmp/old-tree <commit>
    python benchmarks/compare_trees.py /tmp/old-tree .

Each measurement runs in a fresh process that imports perm_lite from the given tree and
scores the same 256 records (examples/dialogues.jsonl, repeated) with this checkout's
shipped model on CPU; the ratio new/old of the medians is what to compare (shared
machines are noisy, so absolute rates are not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CODE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import perm_lite
from perm_lite import Scorer
recs = [json.loads(line) for line in open(sys.argv[2])]
recs = (recs * (256 // len(recs) + 1))[:256]
scorer = Scorer(sys.argv[3], provider="cpu")
scorer.score(recs[:32])
t = time.perf_counter()
scorer.score(recs)
print(json.dumps({"file": perm_lite.__file__, "rps": len(recs) / (time.perf_counter() - t)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the baseline source tree")
    parser.add_argument("new", type=Path, help="the tree to compare")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data, model = HERE / "examples" / "dialogues.jsonl", HERE / "models" / "perm-lite-minilm"
    rates: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for name, root in (("old", args.old.resolve()), ("new", args.new.resolve())):
            cmd = [sys.executable, "-P", "-c", CODE, str(root), str(data), str(model)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out = json.loads(run.stdout.strip().splitlines()[-1])
            if not out["file"].startswith(str(root)):
                raise SystemExit(f"{name}: imported {out['file']}, not the tree {root}")
            rates[name].append(out["rps"])
    print(json.dumps({k: [round(v, 1) for v in vs] for k, vs in rates.items()}))
    print(f"median new/old: {statistics.median(rates['new']) / statistics.median(rates['old']):.3f}")


if __name__ == "__main__":
    main()
