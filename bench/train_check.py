"""Functional GPU check of `internvl sft` on the InternVL3-1B layout (random weights): LoRA, full and ZeRO-2
full on one GPU, DDP LoRA and ZeRO-2 full on two and on four (where the machine has them), and the n-GPU /
one-GPU samples/s ratios (scaling). Records loss (first/last), samples/s, real tokens/s and peak memory.

    python bench/train_check.py --steps 30 --out /tmp/train-check      # on the device machine
    python bench/train_check.py --data realistic --workers 6 --only lora-1gpu,lora-ddp-2gpu,full-zero2-1gpu,full-zero2-2gpu

This is the fine-tuning issue's record (the recipes run and learn on a real shape), not the speed
benchmark: bench/train_bench.py compares against the naive baseline in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from record import write_record  # noqa: E402


def summarize(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    progress = [r for r in records if r["event"] == "progress" and "loss" in r]
    steady = progress[1:] or progress  # the first window holds start-up (compilation, caches)
    return {
        "loss_first": progress[0]["loss"],
        "loss_last": progress[-1]["loss"],
        "samples_per_s": round(sum(r["samples_per_s"] for r in steady) / len(steady), 3),
        "real_tokens_per_s": round(sum(r["tokens_per_s"] for r in steady) / len(steady), 1),
        "peak_mem_gb": max(r.get("gpu_mem_gb", 0) for r in progress),
        "skipped_steps": progress[-1].get("skipped_steps", 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=0, help="rows in the data set (default: steps x batch size x 4, one epoch on four GPUs: an epoch's end restarts the loader workers, a stall that a one-GPU run of the same steps would not have)")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--out", default="/tmp/train-check")
    ap.add_argument("--only", default="", help="comma-separated config names to run")
    ap.add_argument("--results_dir", default="", help="where the record goes (default: --out)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (sft's default: 2); give one GPU as many as the scaling runs' ranks have in all, or the loader, not the GPU, may set its pace")
    ap.add_argument("--what", default="check", help="names the record train-<what>-<card>-<date>.json (default: check)")
    ap.add_argument("--data", choices=["color", "realistic"], default="color", help="synthetic color rows of 1-4 tiles (default), or train_bench's realistic rows (0-2 images of 1-13 tiles, answers of 10-400 words)")
    args = ap.parse_args()
    args.rows = args.rows or args.steps * args.batch_size * 4
    out = Path(args.out)
    model_dir, data_dir = out / "model-1b", out / "data"
    sys.path.insert(0, str(ROOT / "tests" / "worker"))
    from synth import color_dataset

    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", "internvl3-1b", "--output_dir", str(model_dir)], check=True)
    if args.data == "realistic":
        import train_bench

        data = train_bench.make_dataset(out / "data-realistic", args.rows, seed=0)
    else:
        data = color_dataset(data_dir, args.rows, seed=0)
    import torch

    gpus = torch.cuda.device_count()
    common = ["--model_id_or_path", str(model_dir), "--dataset", str(data), "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
              "--gradient_accumulation_steps", "1", "--logging_steps", "5", "--save_steps", str(args.steps), "--eval_steps", str(args.steps),
              "--dataset_test_ratio", "0", "--add_output_dir_suffix", "false", "--max_length", "4096", "--dataloader_num_workers", str(args.workers)]  # fmt: skip
    configs = {
        "lora-1gpu": (1, ["--sft_type", "lora", "--learning_rate", "1e-4"]),
        "full-1gpu": (1, ["--sft_type", "full", "--learning_rate", "1e-5"]),
        "full-zero2-1gpu": (1, ["--sft_type", "full", "--learning_rate", "1e-5", "--deepspeed", "default-zero2"]),
        "lora-ddp-2gpu": (2, ["--sft_type", "lora", "--learning_rate", "1e-4"]),
        "full-zero2-2gpu": (2, ["--sft_type", "full", "--learning_rate", "1e-5", "--deepspeed", "default-zero2"]),
        "lora-ddp-4gpu": (4, ["--sft_type", "lora", "--learning_rate", "1e-4"]),
        "full-zero2-4gpu": (4, ["--sft_type", "full", "--learning_rate", "1e-5", "--deepspeed", "default-zero2"]),
    }
    wanted = set(filter(None, args.only.split(",")))
    results = {}
    for name, (nproc, extra) in configs.items():
        if (wanted and name not in wanted) or nproc > gpus:
            continue
        env = dict(os.environ, NPROC_PER_NODE=str(nproc), CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(nproc)))
        cmd = [sys.executable, "-m", "internvl_worker", "sft", *common, "--output_dir", str(out / name), *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr.strip().splitlines()[-5:], "returncode": proc.returncode}
            print(name, "FAILED", "\n".join(proc.stderr.strip().splitlines()[-15:]), flush=True)
            continue
        results[name] = {"gpus": nproc, "wall_s": round(time.time() - t0, 1), **summarize(out / name)}
        print(name, json.dumps(results[name]), flush=True)
    rows_are = "synthetic color rows, 1-4 tiles of 448 px" if args.data == "color" else "train_bench's realistic rows (seed 0): 0-2 images of 1-13 tiles, answers of 10-400 words"
    config = {"model": "InternVL3-1B layout, random weights, bf16", "data": f"{args.rows} {rows_are}", "batch_size": args.batch_size, "steps": args.steps,
              "attention": "sdpa", "gradient_checkpointing": "internvl sft's default (auto)", "dataloader_workers_per_rank": args.workers}  # fmt: skip
    # Scaling: samples/s on n GPUs over one, the same method, settings and per-GPU batch (n = perfect scaling).
    pairs = [(f"lora-ddp-{n}gpu", "lora-1gpu") for n in (2, 4)] + [(f"full-zero2-{n}gpu", one) for n in (2, 4) for one in ("full-zero2-1gpu", "full-1gpu")]
    ratios = {f"{many}_vs_{one}": round(results[many]["samples_per_s"] / results[one]["samples_per_s"], 3)
              for many, one in pairs if "samples_per_s" in results.get(many, {}) and "samples_per_s" in results.get(one, {})}  # fmt: skip
    path = write_record(args.results_dir or out, "train", args.what, config=config, baselines={}, ours=results, ratios=ratios)
    print("wrote", path)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
