"""Vision-tower outputs kept by image content, so an image sent again skips decoding, tiling and the tower.

Chat clients resend the whole conversation each turn, images included: without a cache every turn pays the
image's decode, tiling and vision-tower forward again (the largest part of a short prompt's time to first
token). Keys are the SHA-256 of the image's encoded bytes (as sent, before decoding), so only the very same
file hits; values are its features `(tiles, tokens per tile, hidden)` on the model's device, ready to be
scattered into the prompt. Least recently used entries go first once `max_bytes` is reached.

Not used when LoRA adapters touch the vision tower or projector (the features would depend on the adapter).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageFeatureCache:
    def __init__(self, max_bytes: int, metrics=None):
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str):
        """The features stored under `key` (now the most recently used), or None."""
        with self._lock:
            feats = self._items.get(key)
            if feats is None:
                self.misses += 1
            else:
                self._items.move_to_end(key)
                self.hits += 1
        if self.metrics is not None:
            (self.metrics.image_cache_misses if feats is None else self.metrics.image_cache_hits).inc()
        return feats

    def put(self, key: str, feats) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = feats
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, gone = self._items.popitem(last=False)
                self.bytes -= gone.numel() * gone.element_size()
        if self.metrics is not None:
            self.metrics.image_cache_bytes.set(self.bytes)
