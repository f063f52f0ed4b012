"""Explanations bounded and `perm explain` hardened (issue 19: items 1, 7, 9, 10, parts of 17 and 18).

Bounds are asserted as counts (forward passes, variants per call, characters per variant,
traced memory), never as wall-clock limits. Every test uses the tiny fixture model.
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
import signal
import sys
import tracemalloc
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from perm_lite.cli import explain_commands
from perm_lite.cli.main import app
from typer.testing import CliRunner

import perm_lite
from perm_lite import Guardrail
from perm_lite.explain import (
    CHUNK_SIZE,
    MAX_SENTENCES,
    _without,
    explain,
    explain_dialogue,
    split_sentences,
    visible_chars,
)
from perm_lite.records import Dialogue, Turn, parse_record
from perm_lite.text import CHARS_PER_TOKEN

RNG_WORDS = (
    "i am so sorry to hear that . it sounds really hard ! how are you feeling ? my dog died today "
    "thank you friend , you are not alone . what can i do to help"
).split()


class Counting:
    """The tiny scorer, counting what it is asked to score."""

    def __init__(self, scorer):
        self.real, self.config, self.tokenizer, self.heads = scorer, scorer.config, scorer.tokenizer, scorer.heads
        self.calls: list[list[int]] = []  # per call: characters of text per dialogue

    def encode(self, dialogues):
        return self.real.encode(dialogues)

    def score_dialogues(self, dialogues):
        self.calls.append([len(d.response) + len(d.query) + sum(len(t.text) for t in d.history) for d in dialogues])
        return self.real.score_dialogues(dialogues)

    @property
    def scored(self) -> int:
        return sum(len(c) for c in self.calls)


def _limit(scorer) -> int:
    return CHARS_PER_TOKEN * scorer.config.max_length


# -- item 1: bounded by what the model reads ---------------------------------------------------


def test_a_long_reply_costs_a_bounded_number_of_forward_passes(scorer):
    """Issue: a 100k-character reply cost 5,001 forward passes although the sentences past
    the clip cannot change the score; all variants were built at once, each a full copy."""
    counting = Counting(scorer)
    reply = "Hi. " * 5_000  # 20 KB, 5,000 sentences
    explanation = explain(counting, {"query": "my dog died", "response": reply})
    assert counting.scored <= 1 + MAX_SENTENCES
    assert max(len(c) for c in counting.calls) <= CHUNK_SIZE  # never all variants at once
    assert counting.calls[0] == [len(reply.strip()) + len("my dog died")]  # the full record, once
    assert max(n for c in counting.calls[1:] for n in c) <= 2 * _limit(scorer) + 20  # no variant holds it all
    measured, omitted = len(explanation.sentences), explanation.omitted
    assert measured + omitted.sentences_unseen + omitted.sentences_over_cap == 5_000
    assert omitted.sentences_unseen > 4_000  # the tiny model reads 32 tokens


def test_a_one_megabyte_reply_and_27001_turns_stay_small(scorer):
    """Issue: a 1 MB reply of "Hi. " took explain past 4-6 GB; 27,001 one-character turns
    with context took 6 GB in 28 s. Measured as Python's traced peak, not wall time."""
    counting = Counting(scorer)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(27_001)]
    big_reply = {"query": "my dog died", "response": "Hi. " * 262_144}
    big_context = {"messages": messages, "response": "so sorry. that is hard."}
    for record, context in ((big_reply, False), (big_context, True)):
        dialogue = parse_record(record)
        tracemalloc.start()
        try:
            explanation = explain_dialogue(counting, dialogue, context=context, source=record)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 40_000_000, peak  # bytes; the old code held every variant (gigabytes)
        assert explanation.result.combined == counting.real.score_dialogues([dialogue])[0].combined
    assert max(len(c) for c in counting.calls) <= CHUNK_SIZE
    assert counting.scored <= 2 * (1 + MAX_SENTENCES) + 64
    assert explanation.omitted.turns_unseen > 26_000 and len(explanation.context) <= 65


def test_only_sentences_the_model_cannot_read_are_skipped_fuzz(scorer):
    """Against brute force (every sentence removed, whole text kept): every sentence whose
    removal moves a score is measured, with the same delta; the rest are counted unseen."""
    rng = random.Random(19)
    for _ in range(25):
        words = [rng.choice(RNG_WORDS) for _ in range(rng.randint(1, 400))]
        reply = " ".join(w if rng.random() > 0.05 else w + "\n" for w in words).strip() or "ok"
        record = {"query": " ".join(rng.choices(RNG_WORDS, k=rng.randint(0, 30))), "response": reply}
        if rng.random() < 0.5:
            record["analysis"] = " ".join(rng.choices(RNG_WORDS, k=rng.randint(0, 40)))
        dialogue = parse_record(record)
        explanation = explain(scorer, record, max_sentences=10_000)
        spans = split_sentences(dialogue.response)
        full = scorer.score_dialogues([dialogue])[0]
        alone = [scorer.score_dialogues([replace(dialogue, response=_without(dialogue.response, s))])[0] for s in spans]
        moved = {i for i, r in enumerate(alone) if abs(r.combined - full.combined) > 1e-6}
        measured = {c.index: c for c in explanation.sentences}
        assert moved <= set(measured), (reply, moved - set(measured))
        for i, c in measured.items():
            assert c.deltas["combined"] == pytest.approx(full.combined - alone[i].combined, abs=2e-6)
        assert len(measured) + explanation.omitted.sentences_unseen == len(spans)
        seen = visible_chars(scorer, dialogue)
        assert all(spans[i][0] < seen for i in measured)


def test_only_turns_the_model_cannot_read_are_skipped_fuzz(scorer):
    """Context turns: every turn whose removal moves a score is measured, with the delta of
    the whole record without it (variants hold only the history the model can read)."""
    rng = random.Random(7)
    for _ in range(10):
        messages = [
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": " ".join(rng.choices(RNG_WORDS, k=rng.randint(0, 12))),
            }
            for i in range(rng.randint(1, 80))
        ]
        record = {
            "messages": [*messages, {"role": "user", "content": "my dog died"}],
            "response": "so sorry. i am here.",
        }
        dialogue = parse_record(record)
        explanation = explain(scorer, record, context=True, max_turns=10_000)
        full = scorer.score_dialogues([dialogue])[0]
        history = dialogue.history
        alone = [
            scorer.score_dialogues([replace(dialogue, history=history[:k] + history[k + 1 :])])[0]
            for k in range(len(history))
        ]
        moved = {k for k, r in enumerate(alone) if abs(r.combined - full.combined) > 1e-6}
        measured = {int(c.part.split(":")[1]): c for c in explanation.context if c.part != "query"}
        assert moved <= set(measured)
        for k, c in measured.items():
            assert c.deltas["combined"] == pytest.approx(full.combined - alone[k].combined, abs=2e-6)
        assert len(measured) + explanation.omitted.turns_unseen == len(history)


def test_caps_count_what_they_leave_out(scorer):
    record = {"messages": [{"role": "user", "content": "hi"}] * 3 + [{"role": "user", "content": "my dog died"}]}
    record["messages"][1] = {"role": "assistant", "content": "hello"}
    explanation = explain(scorer, {**record, "response": "so sorry. that is hard. i am here."}, context=True,
                          max_sentences=2, max_turns=1)  # fmt: skip
    assert [c.index for c in explanation.sentences] == [0, 1]
    assert explanation.omitted.sentences_over_cap == 1
    assert [c.part for c in explanation.context] == ["history:2", "query"]  # the newest turn, then the query
    assert explanation.omitted.turns_over_cap == 2
    data = json.loads(json.dumps(explanation.to_dict()))
    assert data["omitted"]["sentences_over_cap"] == 1 and data["field"] == "response"


def test_guardrail_culprit_is_bounded(scorer):
    counting = Counting(scorer)
    guard = Guardrail({"combined": 99.0}, scorer=counting)
    verdict = guard.check({"query": "my dog died", "response": "i am so sorry. " * 1_000})
    assert verdict.flagged and counting.scored <= 1 + MAX_SENTENCES  # the full reply is scored once
    assert max(len(c) for c in counting.calls) <= CHUNK_SIZE


# -- item 18: one direction between explain and scorer ---------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_explain_does_not_import_the_scorer():
    """Issue: explain.py <-> scorer.py imported each other (TYPE_CHECKING and function level)."""
    root = Path(perm_lite.__file__).parent
    assert "perm_lite.scorer" not in _imports(root / "explain.py")
    assert "perm_lite.explain" in _imports(root / "scorer.py")  # Scorer.explain: scorer -> explain only


# -- item 10: offsets index the field the user gave ------------------------------------------


def test_offsets_index_the_input_field(scorer):
    raw = "  \n  I am so sorry.   That sounds hard.  "
    explanation = explain(scorer, {"query": "my dog died", "response": raw})
    assert explanation.field == "response"
    assert [raw[c.start : c.end] for c in explanation.sentences] == ["I am so sorry.", "That sounds hard."]

    completion = "# Analysis\nI am so sorry. The seeker is sad.\n\n# Response\n\n  I am so sorry. How are you?\n"
    explanation = explain(scorer, {"query": "my dog died", "completion": completion})
    assert explanation.field == "completion"
    spans = [(c.start, c.end) for c in explanation.sentences]
    assert [completion[a:b] for a, b in spans] == ["I am so sorry.", "How are you?"]
    assert all(a > completion.index("# Response") for a, _ in spans)  # never the analysis

    mapped = {"question": "my dog died", "reply": "   Okay. Thanks."}
    explanation = explain(scorer, mapped, field_map={"response": "reply", "query": "question"})
    assert explanation.field == "reply"
    assert [mapped["reply"][c.start : c.end] for c in explanation.sentences] == ["Okay.", "Thanks."]

    dialogue = Dialogue(response="Okay. Thanks.", history=(Turn("seeker", "hi"),))
    assert explain(scorer, dialogue).field is None  # a Dialogue: offsets in Dialogue.response

    verdict = Guardrail({"combined": 99.0}, scorer=scorer).check({"query": "x", "response": raw})
    if verdict.culprit is not None:
        assert raw[verdict.culprit["start"] : verdict.culprit["end"]] == verdict.culprit["sentence"]
        assert verdict.culprit["field"] == "response"


def test_perm_explain_offsets_index_the_file_field(tmp_path, tiny_model_dir):
    """Issue: offsets were relative to the stripped response or the completion's response
    section, so `perm report` coloured the wrong spans (and could show the analysis)."""
    src = tmp_path / "in.jsonl"
    completion = "# Analysis\nSad seeker.\n# Response\n  I am so sorry. How are you?"
    rows = [{"id": 1, "completion": completion}, {"id": 2, "response": "  Okay.  Thanks."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["explain", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    for row, original in zip(got, rows):
        text = original.get("completion") or original.get("response")
        assert [text[s["start"] : s["end"]] for s in row["sentences"]] == [s["text"] for s in row["sentences"]]
    assert [row["field"] for row in got] == ["completion", "response"]
    out.unlink()
    src.write_text(json.dumps({"id": 3, "reply": "  Okay.  Thanks."}) + "\n")
    res = CliRunner().invoke(
        app, ["explain", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--fields", "response=reply"]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())
    assert row["field"] == "reply" and [(s["start"], s["end"]) for s in row["sentences"]] == [(2, 7), (9, 16)]


# -- item 9: the terminal view prints user text as text ------------------------------------


def test_terminal_view_prints_markup_and_escapes_as_text(scorer):
    from rich.console import Console

    hostile = "[/bold] Oops. [link=https://evil.example]click[/link] now. \x1b[2J\x1b]0;owned\x07 Bye.\u202e"
    explanation = explain(scorer, {"query": "hi", "response": hostile})
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="truecolor", width=200)
    explain_commands.render_terminal(explanation, "combined", console=console, title="line 1")
    shown = buffer.getvalue()
    assert "[/bold]" in shown and "[link=https://evil.example]" in shown  # literally, not markup
    assert "\x1b]8;" not in shown  # no hyperlink
    assert "\x1b[2J" not in shown and "\x1b]0;" not in shown and "\u202e" not in shown
    assert "\\x1b[2J" in shown and "\\x07" in shown and "\\u202e" in shown  # shown, visibly


def test_perm_explain_renders_on_a_terminal_without_crashing(tmp_path, tiny_model_dir, monkeypatch):
    """Issue: the terminal view passed reply text to Rich as markup: `[/bold]` crashed it."""
    from typer.testing import _NamedTextIOWrapper

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"query": "hi", "response": "[/bold] so sorry. \x1b[31mred"}) + "\n")
    monkeypatch.setattr(_NamedTextIOWrapper, "isatty", lambda self: True, raising=False)  # stdout is a terminal
    res = CliRunner().invoke(app, ["explain", str(src), "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert "[/bold] so sorry." in res.stdout and "\\x1b[31mred" in res.stdout and "\x1b[31mred" not in res.stdout


# -- item 7: outputs.py rules, streaming, resume, errors file, progress ----------------------


def _records(n: int) -> str:
    return "".join(json.dumps({"id": i, "query": "my dog died", "response": f"so sorry {i}. that is hard."}) + "\n"
                   for i in range(n))  # fmt: skip


def test_no_fixed_temporary_name_and_no_writing_through_links(tmp_path, tiny_model_dir):
    """Issue: `ln -s victim .OUT.perm-tmp` overwrote the victim; an input named
    `.OUT.perm-tmp` disappeared."""
    runner = CliRunner()
    src = tmp_path / "in.jsonl"
    src.write_text(_records(2))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.perm-tmp").symlink_to(victim)
    for args in ([], ["--overwrite"]):  # a new output, then replacing it
        res = runner.invoke(app, ["explain", str(src), "-o", str(out), "--model", str(tiny_model_dir), *args])
        assert res.exit_code == 0, res.output
        assert victim.read_text() == "precious\n"
        assert len(out.read_text().splitlines()) == 2
    named = tmp_path / ".out2.jsonl.perm-tmp"
    named.write_text(_records(1))
    res = runner.invoke(app, ["explain", str(named), "-o", str(tmp_path / "out2.jsonl"), "--model",
                              str(tiny_model_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert named.read_text() == _records(1)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".perm-tmp") and p != named.name and "out.jsonl" not in p]


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stream_interrupt_and_resume(tmp_path, tiny_model_dir, monkeypatch, how):
    """Issue: perm explain wrote only at the end (SIGTERM kept nothing), with no --resume."""
    import perm_lite.explain as explain_module

    src = tmp_path / "in.jsonl"
    src.write_text(_records(6))
    out = tmp_path / "out.jsonl"
    real = explain_module.explain_dialogue
    seen = []

    def stopping(scorer, dialogue, **kw):
        seen.append(dialogue.id)
        if len(seen) == 3:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # perm handles it after this record
            else:
                raise KeyboardInterrupt
        return real(scorer, dialogue, **kw)

    monkeypatch.setattr(explain_module, "explain_dialogue", stopping)
    runner = CliRunner()
    res = runner.invoke(app, ["explain", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 130, res.output
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == list(range(len(kept))) and 2 <= len(kept) < 6  # what was explained, in order, kept
    monkeypatch.setattr(explain_module, "explain_dialogue", real)
    res = runner.invoke(app, ["explain", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--resume"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6)) and [r["perm"]["line"] for r in rows] == list(range(1, 7))


def test_errors_file_progress_and_refusals(tmp_path, tiny_model_dir, monkeypatch):
    runner = CliRunner()
    src = tmp_path / "in.jsonl"
    src.write_text(_records(2) + "{broken\n" + json.dumps({"query": "no reply"}) + "\n")
    out = tmp_path / "out.jsonl"
    ticks: list = []

    @contextmanager
    def recorder(show, total, label="scoring"):
        ticks.append(("start", show, total, label))
        yield ticks.append

    monkeypatch.setattr(explain_commands, "progress_bar", recorder, raising=False)
    monkeypatch.setattr(explain_commands, "_is_terminal", lambda stream: stream is sys.stderr, raising=False)
    res = runner.invoke(app, ["explain", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 3, res.output
    assert ticks[0] == ("start", True, 4, "explaining") and sum(t for t in ticks[1:]) == 4
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 4] and errors[1]["field"] == "response"
    assert "explained 2 records" in res.stderr
    # refusals: one line each, with the error: prefix
    for args, code in (
        (["explain", str(src), "-o", str(out)], 2),  # exists
        (["explain", str(src), "-o", str(src)], 2),  # the input
        (["explain", str(tmp_path / "missing.jsonl")], 2),
        (["explain", str(src), "-o", str(tmp_path / "new.jsonl"), "--check", "warmth"], 2),
    ):
        res = runner.invoke(app, [*args, "--model", str(tiny_model_dir)])
        assert res.exit_code == code, res.output
        assert res.stderr.startswith("error: "), res.stderr
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"loss": 1.5}\n')
    res = runner.invoke(app, ["explain", str(src), "-o", str(foreign), "--resume", "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and foreign.read_text() == '{"loss": 1.5}\n'


def test_report_refusals_have_the_error_prefix(tmp_path, tiny_model_dir):
    runner = CliRunner()
    page = tmp_path / "page.html"
    page.write_text("old")
    scored = tmp_path / "scored.jsonl"
    scored.write_text("")
    for args in (
        ["report", str(tmp_path / "missing.jsonl"), "-o", str(page)],
        ["report", str(scored), "-o", str(page)],
    ):
        res = runner.invoke(app, [*args, "--model", str(tiny_model_dir)])
        assert res.exit_code == 2 and res.stderr.startswith("error: "), res.stderr
