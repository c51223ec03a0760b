"""Chat templates: turn (system, history, query, images) into token ids and training labels.

Layout, e.g. `internvl2_5` (chatml with a newline after each turn):

    <|im_start|>system\n{SYSTEM}<|im_end|>\n
    <|im_start|>user\n<img><IMG_CONTEXT>x(256*tiles)</img>\n{QUERY}<|im_end|>\n
    <|im_start|>assistant\n{RESPONSE}<|im_end|>\n

Each `<image>` tag in the queries becomes one `<img>...</img>` block; when the queries hold no tag, one
`<image>\n` per image is put before the first query (as InternVL's `chat()` and ms-swift do). Labels are
-100 everywhere except the assistant responses and the token that ends them, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    prefix: str  # text before everything (InternLM2 and Phi-3 start with the BOS `<s>`)
    system: str  # the system block, `{}` = the prompt
    user: str  # a user turn, `{}` = the query with its image blocks
    assistant: str  # what opens the assistant's turn (the generation prompt ends here)
    suffix: str  # what ends the assistant's turn; labelled, and the stop word
    sep: str = ""  # between turns, after the suffix; not labelled
    stop_words: tuple[str, ...] = ()


_CHATML = dict(
    system="<|im_start|>system\n{}<|im_end|>",
    user="<|im_start|>user\n{}<|im_end|>",
    assistant="<|im_start|>assistant\n",
    suffix="<|im_end|>",
)

TEMPLATES: dict[str, TemplateSpec] = {
    # InternVL-Chat-V1.5, Mini-2B, InternVL2-2B/8B/26B: MPT style, no newline between turns.
    "internlm2": TemplateSpec("internlm2", prefix="<s>", stop_words=("<|im_end|>", "</s>"), **_CHATML),
    # InternVL2-1B/40B/76B (Hermes-2): the same without the BOS.
    "hermes2": TemplateSpec("hermes2", prefix="", stop_words=("<|im_end|>", "<|endoftext|>"), **_CHATML),
    # InternVL2.5, 3 and 3.5: chatml with a newline after each turn.
    "internvl2_5": TemplateSpec(
        "internvl2_5",
        prefix="",
        sep="\n",
        stop_words=("<|im_end|>", "<|endoftext|>"),
        system="<|im_start|>system\n{}<|im_end|>\n",
        user="<|im_start|>user\n{}<|im_end|>\n",
        assistant="<|im_start|>assistant\n",
        suffix="<|im_end|>",
    ),
    # Mini-InternVL-4B, InternVL2-4B (Phi-3): must stop on <|end|> (vLLM #6514).
    "phi3": TemplateSpec(
        "phi3",
        prefix="<s>",
        system="<|system|>\n{}<|end|>",
        user="<|user|>\n{}<|end|>",
        assistant="<|assistant|>\n",
        suffix="<|end|>",
        stop_words=("<|end|>", "<|endoftext|>"),
    ),
}


@dataclass
class Conversation:
    """One sample or chat: turns of (query, response); the last response is None for generation."""

    turns: list[tuple[str, str | None]]
    images: list = field(default_factory=list)  # paths, URLs, data URLs or PIL images, in tag order
    system: str | None = None  # None = the model's default system prompt; "" = none


class TemplateError(ValueError):
    pass


class PromptTooLong(TemplateError):
    def __init__(self, length: int, max_length: int, image_tokens: int):
        self.length, self.max_length, self.image_tokens = length, max_length, image_tokens
        super().__init__(
            f"prompt is {length} tokens ({image_tokens} of them image tokens), over max_length {max_length}: "
            "raise --max_length or lower --max_num (tiles per image)"
        )


def count_image_tags(conv: Conversation) -> int:
    return sum(q.count(IMAGE_TAG) for q, _ in conv.turns)


def place_image_tags(conv: Conversation) -> list[tuple[str, str | None]]:
    """Turns whose queries hold exactly one `<image>` tag per image (tags added before the first query)."""
    tags, n = count_image_tags(conv), len(conv.images)
    if tags == n:
        return list(conv.turns)
    if tags == 0:
        (q0, r0), rest = conv.turns[0], conv.turns[1:]
        return [(f"{IMAGE_TAG}\n" * n + q0, r0), *rest]
    raise TemplateError(f"{tags} <image> tag(s) in the queries but {n} image(s) given")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)


class Template:
    """A template bound to a tokenizer: `encode(conversation, tiles_per_image)` -> ids and labels."""

    def __init__(
        self,
        spec: TemplateSpec,
        tokenizer,
        *,
        image_seq_length: int,
        default_system: str | None,
        max_length: int | None = None,
        tiler=None,
    ):
        self.spec, self.tokenizer = spec, tokenizer
        self.tiler = tiler  # images.ImageTiler: turns images into pixel values and tile counts
        self.image_seq_length = image_seq_length  # 256 = (448/14)^2 * 0.5^2 tokens per tile
        self.default_system = default_system
        self.max_length = max_length
        ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids or None in ids:
            raise TemplateError(f"tokenizer lacks the image tokens {IMG_START} {IMG_END} {IMG_CONTEXT}")
        self.img_start_id, self.img_end_id, self.img_context_id = ids
        self.stop_token_ids = [i for i in tokenizer.convert_tokens_to_ids(list(spec.stop_words)) if i is not None and i != tokenizer.unk_token_id]

    def _segments(self, conv: Conversation) -> list[tuple[str, bool]]:
        """(text, labelled) pieces of the whole conversation; text may hold <image> tags."""
        spec = self.spec
        system = self.default_system if conv.system is None else conv.system
        segs: list[tuple[str, bool]] = [(spec.prefix, False)] if spec.prefix else []
        if system:
            segs.append((spec.system.format(system), False))
        for query, response in place_image_tags(conv):
            segs.append((spec.user.format(query) + spec.assistant, False))
            if response is not None:
                segs.append((response + spec.suffix, True))
                if spec.sep:
                    segs.append((spec.sep, False))
        return segs

    def encode(self, conv: Conversation, tiles_per_image: list[int], *, check_length: bool = True) -> Encoded:
        if len(tiles_per_image) != len(conv.images):
            raise TemplateError(f"{len(conv.images)} images but tile counts for {len(tiles_per_image)}")
        pieces: list[tuple[str, bool]] = []
        layout: list[tuple[str, int, bool]] = []  # ("text", piece index, labelled) | ("image", image index, False)
        image_index = 0
        for text, labelled in self._segments(conv):
            parts = text.split(IMAGE_TAG) if not labelled else [text]
            for k, part in enumerate(parts):
                if k > 0:
                    layout.append(("image", image_index, False))
                    image_index += 1
                if part:
                    layout.append(("text", len(pieces), labelled))
                    pieces.append((part, labelled))
        for text, _ in pieces:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. from the JSON escape "\ud800"
                raise TemplateError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        token_lists = self.tokenizer([p for p, _ in pieces], add_special_tokens=False)["input_ids"] if pieces else []
        reserved = {self.img_start_id, self.img_end_id, self.img_context_id}
        for toks in token_lists:
            if reserved.intersection(toks):
                # `<IMG_CONTEXT>` typed in a query would become image slots with no image behind them (the
                # model then fails on "image features and image tokens do not match"); `<img>` would fake one.
                raise TemplateError(f"text holds a reserved image token ({IMG_START}, {IMG_END} or {IMG_CONTEXT}); mark images with {IMAGE_TAG}")
        input_ids: list[int] = []
        labels: list[int] = []
        image_tokens = 0
        for kind, index, labelled in layout:
            if kind == "image":
                n = self.image_seq_length * tiles_per_image[index]
                block = [self.img_start_id] + [self.img_context_id] * n + [self.img_end_id]
                image_tokens += n
                input_ids += block
                labels += [IGNORE_INDEX] * len(block)
            else:
                toks = token_lists[index]
                input_ids += toks
                labels += toks if labelled else [IGNORE_INDEX] * len(toks)
        if check_length and self.max_length and len(input_ids) > self.max_length:
            raise PromptTooLong(len(input_ids), self.max_length, image_tokens)
        return Encoded(input_ids, labels, image_tokens)

    def decode_response(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        for stop in self.spec.stop_words:
            cut = text.find(stop)
            if cut != -1:
                text = text[:cut]
        return text
