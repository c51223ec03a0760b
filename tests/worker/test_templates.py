"""Prompt and label layout for single-turn, multi-turn, multi-image and text-only conversations."""

import pytest

from internvl_worker.registry import MODELS
from internvl_worker.templates import IGNORE_INDEX, TEMPLATES, Conversation, PromptTooLong, Template, TemplateError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make(tokenizer, name="internvl2_5", system="SYS", per_tile=4, max_length=None):
    return Template(TEMPLATES[name], tokenizer, image_seq_length=per_tile, default_system=system, max_length=max_length)


def labelled_text(tokenizer, enc):
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_single_turn_with_image_layout(tokenizer):
    t = make(tokenizer)
    enc = t.encode(Conversation(turns=[("What color?", "red")], images=["x.png"]), [3])
    text = tokenizer.decode(enc.input_ids)
    expected = (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat color?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    assert text == expected
    assert enc.image_tokens == 12 == enc.input_ids.count(t.img_context_id)
    # Only the response and the token that ends it are learned.
    assert labelled_text(tokenizer, enc) == "red<|im_end|>"
    assert len(enc.labels) == len(enc.input_ids)


def test_multi_turn_labels_every_response(tokenizer):
    t = make(tokenizer, name="internlm2", system=None)
    conv = Conversation(turns=[("<image>\nhi", "one"), ("again", "two")], images=["a.png"])
    enc = t.encode(conv, [1])
    text = tokenizer.decode(enc.input_ids)
    assert text.startswith("<s><|im_start|>user\n<img>")  # no system block when the default is None
    assert "one<|im_end|><|im_start|>user\nagain<|im_end|><|im_start|>assistant\ntwo<|im_end|>" in text  # MPT: no newline
    assert labelled_text(tokenizer, enc) == "one<|im_end|>two<|im_end|>"


def test_multi_image_tags_in_place_and_text_only(tokenizer):
    t = make(tokenizer, per_tile=2)
    conv = Conversation(turns=[("left <image> right <image> which?", "b")], images=["a", "b"])
    enc = t.encode(conv, [1, 3])
    text = tokenizer.decode(enc.input_ids)
    assert "left <img>" + "<IMG_CONTEXT>" * 2 + "</img> right <img>" + "<IMG_CONTEXT>" * 6 + "</img> which?" in text
    # Untagged images go before the first query, one block each, in order.
    enc2 = t.encode(Conversation(turns=[("q", "r")], images=["a", "b"]), [1, 2])
    assert "user\n<img>" + "<IMG_CONTEXT>" * 2 + "</img>\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nq" in tokenizer.decode(enc2.input_ids)
    text_only = t.encode(Conversation(turns=[("just text", "ok")]), [])
    assert t.img_start_id not in text_only.input_ids and text_only.image_tokens == 0


def test_generation_prompt_ends_with_assistant_and_system_override(tokenizer):
    t = make(tokenizer, name="phi3")
    enc = t.encode(Conversation(turns=[("q", None)], system=""), [])
    assert tokenizer.decode(enc.input_ids) == "<s><|user|>\nq<|end|><|assistant|>\n"
    assert all(lab == IGNORE_INDEX for lab in enc.labels)
    assert t.stop_token_ids == tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])


def test_tag_count_mismatch_and_length_limit(tokenizer):
    t = make(tokenizer, max_length=50)
    with pytest.raises(TemplateError, match="2 <image> tag\\(s\\) in the queries but 1 image"):
        t.encode(Conversation(turns=[("<image><image>", "r")], images=["a"]), [1])
    with pytest.raises(PromptTooLong, match="over max_length 50") as e:
        t.encode(Conversation(turns=[("q", "r")], images=["a"]), [13])
    assert e.value.image_tokens == 52 and e.value.length > 50


def test_every_registered_model_has_a_template():
    for spec in MODELS.values():
        assert spec.template in TEMPLATES, spec.model_type
    assert MODELS["internvl-chat-v1_5"].template == "internlm2"
    assert MODELS["mini-internvl-chat-4b-v1_5"].template == "phi3"
