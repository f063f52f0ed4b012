import pytest

from perm_lite.records import RecordError, Turn, parse_record, split_completion


def test_query_form_and_passthrough():
    d = parse_record({"id": 7, "query": " I lost my job ", "response": " So sorry. ", "lang": "en", "meta": {"a": 1}})
    assert (d.id, d.query, d.response) == (7, "I lost my job", "So sorry.")
    assert d.passthrough == {"lang": "en", "meta": {"a": 1}}
    assert d.history == ()


def test_messages_form_answers_last_user_turn():
    d = parse_record(
        {
            "messages": [
                {"role": "system", "content": "be kind"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello, how are you?"},
                {"role": "user", "content": "my dog died"},
            ],
            "response": "I'm so sorry.",
        }
    )
    assert d.query == "my dog died"
    assert d.history == (Turn("seeker", "hi"), Turn("supporter", "hello, how are you?"))


def test_completion_form_is_split():
    d = parse_record({"query": "q", "completion": "# Analysis\nShe is grieving.\n\n# RESPONSE\nI'm here for you."})
    assert (d.analysis, d.response) == ("She is grieving.", "I'm here for you.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("just a reply", ("", "just a reply")),
        ("## analysis:\nA\n## response\nB", ("A", "B")),
        ("# Response\nonly response", ("", "only response")),
        ("# Analysis\nonly analysis", ("", "# Analysis\nonly analysis")),
    ],
)
def test_split_completion(text, expected):
    assert split_completion(text) == expected


def test_persona_scenario_analysis():
    d = parse_record({"persona": "a nurse", "scenario": "night shift", "analysis": "exhausted", "response": "r"})
    assert (d.persona, d.scenario, d.analysis) == ("a nurse", "night shift", "exhausted")


def test_field_map_renames():
    d = parse_record({"reply": "ok then", "question": "why"}, {"response": "reply", "query": "question"})
    assert (d.response, d.query) == ("ok then", "why")


@pytest.mark.parametrize(
    ("record", "field", "fragment"),
    [
        ({}, "response", "missing"),
        ({"response": "   "}, "response", "empty"),
        ({"response": 3}, "response", "expected a string, got int"),
        ({"response": "r", "query": ["x"]}, "query", "expected a string, got list"),
        ({"response": "r", "messages": "hi"}, "messages", "non-empty list"),
        ({"response": "r", "messages": [{"role": "bot", "content": "x"}]}, "messages", "role 'bot'"),
        ({"response": "r", "messages": [{"role": "assistant", "content": "x"}]}, "messages", "no 'user' turn"),
        (
            {"response": "r", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages",
            "last non-system message",
        ),
        ({"response": "r", "query": "q", "messages": [{"role": "user", "content": "x"}]}, "messages", "not both"),
        ({"response": "r", "completion": "c"}, "completion", "not both"),
        ({"completion": "# Analysis\nx\n# Response\n"}, "completion", "empty"),
        ({"response": "r", "id": [1]}, "id", "string or integer"),
    ],
)
def test_bad_records_name_the_field(record, field, fragment):
    with pytest.raises(RecordError) as info:
        parse_record(record)
    assert info.value.field == field
    assert fragment in str(info.value)


def test_not_an_object():
    with pytest.raises(RecordError, match="expected a JSON object, got list"):
        parse_record([1, 2])


def test_error_location_in_message():
    err = RecordError("empty", "response").at("line 12")
    assert str(err) == "line 12, field 'response': empty"


@pytest.mark.parametrize(
    "record, field",
    [
        ({"response": "so sorry \ud800"}, "response"),
        ({"completion": "# Response\n\udfff"}, "completion"),
        ({"response": "r", "query": "\ud83d"}, "query"),
        ({"response": "r", "persona": "x\udc00y"}, "persona"),
        ({"response": "r", "analysis": "\ud800"}, "analysis"),
        ({"response": "r", "messages": [{"role": "user", "content": "hi \ud800"}]}, "messages"),
        ({"response": "r", "id": "\ud800"}, "id"),
    ],
)
def test_lone_surrogates_are_the_records_error(record, field):
    """A lone surrogate (JSON "\\ud800") cannot be tokenized or written as UTF-8."""
    with pytest.raises(RecordError, match="lone surrogate") as info:
        parse_record(record)
    assert info.value.field == field
    str(info.value).encode("utf-8")  # the message itself is printable


def test_valid_unicode_passes():
    d = parse_record({"id": "caf\u00e9", "response": "\U0001f622 so sorry", "query": "\u4f60\u597d"})
    assert d.response == "\U0001f622 so sorry"
