"""Input records: validation and normalisation of one JSON object into a `Dialogue`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from perm_lite.errors import OptionError, PermError

KNOWN_FIELDS = ("id", "response", "analysis", "persona", "scenario", "query", "messages", "completion")


def check_field_map(field_map: Mapping[str, str] | None) -> dict[str, str]:
    """A field map {perm-lite field: the input's name for it}; an unknown perm-lite field is
    an `OptionError` (it would be ignored)."""
    mapping = dict(field_map or {})
    unknown = sorted(map(str, set(mapping) - set(KNOWN_FIELDS)))
    if unknown:
        raise OptionError(f"unknown perm-lite fields {unknown}; known: {', '.join(KNOWN_FIELDS)}", "fields")
    return mapping


_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]*(analysis|response)[ \t]*:?[ \t]*$", re.IGNORECASE | re.MULTILINE)


class RecordError(PermError, ValueError):
    """A record that cannot be scored: `location` (e.g. "line 12"), `field` and `reason`."""

    def __init__(self, reason: str, field: str | None = None, location: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.location = location
        where = ", ".join(part for part in (location, f"field '{field}'" if field else None) if part)
        super().__init__(f"{where}: {reason}" if where else reason)

    def at(self, location: str) -> RecordError:
        """The same error, naming where the record came from."""
        return RecordError(self.reason, self.field, location)


@dataclass(frozen=True)
class Turn:
    role: str  # "seeker" or "supporter"
    text: str


@dataclass(frozen=True)
class Dialogue:
    """A normalised record: what the model sees, plus untouched passthrough fields."""

    response: str
    analysis: str = ""
    persona: str = ""
    scenario: str = ""
    query: str = ""
    history: tuple[Turn, ...] = ()
    id: Any = None
    passthrough: Mapping[str, Any] = field(default_factory=dict)


def split_completion(completion: str) -> tuple[str, str]:
    """Split a PERM policy completion into (analysis, response).

    Headings `# Analysis` and `# Response` are matched case-insensitively. Without a
    `# Response` heading the whole completion is the response.
    """
    marks = [(m.start(), m.end(), m.group(1).lower()) for m in _HEADING.finditer(completion)]
    sections: dict[str, str] = {}
    for i, (_, end, name) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(completion)
        sections.setdefault(name, completion[end:stop].strip())
    if "response" not in sections:
        return "", completion.strip()
    return sections.get("analysis", ""), sections["response"]


def _text(value: str, name: str) -> str:
    """`value`, checked to be valid Unicode: a lone surrogate (JSON `"\\ud800"`) cannot be
    tokenized or written as UTF-8, so it is this record's error, not the batch's."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RecordError(
                f"contains a lone surrogate ({value[exc.start]!r} at character {exc.start}); not valid Unicode text",
                name,
            ) from None
    return value


def _optional_str(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"expected a string, got {type(value).__name__}", name)
    return _text(value, name).strip()


def _messages(value: Any) -> tuple[str, tuple[Turn, ...]]:
    if not isinstance(value, list) or not value:
        raise RecordError("expected a non-empty list of {'role', 'content'} objects", "messages")
    turns: list[Turn] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise RecordError(f"item {i} is {type(msg).__name__}, expected an object", "messages")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"item {i} has role {role!r}, expected 'system', 'user' or 'assistant'", "messages")
        if not isinstance(content, str):
            raise RecordError(f"item {i} content must be a string", "messages")
        _text(content, "messages")
        if role == "system":
            continue  # instructions to the chatbot are not part of the seeker's side
        turns.append(Turn("seeker" if role == "user" else "supporter", content.strip()))
    last_user = max((i for i, t in enumerate(turns) if t.role == "seeker"), default=None)
    if last_user is None:
        raise RecordError("no 'user' turn: the reply must answer a user message", "messages")
    if last_user != len(turns) - 1:
        raise RecordError(
            "the last non-system message must be a 'user' turn (put the reply being scored in 'response')",
            "messages",
        )
    return turns[last_user].text, tuple(turns[:last_user])


def parse_record(record: Any, field_map: Mapping[str, str] | None = None) -> Dialogue:
    """Validate one input object and return a `Dialogue`.

    `field_map` maps perm-lite field names to the names used in the record, e.g.
    {"response": "reply"}. Unknown fields are kept in `passthrough`.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if field_map:
        renamed = dict(record)
        for ours, theirs in field_map.items():
            if theirs in record:
                renamed[ours] = renamed.pop(theirs)
        record = renamed
    analysis = _optional_str(record, "analysis")
    if "completion" in record and record["completion"] is not None:
        if "response" in record:
            raise RecordError("give either 'completion' or 'response', not both", "completion")
        completion = record["completion"]
        if not isinstance(completion, str):
            raise RecordError(f"expected a string, got {type(completion).__name__}", "completion")
        _text(completion, "completion")
        parsed_analysis, response = split_completion(completion)
        analysis = analysis or parsed_analysis
        if not response:
            raise RecordError("the '# Response' section is empty", "completion")
    else:
        if "response" not in record or record["response"] is None:
            raise RecordError(
                "missing: every record needs the reply to score in 'response' (or 'completion')", "response"
            )
        response = record["response"]
        if not isinstance(response, str):
            raise RecordError(f"expected a string, got {type(response).__name__}", "response")
        response = _text(response, "response").strip()
        if not response:
            raise RecordError("empty: the reply to score must contain text", "response")
    query, history = "", ()
    if record.get("messages") is not None:
        if record.get("query") is not None:
            raise RecordError("give either 'query' or 'messages', not both", "messages")
        query, history = _messages(record["messages"])
    else:
        query = _optional_str(record, "query")
    rid = record.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise RecordError(f"expected a string or integer, got {type(rid).__name__}", "id")
    if isinstance(rid, str):
        _text(rid, "id")
    passthrough = {k: v for k, v in record.items() if k not in KNOWN_FIELDS}
    return Dialogue(
        response=response,
        analysis=analysis,
        persona=_optional_str(record, "persona"),
        scenario=_optional_str(record, "scenario"),
        query=query,
        history=history,
        id=rid,
        passthrough=passthrough,
    )
