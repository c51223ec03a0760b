"""Training speed: `internvl sft` against a naive Hugging Face loop, same data, same card, same run.

    python bench/train_bench.py --list                     # the configs and what each one changes
    python bench/train_bench.py --steps 24                 # all configs
    python bench/train_bench.py --only naive-full-fixed,ours-full-fixed-b8-auto,ours-full-fixed-b8   # 4,096-token rows (MFU)
    python bench/train_bench.py --only naive-lora,ours-lora-curve,naive-full,ours-full-curve --steps 16 --warmup 4 --what curve

Model: the InternVL3-1B layout (InternViT-300M + Qwen2-0.5B) with random weights (speed does not depend on
values). Data (seeded): "real" rows have 0-2 images whose aspect ratios pick 1-12 tiles (+ a thumbnail when more
than one: 1-13 tiles, mean about 8), a question, and a 10-400 word answer; about 2,500 tokens a row, 10%
text-only and 10% two-image rows. "fixed" rows are exactly 4,096 tokens each (checked): one 448-px tile (256
image tokens), a question and an answer of about 1,900 tokens each. Naive = transformers' Trainer + PEFT with
default settings: padding to the longest row of a random batch, the model's own loss over full-vocabulary
logits, images decoded in the main process. Ours = `internvl sft` with its defaults plus the flags in CONFIGS.

Reported per config: samples/s, real (non-padding) tokens/s, model-FLOPs utilisation against the card's
measured bf16 matmul peak (model_flops says what counts), peak memory, mean loss of the last steps, and every
step's loss and real tokens (warmup included); ratios ours / naive, for a config that only adds one option
(-noliger, -compile) it / the same config without that suffix, and for a -curve config (naive's rows, order, batch and
optimisation) its per-step loss against naive's (curve_ratios).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))

from record import card_name, write_record as write_result  # noqa: E402  (this folder: bench/results records)

WORDS = ("the a picture shows red green blue yellow cat dog road city sign distance left right top bottom large small "
         "one two three four five people car tree house sky water boat text number table chart line bar").split()  # fmt: skip
# Grids (cols, rows) and their weights: 1 to 12 tiles, mean about 7 (+ thumbnail -> about 8).
GRIDS = [((1, 1), 1), ((2, 1), 1), ((1, 2), 1), ((2, 2), 2), ((3, 2), 3), ((2, 3), 2), ((4, 2), 3), ((3, 3), 3), ((5, 2), 2), ((4, 3), 3), ((3, 4), 2), ((6, 2), 2)]


def make_dataset(folder: Path, rows: int, *, seed: int) -> Path:
    """Realistic rows: 0-2 images of 1-12 tiles, a question, a 10-400 word answer."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(rows):
        kind = rng.random()
        n_images = 0 if kind < 0.1 else 2 if kind > 0.9 else 1
        grids = [rng.choices([g for g, _ in GRIDS], weights=[w for _, w in GRIDS])[0] for _ in range(n_images)]
        if n_images == 2:  # two images share the budget: keep each smaller
            grids = [(max(1, c // 2), r) for c, r in grids]
        answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 400)))
        query = "Describe what you see in detail, then answer: what is the main object?"
        images = [_image(folder, int(448 * c * s), int(448 * r * s), rng.randrange(4)) for (c, r), s in ((g, rng.choice((0.75, 1.0, 1.25))) for g in grids)]
        lines.append(json.dumps({"query": query, "response": answer, "images": images}))
    out = folder / "train.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def make_fixed_dataset(folder: Path, rows: int, *, seed: int, tokens: int, template) -> Path:
    """Rows of exactly `tokens` tokens as the model's template encodes them: one 448-px image (one tile), a
    question of random words, and an answer of random words that fits, topped up with "." one at a time;
    a row that cannot be made exact raises."""
    from internvl_worker.templates import Conversation

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    image = _image(folder, 448, 448, 0)
    tiles = [template.tiler.num_tiles(448, 448)]
    length = lambda q, a: len(template.encode(Conversation(turns=[(q, a)], images=[image]), tiles, check_length=False))  # noqa: E731
    # A byte-level BPE splits text at spaces first, so " word" costs the same tokens wherever it stands:
    # the answer's length can be planned word by word and then checked with the template.
    cost = {w: len(template.tokenizer(" " + w, add_special_tokens=False).input_ids) for w in WORDS}
    lines = []
    for _ in range(rows):
        query = "<image>\n" + " ".join(rng.choices(WORDS, k=tokens // 6))  # about half the row (~2.9 tokens a word)
        budget, words = tokens - length(query, ""), []
        while budget - cost[w := rng.choice(WORDS)] > 0:
            budget -= cost[w]
            words.append(w)
        while words and length(query, " ".join(words)) > tokens:
            words.pop()
        answer = " ".join(words)
        while length(query, answer) < tokens:
            answer += "."
        if length(query, answer) != tokens:
            raise RuntimeError(f"could not build a row of exactly {tokens} tokens (got {length(query, answer)})")
        lines.append(json.dumps({"query": query, "response": answer, "images": [image]}))
    out = folder / f"fixed-{tokens}.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _image(folder: Path, w: int, h: int, variant: int) -> str:
    """A noise JPEG of w x h (written once per size and variant); its file name."""
    import numpy as np
    from PIL import Image

    path = folder / f"img_{w}x{h}_{variant}.jpg"
    if not path.is_file():
        arr = (np.random.default_rng(w * 100_003 + h * 7 + variant).random((h // 8, w // 8, 3)) * 255).astype("uint8")
        Image.fromarray(arr).resize((w, h)).save(path, quality=90)
    return path.name


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


def model_shape(model_dir: Path) -> dict:
    """What model_flops needs: matmul parameter counts (from the safetensors headers, nothing loaded) and
    sizes (from config.json). Embedding lookups are no matmuls; the tied LM head is counted in model_flops."""
    from safetensors import safe_open

    n = {"llm": 0, "vit": 0, "projector": 0}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                size = math.prod(f.get_slice(key).get_shape())
                if "language_model" in key and "embed_tokens" not in key:
                    n["llm"] += size
                elif "vision_tower" in key and not any(x in key for x in ("position_embeddings", "cls_token", "mask_token")):
                    n["vit"] += size
                elif "multi_modal_projector" in key:
                    n["projector"] += size
    config = json.loads((model_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    side = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    return {
        "n_llm": n["llm"], "n_vit": n["vit"], "n_projector": n["projector"],
        "d": text["hidden_size"], "layers": text["num_hidden_layers"], "vocab": text["vocab_size"],
        "vit_d": vision["hidden_size"], "vit_layers": vision["num_hidden_layers"],
        "vit_tokens": (side(vision["image_size"]) // side(vision["patch_size"])) ** 2 + 1,  # patches + CLS
        "image_tokens": config["image_seq_length"],
    }  # fmt: skip


def model_flops(rows: list[dict], *, full: bool, shape: dict) -> float:
    """Useful FLOPs for these rows, as in PaLM's MFU (2 per multiply-add; 6N per token for trained weights:
    forward 2N, backward 2N for the input gradient and 2N for the weight gradient; 4N for frozen weights that
    gradients still pass through; 2N for frozen weights nothing before them trains):
      frozen ViT, forward only: 2 * n_vit per patch token, and attention 4 * layers * T^2 * d per tile;
      projector (trained only in full): 2 or 4 * n_projector per image token (no gradient flows into the ViT);
      LLM: 6 (full) or 4 (LoRA: frozen weights; adapters negligible) * n_llm per token;
      LLM causal attention: QK^T and AV, 2 * t^2 * d per layer forward (the causal half), x3 with backward,
        also for LoRA (attention has no weights, its backward is all input gradients);
      LM head (tied, so trained in full): 6 or 4 * vocab * d per answer token, the only logits a loss needs.
    Padding, recomputation (gradient checkpointing) and image/prompt logits are not useful work: not counted."""
    s = shape
    total = 0.0
    for r in rows:
        t, tiles, answer = r["tokens"], r["tiles"], r["answer_tokens"]
        total += tiles * (2 * s["n_vit"] * s["vit_tokens"] + 4 * s["vit_layers"] * s["vit_tokens"] ** 2 * s["vit_d"])
        total += (4 if full else 2) * s["n_projector"] * s["image_tokens"] * tiles
        total += (6 if full else 4) * s["n_llm"] * t
        total += 3 * 2 * s["layers"] * t * t * s["d"]
        total += (6 if full else 4) * s["vocab"] * s["d"] * answer
    return total


def free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


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


SEED = 0  # naive's TrainingArguments seed and data_seed, ours' --seed
NAIVE_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"  # the LLM's 7 linear layers


def learning_rate(full: bool) -> float:
    return 1e-5 if full else 1e-4


def naive_training_args(*, full: bool, steps: int, batch: int, on_gpu: bool):
    """The naive loop's TrainingArguments: transformers' defaults (AdamW, linear decay, no warmup, weight decay
    0, RandomSampler) plus what a run needs. data_seed = seed: the sampler's order then rests on the seed alone,
    not on whatever last seeded torch's generator (the Trainer falls back to torch.initial_seed())."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir="/tmp/naive-out", per_device_train_batch_size=batch, max_steps=steps, learning_rate=learning_rate(full),
                             bf16=on_gpu, use_cpu=not on_gpu, logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
                             disable_tqdm=True, seed=SEED, data_seed=SEED)  # fmt: skip


def naive_model(model_dir: Path, *, full: bool, on_gpu: bool):
    """(loaded, model to train): seeded, loaded and frozen or wrapped in LoRA in run_sft's order (set_seed, load,
    then PEFT), so LoRA's A matrices are drawn from the same generator state as ours'. On a GPU LoRA keeps a bf16
    base and full fp32 master weights (as ours); on a CPU both are fp32 (as ours)."""
    from transformers import set_seed

    from internvl_worker.modeling import load_model

    set_seed(SEED)
    loaded = load_model(model_dir, dtype="fp32" if full or not on_gpu else "bf16", device_map={"": 0} if on_gpu else None, max_length=8192)
    model = loaded.model
    model.config.use_cache = False
    if full:
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("model.vision_tower"))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=NAIVE_LORA_TARGETS, task_type="CAUSAL_LM"))
    return loaded, model


def run_naive(model_dir: Path, data: Path, *, full: bool, steps: int, batch: int, warmup: int) -> dict:
    """transformers' Trainer + PEFT, defaults: the loop a person writes from the docs. Runs on a CPU too (fp32,
    no autocast, no memory figure), for tests."""
    import torch
    from transformers import Trainer, TrainerCallback

    from internvl_worker.data import read_dataset
    from internvl_worker.train import SftDataset, collate, setup_numerics

    on_gpu = torch.cuda.is_available()
    setup_numerics()  # the same NaN guard for both: cuDNN SDPA off
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    loaded, model = naive_model(model_dir, full=full, on_gpu=on_gpu)
    rows = read_dataset(data)
    ds = SftDataset(rows, loaded.template, [0] * len(rows))
    times, losses, batch_tokens = [], {}, []  # real tokens of each batch, in the order the steps take them

    def collate_and_count(b):
        out = collate(b, loaded.template.tokenizer.pad_token_id)
        batch_tokens.append(int(out["attention_mask"].sum()))
        return {k: v for k, v in out.items() if not k.startswith("answer_")}  # the model's own inputs only (ours finds answers in collate)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    args = naive_training_args(full=full, steps=steps, batch=batch, on_gpu=on_gpu)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_and_count, callbacks=[Timer()])
    trainer.train()
    span = times[-1] - times[warmup - 1]
    per_step = [losses[s] for s in sorted(losses)]
    result = {"samples_per_s": round((steps - warmup) * batch / span, 3), "real_tokens_per_s": round(sum(batch_tokens[warmup:steps]) / span, 1), "step_s": round(span / (steps - warmup), 4),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if on_gpu else 0, "loss_last": round(sum(per_step[-5:]) / len(per_step[-5:]), 4),
              "rows": len(rows), "losses": per_step, "batch_tokens": batch_tokens[:steps]}  # fmt: skip
    del trainer, model, loaded
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def ours_command(model_dir: Path, data: Path, out: Path, *, full: bool, steps: int, batch: int, extra: list[str], workers: int = 6) -> list[str]:
    """`internvl sft` as every ours config runs it: naive's seed, learning rate, no warmup, no validation split,
    every step logged, LoRA r 8 / alpha 32 / dropout 0 on the LLM's 7 linear layers; then the config's flags
    (argparse keeps the last of a repeated flag, so `extra` may override these)."""
    cmd = [sys.executable, "-m", "internvl_worker", "sft", "--model_id_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
           "--add_output_dir_suffix", "false", "--max_steps", str(steps), "--batch_size", str(batch), "--gradient_accumulation_steps", "1",
           "--logging_steps", "1", "--save_steps", "100000", "--eval_steps", "100000", "--dataset_test_ratio", "0",
           "--max_length", "8192", "--dataloader_num_workers", str(workers), "--warmup_ratio", "0", "--seed", str(SEED),
           "--sft_type", "full" if full else "lora", "--learning_rate", str(learning_rate(full))]  # fmt: skip
    if not full:
        cmd += ["--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--freeze_vit", "true", "--lora_dropout", "0", "--lora_rank", "8", "--lora_alpha", "32"]
    else:
        cmd += ["--freeze_vit", "true", "--freeze_aligner", "false"]
    return cmd + list(extra)


def run_ours(model_dir: Path, data: Path, out: Path, *, full: bool, steps: int, batch: int, warmup: int, extra: list[str], workers: int = 6) -> dict:
    cmd = ours_command(model_dir, data, out, full=full, steps=steps, batch=batch, extra=extra, workers=workers)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "worker"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    start = next((json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "start"')), {})
    # what ran, from sft's start event: Liger is on by default where installed, checkpointing auto on a GPU
    rows = {k: start[k] for k in ("train_rows", "val_rows", "dropped_rows", "liger_kernels", "checkpointing") if k in start}
    return timed_throughput(records, batch=batch, warmup=warmup) | rows | step_records(records, batch=batch)


def step_records(records: list[dict], *, batch: int) -> dict:
    """Every step's loss and real tokens (warmup included) from sft's progress records, one a step
    (--logging_steps 1). sft logs no token count, only rates over the same interval: tokens/s x batch /
    samples/s, to within their rounding (a few tokens in 10,000), enough to tell two batches apart."""
    progress = sorted((r for r in records if r["event"] == "progress" and "loss" in r), key=lambda r: r["step"])
    steps = {"losses": [r["loss"] for r in progress], "batch_tokens": [round(r["tokens_per_s"] * batch / r["samples_per_s"]) for r in progress]}
    if any("checkpointed_layers" in r for r in progress):  # --gradient_checkpointing auto's choice each step
        steps["checkpointed_layers"] = [r.get("checkpointed_layers") for r in progress]
    return steps


def timed_throughput(records: list[dict], *, batch: int, warmup: int) -> dict:
    """Throughput of the steps after `warmup` from sft's progress records (one a step: --logging_steps 1):
    their samples and real tokens over their summed time, as for naive. A plain mean of the per-step rates
    would overstate it: short length-grouped batches have high rates but take little of the time."""
    progress = [r for r in records if r["event"] == "progress" and "loss" in r and r["step"] > warmup]
    seconds = [batch / r["samples_per_s"] for r in progress]
    span = sum(seconds)
    return {"samples_per_s": round(len(progress) * batch / span, 3), "real_tokens_per_s": round(sum(r["tokens_per_s"] * dt for r, dt in zip(progress, seconds)) / span, 1), "step_s": round(span / len(progress), 4),
            "peak_mem_gb": max(r.get("gpu_mem_gb", 0) for r in progress), "loss_last": round(sum(r["loss"] for r in progress[-5:]) / len(progress[-5:]), 4)}  # fmt: skip


# name: (kind, full, data, batch size, extra flags for ours). The naive loop runs at batch 4, the largest
# that fits on an 80 GB card with realistic rows (batch 8 runs out of memory: full-vocabulary fp32 logits).
# Ours: random batches as naive ("-b4"), then its memory savings spent on larger batches with gradient
# checkpointing (all layers "-gc", none, or "-auto": internvl sft's default, as many as memory needs), length
# grouping or packing. Liger's kernels are on by default where installed; a "-noliger" config turns them off
# and a "-compile" config adds --torch_compile to the config named without that suffix, so the two measure the
# option on and off.
NOGC = ["--gradient_checkpointing", "false"]
GC = ["--gradient_checkpointing", "true"]
NOLIGER = ["--use_liger_kernel", "false"]
COMPILE = ["--torch_compile", "true"]
# The "-curve" configs: naive's rows in naive's order at naive's batch with naive's optimisation (HF Trainer
# defaults), so that their per-step losses can be set beside naive's. ours_command already gives the seed,
# learning rate, warmup 0, no validation split, max_length 8192 (no realistic row is dropped) and the LoRA
# settings; these remove what differs besides: sft's length-grouped sampler, its weight decay 0.1 and its
# cosine schedule. max_grad_norm 1.0 is both defaults, given so a change of sft's default shows here.
# Everything else is ours' own defaults (gradient checkpointing, answer-only logits, uint8 pixels, workers, the
# fused LoRA update, Liger where installed on a GPU): they change the rounding, not the math.
CURVE = ["--group_by_length", "false", "--weight_decay", "0", "--lr_scheduler_type", "linear", "--max_grad_norm", "1.0"]
CONFIGS = {
    "naive-lora": ("naive", False, "real", 4, []),
    "ours-lora-b4": ("ours", False, "real", 4, NOGC + ["--group_by_length", "false"]),
    "ours-lora-b8-auto": ("ours", False, "real", 8, []),
    "ours-lora-b16-auto": ("ours", False, "real", 16, []),
    "ours-lora-b8-auto-w12": ("ours", False, "real", 8, ["--dataloader_num_workers", "12"]),  # is the default step loader-bound?
    "ours-lora-b8": ("ours", False, "real", 8, NOGC),
    "ours-lora-b8-noliger": ("ours", False, "real", 8, NOGC + NOLIGER),
    "ours-lora-b8-gc": ("ours", False, "real", 8, GC),
    "ours-lora-b8-gc-noliger": ("ours", False, "real", 8, GC + NOLIGER),
    "ours-lora-b8-gc-compile": ("ours", False, "real", 8, GC + COMPILE),
    "ours-lora-b8-gc-packed": ("ours", False, "real", 8, GC + ["--packing", "true"]),
    "ours-lora-b8-gc-packed-flex": ("ours", False, "real", 8, GC + ["--packing", "true", "--attn_impl", "flex_attention"]),
    "ours-lora-curve": ("ours", False, "real", 4, CURVE),
    "naive-full": ("naive", True, "real", 4, []),
    "ours-full-curve": ("ours", True, "real", 4, CURVE),
    "ours-full-b4": ("ours", True, "real", 4, NOGC + ["--group_by_length", "false"]),
    "ours-full-b8-auto": ("ours", True, "real", 8, []),
    "ours-full-b16-auto": ("ours", True, "real", 16, []),
    "ours-full-b8": ("ours", True, "real", 8, NOGC),
    "ours-full-b8-noliger": ("ours", True, "real", 8, NOGC + NOLIGER),
    "ours-full-b8-gc": ("ours", True, "real", 8, GC),
    "ours-full-b8-gc-noliger": ("ours", True, "real", 8, GC + NOLIGER),
    "ours-full-b16-gc": ("ours", True, "real", 16, GC),
    # Fixed 4,096-token rows (one tile each; no padding whatever the batch): the MFU rows.
    "naive-full-fixed": ("naive", True, "fixed", 4, []),
    "ours-full-fixed": ("ours", True, "fixed", 4, NOGC),
    "ours-full-fixed-noliger": ("ours", True, "fixed", 4, NOGC + NOLIGER),
    "ours-full-fixed-compile": ("ours", True, "fixed", 4, NOGC + COMPILE),
    "ours-full-fixed-b8": ("ours", True, "fixed", 8, NOGC),
    "ours-full-fixed-b8-auto": ("ours", True, "fixed", 8, []),
    "ours-full-fixed-b16-auto": ("ours", True, "fixed", 16, []),
    "ours-full-fixed-b8-gc": ("ours", True, "fixed", 8, GC),
}
OPTION_SUFFIXES = ("-noliger", "-compile")
CURVE_SUFFIX = "-curve"
FIXED_TOKENS = 4096


def describe(name: str) -> str:
    kind, full, data, batch, extra = CONFIGS[name]
    what = ("HF Trainer" + ("" if full else " + PEFT") + ", defaults") if kind == "naive" else "internvl sft " + " ".join(extra)
    return f"{name:30s} {'full' if full else 'LoRA':4s} {data:5s} batch {batch:<3d} {what}"


def missing_requirement(extra: list[str]) -> str | None:
    """Why a config cannot measure what it names here (sft would fall back with a warning), or None."""
    if "--use_liger_kernel" in extra and extra[extra.index("--use_liger_kernel") + 1] == "true" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed here (bench/device_wheels.sh gathers its wheel)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per config (default: 24)")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing (default: 4)")
    ap.add_argument("--rows", type=int, default=256, help="rows in each data set (default: 256)")
    ap.add_argument("--out", default="/tmp/train-bench", help="work folder: the random model (kept), data, run logs")
    ap.add_argument("--only", default="", help="comma-separated config names (default: all)")
    ap.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--what", default="speed", help="names the result file train-<what>-<card>-<date>.json, so two runs of a day do not overwrite each other (default: speed)")
    ap.add_argument("--list", action="store_true", help="print the config names and what each runs, then exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(describe(name) for name in CONFIGS))
        return 0
    wanted = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {', '.join(unknown)}; --list shows them")

    out = Path(args.out)
    model_dir = out / "model-1b"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", "internvl3-1b", "--output_dir", str(model_dir)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "worker")))
    from transformers import AutoConfig, AutoTokenizer

    from internvl_worker.modeling import build_template
    from internvl_worker.registry import get_model_spec

    config = AutoConfig.from_pretrained(model_dir)
    template, _ = build_template(config, AutoTokenizer.from_pretrained(model_dir), get_model_spec("internvl3-1b"))
    kinds = {CONFIGS[c][2] for c in wanted}
    data = {}
    if "real" in kinds:
        data["real"] = make_dataset(out / "data", args.rows, seed=0)
    if "fixed" in kinds:
        data["fixed"] = make_fixed_dataset(out / "data", args.rows, seed=0, tokens=FIXED_TOKENS, template=template)
    stats = {k: row_stats(v, template) for k, v in data.items()}
    if "fixed" in stats and {r["tokens"] for r in stats["fixed"]} != {FIXED_TOKENS}:
        raise SystemExit(f"fixed rows are not all {FIXED_TOKENS} tokens: {sorted({r['tokens'] for r in stats['fixed']})}")
    shape = model_shape(model_dir)
    peak = measured_peak_tflops()
    print(f"card {card_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for k, s in stats.items():
        print(f"data {k}: {len(s)} rows, mean {mean([r['tokens'] for r in s]):.0f} tokens, {mean([r['tiles'] for r in s]):.1f} tiles, {mean([r['answer_tokens'] for r in s]):.0f} answer tokens", flush=True)

    print(f"model: {shape}", flush=True)
    results = {}
    for name in wanted:
        kind, full, data_kind, batch, extra = CONFIGS[name]
        t0 = time.time()
        if kind == "naive":
            try:
                r = run_naive(model_dir, data[data_kind], full=full, steps=args.steps, batch=batch, warmup=args.warmup)
            except Exception as e:  # e.g. out of memory: record it and measure the other configs
                r = {"error": [f"{type(e).__name__}: {e}"[:1000]]}
            free_cuda_memory()  # what a failed run left (its frames are gone once the except block ends)
        elif missing := missing_requirement(extra):
            r = {"error": [missing]}
        else:
            r = run_ours(model_dir, data[data_kind], out / name, full=full, steps=args.steps, batch=batch, warmup=args.warmup, extra=extra)
            r["flags"] = " ".join(extra)
        r["batch_size"] = batch
        if "error" not in r:
            # MFU from the measured real tokens/s and the data's useful FLOPs per real token: the timed steps
            # hold whichever rows the sampler gave them, not the data's average row.
            rows = stats[data_kind]
            flops_per_token = model_flops(rows, full=full, shape=shape) / sum(x["tokens"] for x in rows)
            r["mfu"] = round(r["real_tokens_per_s"] * flops_per_token / (peak * 1e12), 4)
        r["wall_s"] = round(time.time() - t0, 1)
        results[name] = r
        print(name, json.dumps(r), flush=True)
        write_record(args, results, stats, peak, shape)
    write_record(args, results, stats, peak, shape)
    return 0


def naive_counterpart(name: str) -> str:
    """The naive config an ours config is compared with: the same method and data (ours-lora-curve -> naive-lora)."""
    return "naive-" + name.split("-")[1] + ("-fixed" if "-fixed" in name else "")


def curve_ratios(name: str, ours: dict, naive: dict) -> dict:
    """Per-step loss of a -curve config against its naive counterpart over the steps both logged:
    `_loss_max_abs_diff`, `_loss_mean_abs_diff`; for scale, the naive run's own step-to-step change,
    mean |loss[t] - loss[t-1]| (`_naive_loss_step_noise`: what a different batch moves the loss by); and
    `_batch_tokens_max_rel_diff`, the largest relative difference in real tokens of the same step's batch
    (about 0 when both took the same rows: ours' counts are rounded, see step_records), and `_rows_match`:
    ours trained on all of naive's rows (none held out for validation or dropped over --max_length). A step
    where either loss is not finite is counted in `_loss_nonfinite_steps` and left out of the differences."""
    a, b = ours.get("losses", []), naive.get("losses", [])
    n = min(len(a), len(b))
    pairs = [(x, y) for x, y in zip(a[:n], b[:n]) if math.isfinite(x) and math.isfinite(y)]
    diffs = [abs(x - y) for x, y in pairs]
    noise = [abs(y - x) for x, y in itertools.pairwise(b) if math.isfinite(x) and math.isfinite(y)]
    out = {f"{name}_loss_steps": n, f"{name}_loss_nonfinite_steps": n - len(pairs),
           f"{name}_loss_max_abs_diff": round(max(diffs), 6) if diffs else None,
           f"{name}_loss_mean_abs_diff": round(sum(diffs) / len(diffs), 6) if diffs else None,
           f"{name}_naive_loss_step_noise": round(sum(noise) / len(noise), 6) if noise else None}  # fmt: skip
    out[f"{name}_rows_match"] = ours.get("train_rows") == naive.get("rows") and not ours.get("val_rows") and not ours.get("dropped_rows")
    ta, tb = ours.get("batch_tokens", []), naive.get("batch_tokens", [])
    m = min(len(ta), len(tb), n)
    if m:
        out[f"{name}_batch_tokens_max_rel_diff"] = round(max(abs(x - y) / max(y, 1) for x, y in zip(ta[:m], tb[:m])), 6)
    return out


def write_record(args, results: dict, stats: dict, peak: float, shape: dict) -> None:
    """Rewritten after every config, so a run cut short still leaves what it measured."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    ratios = {}
    for name, r in results.items():
        if name.startswith("ours-") and "error" not in r:
            base = naive_counterpart(name)
            if base in results and "samples_per_s" in results[base]:
                ratios[f"{name}_speedup"] = round(r["samples_per_s"] / results[base]["samples_per_s"], 3)
                ratios[f"{name}_token_speedup"] = round(r["real_tokens_per_s"] / results[base]["real_tokens_per_s"], 3)
                if name.endswith(CURVE_SUFFIX):
                    ratios.update(curve_ratios(name, r, results[base]))
            for suffix in OPTION_SUFFIXES:  # the option on / off, same run
                off = name.removesuffix(suffix)
                if off != name and "samples_per_s" in results.get(off, {}):
                    ratios[f"{name}_vs_{off}"] = round(r["samples_per_s"] / results[off]["samples_per_s"], 3)
    config = {"model": "InternVL3-1B layout, random weights", "steps": args.steps, "warmup_steps_excluded": args.warmup,
              "data": {k: {"rows": len(s), "mean_tokens": round(mean([r['tokens'] for r in s])), "min_tokens": min(r['tokens'] for r in s), "max_tokens": max(r['tokens'] for r in s),
                           "mean_tiles": round(mean([r['tiles'] for r in s]), 2), "mean_answer_tokens": round(mean([r['answer_tokens'] for r in s]))} for k, s in stats.items()},
              "lora": "r 8, alpha 32, dropout 0 (PEFT's default, as naive), all LLM linear layers; ViT frozen",
              "curve": "ours-*-curve: naive's rows, order (RandomSampler seeded by data_seed 0), batch 4, learning rate, linear schedule, no warmup, weight decay 0, seed 0 (set before the model is built); every config records its per-step losses and real tokens per step (batch_tokens)", "full": "LLM + projector trained, ViT frozen", "measured_peak_tflops": round(peak, 1),
              "model_shape": shape, "mfu": "measured real tokens/s x the data's useful FLOPs per real token (model_flops: 6N/4N per token, causal attention, answer-only LM head, frozen ViT forward) / measured peak"}  # fmt: skip
    path = write_result(args.results_dir, "train", args.what, config=config, baselines={k: v for k, v in results.items() if k.startswith("naive")},
                        ours={k: v for k, v in results.items() if k.startswith("ours")}, ratios=ratios)  # fmt: skip
    print(json.dumps(ratios), "written", path, flush=True)


if __name__ == "__main__":
    sys.exit(main())
