"""`perm report`: one self-contained HTML page about a scored JSONL file.

Histograms per perspective and of the combined score (inline SVG: no script, no CDN, no
external URL), the same split by any field (`by="model"` compares two chatbots' logs), the
lowest and highest replies with their sentence-level explanations, truncation and error
counts, and the model card's summary and limits.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perm_lite.jsonl import count_lines
from perm_lite.scales import SCALES

COLOURS = ("#3b6ea8", "#d9822b", "#3a9a5b", "#b5473a", "#7a5aa6", "#8c6d3f")
COMBINED_RANGE = (-0.5, 1.0)


@dataclass
class ScoredFile:
    """What a scored JSONL holds: the scored rows, and what could not be read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)  # line numbers without scores

    @property
    def truncated(self) -> int:
        return sum(bool((r.get("perm") or {}).get("truncated")) for r in self.rows)


def read_scored(path: Path) -> ScoredFile:
    """Rows of `perm score` output; lines that are not scored records are counted, not dropped silently."""
    out = ScoredFile()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                out.unreadable.append(n)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("scores"), dict) or "combined" not in row:
                out.unreadable.append(n)
                continue
            out.rows.append(row)
    return out


def value(row: dict[str, Any], check: str) -> float | None:
    v = row.get("combined") if check == "combined" else row["scores"].get(check)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _range(check: str, scales: dict[str, tuple[float, float]] | None = None) -> tuple[float, float]:
    if check == "combined":
        return COMBINED_RANGE
    return (scales or SCALES).get(check, (0.0, 1.0))


def _checks(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The perspectives the rows were scored on (in their order) and "combined"."""
    names = dict.fromkeys(k for row in rows for k in row["scores"])
    return (*names, "combined")


def histogram_svg(
    groups: dict[str, Sequence[float]],
    check: str,
    bins: int = 20,
    width: int = 420,
    scales: dict[str, tuple[float, float]] | None = None,
) -> str:
    """Overlaid histograms (share of each group's records per bin) as an inline SVG; the
    axis spans the check's scale (`scales`, else PERM's) widened to the values."""
    low, high = _range(check, scales)
    for values in groups.values():
        if values:
            low, high = min(low, min(values)), max(high, max(values))
    height, pad = 160, 28
    step = (high - low) / bins or 1.0
    shares = {}
    for name, values in groups.items():
        counts = [0] * bins
        for v in values:
            counts[min(bins - 1, max(0, int((v - low) / step)))] += 1
        shares[name] = [c / max(1, len(values)) for c in counts]
    top = max([max(s) for s in shares.values()] + [1e-9])
    bar_w = (width - 2 * pad) / bins
    parts = [
        f'<svg role="img" width="{width}" height="{height + 2 * pad}" '
        f'viewBox="0 0 {width} {height + 2 * pad}"><title>{html.escape(check)} histogram</title>',
        f'<line x1="{pad}" y1="{height + pad}" x2="{width - pad}" y2="{height + pad}" stroke="#555"/>',
    ]
    for g, share in enumerate(shares.values()):
        colour = COLOURS[g % len(COLOURS)]
        for b, s in enumerate(share):
            if s <= 0:
                continue
            h = s / top * height
            x = pad + b * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{height + pad - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                f'fill="{colour}" fill-opacity="{0.85 if len(shares) == 1 else 0.5}"/>'
            )
    for x_value in (low, (low + high) / 2, high):
        x = pad + (x_value - low) / (high - low or 1) * (width - 2 * pad)
        parts.append(
            f'<text x="{x:.1f}" y="{height + pad + 16}" font-size="11" text-anchor="middle">{x_value:g}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "no records"
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered)
    median = ordered[len(ordered) // 2]
    return f"n={len(ordered)}, mean {mean:.3f}, median {median:.3f}, min {ordered[0]:.3f}, max {ordered[-1]:.3f}"


def _card_sections(card: Path | None) -> tuple[str, str]:
    """The model card's first paragraph and its "Limits" section (plain text)."""
    if card is None or not card.is_file():
        return "(no model card found)", ""
    lines = card.read_text(encoding="utf-8").splitlines()
    summary = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "|", "**"))), "")
    limits: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("## "):
            inside = line[3:].strip().lower().startswith(("limits", "known limits", "what it still gets wrong"))
            continue
        if inside:
            limits.append(line)
    return summary, "\n".join(limits).strip()


def _reply_text(row: dict[str, Any]) -> str:
    text = row.get("response") or row.get("completion") or ""
    return text if isinstance(text, str) else json.dumps(text)


def _explained_html(row: dict[str, Any], explanation: dict | None, check: str) -> str:
    """The reply with each sentence coloured by its contribution to `check`."""
    text = _reply_text(row)
    if not explanation or not explanation.get("sentences"):
        return f"<p class='reply'>{html.escape(text)}</p>"
    deltas = [s["deltas"][check] for s in explanation["sentences"]]
    scale = max([abs(d) for d in deltas] + [1e-9])
    pieces, last = [], 0
    for s in explanation["sentences"]:
        d = s["deltas"][check]
        alpha = min(0.75, abs(d) / scale * 0.75)
        colour = f"rgba(46,160,67,{alpha:.2f})" if d > 0 else f"rgba(207,34,46,{alpha:.2f})"
        pieces.append(html.escape(text[last : s["start"]]))
        sentence = html.escape(text[s["start"] : s["end"]])
        pieces.append(f"<span style='background:{colour}' title='{check} {d:+.3f}'>{sentence}</span>")
        last = s["end"]
    pieces.append(html.escape(text[last:]))
    return "<p class='reply'>" + "".join(pieces) + "</p>"


def _context_text(row: dict[str, Any]) -> str:
    if isinstance(row.get("messages"), list):
        users = [m.get("content", "") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(row.get("query") or "")


def render_report(
    scored: ScoredFile,
    *,
    by: str | None = None,
    explanations: dict[int, dict] | None = None,
    extremes: int = 5,
    errors: int = 0,
    card: Path | None = None,
    title: str = "perm-lite report",
    scales: dict[str, tuple[float, float]] | None = None,
) -> str:
    """The whole HTML page as a string (self-contained)."""
    rows = scored.rows
    explanations = explanations or {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        key = row.get(by) if by else "all"
        groups["(missing)" if key is None else str(key)].append(i)
    models = Counter(f"{(r.get('perm') or {}).get('model')} {(r.get('perm') or {}).get('version')}" for r in rows)
    summary, limits = _card_sections(card)
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        "h2{border-bottom:1px solid #ccc;padding-bottom:.2em}.grid{display:flex;flex-wrap:wrap;gap:1em}"
        ".card{border:1px solid #ddd;border-radius:6px;padding:.6em}.reply{line-height:1.6}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}"
        ".legend span{display:inline-block;width:1em;height:1em;margin:0 .3em 0 1em;vertical-align:middle}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table><tr><th>scored records</th><th>truncated</th><th>errors (errors file)</th>"
        "<th>unreadable lines</th><th>model</th></tr>",
        f"<tr><td>{len(rows)}</td><td>{scored.truncated}</td><td>{errors}</td><td>{len(scored.unreadable)}</td>"
        f"<td>{html.escape(', '.join(f'{m} ({n})' for m, n in models.most_common()))}</td></tr></table>",
        "<h2>Distribution</h2>",
    ]
    if by:
        legend = "".join(
            f"<span style='background:{COLOURS[g % len(COLOURS)]}'></span>{html.escape(name)} ({len(idx)})"
            for g, name in enumerate(groups)
            for idx in [groups[name]]
        )
        out.append(f"<p class='legend'>By <code>{html.escape(by)}</code>:{legend}</p>")
    out.append("<div class='grid'>")
    for check in _checks(rows):
        values = {name: [v for i in idx if (v := value(rows[i], check)) is not None] for name, idx in groups.items()}
        stats = "<br>".join(f"{html.escape(name)}: {_stats(v)}" for name, v in values.items())
        chart = histogram_svg(values, check, scales=scales)
        out.append(f"<div class='card'><h3>{html.escape(check)}</h3>{chart}<p><small>{stats}</small></p></div>")
    out.append("</div>")
    ordered = _by_combined(rows)
    for label, picked in (
        ("Lowest combined scores", ordered[:extremes]),
        ("Highest combined scores", ordered[::-1][:extremes]),
    ):
        out.append(f"<h2>{label}</h2>")
        for i in picked:
            row = rows[i]
            scores = ", ".join(f"{k} {v:.2f}" for k, v in row["scores"].items())
            line = (row.get("perm") or {}).get("line")
            out.append(
                "<div class='card'>"
                f"<p><b>combined {row['combined']:.3f}</b> ({html.escape(scores)}); line {line}, "
                f"id {html.escape(str(row.get('id')))}</p>"
                f"<p><i>Seeker:</i> {html.escape(_context_text(row))}</p>"
                f"{_explained_html(row, explanations.get(i), 'combined')}</div>"
            )
    out.append(
        "<p><small>Sentence colours: green raised the combined score, red lowered it (occlusion: the score "
        "change when the sentence is removed).</small></p>"
    )
    out += [
        "<h2>Model</h2>",
        f"<p>{html.escape(summary)}</p>",
        f"<h3>Known limits</h3><pre style='white-space:pre-wrap'>{html.escape(limits or '(none listed)')}</pre>",
        "</body></html>",
    ]
    return "\n".join(out)


def _by_combined(rows: Sequence[dict[str, Any]]) -> list[int]:
    return sorted(range(len(rows)), key=lambda i: value(rows[i], "combined") or 0.0)


def extreme_indices(rows: Sequence[dict[str, Any]], n: int) -> list[int]:
    """Indices of the n lowest and n highest combined scores."""
    ordered = _by_combined(rows)
    return sorted(set(ordered[:n]) | set(ordered[::-1][:n]))


def explain_rows(scorer, rows: Sequence[dict[str, Any]], indices: Iterable[int]) -> dict[int, dict]:
    """Explanations of the picked rows (rows that no longer parse are left unexplained)."""
    from perm_lite.records import RecordError, parse_record

    out = {}
    for i in indices:
        record = {k: v for k, v in rows[i].items() if k not in ("scores", "combined", "perm")}
        try:
            out[i] = scorer.explain(parse_record(record)).to_dict()
        except RecordError:
            continue
    return out


def write_report(
    scored_path: Path,
    out_path: Path,
    scorer,
    *,
    by: str | None = None,
    extremes: int = 5,
    errors_path: Path | None = None,
) -> ScoredFile:
    """Read `scored_path`, explain its extremes with `scorer`, write the HTML to `out_path`."""
    scored = read_scored(scored_path)
    explanations = explain_rows(scorer, scored.rows, extreme_indices(scored.rows, extremes))
    page = render_report(
        scored,
        by=by,
        explanations=explanations,
        extremes=extremes,
        errors=(count_lines(str(errors_path)) or 0) if errors_path is not None else 0,
        card=scorer.config.path / "README.md",
        title=f"perm-lite report: {scored_path.name}",
        scales=scorer.heads.scales,
    )
    out_path.write_text(page, encoding="utf-8")
    return scored
