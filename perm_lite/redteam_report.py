"""`perm redteam`'s reports: a short text summary and a self-contained HTML page.

Every value taken from the input or the model is escaped in the page (no script, no
external resource); the text report prints replies with control characters made visible.
"""

from __future__ import annotations

import html
import json

from perm_lite.redteam import RedTeamReport, context_text

SHOWN = 600  # characters of a reply shown in a report


def _visible(text: str, limit: int = SHOWN) -> str:
    """Control characters as escapes, long text cut with a marker."""
    out = "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode() for ch in text)
    return out if len(out) <= limit else out[:limit] + f"... [{len(out) - limit} more characters]"


def summary_line(report: RedTeamReport) -> str:
    """One line: how often the search found a degenerate reply above the original."""
    return (
        f"redteam: a degenerate reply scored above the original in {report.hacked}/{len(report.results)} "
        f"contexts ({report.hack_rate:.1%}); {report.calls} model calls, budget {report.budget} per context, "
        f"objective {report.objective}, pools {','.join(report.pools)}"
    )


def to_text(report: RedTeamReport, show: int = 10) -> str:
    """The summary and the `show` contexts where the search got furthest above the original."""
    lines = [summary_line(report), ""]
    order = sorted(range(len(report.results)), key=lambda k: report.results[k].gain, reverse=True)
    for k in order[:show]:
        r = report.results[k]
        lines.append(f"context {k + 1}: {_visible(context_text(report.contexts[k]), 160)}")
        lines.append(f"  original  {r.original_score:+.4f}  {_visible(r.original, 200)}")
        if r.best_degenerate:
            d = r.best_degenerate
            verdict = "HACK" if r.hacked else "below the original"
            lines.append(
                f"  degenerate {d.score:+.4f} ({d.score - r.original_score:+.4f}, {verdict}): "
                f"{', '.join(d.degeneracy.reasons)}"
            )
            lines.append(f"    {_visible(d.text, 300)}")
        lines.append(f"  best found {r.best.score:+.4f}" + (" (degenerate)" if r.best.degeneracy.degenerate else ""))
        lines.append("")
    return "\n".join(lines)


def to_json(report: RedTeamReport) -> dict:
    """Every context's figures (texts included) for machines."""
    return {
        "model": report.model,
        "objective": report.objective,
        "budget": report.budget,
        "pools": list(report.pools),
        "contexts": len(report.results),
        "hacked": report.hacked,
        "hack_rate": report.hack_rate,
        "calls": report.calls,
        "results": [
            {
                "context": context_text(d),
                "original": r.original,
                "original_score": r.original_score,
                "best": {
                    "text": r.best.text,
                    "score": r.best.score,
                    "edits": list(r.best.edits),
                    "degenerate": list(r.best.degeneracy.reasons),
                },
                "best_degenerate": None
                if r.best_degenerate is None
                else {
                    "text": r.best_degenerate.text,
                    "score": r.best_degenerate.score,
                    "edits": list(r.best_degenerate.edits),
                    "reasons": list(r.best_degenerate.degeneracy.reasons),
                },
                "hacked": r.hacked,
                "calls": r.calls,
            }
            for d, r in zip(report.contexts, report.results)
        ],
    }


_STYLE = (
    "body{font:14px/1.45 system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}"
    ".hack{background:#fde2e2}.ok{background:#e6f4ea}.t{white-space:pre-wrap;font-size:12px}"
)


def to_html(report: RedTeamReport) -> str:
    """A self-contained page: the summary, then one row per context (worst first)."""
    e = html.escape
    rows = []
    order = sorted(range(len(report.results)), key=lambda k: report.results[k].gain, reverse=True)
    for k in order:
        r = report.results[k]
        d = r.best_degenerate
        cls = "hack" if r.hacked else "ok"
        found = (
            f"{d.score:+.4f} ({d.score - r.original_score:+.4f})<br>{e(', '.join(d.degeneracy.reasons))}"
            f"<div class='t'>{e(_visible(d.text))}</div>"
            if d
            else "none found"
        )
        rows.append(
            f"<tr class='{cls}'><td>{k + 1}</td><td class='t'>{e(_visible(context_text(report.contexts[k]), 300))}</td>"
            f"<td>{r.original_score:+.4f}<div class='t'>{e(_visible(r.original))}</div></td><td>{found}</td></tr>"
        )
    meta = json.dumps({"model": report.model, "budget": report.budget, "objective": report.objective})
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>perm redteam</title>"
        f"<style>{_STYLE}</style></head><body><h1>perm redteam</h1><p>{e(summary_line(report))}</p>"
        f"<p>{e(meta)}</p><p>A hack is a degenerate reply (repeated sentences or n-grams, echoed context, "
        "imported stock or foreign material) that the reward scores above the original reply.</p>"
        "<table><tr><th>#</th><th>context</th><th>original</th><th>best degenerate reply found</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
