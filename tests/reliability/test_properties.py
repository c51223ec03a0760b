"""Property-based tests (hypothesis): the dataset row parser, the template builder and the serving request
parsers, on arbitrary input, raise nothing but their own validation error, and what they build is consistent."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from internvl_worker.data import RowError, parse_row
from internvl_worker.serve.protocol import Limits, ServeError, parse_chat, parse_tgi
from internvl_worker.templates import IGNORE_INDEX, IMAGE_TAG, Conversation, TemplateError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
KEYS = ["query", "response", "history", "images", "image", "system", "conversations", "messages", "from", "value", "role", "content"]
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(["<image>", "<image>\n", "", "<img>", "<IMG_CONTEXT>"])


def row_like():
    """Dicts that look like rows (known keys, any values), so the parser's deeper branches are reached."""
    message = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system", "user", "x"]) | json_value,
                                                  "value": texts | json_value, "role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_value,
                                                  "content": texts | json_value})
    return st.fixed_dictionaries({}, optional={
        "query": texts | json_value, "response": texts | json_value, "system": texts | json_value,
        "history": st.lists(st.lists(texts | json_value, max_size=3), max_size=3) | json_value,
        "images": st.lists(texts, max_size=3) | json_value, "image": texts | st.lists(texts, max_size=3),
        "conversations": st.lists(message, max_size=4) | json_value, "messages": st.lists(message, max_size=4) | json_value,
    })


@FAST
@given(st.one_of(json_value, row_like()))
def test_parse_row_raises_only_row_error(obj):
    try:
        conv = parse_row(obj)
    except RowError as e:
        assert str(e)
        return
    # Accepted: a well-formed conversation whose <image> tags (if any) match its images.
    assert conv.turns and all(isinstance(q, str) and isinstance(r, str) for q, r in conv.turns)
    assert all(isinstance(i, str) and i for i in conv.images)
    tags = sum(q.count(IMAGE_TAG) for q, _ in conv.turns)
    assert tags in (0, len(conv.images))


@st.composite
def conversations(draw):
    n_images = draw(st.integers(0, 3))
    turns = []
    for k in range(draw(st.integers(1, 3))):
        turns.append((draw(st.text(max_size=40)), draw(st.text(max_size=40))))
    if n_images and draw(st.booleans()):  # tags placed by the writer, one per image, anywhere in the queries
        for _ in range(n_images):
            k = draw(st.integers(0, len(turns) - 1))
            q, r = turns[k]
            at = draw(st.integers(0, len(q)))
            turns[k] = (q[:at] + IMAGE_TAG + q[at:], r)
    system = draw(st.none() | st.text(max_size=20))
    tiles = draw(st.lists(st.integers(1, 13), min_size=n_images, max_size=n_images))
    return Conversation(turns=turns, images=[f"img{i}.png" for i in range(n_images)], system=system), tiles


@FAST
@given(conversations())
def test_template_encode_labels_align_and_image_tokens_match_tiles(tiny, case):
    conv, tiles = case
    template = tiny.template
    try:
        enc = template.encode(conv, tiles, check_length=False)
    except TemplateError as e:  # only when the text itself holds extra <image> tags or reserved image tokens
        assert "<image>" in str(e) or "reserved image token" in str(e)
        return
    assert len(enc.input_ids) == len(enc.labels)
    per_tile = template.image_seq_length
    assert enc.image_tokens == per_tile * sum(tiles)
    assert enc.input_ids.count(template.img_context_id) == per_tile * sum(tiles)
    assert enc.input_ids.count(template.img_start_id) == len(tiles) == enc.input_ids.count(template.img_end_id)
    # Labels are the ids where they are learned, -100 elsewhere; never on image tokens.
    for i, (tok, lab) in enumerate(zip(enc.input_ids, enc.labels)):
        assert lab == IGNORE_INDEX or lab == tok, i
        if tok == template.img_context_id:
            assert lab == IGNORE_INDEX
    # Every response is learned, with the token that ends it (the model must learn to stop).
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) >= len(conv.turns)


@FAST
@given(st.one_of(json_value, st.fixed_dictionaries({}, optional={"inputs": texts | json_value, "parameters": json_value | st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "best_of", "truncate", "details", "adapter_id", "do_sample", "return_full_text"]), json_value, max_size=5), "stream": json_value})))
def test_tgi_parser_raises_only_validation_errors(body):
    try:
        req = parse_tgi(body, Limits(max_images=2))
    except ServeError as e:
        assert e.status == 422 and e.message
        return
    assert req.params.max_new_tokens >= 1 and len(req.conversation.images) <= 2


@FAST
@given(st.one_of(json_value, st.fixed_dictionaries({"messages": json_value | st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_value, "content": texts | json_value | st.lists(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "image_url", "audio"]), "text": json_value, "image_url": json_value | st.fixed_dictionaries({"url": texts})}), max_size=3)}), max_size=4)}, optional={"model": json_value, "max_tokens": json_value, "temperature": json_value, "stop": json_value, "n": json_value, "stream": json_value})))
def test_chat_parser_raises_only_validation_errors(body):
    try:
        req = parse_chat(body, Limits(max_images=2))
    except ServeError as e:
        assert e.status == 422 and e.message
        return
    assert req.conversation.turns and req.conversation.turns[-1][1] is None
    assert len(req.conversation.images) <= 2


@pytest.mark.parametrize("text", ["\ud800", "\x00" * 50, "🙂" * 100, "<image>" * 3, "\u202e" + "abc", "<IMG_CONTEXT>", "</img>"])
def test_template_never_crashes_on_odd_unicode(tiny, text):
    conv = Conversation(turns=[(text, text)], images=[])
    try:
        enc = tiny.template.encode(conv, [], check_length=False)
    except TemplateError:
        return
    assert len(enc.input_ids) == len(enc.labels) > 0
