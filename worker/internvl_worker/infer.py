"""The Python inference API, shaped like the seed's ms-swift calls.

    loaded = load_model("/models/InternVL3-1B-hf", model_type="internvl3-1b", dtype="bf16")
    response, history = inference(loaded.model, loaded.template, "How far is each city?", images=["road.png"])
    for response, history in inference_stream(loaded.model, loaded.template, "Which is farthest?", history):
        ...

`images` are the conversation's images in order: they fill the `<image>` tags of the history and the
query; images beyond those tags are placed before the new query (so a first turn with one image and no
tag gets `<image>\\n` in front, as InternVL's chat() does). The returned history keeps the queries with
their tags, so passing the same history and images back reproduces the same prompt.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator

from .images import load_image
from .templates import IMAGE_TAG, Conversation, Template

History = list[list[str]]


def build_conversation(query: str, history: History | None, images: list | None, system: str | None) -> Conversation:
    history = [list(turn) for turn in (history or [])]
    images = list(images or [])
    tags = sum(q.count(IMAGE_TAG) for q, _ in history) + query.count(IMAGE_TAG)
    if len(images) > tags and query.count(IMAGE_TAG) == 0:
        query = f"{IMAGE_TAG}\n" * (len(images) - tags) + query
    turns = [(q, r) for q, r in history] + [(query, None)]
    return Conversation(turns=turns, images=images, system=system)


def prepare_inputs(model, template: Template, conv: Conversation, *, image_kwargs: dict | None = None) -> dict:
    """Tensors for `model.generate` / `model(...)`: input_ids, attention_mask and pixel_values."""
    import torch

    pil_images = [load_image(src, **(image_kwargs or {})) for src in conv.images]
    pixel_values, tiles = template.tiler(pil_images) if pil_images else (None, [])
    encoded = template.encode(conv, tiles)
    device = model.get_input_embeddings().weight.device
    inputs = {
        "input_ids": torch.tensor([encoded.input_ids], device=device),
        "attention_mask": torch.ones(1, len(encoded), dtype=torch.long, device=device),
    }
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(device=device, dtype=model.dtype)
    return inputs


def generation_config_for(model, template: Template, **overrides):
    """The model's generation config with our stop tokens; greedy unless temperature > 0 or do_sample."""
    config = copy.deepcopy(model.generation_config)
    temperature = overrides.pop("temperature", None)
    do_sample = overrides.pop("do_sample", None)
    if do_sample is None:
        do_sample = bool(temperature and temperature > 0)
    config.do_sample = do_sample
    if do_sample:
        config.temperature = temperature if temperature else 1.0
    else:
        config.temperature, config.top_p, config.top_k = None, None, None
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    config.eos_token_id = template.stop_token_ids or config.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = template.tokenizer.pad_token_id
    if config.max_new_tokens is None:
        config.max_new_tokens = 512
    return config


def _cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return ids


def inference(model, template: Template, query: str, history: History | None = None, *, images: list | None = None, system: str | None = None, image_kwargs: dict | None = None, **generation) -> tuple[str, History]:
    """One reply: (response, history + [[query, response]])."""
    import torch

    conv = build_conversation(query, history, images, system)
    inputs = prepare_inputs(model, template, conv, image_kwargs=image_kwargs)
    config = generation_config_for(model, template, **generation)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    new_tokens = _cut_at_stop(out[0, inputs["input_ids"].shape[1] :].tolist(), template.stop_token_ids)
    response = template.tokenizer.decode(new_tokens, skip_special_tokens=True)
    return response, [list(t) for t in conv.turns[:-1]] + [[conv.turns[-1][0], response]]


def inference_stream(model, template: Template, query: str, history: History | None = None, *, images: list | None = None, system: str | None = None, image_kwargs: dict | None = None, **generation) -> Iterator[tuple[str, History]]:
    """Yields (response so far, history with it) as tokens arrive; the last item equals `inference()`."""
    import torch
    from transformers import TextIteratorStreamer

    conv = build_conversation(query, history, images, system)
    inputs = prepare_inputs(model, template, conv, image_kwargs=image_kwargs)
    config = generation_config_for(model, template, **generation)
    streamer = TextIteratorStreamer(template.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, generation_config=config, streamer=streamer)
        except BaseException as e:  # re-raised in the caller's thread below
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    prior = [list(t) for t in conv.turns[:-1]]
    response = ""
    for delta in streamer:
        response += delta
        yield response, prior + [[conv.turns[-1][0], response]]
    thread.join()
    if failure:
        raise failure[0]
