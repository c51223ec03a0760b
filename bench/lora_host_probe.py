"""Host time per LoRA layer: PEFT's own forward against `internvl sft`'s fused one, with tensors so small that the
device work is nothing and what is left is Python, dispatch and autograd bookkeeping.

    python bench/lora_host_probe.py

Why: on an H100 the 1B LoRA step left the GPU idle a third of the time, mostly while the host was still in the
adapted layers' forward (168 a step) and their backward (bench/train_profile.py's gpu_idle). That host time per
layer is about the same whatever the tensor sizes, so it is measured here, on any machine, with 64 chained
16 x 16 LoRA layers (rank 8): forward alone and forward + backward, per layer, fp32 and under bf16 autocast on a
bf16 base (the Trainer's LoRA setting), one thread. Writes bench/results/train-lora-host-<card>-<date>.json
(baseline: PEFT, ratio: PEFT's time / ours).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT / "bench"))

from record import write_record  # noqa: E402

LAYERS = 64


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(LAYERS)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def models(setting: str):
    from peft import LoraConfig, get_peft_model

    from internvl_worker.speedups import fuse_lora_updates, skip_adapter_input_casts

    torch.manual_seed(0)
    chain = Chain() if setting == "fp32" else Chain().to(torch.bfloat16)
    peft = get_peft_model(chain, LoraConfig(r=8, lora_alpha=32, target_modules=r".*layers\.\d+$", lora_dropout=0.0))
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # PEFT's default on a bf16 base: fp32 adapters
    fused = copy.deepcopy(peft)
    if setting != "fp32":
        skip_adapter_input_casts(fused)  # as sft's prepare_model under autocast
    fuse_lora_updates(fused)
    return peft, fused


def per_layer_us(model, setting: str, backward: bool, reps: int) -> float:
    x = torch.randn(2, 4, 16, dtype=torch.float32 if setting == "fp32" else torch.bfloat16, requires_grad=True)
    times = []
    for i in range(reps + 5):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting != "fp32"):
            y = model(x)
        if backward:
            y.float().sum().backward()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / LAYERS * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    baselines, ours, ratios = {}, {}, {}
    for setting in ("fp32", "bf16-autocast"):
        peft, fused = models(setting)
        for what, backward in (("forward", False), ("forward_backward", True)):
            key = f"{setting}-{what}"
            baselines[key] = {"host_us_per_layer": round(per_layer_us(peft, setting, backward, args.reps), 1)}
            ours[key] = {"host_us_per_layer": round(per_layer_us(fused, setting, backward, args.reps), 1)}
            ratios[key] = round(baselines[key]["host_us_per_layer"] / ours[key]["host_us_per_layer"], 3)
            print(json.dumps({"case": key, "peft_us": baselines[key]["host_us_per_layer"], "ours_us": ours[key]["host_us_per_layer"], "ratio": ratios[key]}), flush=True)
    config = {"layers": LAYERS, "shape": "16 x 16 Linear, rank 8, batch 2 x 4 tokens", "threads": 1, "torch": torch.__version__, "what": "host time per LoRA layer, device work negligible"}
    path = write_record(args.results_dir, "train", "lora-host", config=config, baselines=baselines, ours=ours, ratios=ratios)
    print(json.dumps({"event": "done", "written": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
