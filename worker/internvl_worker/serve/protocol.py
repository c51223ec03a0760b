"""The wire formats: TGI's and OpenAI's requests in, one `GenerationRequest` out; responses back.

Stage 1 of serving (decode request) and stage 3 (encode response) as pure functions over pydantic
models and dicts, so every field mapping is unit-tested without a server. The TGI shapes follow what the
`text-generation` 0.7.0 client sends and parses (details, prefill and tokens are required keys; the chat
chunk needs `system_fingerprint`, `choices[].logprobs` and `delta.tool_calls`, null allowed).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..templates import IMAGE_TAG, Conversation
from .sampling import SamplingParams

MAX_STOP_SEQUENCES = 4  # as TGI's default --max-stop-sequences
# TGI's router finds images in `inputs` with this pattern (router/src/validation.rs).
MARKDOWN_IMAGE = re.compile(r"!\[\]\(([^\)]*)\)")


class ServeError(Exception):
    """A request that cannot be served; becomes `{"error", "error_type"}` with this HTTP status."""

    def __init__(self, status: int, message: str, error_type: str = "validation"):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


def validation_error(message: str) -> ServeError:
    return ServeError(422, message, "validation")


def format_validation_error(e: ValidationError) -> str:
    """Pydantic's errors as one line: `parameters.top_p: Input should be less than 1`."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"] if x != "__root__")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------- TGI in


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1)
    min_new_tokens: int | None = Field(default=None, ge=0)  # ours: fixed-length outputs for benchmarks
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    return_full_text: bool | None = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, lt=1)
    truncate: int | None = None
    typical_p: float | None = Field(default=None, gt=0, lt=1)
    best_of: int | None = Field(default=None, ge=1)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    grammar: Any = None
    adapter_id: str | None = None


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


# ---------------------------------------------------------------------------------------- OpenAI in


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension; benchmarks use it
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, gt=0)  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)  # TGI's extension
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None


# ------------------------------------------------------------------------------ the common request


@dataclass
class GenerationRequest:
    """What the engine needs, whichever protocol asked: a conversation, its images, sampling."""

    conversation: Conversation
    params: SamplingParams
    adapter: str | None = None  # a served adapter name; None = the default model
    stream: bool = False
    details: bool = False
    decoder_input_details: bool = False
    prefix_text: str = ""  # return_full_text: the inputs, put before the generated text
    omit_done: bool = False  # OpenAI stream without the final `data: [DONE]` (text-generation 0.7.0)
    include_usage: bool = False  # OpenAI stream_options.include_usage
    model_name: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int = 8192
    max_total_tokens: int = 10240
    max_images: int = 8
    default_max_new_tokens: int = 20  # TGI's default when a request names none


def split_markdown_images(text: str) -> tuple[str, list[str]]:
    """TGI inputs -> (query with one `<image>` tag per image, image URLs in order).

    `![](url)Describe it` becomes `<image>\\nDescribe it`: InternVL was trained with a newline after the
    image block, and this is the prompt `inference("Describe it", images=[url])` builds.
    """
    images: list[str] = []

    def repl(m: re.Match) -> str:
        images.append(m.group(1).strip())
        after = text[m.end() : m.end() + 1]
        return IMAGE_TAG if after in ("\n", "") else IMAGE_TAG + "\n"

    query = MARKDOWN_IMAGE.sub(repl, text)
    return query, images


def _sampling_from(*, do_sample: bool, temperature, top_p, top_k, seed, repetition_penalty, frequency_penalty, presence_penalty, max_new_tokens, min_new_tokens, stop) -> SamplingParams:
    # TGI samples when any warper is set even if do_sample is false (its NextTokenChooser does the same);
    # temperature 0 (OpenAI) means greedy.
    if temperature == 0:
        do_sample = False
    elif temperature not in (None, 1.0) or top_k or (top_p is not None and top_p < 1.0):
        do_sample = True
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(min_new_tokens or 0, max_new_tokens),
        do_sample=do_sample,
        temperature=temperature if temperature else 1.0,
        top_k=top_k,
        top_p=top_p if top_p is not None and top_p < 1.0 else None,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty or None,
        presence_penalty=presence_penalty or None,
        seed=seed,
        stop=list(stop or []),
    )


def check_stop(stop: list[str]) -> list[str]:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise validation_error(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
    if any(not s for s in stop):
        raise validation_error("stop: stop sequences must not be empty")
    return stop


def parse_tgi(body: Any, limits: Limits, *, stream: bool | None = None) -> GenerationRequest:
    """A TGI request body (already JSON-decoded) -> GenerationRequest. `stream` overrides the body's."""
    try:
        req = TGIRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(format_validation_error(e)) from None
    p = req.parameters
    if not req.inputs.strip():
        raise validation_error("inputs: must not be empty")
    if p.best_of not in (None, 1):
        raise validation_error("best_of: only 1 is supported")
    if p.top_n_tokens:
        raise validation_error("top_n_tokens: not supported by this server")
    if p.grammar is not None:
        raise validation_error("grammar: not supported by this server")
    if p.truncate is not None:
        raise validation_error("truncate: not supported (cutting a prompt could cut an image block); shorten the inputs")
    query, images = split_markdown_images(req.inputs)
    if len(images) > limits.max_images:
        raise validation_error(f"inputs: {len(images)} images, at most {limits.max_images} per request")
    max_new = p.max_new_tokens or limits.default_max_new_tokens
    params = _sampling_from(
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=None,
        max_new_tokens=max_new,
        min_new_tokens=p.min_new_tokens,
        stop=check_stop(p.stop),
    )
    return GenerationRequest(
        conversation=Conversation(turns=[(query, None)], images=images),
        params=params,
        adapter=p.adapter_id,
        stream=req.stream if stream is None else stream,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        prefix_text=req.inputs if p.return_full_text else "",
    )


def _content_to_text(content, role: str, images: list[str]) -> str:
    """Message content -> text with an `<image>\\n` tag where each image part was; images appended."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.type == "text":
            out.append(part.text or "")
        else:
            if role != "user":
                raise validation_error(f"messages: image_url parts are only allowed in user messages, not {role}")
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if not url:
                raise validation_error("messages: image_url part without a url")
            images.append(url)
            out.append(IMAGE_TAG + "\n")
    return "".join(out)


def chat_conversation(messages: list[ChatMessage]) -> Conversation:
    """OpenAI messages -> Conversation: a leading system prompt, then (user, assistant) turns ending with a user.

    Consecutive messages of one role are joined with a newline (some clients split a turn in two).
    """
    images: list[str] = []
    system = None
    turns: list[list] = []  # [query, response]
    for i, m in enumerate(messages):
        text = _content_to_text(m.content, m.role, images)
        if m.role in ("system", "developer"):
            if turns:
                raise validation_error(f"messages[{i}]: a system message must come before the conversation")
            system = text if system is None else system + "\n" + text
        elif m.role == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] += "\n" + text
            else:
                turns.append([text, None])
        else:  # assistant
            if not turns:
                raise validation_error(f"messages[{i}]: the conversation must start with a user message")
            turns[-1][1] = text if turns[-1][1] is None else turns[-1][1] + "\n" + text
    if not turns or turns[-1][1] is not None:
        raise validation_error("messages: the last message must be from the user")
    if any(r is None for _, r in turns[:-1]):
        raise validation_error("messages: internal error pairing turns")  # unreachable by construction
    return Conversation(turns=[(q, r) for q, r in turns], images=images, system=system)


def parse_chat(body: Any, limits: Limits, *, omit_done: bool = False) -> GenerationRequest:
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(format_validation_error(e)) from None
    if req.n not in (None, 1):
        raise validation_error("n: only 1 choice per request is supported")
    if req.tools:
        raise validation_error("tools: tool calls are not supported by this server")
    if req.logprobs:
        raise validation_error("logprobs: not supported by this server")
    conv = chat_conversation(req.messages)
    if len(conv.images) > limits.max_images:
        raise validation_error(f"messages: {len(conv.images)} images, at most {limits.max_images} per request")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_new = req.max_completion_tokens or req.max_tokens or 0  # 0: filled in once the prompt length is known
    params = _sampling_from(
        do_sample=False,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        max_new_tokens=max_new or 1,
        min_new_tokens=req.min_tokens,
        stop=check_stop(stop),
    )
    if not max_new:
        params.max_new_tokens = 0
        params.min_new_tokens = req.min_tokens or 0
    return GenerationRequest(
        conversation=conv,
        params=params,
        adapter=req.model,
        stream=req.stream,
        omit_done=omit_done,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        model_name=req.model,
    )


def fit_max_new_tokens(params: SamplingParams, prompt_tokens: int, limits: Limits) -> None:
    """Check the prompt against the limits; fill in max_new_tokens where the request left it open (0)."""
    if prompt_tokens > limits.max_input_tokens:
        raise validation_error(f"inputs: the prompt is {prompt_tokens} tokens (images included), over the limit of {limits.max_input_tokens} (--max-input-tokens)")
    room = limits.max_total_tokens - prompt_tokens
    if params.max_new_tokens == 0:
        params.max_new_tokens = max(1, room)
        params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
    elif prompt_tokens + params.max_new_tokens > limits.max_total_tokens:
        raise validation_error(
            f"inputs tokens + max_new_tokens must be <= {limits.max_total_tokens}. Given: {prompt_tokens} inputs tokens and {params.max_new_tokens} max_new_tokens"
        )


# ---------------------------------------------------------------------------------------- responses


@dataclass
class Generated:
    """What came out of one request, for the response encoders."""

    text: str
    token_ids: list[int]
    token_texts: list[str]
    logprobs: list[float]
    specials: list[bool]
    finish_reason: str  # length | eos_token | stop_sequence
    prompt_tokens: int
    seed: int | None = None
    prefill: list[dict] = field(default_factory=list)


def tgi_token(token_id: int, text: str, logprob: float | None, special: bool) -> dict:
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def tgi_response(g: Generated, req: GenerationRequest) -> dict:
    """/generate's body (the client always asks for details; they are cheap, so always sent)."""
    return {
        "generated_text": req.prefix_text + g.text,
        "details": {
            "finish_reason": g.finish_reason,
            "generated_tokens": len(g.token_ids),
            "seed": g.seed,
            "prefill": g.prefill,
            "tokens": [tgi_token(i, t, lp, s) for i, t, lp, s in zip(g.token_ids, g.token_texts, g.logprobs, g.specials)],
        },
    }


def tgi_stream_event(index: int, token: dict, *, final: Generated | None = None, req: GenerationRequest | None = None) -> dict:
    ev = {"index": index, "token": token, "top_tokens": None, "generated_text": None, "details": None}
    if final is not None:
        ev["generated_text"] = (req.prefix_text if req else "") + final.text
        ev["details"] = {"finish_reason": final.finish_reason, "generated_tokens": len(final.token_ids), "seed": final.seed, "input_length": final.prompt_tokens}
    return ev


OPENAI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def new_chat_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(g: Generated) -> dict:
    n = len(g.token_ids)
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": n, "total_tokens": g.prompt_tokens + n}


def chat_completion(g: Generated, *, model: str, chat_id: str, created: int | None = None, fingerprint: str = "") -> dict:
    return {
        "id": chat_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": g.text, "tool_calls": None},
                "logprobs": None,
                "finish_reason": OPENAI_FINISH.get(g.finish_reason, g.finish_reason),
            }
        ],
        "usage": usage(g),
    }


def chat_chunk(*, chat_id: str, model: str, created: int, content: str | None, finish_reason: str | None = None, role: bool = False, fingerprint: str = "", usage_: dict | None = None, empty_choices: bool = False) -> dict:
    choices = []
    if not empty_choices:
        delta = {"role": "assistant", "content": content, "tool_calls": None}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": OPENAI_FINISH.get(finish_reason, finish_reason) if finish_reason else None}]
    chunk = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": fingerprint, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def tgi_error(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def openai_error(message: str, error_type: str, status: int) -> dict:
    """OpenAI clients read error.message; error_type is kept at the top for TGI-style clients."""
    code = {404: "model_not_found", 429: "rate_limit_exceeded", 401: "invalid_api_key", 413: "request_too_large"}.get(status)
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}, "error_type": error_type}
