"""Training speed: `internvl sft` against a naive Hugging Face loop, same data, same card, same run.

    python bench/train_bench.py --steps 24                 # realistic rows, LoRA and full, naive + ours
    python bench/train_bench.py --only ours-full-fixed,naive-full-fixed   # fixed 4096-token rows (MFU)

Model: the InternVL3-1B layout (InternViT-300M + Qwen2-0.5B) with random weights (speed does not depend on
values). Data (seeded): each row has 0-2 images whose aspect ratios pick 1-12 tiles (+ a thumbnail when more
than one: 1-13 tiles, mean about 8), a question, and a 10-400 word answer; about 2,500 tokens a row, 10%
text-only and 10% two-image rows. Naive = transformers' Trainer + PEFT with default settings: padding to the
longest row of a random batch, the model's own loss over full-vocabulary logits, images decoded in the main
process. Ours = `internvl sft` with its defaults plus the variants named in CONFIGS.

Reported per config: samples/s, real (non-padding) tokens/s, model-FLOPs utilisation against the card's
measured bf16 matmul peak, peak memory, mean loss of the last steps; ratios ours / naive.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))

from train_check import card_name  # noqa: E402  (this folder: the card's name as nvidia-smi gives it)

WORDS = ("the a picture shows red green blue yellow cat dog road city sign distance left right top bottom large small "
         "one two three four five people car tree house sky water boat text number table chart line bar").split()  # fmt: skip
# Grids (cols, rows) and their weights: 1 to 12 tiles, mean about 7 (+ thumbnail -> about 8).
GRIDS = [((1, 1), 1), ((2, 1), 1), ((1, 2), 1), ((2, 2), 2), ((3, 2), 3), ((2, 3), 2), ((4, 2), 3), ((3, 3), 3), ((5, 2), 2), ((4, 3), 3), ((3, 4), 2), ((6, 2), 2)]


def make_dataset(folder: Path, rows: int, *, seed: int, fixed_tokens: int = 0) -> Path:
    """Realistic rows (or, with fixed_tokens, one 448-px tile + text to a fixed token length)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    cache: dict = {}

    def image(cols: int, rows_: int) -> str:
        scale = rng.choice((0.75, 1.0, 1.25))
        w, h = int(448 * cols * scale), int(448 * rows_ * scale)
        key = (w, h, rng.randrange(4))
        if key not in cache:
            arr = (np.random.default_rng(len(cache)).random((h // 8, w // 8, 3)) * 255).astype("uint8")
            path = folder / f"img_{len(cache)}.jpg"
            Image.fromarray(arr).resize((w, h)).save(path, quality=90)
            cache[key] = path.name
        return cache[key]

    for i in range(rows):
        if fixed_tokens:
            # The random model's byte-level tokenizer spends about 2.87 tokens a word (measured on WORDS);
            # 300 tokens go to the image block (258) and the template.
            words = int((fixed_tokens - 300) / 2.87)
            lines.append(json.dumps({"query": "<image>\n" + " ".join(rng.choices(WORDS, k=words // 2)), "response": " ".join(rng.choices(WORDS, k=words // 2)), "images": [image(1, 1)]}))
            continue
        kind = rng.random()
        n_images = 0 if kind < 0.1 else 2 if kind > 0.9 else 1
        grids = [rng.choices([g for g, _ in GRIDS], weights=[w for _, w in GRIDS])[0] for _ in range(n_images)]
        if n_images == 2:  # two images share the budget: keep each smaller
            grids = [(max(1, c // 2), r) for c, r in grids]
        answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 400)))
        query = "Describe what you see in detail, then answer: what is the main object?"
        lines.append(json.dumps({"query": query, "response": answer, "images": [image(c, r) for c, r in grids]}))
    out = folder / ("fixed.jsonl" if fixed_tokens else "train.jsonl")
    out.write_text("\n".join(lines) + "\n")
    return out


def measured_peak_tflops() -> float:
    """bf16 dense matmul rate of this card (8192^3, median of 20), the denominator of MFU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()  # leave the whole card to the runs measured next
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def model_flops(rows: list[dict], *, full: bool, n_llm: int, n_vit: int, d: int, layers: int, vit_tokens_per_tile: int = 1025) -> float:
    """Useful FLOPs for these rows: frozen ViT forward, LLM forward + backward (weight grads only when
    full), causal attention, and the LM head on answer tokens only (what any loss needs)."""
    total = 0.0
    for r in rows:
        t, tiles, answer = r["tokens"], r["tiles"], r["answer_tokens"]
        total += 2 * n_vit * vit_tokens_per_tile * tiles
        total += (6 if full else 4) * n_llm * t
        total += (3 if full else 2) * 2 * layers * t * t * d  # QK^T and AV, causal half, fwd + bwd
        total += (6 if full else 4) * 151_674 * d * answer
    return total


def row_stats(data: Path, template) -> list[dict]:
    from internvl_worker.data import read_dataset
    from internvl_worker.images import image_size

    stats = []
    for row in read_dataset(data):
        conv = row.conversation
        tiles = [template.tiler.num_tiles(*image_size(src, verify=False)) for src in conv.images]
        enc = template.encode(conv, tiles, check_length=False)
        stats.append({"tokens": len(enc), "tiles": sum(tiles), "answer_tokens": sum(1 for x in enc.labels if x != -100)})
    return stats


def run_naive(model_dir: Path, data: Path, *, full: bool, steps: int, batch: int, warmup: int) -> dict:
    """transformers' Trainer + PEFT, defaults: the loop a person writes from the docs."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from internvl_worker.data import read_dataset
    from internvl_worker.modeling import load_model
    from internvl_worker.train import SftDataset, collate, setup_numerics

    setup_numerics()  # the same NaN guard for both: cuDNN SDPA off
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model(model_dir, dtype="fp32" if full else "bf16", device_map={"": 0}, max_length=8192)
    model = loaded.model
    model.config.use_cache = False
    if full:
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("model.vision_tower"))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$", task_type="CAUSAL_LM"))
    rows = read_dataset(data)
    ds = SftDataset(rows, loaded.template, [0] * len(rows))
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir="/tmp/naive-out", per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5 if full else 1e-4,
                             bf16=True, logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=lambda b: collate(b, loaded.template.tokenizer.pad_token_id), callbacks=[Timer()])
    trainer.train()
    span = times[-1] - times[warmup - 1]
    result = {"samples_per_s": round((steps - warmup) * batch / span, 3), "step_s": round(span / (steps - warmup), 4), "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4)}
    del trainer, model, loaded
    torch.cuda.empty_cache()
    return result


def run_ours(model_dir: Path, data: Path, out: Path, *, full: bool, steps: int, batch: int, warmup: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "internvl_worker", "sft", "--model_id_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
           "--add_output_dir_suffix", "false", "--max_steps", str(steps), "--batch_size", str(batch), "--gradient_accumulation_steps", "1",
           "--logging_steps", "1", "--save_steps", "100000", "--eval_steps", "100000", "--dataset_test_ratio", "0",
           "--max_length", "8192", "--dataloader_num_workers", "6", "--warmup_ratio", "0", "--seed", "0",
           "--sft_type", "full" if full else "lora", "--learning_rate", "1e-5" if full else "1e-4", *extra]  # fmt: skip
    if not full:
        cmd += ["--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--freeze_vit", "true", "--lora_dropout", "0"]
    else:
        cmd += ["--freeze_vit", "true", "--freeze_aligner", "false"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "worker"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    progress = [r for r in records if r["event"] == "progress" and "loss" in r and r["step"] > warmup]
    span_samples = sum(r["samples_per_s"] for r in progress) / len(progress)
    return {"samples_per_s": round(span_samples, 3), "peak_mem_gb": max(r.get("gpu_mem_gb", 0) for r in progress), "loss_last": round(sum(r["loss"] for r in progress[-5:]) / len(progress[-5:]), 4)}


# name: (kind, full, data, batch size, extra flags for ours). The naive loop runs at batch 4, the largest
# that fits on an 80 GB card with realistic rows (batch 8 runs out of memory: full-vocabulary fp32 logits).
# Ours: random batches as naive ("-b4"), then its memory savings spent on larger batches with gradient
# checkpointing, length grouping or packing.
NOGC = ["--gradient_checkpointing", "false"]
GC = ["--gradient_checkpointing", "true"]
CONFIGS = {
    "naive-lora": ("naive", False, "real", 4, []),
    "ours-lora-b4": ("ours", False, "real", 4, NOGC + ["--group_by_length", "false"]),
    "ours-lora-b8-gc": ("ours", False, "real", 8, GC),
    "ours-lora-b8-gc-packed": ("ours", False, "real", 8, GC + ["--packing", "true"]),
    "ours-lora-b8-gc-packed-flex": ("ours", False, "real", 8, GC + ["--packing", "true", "--attn_impl", "flex_attention"]),
    "naive-full": ("naive", True, "real", 4, []),
    "ours-full-b4": ("ours", True, "real", 4, NOGC + ["--group_by_length", "false"]),
    "ours-full-b8-gc": ("ours", True, "real", 8, GC),
    "naive-full-fixed": ("naive", True, "fixed", 4, []),
    "ours-full-fixed": ("ours", True, "fixed", 4, NOGC),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", default="/tmp/train-bench")
    ap.add_argument("--only", default="", help="comma-separated config names (default: all)")
    ap.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    model_dir = out / "model-1b"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", "internvl3-1b", "--output_dir", str(model_dir)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "worker")))
    data = {"real": make_dataset(out / "data", args.rows, seed=0), "fixed": make_dataset(out / "data", args.rows, seed=0, fixed_tokens=4096)}
    from transformers import AutoConfig, AutoTokenizer

    from internvl_worker.modeling import build_template
    from internvl_worker.registry import get_model_spec

    config = AutoConfig.from_pretrained(model_dir)
    template, _ = build_template(config, AutoTokenizer.from_pretrained(model_dir), get_model_spec("internvl3-1b"))
    stats = {k: row_stats(v, template) for k, v in data.items()}
    n_llm = 494_032_768 - 151_674 * 896  # Qwen2-0.5B without its (tied) embedding
    n_vit = 304_000_000
    peak = measured_peak_tflops()
    print(f"card {card_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for k, s in stats.items():
        print(f"data {k}: {len(s)} rows, mean {mean([r['tokens'] for r in s]):.0f} tokens, {mean([r['tiles'] for r in s]):.1f} tiles, {mean([r['answer_tokens'] for r in s]):.0f} answer tokens", flush=True)

    wanted = [c for c in (args.only.split(",") if args.only else CONFIGS)]
    results = {}
    for name in wanted:
        kind, full, data_kind, batch, extra = CONFIGS[name]
        t0 = time.time()
        if kind == "naive":
            r = run_naive(model_dir, data[data_kind], full=full, steps=args.steps, batch=batch, warmup=args.warmup)
        else:
            r = run_ours(model_dir, data[data_kind], out / name, full=full, steps=args.steps, batch=batch, warmup=args.warmup, extra=extra)
        r["batch_size"] = batch
        if "error" not in r:
            rows = stats[data_kind]
            per_row_flops = model_flops(rows, full=full, n_llm=n_llm, n_vit=n_vit, d=896, layers=24) / len(rows)
            r["real_tokens_per_s"] = round(r["samples_per_s"] * mean([x["tokens"] for x in rows]), 1)
            r["mfu"] = round(r["samples_per_s"] * per_row_flops / (peak * 1e12), 4)
        r["wall_s"] = round(time.time() - t0, 1)
        results[name] = r
        print(name, json.dumps(r), flush=True)
        write_record(args, results, stats, peak)
    write_record(args, results, stats, peak)
    return 0


def write_record(args, results: dict, stats: dict, peak: float) -> None:
    """Rewritten after every config, so a run cut short still leaves what it measured."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    ratios = {}
    for name, r in results.items():
        if name.startswith("ours-") and "error" not in r:
            base = "naive-" + name.split("-")[1] + ("-fixed" if "-fixed" in name else "")
            if base in results and "samples_per_s" in results[base]:
                ratios[f"{name}_speedup"] = round(r["samples_per_s"] / results[base]["samples_per_s"], 3)
    card = card_name()
    record = {
        "card": card,
        "command": "python bench/train_bench.py " + " ".join(sys.argv[1:]),
        "git_commit": os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown",
        "date": date.today().isoformat(),
        "config": {"model": "InternVL3-1B layout, random weights", "steps": args.steps, "warmup_steps_excluded": args.warmup,
                   "data": {k: {"rows": len(s), "mean_tokens": round(mean([r['tokens'] for r in s])), "mean_tiles": round(mean([r['tiles'] for r in s]), 2)} for k, s in stats.items()},
                   "lora": "r 8, alpha 32, dropout 0 (PEFT's default, as naive), all LLM linear layers; ViT frozen", "full": "LLM + projector trained, ViT frozen", "measured_peak_tflops": round(peak, 1)},  # fmt: skip
        "baselines": {k: v for k, v in results.items() if k.startswith("naive")},
        "ours": {k: v for k, v in results.items() if k.startswith("ours")},
        "ratios": ratios,
    }
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.results_dir) / f"train-speed-{card.replace(' ', '-')}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(ratios), "written", path, flush=True)


if __name__ == "__main__":
    sys.exit(main())
