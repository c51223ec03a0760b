"""How fast can the frozen vision tower run in a training step? One batch's tiles through the InternVL3-1B
layout's ViT (random weights, no gradients), timed the ways a training step could run it:

    autocast-bf16     bf16 weights under bf16 autocast: what `internvl sft --sft_type lora` does today
    autocast-fp32w    fp32 weights under bf16 autocast: full fine-tuning's fp32 masters (the ViT frozen)
    bf16              bf16 weights, autocast off: LayerNorm outputs stay bf16, no per-linear input casts
    bf16-cudnn        as bf16, with cuDNN's attention allowed (forward only: the cuDNN NaN issue is in backward)
    bf16-compile      as bf16, the tower under torch.compile (dynamic tile count)

Prints one JSON line per way (ms per batch, TFLOP/s of its matmul and attention FLOPs, the largest
difference from autocast-bf16's features) and writes nothing else: a probe for choosing, not a benchmark.

    python bench/vit_probe.py --tiles 76
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, warmup: int, reps: int) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=76, help="448-px tiles in the batch (default: 76, a realistic batch of 8 rows)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ways", default="autocast-bf16,autocast-fp32w,bf16,bf16-cudnn,bf16-compile")
    ap.add_argument("--out", default="/tmp/vit-probe")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "worker"))
    from internvl_worker.modeling import load_model, tile_and_patch

    model_dir = Path(args.out) / "model-1b"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", "internvl3-1b", "--output_dir", str(model_dir)], check=True)
    model = load_model(model_dir, dtype="bf16").model.cuda().eval().requires_grad_(False)
    vision = model.model.vision_tower
    vc = vision.config
    size, patch = tile_and_patch(vc)
    tokens = (size // patch) ** 2 + 1
    params = sum(p.numel() for p in vision.parameters())
    flops = 2 * params * tokens * args.tiles + 4 * tokens * tokens * vc.hidden_size * vc.num_hidden_layers * args.tiles
    pixels = torch.randn(args.tiles, 3, size, size, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def features():
        return vision(pixel_values=pixels).last_hidden_state

    reference = None
    for way in args.ways.split(","):
        t0 = time.time()
        try:
            if way == "autocast-fp32w":
                vision.float()
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    ms, out = timed(lambda: vision(pixel_values=pixels.float()).last_hidden_state, 2, args.reps)
                vision.to(torch.bfloat16)
            elif way == "autocast-bf16":
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    ms, out = timed(features, 2, args.reps)
            elif way == "bf16":
                with torch.no_grad():
                    ms, out = timed(features, 2, args.reps)
            elif way == "bf16-cudnn":
                with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    ms, out = timed(features, 2, args.reps)
            elif way == "bf16-compile":
                compiled = torch.compile(vision, dynamic=True)
                with torch.no_grad():
                    ms, out = timed(lambda: compiled(pixel_values=pixels).last_hidden_state, 2, args.reps)
            else:
                raise SystemExit(f"unknown way {way!r}")
        except Exception as e:  # report and go on with the next way
            print(json.dumps({"way": way, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
            continue
        out = out.float()
        if reference is None:
            reference = out
        diff = float((out - reference).abs().max() / reference.abs().max())
        print(json.dumps({"way": way, "tiles": args.tiles, "ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1), "max_rel_diff_vs_first": round(diff, 5), "wall_s": round(time.time() - t0, 1), "card": torch.cuda.get_device_name()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
