"""Read a judge's answer: the reason and the integer score(s) the rubric asked for.

A reply that does not hold the expected lines is `None` (with the raw answer kept by the
caller), never a guess or an average.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BYSTANDER_PARTS = ("content", "structure", "efficiency", "objectivity", "accuracy")
_REASON = re.compile(r"^\s*reason\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_SCORE = re.compile(r"^\s*\**\s*score\s*(?:\(1-5\))?\s*\**\s*:\s*\**\s*(\d+)\b", re.IGNORECASE | re.MULTILINE)
_TOTAL = re.compile(r"^\s*\**\s*total\s*(?:\(0-100\))?\s*\**\s*:\s*\**\s*(\d+)\b", re.IGNORECASE | re.MULTILINE)


def _part(name: str) -> re.Pattern:
    return re.compile(rf"^\s*\**\s*{name}\s*\**\s*:\s*\**\s*(\d+)\b", re.IGNORECASE | re.MULTILINE)


_PARTS = {name: _part(name) for name in BYSTANDER_PARTS}


@dataclass
class Judgement:
    score: int | None
    reason: str | None
    parts: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # why score is None

    def to_dict(self) -> dict:
        out = {"score": self.score, "reason": self.reason}
        if self.parts:
            out["parts"] = self.parts
        if self.problem:
            out["problem"] = self.problem
        return out


def parse_answer(text: str, perspective: str) -> Judgement:
    """Parse one perspective's answer. Scores outside the scale are rejected."""
    reason_match = _REASON.search(text or "")
    reason = reason_match.group(1).strip() if reason_match else None
    if perspective != "bystander":
        found = _SCORE.findall(text or "")
        if len(found) != 1:
            problem = "no 'Score (1-5): N' line" if not found else "more than one score line"
            return Judgement(None, reason, problem=problem)
        score = int(found[0])
        if not 1 <= score <= 5:
            return Judgement(None, reason, problem=f"score {score} is outside 1-5")
        return Judgement(score, reason)
    parts = {}
    for name, pattern in _PARTS.items():
        match = pattern.search(text or "")
        if match:
            parts[name] = int(match.group(1))
    total_match = _TOTAL.search(text or "")
    if any(not 0 <= v <= 20 for v in parts.values()):
        return Judgement(None, reason, parts, problem="a bystander part is outside 0-20")
    if total_match is None:
        if len(parts) == len(BYSTANDER_PARTS):  # five parts but no total line: their sum is the total
            return Judgement(sum(parts.values()), reason, parts)
        return Judgement(None, reason, parts, problem="no 'Total (0-100): N' line")
    total = int(total_match.group(1))
    if not 0 <= total <= 100:
        return Judgement(None, reason, parts, problem=f"total {total} is outside 0-100")
    if len(parts) == len(BYSTANDER_PARTS) and sum(parts.values()) != total:
        return Judgement(None, reason, parts, problem=f"parts sum to {sum(parts.values())}, total says {total}")
    return Judgement(total, reason, parts)
