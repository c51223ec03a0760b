"""GPU: bf16 + SDPA inference on CUDA (skipped without a GPU; run through the device tool)."""

import time

import pytest
import torch
from PIL import Image

from internvl_worker.infer import inference, inference_stream, prepare_inputs
from internvl_worker.modeling import build_template, load_model
from internvl_worker.registry import get_model_spec
from internvl_worker.templates import Conversation

pytestmark = pytest.mark.gpu


def test_bf16_sdpa_matches_fp32_and_streams(tiny_model_dir, tmp_path):
    img = tmp_path / "red.png"
    Image.new("RGB", (120, 40), (220, 20, 20)).save(img)
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = load_model(tiny_model_dir, dtype="fp32", device_map={"": "cpu"})
    conv = Conversation(turns=[("What color?", None)], images=[str(img)])

    def logits(loaded):
        with torch.no_grad():
            return loaded.model(**prepare_inputs(loaded.model, loaded.template, conv)).logits.float().cpu()

    reference = logits(cpu)
    errors = {}
    for dtype in ("fp32", "bf16"):
        gpu = load_model(tiny_model_dir, dtype=dtype, device_map={"": 0})
        assert gpu.model.config._attn_implementation == "sdpa"
        errors[dtype] = ((logits(gpu) - reference).norm() / reference.norm()).item()
    print(f"GPU SDPA vs CPU fp32 logits, relative error: fp32 {errors['fp32']:.2e}, bf16 {errors['bf16']:.2e}")
    assert errors["fp32"] < 1e-4  # the same computation
    assert errors["bf16"] < 6e-2  # bf16 keeps 8 bits of mantissa; the tiny model's 0.3-std weights amplify it
    assert gpu.model.dtype == torch.bfloat16
    response, history = inference(gpu.model, gpu.template, "What color?", images=[str(img)], max_new_tokens=24)
    *_, last = inference_stream(gpu.model, gpu.template, "What color?", images=[str(img)], max_new_tokens=24)
    assert last == (response, history)


def test_internvl3_1b_shape_bf16_inference():
    """The real 1B layout (random weights): one 448-px image + a question, greedy decode of 64 tokens."""
    from internvl_worker.tiny import random_model

    model, tokenizer = random_model("internvl3-1b")
    model = model.to("cuda", torch.bfloat16)
    template, _ = build_template(model.config, tokenizer, get_model_spec("internvl3-1b"))
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    inference(model, template, "warm up", images=[img], max_new_tokens=4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    inference(model, template, "Describe the image.", images=[img], max_new_tokens=64, min_new_tokens=64)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"InternVL3-1B shape, bf16, SDPA, batch 1: 64 new tokens in {dt:.2f}s = {64 / dt:.1f} tokens/s, peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    conv = Conversation(turns=[("Describe the image.", None)], images=[img])
    with torch.no_grad():
        logits = model(**prepare_inputs(model, template, conv)).logits
    assert torch.isfinite(logits).all()
