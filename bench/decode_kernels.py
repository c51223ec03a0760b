"""The kernels of one replayed decode step: name, count and GPU time per step, largest first.

    python bench/decode_kernels.py [--batch 1] [--length 1024]

InternVL3-1B shape, random weights, bf16, the serving decode path (fixed slots, fused layers, Liger's kernels
when installed), one GPU, once with SDPA attention and once with our Triton kernels (serve/kernels.py). The
graph is replayed under torch.profiler (CUPTI sees the kernels inside CUDA graphs); prints a table and the
step's total kernel time against its wall time for each.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=1024, help="KV columns of the step (a length bucket)")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--variants", default="sdpa,triton", help="attention of the step, each measured in turn: sdpa (cuDNN first), triton (kernels.py)")
    args = ap.parse_args()
    from gpu.test_serve_graphs import _served_1b
    from internvl_worker import speedups

    sm = _served_1b()
    liger = speedups.liger_unavailable() is None
    for variant in args.variants.split(","):
        table(sm, args, liger, variant)
    return 0


def table(sm, args, liger: bool, variant: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from internvl_worker.serve.slots import SlotDecoder

    with torch.inference_mode():
        dec = SlotDecoder(sm.model, slots=max(args.batch, 1), max_len=args.length, liger=liger, triton=variant == "triton")
        positions = [args.length - 2] * args.batch
        dec.step([0] * args.batch, positions)  # captures this bucket's graph
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.replays):
            dec.step([0] * args.batch, positions)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.replays * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.replays):
                dec.step([0] * args.batch, positions)
            torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total_us = sum(v[1] for v in kernels.values()) / args.replays
    count = sum(v[0] for v in kernels.values()) / args.replays
    print(f"\n{torch.cuda.get_device_name()}: {variant}, batch {args.batch}, {args.length} columns, liger={liger}, fused={dec.fused is not None}, triton={dec.triton_why or 'on'}")
    print(f"per step: {count:.0f} kernels, {total_us / 1e3:.3f} ms of kernel time, {wall:.3f} ms wall (step + its host copy)")
    print(f"{'per step':>8} {'us/step':>8} {'us each':>8}  kernel")
    for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"{n / args.replays:8.1f} {us / args.replays:8.1f} {us / n:8.2f}  {name}")


if __name__ == "__main__":
    sys.exit(main())
