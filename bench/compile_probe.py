"""Does torch.compile pay on the fused decode step? Step times (graph replay) at batch 1/8/64 for the fused
layers with Liger's kernels against the fused layers compiled by inductor, and the engine in-process with
--compile. InternVL3-1B shape, bf16, one GPU; prints JSON lines (a probe for decode_profile.py's choice)."""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import torch
    from PIL import Image
    from transformers.cache_utils import DynamicCache

    from decode_profile import engine_run, step_times
    from gpu.test_serve_graphs import _served_1b
    from serve.test_slots import _prepared

    sm = _served_1b()
    model = sm.model
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    prep = _prepared(sm, "describe the picture please " * 12, img)
    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.tensor([prep.input_ids], device="cuda")
        model(input_ids=ids, pixel_values=sm.template.tiler([img])[0].to("cuda", torch.bfloat16), use_cache=True, cache=cache, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        out = {"card": torch.cuda.get_device_name()}
        out["liger+fused"] = step_times(model, kv, ids.shape[1], eager=False, liger=True)
        t0 = time.time()
        out["compiled+fused"] = step_times(model, kv, ids.shape[1], eager=False, compile=True)
        out["compile_s"] = round(time.time() - t0, 1)
    print(json.dumps(out), flush=True)
    print(json.dumps({"engine graphs+fused+compile": engine_run(sm, prep, decode="graphs", liger=False, compile=True, new_tokens=256, concurrent=64)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
