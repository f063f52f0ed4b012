"""optimum's ORTModel as a benchmark backend, run in its own virtual environment.

optimum-onnx pins transformers<4.58, so it cannot share perm-lite's environment; run.py
starts this script with that environment's Python and drives it over stdin/stdout so its
repeats interleave with the other backends'. Protocol: one line in, `BATCH_SIZE`, one line
out, a JSON list of per-batch latencies in seconds (the whole input, arrival order,
per-batch padding to the longest; the same encodings as the PyTorch eager row).

    python optimum_worker.py MODEL_DIR INPUT.jsonl RECORDS
MODEL_DIR holds model.fp32.onnx; the worker writes a transformers config beside a copy.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    model_dir, input_path, records = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    import itertools

    from optimum.onnxruntime import ORTModelForCustomTasks
    from transformers import BertConfig

    from perm_lite.jsonl import open_input, read_records
    from perm_lite.scorer import Scorer
    from perm_lite.text import pad_batch

    scorer = Scorer(model_dir, provider="cpu", variant="fp32")  # tokenization only
    with open_input(input_path) as fh:
        dialogues = [p.dialogue for p in read_records(fh) if p.dialogue is not None]
    dialogues = list(itertools.islice(itertools.cycle(dialogues), records))
    with tempfile.TemporaryDirectory(prefix="perm-optimum-") as tmp:
        shutil.copy(model_dir / "model.fp32.onnx", Path(tmp) / "model.onnx")
        BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12).save_pretrained(tmp)
        model = ORTModelForCustomTasks.from_pretrained(tmp, file_name="model.onnx", provider="CPUExecutionProvider")
        print(json.dumps({"ready": True, "records": len(dialogues)}), flush=True)
        for line in sys.stdin:
            batch_size = int(line)
            latencies = []
            for start in range(0, len(dialogues), batch_size):
                t = time.perf_counter()
                feed = pad_batch(scorer.encode(dialogues[start : start + batch_size]), 0)
                model(**feed)
                latencies.append(time.perf_counter() - t)
            print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main()
