"""Stage 2a: a GenerationRequest -> Prepared (images fetched, tiled and encoded; prompt token ids).

Runs in the preprocessing thread pool, never on the event loop or the engine thread: image URLs can take
seconds, and the vision tower is the heaviest part of a prefill (12 tiles = 3,072 image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..images import ImageError, open_image_bytes, url_image_bytes
from ..templates import PromptTooLong, TemplateError
from .engine import Prepared, ServedModel, finish_image_features, vision_features_off_thread
from .imagecache import image_key
from .protocol import GenerationRequest, Limits, ServeError, fit_max_new_tokens, validation_error


@dataclass(frozen=True)
class ImagePolicy:
    max_image_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0
    allow_private_urls: bool = False  # in a cluster the server must not fetch from inside it


def image_error(e: ImageError) -> ServeError:
    """413 for an image over the byte limit, 422 for anything else wrong with it."""
    msg = str(e)
    if "-byte limit" in msg:
        return ServeError(413, msg, "validation")
    return validation_error(msg)


def prepare(sm: ServedModel, req: GenerationRequest, limits: Limits, policy: ImagePolicy) -> Prepared:
    template = sm.template
    images, keys, cached = [], [], []
    cache = sm.image_cache
    for src in req.conversation.images:
        if not isinstance(src, str) or not src.startswith(("http://", "https://", "data:")):
            # Never read the server's own files: a path in a request would be a file-disclosure hole.
            raise validation_error(f"image {str(src)[:60]!r}: only http(s) and data:image URLs are accepted")
        try:
            data, name = url_image_bytes(src, timeout=policy.timeout, max_bytes=policy.max_image_bytes, allow_private_urls=policy.allow_private_urls)
            key = image_key(data) if cache is not None else None
            hit = cache.get(key) if key is not None else None
            if hit is None:  # a cached image is not even decoded
                images.append(open_image_bytes(data, name))
        except ImageError as e:
            raise image_error(e) from None
        keys.append(key)
        cached.append(hit)
    # uint8 tiles: the GPU normalizes them (encode_images), a quarter of the bytes to copy and half the CPU work
    pixel_values, new_tiles = template.tiler(images, normalize=False) if images else (None, [])
    fresh = iter(new_tiles)
    tiles = [hit.shape[0] if hit is not None else next(fresh) for hit in cached]
    try:
        encoded = template.encode(req.conversation, tiles, check_length=False)
    except PromptTooLong as e:  # not raised with check_length=False; kept for a template that checks anyway
        raise validation_error(str(e)) from None
    except TemplateError as e:
        raise validation_error(f"inputs: {e}") from None
    fit_max_new_tokens(req.params, len(encoded.input_ids), limits)
    prepared = Prepared(input_ids=encoded.input_ids, image_tokens=encoded.image_tokens, tiles=tiles, pixel_values=pixel_values, image_keys=keys, cached=cached)
    if tiles and (pixel_values is None or not sm.vision_in_engine):
        # every image cached, or the eager path: the features are made here, off the engine thread
        finish_image_features(sm, prepared, vision_features_off_thread(sm, pixel_values) if pixel_values is not None else None)
    return prepared


class IncrementalDecoder:
    """Token ids -> text deltas, holding back a delta while it ends inside a multi-byte character.

    With a fast tokenizer this is the tokenizers library's own `DecodeStream` (one Rust call a token: with
    64 streams, two Python-side `decode` calls a token were the event loop's largest cost). Otherwise it
    decodes a window (from the last clean boundary), which keeps each step O(1) rather than re-decoding the
    whole answer. `finish()` returns what is left, so the deltas always add up to the full text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.sent = ""
        self._backend = self._stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:  # tokenizers < 0.21
            return
        # transformers' decode can also clean up spaces around punctuation; the stream cannot, so such a
        # tokenizer keeps the window decoding (the texts must equal what `decode` gives).
        if isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._backend, self._stream = backend, DecodeStream(skip_special_tokens=True)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
            self.sent += delta
            return delta
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.sent += delta
            return delta
        return ""

    def full_text(self, ids: list[int] | None = None) -> str:
        return self._decode(self.ids if ids is None else ids)

    def finish(self, full: str) -> str:
        """The rest of `full` after what was sent (empty when the deltas already cover it)."""
        if full.startswith(self.sent):
            rest = full[len(self.sent) :]
            self.sent = full
            return rest
        return ""
