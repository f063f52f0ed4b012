"""Cost of PERM's four-call LLM judge per reply, from the tokens of real rubric prompts.

Tokens are counted with gpt-4o-mini's tokenizer (tiktoken's o200k_base). tiktoken fetches
that file from the network on first use; offline, the same file (checked by tiktoken's own
hash) is taken from the litellm wheel on PyPI, which ships it, into benchmarks/.cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from perm_lite.records import Dialogue
from perm_lite.rubric import PERSPECTIVE_ORDER, judge_messages

JUDGE_MODEL = "gpt-4o-mini"  # PERM's judge (perm_lite.rubric no longer names it)

# gpt-4o-mini list prices (USD per 1M tokens, OpenAI pricing page, standard tier, 2024-2026).
PRICE_INPUT_PER_M = 0.15
PRICE_OUTPUT_PER_M = 0.60
# Chat-format overhead per message and per request (OpenAI's published counting recipe).
TOKENS_PER_MESSAGE, TOKENS_PER_REQUEST = 3, 3
# What a compliant judge answers: one or two sentences of reason, then the score lines.
TYPICAL_ANSWERS = {
    "resonation": "Reason: The analysis names her fear of being a burden and links it to her "
    "independence, but misses the grief under it.\nScore (1-5): 4",
    "expression": "Reason: Warm and natural, addresses him directly, though the closing line is "
    "a little generic.\nScore (1-5): 3",
    "reception": "Reason: I would feel heard about the loneliness and get one concrete step, "
    "but the tone stays a bit distant.\nScore (1-5): 3",
    "bystander": "Reason: Clear and relevant, with one practical suggestion; some repetition "
    "and an unverified claim about sleep.\nContent: 15\nStructure: 16\nEfficiency: 13\n"
    "Objectivity: 17\nAccuracy: 14\nTotal (0-100): 75",
}
O200K_SHA1_NAME = "fb374d419588a4632f3f557e76b4b70aebbca790"  # tiktoken's cache name for o200k_base
LITELLM_WHEEL = "litellm==1.110.2"


def o200k_encoding(cache_dir: Path):
    """tiktoken's o200k_base, offline: the cache is filled from the litellm wheel once."""
    import tiktoken

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / O200K_SHA1_NAME
    if not target.exists():
        wheels = cache_dir / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), LITELLM_WHEEL],
            check=True,
        )
        wheel = next(wheels.glob("litellm-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("tokenizers/" + O200K_SHA1_NAME))
            target.write_bytes(zf.read(member))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    return tiktoken.get_encoding("o200k_base")


def judge_cost(dialogues: Sequence[Dialogue], cache_dir: Path, perm_lite_rps: float, cores: int) -> dict:
    """Calls and tokens per reply for the judge, and both sides' cost per 1M replies."""
    enc = o200k_encoding(cache_dir)
    inputs = []
    for dialogue in dialogues:
        total = 0
        for perspective in PERSPECTIVE_ORDER:
            messages = judge_messages(dialogue, perspective)
            total += TOKENS_PER_REQUEST + sum(TOKENS_PER_MESSAGE + len(enc.encode(m["content"])) + 1 for m in messages)
        inputs.append(total)
    output = sum(len(enc.encode(a)) for a in TYPICAL_ANSWERS.values())
    mean_input = sum(inputs) / len(inputs)
    judge_usd = mean_input * PRICE_INPUT_PER_M + output * PRICE_OUTPUT_PER_M  # per 1M replies
    cpu_seconds = 1e6 / perm_lite_rps * cores
    return {
        "judge_model": JUDGE_MODEL,
        "calls_per_reply": len(PERSPECTIVE_ORDER),
        "records": len(inputs),
        "input_tokens_per_reply_mean": round(mean_input, 1),
        "input_tokens_per_reply_p95": sorted(inputs)[int(0.95 * (len(inputs) - 1))],
        "output_tokens_per_reply": output,
        "price_input_per_m_tokens": PRICE_INPUT_PER_M,
        "price_output_per_m_tokens": PRICE_OUTPUT_PER_M,
        "judge_usd_per_m_replies": round(judge_usd, 2),
        "perm_lite_records_per_second": perm_lite_rps,
        "perm_lite_cores": cores,
        "perm_lite_cpu_seconds_per_m_replies": round(cpu_seconds),
        "perm_lite_cpu_hours_per_m_replies": round(cpu_seconds / 3600, 2),
    }
