import numpy as np
from fixture_model import build_tokenizer

from perm_lite.records import parse_record
from perm_lite.text import encode_dialogues, pad_batch, render


def enc(record, max_length=32):
    return encode_dialogues([parse_record(record)], build_tokenizer(), max_length)[0]


def test_layout_context_then_reply():
    tok = build_tokenizer()
    e = enc({"query": "my dog died", "response": "so sorry", "analysis": "sad"})
    text = tok.decode(e.input_ids.tolist(), skip_special_tokens=False)
    assert text == "[CLS] seeker : my dog died [SEP] analysis : sad response : so sorry [SEP]"
    n_context = 2 + len("seeker : my dog died".split())
    assert e.token_type_ids.tolist() == [0] * n_context + [1] * (len(e) - n_context)
    assert not e.truncated


def test_render_labels_parts():
    r = render(parse_record({"persona": "nurse", "scenario": "night", "query": "q", "response": "r"}))
    assert (r.persona, r.scenario, r.query, r.response) == (
        "persona: nurse",
        "situation: night",
        "seeker: q",
        "response: r",
    )


def test_oldest_context_dropped_first_and_reported():
    messages = [{"role": "user", "content": "hi " * 10}, {"role": "assistant", "content": "hello " * 10}]
    messages.append({"role": "user", "content": "my dog died"})
    e = enc({"messages": messages, "response": "so sorry " * 3}, max_length=32)
    assert len(e) == 32
    assert e.truncated
    assert e.tokens["response"] == (8, 8)  # whole
    assert e.tokens["query"] == (5, 5)  # whole
    assert e.tokens["history"] == (16, 24)
    words = build_tokenizer().decode(e.input_ids.tolist()).split()
    # The newest earlier turn is whole; only the tail of the oldest one survives.
    assert words.count("hello") == 10 and words.count("hi") == 4 and words.count("seeker") == 1


def test_long_response_keeps_its_start_and_some_context():
    e = enc({"query": "my dog died today " * 5, "response": "sorry " + "okay " * 100}, max_length=32)
    assert len(e) == 32
    kept, total = e.tokens["response"]
    assert total == 103 and kept == 29 - 7
    assert e.tokens["query"][0] == 7  # a quarter of the budget stays for the context


def test_pad_batch_masks():
    tok = build_tokenizer()
    es = encode_dialogues([parse_record({"response": "ok"}), parse_record({"response": "so very sad"})], tok, 32)
    batch = pad_batch(es, 0)
    assert batch["input_ids"].shape == (2, max(len(e) for e in es))
    assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in es]
    assert np.all(batch["input_ids"][0, len(es[0]) :] == 0)
