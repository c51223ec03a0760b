"""How long one full Python garbage collection takes in a training process, before and after gc.freeze():
`internvl sft` freezes what is alive when training starts (train.frozen_gc), so a collection that falls
inside a step no longer walks the model, the tokenizer and the libraries.

    python bench/gc_probe.py                 # the InternVL3-1B layout (random weights, bf16) with LoRA, on the CPU
    python bench/gc_probe.py --shape tiny    # seconds

Writes bench/results/train-gc-<card>-<date>.json (baseline: unfrozen; ours: frozen; ratios: the milliseconds
a full collection saves).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT / "bench"))

from record import write_record  # noqa: E402


def full_collection_ms(reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="internvl3-1b", choices=["internvl3-1b", "tiny"])
    ap.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model

    from internvl_worker.tiny import random_model
    from internvl_worker.train import frozen_gc

    model, _ = random_model(args.shape)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    model = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=8, lora_alpha=32, target_modules=targets))
    tracked = len(gc.get_objects())
    before = full_collection_ms()
    with frozen_gc():
        frozen = gc.get_freeze_count()
        after = full_collection_ms()
    result = {"tracked_objects": tracked, "frozen_objects": frozen}
    baselines = {"unfrozen": {"full_collection_ms": round(before, 3)}}
    ours = {"frozen": {"full_collection_ms": round(after, 3), **result}}
    ratios = {"full_collection_ms_saved": round(before - after, 3)}  # the frozen time is next to nothing: a ratio would mean little
    config = {"shape": args.shape, "model": "random weights, bf16, PEFT LoRA r 8 on the LLM's 7 linear layers", "python": sys.version.split()[0], "torch": torch.__version__}
    path = write_record(args.results_dir, "train", "gc", config=config, baselines=baselines, ours=ours, ratios=ratios)
    print(json.dumps({"unfrozen_ms": baselines["unfrozen"]["full_collection_ms"], "frozen_ms": ours["frozen"]["full_collection_ms"], **result, "written": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
