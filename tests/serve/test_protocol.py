"""Stage 1 and 3 as pure functions: request parsing, limits, response shapes (no model, no server)."""

from __future__ import annotations

import pytest

from internvl_worker.serve.engine import parse_adapters
from internvl_worker.serve.protocol import (
    Limits,
    ServeError,
    chat_conversation,
    ChatMessage,
    fit_max_new_tokens,
    parse_chat,
    parse_tgi,
    split_markdown_images,
)
from internvl_worker.serve.sampling import SamplingParams

L = Limits(max_input_tokens=100, max_total_tokens=150, max_images=2)


def test_markdown_images_become_tags_with_internvl_newline():
    assert split_markdown_images("![](http://a/x.png)Describe it") == ("<image>\nDescribe it", ["http://a/x.png"])
    assert split_markdown_images("![](a)\nQ ![](b)") == ("<image>\nQ <image>", ["a", "b"])
    assert split_markdown_images("no images") == ("no images", [])


def test_tgi_parameters_map_like_tgi():
    g = parse_tgi({"inputs": "hi", "parameters": {"temperature": 0.5, "stop": ["x"], "seed": 3, "return_full_text": True}}, L)
    assert g.params.do_sample and g.params.temperature == 0.5 and g.params.seed == 3 and g.params.stop == ["x"]
    assert g.prefix_text == "hi" and g.params.max_new_tokens == 20  # TGI's default
    greedy = parse_tgi({"inputs": "hi"}, L).params
    assert not greedy.do_sample and greedy.seed is None
    for bad, words in [({"inputs": ""}, "empty"), ({"inputs": "hi", "parameters": {"stop": list("abcde")}}, "at most 4"),
                       ({"inputs": "hi", "parameters": {"best_of": 2}}, "best_of"), ({"inputs": "![](a)![](b)![](c)"}, "at most 2"),
                       ({"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": {}}}}, "grammar")]:  # fmt: skip
        with pytest.raises(ServeError, match=words) as e:
            parse_tgi(bad, L)
        assert e.value.status == 422 and e.value.error_type == "validation"


def test_chat_messages_to_conversation():
    msgs = [ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "and"}, {"role": "user", "content": [{"type": "text", "text": "then?"}]},
    ]]  # fmt: skip
    conv = chat_conversation(msgs)
    assert conv.system == "be brief" and conv.images == ["data:a"]
    assert conv.turns == [("<image>\nwhat?", "a cat"), ("and\nthen?", None)]
    with pytest.raises(ServeError, match="before the conversation"):
        chat_conversation([ChatMessage(role="user", content="a"), ChatMessage(role="system", content="b"), ChatMessage(role="user", content="c")])


def test_chat_defaults_fill_max_tokens_from_the_room_left():
    g = parse_chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 0}, L)
    assert not g.params.do_sample and g.params.max_new_tokens == 0 and not g.omit_done
    fit_max_new_tokens(g.params, 40, L)
    assert g.params.max_new_tokens == 110
    with pytest.raises(ServeError, match="over the limit of 100"):
        fit_max_new_tokens(SamplingParams(max_new_tokens=5), 101, L)
    with pytest.raises(ServeError, match="must be <= 150"):
        fit_max_new_tokens(SamplingParams(max_new_tokens=60), 100, L)
    assert parse_chat({"messages": [{"role": "user", "content": "hi"}], "stop": "x", "max_tokens": 5}, L, omit_done=True).params.stop == ["x"]


def test_parse_adapters():
    assert parse_adapters("a=/x, b=/y") == {"a": "/x", "b": "/y"}
    assert parse_adapters(None) == {}
    for bad in ("a", "a=/x,a=/y", "default=/x", "__base__=/x", "=/x"):
        with pytest.raises(ValueError):
            parse_adapters(bad)


def test_serve_flags_parse():
    from internvl_worker.cli import build_parser

    a = build_parser().parse_args(["serve", "--model_id_or_path", "/m", "--adapters", "x=/a", "--host", "0.0.0.0", "--port", "8080", "--max-batch-size", "4", "--allow-private-image-urls"])
    assert (a.model_id_or_path, a.adapters, a.port, a.max_batch_size, a.allow_private_image_urls, a.max_concurrent_requests) == ("/m", "x=/a", 8080, 4, True, 128)
