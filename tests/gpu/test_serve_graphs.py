"""GPU: the CUDA-graph decode path gives the eager path's tokens, and is faster (skipped without CUDA)."""

import time

import pytest
import torch
from PIL import Image

from internvl_worker.serve.engine import Engine, ServedModel, load_served_model

from serve.test_slots import _prepared, _run  # tests/ is on sys.path (pytest prepend mode: tests/ has no __init__)

pytestmark = pytest.mark.gpu


def test_graph_decode_equals_eager_decode(tiny_model_dir):
    """fp32 so that the two paths' different kernels cannot flip a greedy choice; rows join and leave."""
    sm = load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", device_map={"": 0})
    red, green = Image.new("RGB", (64, 48), (250, 10, 10)), Image.new("RGB", (40, 70), (10, 240, 10))
    words = "red green blue cat dog road city poem left right apple pear".split()
    jobs = [(_prepared(sm, f"What is the {w}?", [red, green, None][i % 3]), 3 + (i * 5) % 11) for i, w in enumerate(words)]
    results = {}
    for mode in ("eager", "graphs"):
        engine = Engine(sm, max_batch_size=5, decode=mode, max_total_tokens=600)
        engine.start()
        try:
            results[mode] = _run(engine, jobs)
        finally:
            engine.shutdown(60)
        if mode == "graphs":
            info = engine.decode_info
    print("graph decode:", info)
    assert info["decode"] == "graphs" and info["graphs"] >= 4 and info["layers"] == "fused"
    assert info["attention"] == "triton split-KV"
    assert results["graphs"] == results["eager"]


def _served_1b() -> ServedModel:
    from internvl_worker.modeling import LoadedModel, build_template
    from internvl_worker.registry import get_model_spec
    from internvl_worker.tiny import random_model

    model, tok = random_model("internvl3-1b")
    model = model.to("cuda", torch.bfloat16).eval()
    spec = get_model_spec("internvl3-1b")
    template, tiler = build_template(model.config, tok, spec)
    return ServedModel(loaded=LoadedModel(model=model, template=template, tiler=tiler, spec=spec, model_dir=None), name="1b")


def test_internvl3_1b_triton_step_equals_the_sdpa_step():
    """bf16, the real layout (14 query heads on 2 KV heads, head dim 64): rows far apart in length, several
    split-KV chunks; the same cache through our kernels and through SDPA gives the same logits (bf16 noise)."""
    from internvl_worker.serve.slots import SlotDecoder

    sm = _served_1b()
    torch.manual_seed(0)
    with torch.inference_mode():
        ours = SlotDecoder(sm.model, slots=4, max_len=1024, triton=True)
        ref = SlotDecoder(sm.model, slots=4, max_len=1024, triton=False)
        assert ours.fused.kernels is not None and ref.fused.kernels is None, ours.triton_why
        for a, b in zip(ours.layers, ref.layers):
            b.keys.copy_(a.keys.normal_())
            b.values.copy_(a.values.normal_())
        tokens, positions = [11, 2000, 7, 99], [1000, 3, 517, 64]
        got, want = ours.step(tokens, positions).float(), ref.step(tokens, positions).float()
        # the new key of each row in every layer: relative difference (bf16 noise grows through the layers)
        rel = []
        for a, b in zip(ours.layers, ref.layers):
            new_a = torch.stack([a.keys[i, :, p] for i, p in enumerate(positions)]).float()
            new_b = torch.stack([b.keys[i, :, p] for i, p in enumerate(positions)]).float()
            rel.append(((new_a - new_b).norm() / new_b.norm()).item())
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    print(
        f"triton vs SDPA step, bf16: logits cosine {cos.min().item():.6f}, max |diff| {(got - want).abs().max().item():.3f} of max |logit| "
        f"{want.abs().max().item():.1f}; new keys' relative difference: layer 0 {rel[0]:.2e}, worst layer {max(rel):.2e}"
    )
    assert rel[0] < 1e-2 and max(rel) < 5e-2
    assert cos.min() > 0.999


def test_internvl3_1b_graph_decode_is_faster_than_eager():
    sm = _served_1b()
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    job = [(_prepared(sm, "Describe the image in detail.", img), 128)]
    speed = {}
    for mode in ("eager", "graphs-sdpa", "graphs"):
        engine = Engine(sm, max_batch_size=8, decode=mode.split("-")[0], max_total_tokens=2048, triton_decode=mode != "graphs-sdpa")
        engine.start()
        try:
            _run(engine, [(job[0][0], 8)])  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            toks = _run(engine, job)[0]
            speed[mode] = len(toks) / (time.perf_counter() - t0)
        finally:
            engine.shutdown(60)
    print(
        f"InternVL3-1B shape, bf16, batch 1, engine in-process: eager {speed['eager']:.0f} tokens/s, graphs with SDPA "
        f"{speed['graphs-sdpa']:.0f}, graphs with our Triton kernels {speed['graphs']:.0f} tokens/s ({speed['graphs'] / speed['eager']:.1f}x eager)"
    )
    assert speed["graphs"] > 3 * speed["eager"]
