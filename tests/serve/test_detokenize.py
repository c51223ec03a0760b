"""Streaming detokenization (prepare.IncrementalDecoder): deltas add up to `decode`'s text, never split a
character, for both the tokenizers stream and the window fallback."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from internvl_worker.serve.prepare import IncrementalDecoder


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


TEXTS = ["plain words, and punctuation!", "héllo wörld: 世界 and 🙂🙂 then ascii", "  leading spaces\nnew lines\tand tabs  "]


@pytest.mark.parametrize("stream", [True, False], ids=["decode-stream", "window"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_decoded_text(tok, text, stream):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = ids[: len(ids) // 2] + [eos] + ids[len(ids) // 2 :]  # a special token in the middle is skipped
    dec = IncrementalDecoder(tok)
    assert (dec._stream is not None) is True  # the tiny tokenizer is a fast one: the stream is used
    if not stream:
        dec._stream = None
    deltas = [dec.step(i) for i in ids]
    want = tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) + dec.finish(dec.full_text()) == want
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0x7FF for c in text):  # a multi-byte character spread over byte tokens: some step held back
        assert "" in deltas


@pytest.mark.parametrize(
    "tok",
    [
        {"id": 5, "text": "plain", "logprob": -0.125, "special": False},
        {"id": 151645, "text": "<|im_end|>", "logprob": None, "special": True},
        {"id": 7, "text": 'quote " back\\slash \n 世界 🙂 \x01', "logprob": -3.0e-09, "special": False},
        {"id": 8, "text": "", "logprob": 0.0, "special": False},
        {"id": 9, "text": "x", "logprob": float("-inf"), "special": False},
    ],
)
def test_token_event_bytes_equal_the_generic_encoder(tok):
    from internvl_worker.serve.app import sse, sse_token
    from internvl_worker.serve.protocol import tgi_stream_event

    assert sse_token(12, tok) == sse(tgi_stream_event(12, tok))
