"""The vision-feature cache (serve/imagecache.py): the same image bytes skip decoding, tiling and the vision
tower and give the same answer; least recently used entries leave first."""

from __future__ import annotations

import requests
import torch
from PIL import Image

from internvl_worker.serve.imagecache import ImageFeatureCache, image_key

from .conftest import data_url


def test_lru_by_bytes():
    cache = ImageFeatureCache(max_bytes=3 * 400)
    a, b, c = (torch.zeros(100) for _ in range(3))  # 400 bytes each
    cache.put("a", a), cache.put("b", b), cache.put("c", c)
    assert cache.get("a") is a  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is a and len(cache) == 3 and cache.bytes == 1200
    cache.put("big", torch.zeros(1000))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("big") is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (2, 2)
    assert image_key(b"x") != image_key(b"y") and image_key(b"x") == image_key(b"x")


def _counts(url: str) -> tuple[float, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    return values["internvl_image_cache_hits_total"], values["internvl_image_cache_misses_total"]


def test_repeated_image_hits_the_cache_with_the_same_answer(server):
    """Eager path (the main test server serves an adapter): features made in the preprocessing pool."""
    odd = data_url(Image.new("RGB", (77, 33), (3, 141, 59)))  # an image no other test sends
    other = data_url(Image.new("RGB", (33, 77), (59, 3, 141)))
    hits0, misses0 = _counts(server.url)

    def ask(image):
        r = requests.post(server.url + "/generate", json={"inputs": f"![]({image})What is this?", "parameters": {"max_new_tokens": 8}}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    first, again, different = ask(odd), ask(odd), ask(other)
    assert again == first
    assert _counts(server.url) == (hits0 + 1, misses0 + 2)
    assert requests.get(server.url + "/info", timeout=10).json()["image_cache_mb"] == 512


def test_slot_path_uses_cached_features(tiny_model_dir):
    """Slot path (vision in the engine): the second request carries the cached features, no pixels, and
    decodes the same tokens; a request with a new image next to a cached one gets both right."""
    from internvl_worker.infer import build_conversation
    from internvl_worker.serve.engine import Engine, Handle, load_served_model
    from internvl_worker.serve.prepare import ImagePolicy, prepare
    from internvl_worker.serve.protocol import GenerationRequest, Limits
    from internvl_worker.serve.sampling import SamplingParams

    sm = load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", device_map={"": "cpu"})
    sm.image_cache = ImageFeatureCache(2**24)
    red, blue = data_url(Image.new("RGB", (64, 40), (250, 10, 10))), data_url(Image.new("RGB", (40, 64), (10, 10, 250)))
    engine = Engine(sm, max_batch_size=2, decode="static", max_total_tokens=512)
    engine.start()

    def run(images):
        conv = build_conversation("Which colours?", [], images, None)
        p = prepare(sm, GenerationRequest(conversation=conv, params=SamplingParams(max_new_tokens=6, min_new_tokens=6)), Limits(), ImagePolicy(allow_private_urls=True))
        cached = [c is not None for c in p.cached]
        h = engine.submit(Handle(SamplingParams(max_new_tokens=6, min_new_tokens=6), None, p))
        return cached, [ev[1] for ev in h.events_sync(timeout=60) if ev[0] == "token"], p

    try:
        c1, t1, _ = run([red])
        c2, t2, p2 = run([red])
        c3, t3, _ = run([blue, red])
        c4, t4, _ = run([blue, red])
        cache, sm.image_cache = sm.image_cache, None
        _, t_ref, _ = run([blue, red])  # no cache at all: the reference for the mixed request
        sm.image_cache = cache
    finally:
        engine.shutdown(30)
    assert (c1, c2, c3, c4) == ([False], [True], [False, True], [True, True])
    assert t2 == t1 and t4 == t3 == t_ref
    assert p2.pixel_values is None and p2.image_features is not None
    assert sm.image_cache.hits == 4 and len(sm.image_cache) == 2
