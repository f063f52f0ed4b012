"""`perm report`: one self-contained HTML page about a scored JSONL file.

Histograms per perspective and of the combined score (inline SVG: no script, no CDN, no
external URL), the same split by any field (`by="model"` compares two chatbots' logs), the
lowest and highest replies with their sentence-level explanations (coloured on one scale
for the whole page), truncation and error counts, and the model card's summary and limits.

Every value from the file is escaped. The file is read as `perm score` reads its input
(`perm_lite.jsonl`: strict JSON, a byte-order mark allowed, `field_map` for files scored
with `--fields`); a line that is not a record `perm score` could have written (invalid
input fields, or `scores`/`combined`/`perm` of the wrong types) is counted as unreadable.
`ReportRun` is `perm report` as a library call: the page is written through
`perm_lite.outputs` (locked, a temporary file renamed over the target when complete).
"""

from __future__ import annotations

import html
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perm_lite.errors import OptionError, PermError
from perm_lite.jsonl import OUTPUT_FIELDS, count_lines, read_records
from perm_lite.outputs import OutputFile, default_errors_path, single_output
from perm_lite.records import Dialogue, RecordError, check_field_map, parse_record
from perm_lite.scales import SCALES

COLOURS = ("#3b6ea8", "#d9822b", "#3a9a5b", "#b5473a", "#7a5aa6", "#8c6d3f")
COMBINED_RANGE = (-0.5, 1.0)


class NoScoredRecords(PermError):
    """Not one line of the file is a scored record (exit 1): no page is written."""


@dataclass
class ScoredFile:
    """What a scored JSONL holds: the scored rows (and their parsed input), and what could not be read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)  # line numbers that are not scored records
    dialogues: list[Dialogue | None] = field(default_factory=list)  # parallel to rows
    first_problem: str | None = None  # why the first unreadable line is not a scored record

    @property
    def truncated(self) -> int:
        return sum(bool(_perm(r).get("truncated")) for r in self.rows)

    def dialogue(self, i: int, field_map: Mapping[str, str] | None = None) -> Dialogue | None:
        """Row i's input as a `Dialogue` (None when it does not parse)."""
        if i < len(self.dialogues) and self.dialogues[i] is not None:
            return self.dialogues[i]
        try:
            return parse_record({k: v for k, v in self.rows[i].items() if k not in OUTPUT_FIELDS}, field_map)
        except RecordError:
            return None


def _perm(row: Mapping[str, Any]) -> Mapping[str, Any]:
    perm = row.get("perm")
    return perm if isinstance(perm, Mapping) else {}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def output_problem(row: Mapping[str, Any]) -> str | None:
    """Why `row` is not a line `perm score` writes (its output fields), or None."""
    scores = row.get("scores")
    if not isinstance(scores, dict) or not scores:
        return "no 'scores' object"
    bad = [str(k) for k, v in scores.items() if not _number(v)]
    if bad:
        return f"scores {', '.join(bad[:3])} are not finite numbers"
    if not _number(row.get("combined")):
        return "'combined' is missing or not a finite number"
    perm = row.get("perm", {})
    if not isinstance(perm, dict):
        return "'perm' is not an object"
    if not isinstance(perm.get("line"), int | None) or isinstance(perm.get("line"), bool):
        return "'perm.line' is not a line number"
    return None


def read_scored(path: Path, field_map: Mapping[str, str] | None = None) -> ScoredFile:
    """Rows of `perm score` output; lines that are not scored records are counted, not
    dropped silently. `field_map`: the `--fields` the file was scored with."""
    field_map = check_field_map(field_map)
    out = ScoredFile()
    with open(path, "rb") as fh:
        for parsed in read_records(fh, field_map):
            problem = str(parsed.error) if parsed.error is not None else output_problem(parsed.record)
            if problem is not None:
                out.unreadable.append(parsed.line)
                if out.first_problem is None:
                    out.first_problem = problem if parsed.error is not None else f"line {parsed.line}: {problem}"
                continue
            out.rows.append(parsed.record)
            out.dialogues.append(parsed.dialogue)
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
    names = dict.fromkeys(str(k) for row in rows for k in row["scores"] if k != "combined")
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
    """The model card's first paragraph and its "Limits" section (Markdown)."""
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


_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(.+?)\*\*")
_EM = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def _inline(text: str) -> str:
    """One line of Markdown as escaped HTML: code, bold, italics; a link keeps its text only
    (the page names no external URL)."""
    pieces = re.split(r"(`[^`]+`)", _LINK.sub(r"\1", text))
    out = []
    for piece in pieces:
        code = _CODE.fullmatch(piece)
        if code:
            out.append(f"<code>{html.escape(code.group(1))}</code>")
            continue
        escaped = html.escape(piece)
        escaped = _STRONG.sub(r"<strong>\1</strong>", escaped)
        out.append(_EM.sub(r"<em>\1</em>", escaped))
    return "".join(out)


def markdown_html(text: str) -> str:
    """The Markdown of a model card section (paragraphs, bullet and numbered lists, code,
    bold, italics, links as text) as HTML; everything else is shown as escaped text."""
    blocks: list[str] = []
    items: list[str] = []
    para: list[str] = []

    def close_para() -> None:
        if para:
            blocks.append("<p>" + _inline(" ".join(x.strip() for x in para)) + "</p>")
            para.clear()

    def close_list() -> None:
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if not line.strip():
            close_para()
            close_list()
        elif _ITEM.match(line):
            close_para()
            items.append(_ITEM.sub("", line).strip())
        elif items and line[:1].isspace():
            items[-1] += " " + line.strip()  # a list item's continuation line
        elif line.lstrip().startswith("#"):
            close_para()
            close_list()
            blocks.append(f"<h4>{_inline(line.lstrip('#').strip())}</h4>")
        else:
            close_list()
            para.append(line)
    close_para()
    close_list()
    return "\n".join(blocks)


def _reply_text(row: dict[str, Any], dialogue: Dialogue | None = None) -> str:
    """The reply that was scored: the response (a completion's response section, never its
    analysis), from the parsed input."""
    if dialogue is not None:
        return dialogue.response
    text = row.get("response")
    return text if isinstance(text, str) else ""


def _spans(text: str, sentences: Sequence[Mapping[str, Any]], offsets_fit: bool) -> list[tuple[int, int, Any]]:
    """(start, end, sentence) of each explained sentence in `text`: by its offsets when they
    index `text`, else found by its text in order; a sentence not found is left out."""
    spans, last = [], 0
    for s in sentences:
        sentence = s.get("text")
        if not isinstance(sentence, str) or not sentence:
            continue
        start, end = s.get("start"), s.get("end")
        if not (offsets_fit and isinstance(start, int) and isinstance(end, int) and text[start:end] == sentence):
            start = text.find(sentence, last)
            if start < 0:
                continue
            end = start + len(sentence)
        if start < last:
            continue
        spans.append((start, end, s))
        last = end
    return spans


def _delta(sentence: Mapping[str, Any], check: str) -> float | None:
    d = (sentence.get("deltas") or {}).get(check)
    return float(d) if _number(d) else None


def colour_scale(explanations: Iterable[Mapping[str, Any] | None], check: str = "combined") -> float:
    """The largest |delta| on `check` over every explained sentence: one colour scale for the page."""
    deltas = [
        abs(d)
        for e in explanations
        if e
        for s in (e.get("sentences") or [])
        if isinstance(s, Mapping) and (d := _delta(s, check)) is not None
    ]
    return max(deltas, default=0.0)


def _explained_html(
    row: dict[str, Any],
    explanation: dict | None,
    check: str,
    scale: float | None = None,
    dialogue: Dialogue | None = None,
) -> str:
    """The reply with each sentence coloured by its contribution to `check`, on `scale`
    (the page's largest |delta|; None: this reply's own)."""
    text = _reply_text(row, dialogue)
    sentences = [s for s in (explanation or {}).get("sentences") or [] if isinstance(s, Mapping)]
    if not sentences:
        return f"<p class='reply'>{html.escape(text)}</p>"
    if scale is None:
        scale = colour_scale([explanation], check)
    scale = max(scale, 1e-9)
    pieces, last = [], 0
    for start, end, s in _spans(text, sentences, (explanation or {}).get("field") is None):
        d = _delta(s, check) or 0.0
        alpha = min(0.75, abs(d) / scale * 0.75)
        colour = f"rgba(46,160,67,{alpha:.2f})" if d > 0 else f"rgba(207,34,46,{alpha:.2f})"
        pieces.append(html.escape(text[last:start]))
        title = html.escape(f"{check} {d:+.3f}", quote=True)
        pieces.append(f"<span style='background:{colour}' title='{title}'>{html.escape(text[start:end])}</span>")
        last = end
    pieces.append(html.escape(text[last:]))
    return "<p class='reply'>" + "".join(pieces) + "</p>"


def _context_text(row: dict[str, Any], dialogue: Dialogue | None = None) -> str:
    """The seeker's message the reply answers (the last user message of `messages`)."""
    if dialogue is not None:
        return dialogue.query
    query = row.get("query")
    return query if isinstance(query, str) else ""


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
    field_map: Mapping[str, str] | None = None,
) -> str:
    """The whole HTML page as a string (self-contained; every value from the file escaped)."""
    rows = scored.rows
    explanations = explanations or {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        key = row.get(by) if by else "all"
        groups["(missing)" if key is None else str(key)].append(i)
    models = Counter(f"{_perm(r).get('model')} {_perm(r).get('version')}" for r in rows)
    summary, limits = _card_sections(card)
    ordered = _by_combined(rows)
    picked = {"Lowest combined scores": ordered[:extremes], "Highest combined scores": ordered[::-1][:extremes]}
    shown = {i for idx in picked.values() for i in idx}
    scale = colour_scale(explanations.get(i) for i in shown)  # one colour scale for the whole page
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
    for label, indices in picked.items():
        out.append(f"<h2>{label}</h2>")
        for i in indices:
            row = rows[i]
            dialogue = scored.dialogue(i, field_map)
            scores = ", ".join(f"{k} {v:.2f}" for k, v in row["scores"].items())
            line = _perm(row).get("line")
            out.append(
                "<div class='card'>"
                f"<p><b>combined {row['combined']:.3f}</b> ({html.escape(scores)}); line {html.escape(str(line))}, "
                f"id {html.escape(str(row.get('id')))}</p>"
                f"<p><i>Seeker:</i> {html.escape(_context_text(row, dialogue))}</p>"
                f"{_explained_html(row, explanations.get(i), 'combined', scale, dialogue)}</div>"
            )
    out.append(
        "<p><small>Sentence colours: green raised the combined score, red lowered it (occlusion: the score "
        f"change when the sentence is removed); one scale for the whole page, full colour at a change of "
        f"{scale:.3f}.</small></p>"
    )
    out += [
        "<h2>Model</h2>",
        f"<p>{_inline(summary)}</p>",
        f"<h3>Known limits</h3>{markdown_html(limits) if limits else '<p>(none listed)</p>'}",
        "</body></html>",
    ]
    return "\n".join(out)


def _by_combined(rows: Sequence[dict[str, Any]]) -> list[int]:
    return sorted(range(len(rows)), key=lambda i: value(rows[i], "combined") or 0.0)


def extreme_indices(rows: Sequence[dict[str, Any]], n: int) -> list[int]:
    """Indices of the n lowest and n highest combined scores."""
    ordered = _by_combined(rows)
    return sorted(set(ordered[:n]) | set(ordered[::-1][:n]))


def explain_rows(
    scorer,
    rows: Sequence[dict[str, Any]],
    indices: Iterable[int],
    dialogues: Sequence[Dialogue | None] | None = None,
    field_map: Mapping[str, str] | None = None,
) -> dict[int, dict]:
    """Explanations of the picked rows (offsets index their `Dialogue.response`); a row that
    does not parse, or whose explanation fails, is left unexplained."""
    out = {}
    for i in indices:
        dialogue = dialogues[i] if dialogues is not None and i < len(dialogues) else None
        try:
            if dialogue is None:
                record = {k: v for k, v in rows[i].items() if k not in OUTPUT_FIELDS}
                dialogue = parse_record(record, field_map)
            out[i] = scorer.explain(dialogue).to_dict()
        except (PermError, ValueError):
            continue
    return out


class ReportRun:
    """One `perm report` run, checked and locked before the model is loaded.

    Refused here: an output of "-" (a page needs a file) or one that is the scored file or
    the errors file it reads (links included), not a regular file, another run's output
    (`OutputBusy`), or existing without `overwrite` (`TargetError`, code 2); a scored file
    that is missing or a directory (`OptionError`). `read()` raises `NoScoredRecords` when no
    line is a scored record; `write(scorer)` explains the extremes and writes the page to a
    temporary file renamed over OUTPUT when complete (a failure leaves OUTPUT as it was).
    """

    def __init__(
        self,
        scored_path: str | os.PathLike,
        output_path: str | os.PathLike,
        *,
        errors_path: str | os.PathLike | None = None,
        overwrite: bool = False,
        field_map: Mapping[str, str] | None = None,
    ) -> None:
        self.scored_path = Path(scored_path)
        if os.fspath(scored_path) == "-":
            raise OptionError("perm report reads a file (the output of perm score), not stdin")
        if not self.scored_path.is_file():
            raise OptionError(f"input {scored_path} does not exist or is not a file")
        self.field_map = check_field_map(field_map)
        self.errors_path = Path(errors_path) if errors_path is not None else default_errors_path(os.fspath(scored_path))
        if os.fspath(output_path) == "-":
            raise OptionError("perm report writes an HTML file: give -o FILE.html, not - (stdout)")
        self.output: OutputFile = single_output(
            output_path, reads=(self.scored_path, self.errors_path), overwrite=overwrite
        )
        self.output_path = Path(output_path)
        self._scored: ScoredFile | None = None

    def read(self) -> ScoredFile:
        """The scored file's rows (`NoScoredRecords` when not one line is a scored record)."""
        if self._scored is None:
            scored = read_scored(self.scored_path, self.field_map)
            if scored.unreadable and not scored.rows:
                hint = ""
                if not self.field_map and "'response'" in (scored.first_problem or ""):
                    hint = " (a file scored with --fields needs the same --fields here)"
                raise NoScoredRecords(
                    f"{self.scored_path} holds no scored records: none of its {len(scored.unreadable)} lines is "
                    f"perm score output ({scored.first_problem}){hint}; no report was written"
                )
            self._scored = scored
        return self._scored

    def write(self, scorer, *, by: str | None = None, extremes: int = 5) -> ScoredFile:
        """Explain the extremes with `scorer` and write the page (see the class)."""
        try:
            scored = self.read()
            indices = extreme_indices(scored.rows, extremes)
            explanations = explain_rows(scorer, scored.rows, indices, scored.dialogues, self.field_map)
            errors = (count_lines(str(self.errors_path)) or 0) if self.errors_path.is_file() else 0
            page = render_report(
                scored,
                by=by,
                explanations=explanations,
                extremes=extremes,
                errors=errors,
                card=scorer.config.path / "README.md",
                title=f"perm-lite report: {self.scored_path.name}",
                scales=scorer.heads.scales,
                field_map=self.field_map,
            )
            self.output.write(page)
            self.output.commit()
        finally:
            self.output.abort()  # the lock, and a temporary file left by a failure
        return scored

    def close(self) -> None:
        """Give the run up: nothing is written, the output's lock is released."""
        self.output.abort()


def write_report(
    scored_path: Path,
    out_path: Path,
    scorer,
    *,
    by: str | None = None,
    extremes: int = 5,
    errors_path: Path | None = None,
    overwrite: bool = True,
    field_map: Mapping[str, str] | None = None,
) -> ScoredFile:
    """Read `scored_path`, explain its extremes with `scorer`, write the HTML to `out_path`
    (`ReportRun(...).write(scorer)`; an existing `out_path` is replaced unless `overwrite`
    is False)."""
    run = ReportRun(scored_path, out_path, errors_path=errors_path, overwrite=overwrite, field_map=field_map)
    return run.write(scorer, by=by, extremes=extremes)
