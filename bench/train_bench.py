"""Training speed: `internvl sft` against a naive Hugging Face loop, same data, same card, same run.

    python bench/train_bench.py --list                     # the configs and what each one changes
    python bench/train_bench.py --steps 24                 # all configs
    python bench/train_bench.py --only naive-full-fixed,ours-full-fixed,ours-full-fixed-liger   # 4,096-token rows (MFU)

Model: the InternVL3-1B layout (InternViT-300M + Qwen2-0.5B) with random weights (speed does not depend on
values). Data (seeded): "real" rows have 0-2 images whose aspect ratios pick 1-12 tiles (+ a thumbnail when more
than one: 1-13 tiles, mean about 8), a question, and a 10-400 word answer; about 2,500 tokens a row, 10%
text-only and 10% two-image rows. "fixed" rows are exactly 4,096 tokens each (checked): one 448-px tile (256
image tokens), a question and an answer of about 1,900 tokens each. Naive = transformers' Trainer + PEFT with
default settings: padding to the longest row of a random batch, the model's own loss over full-vocabulary
logits, images decoded in the main process. Ours = `internvl sft` with its defaults plus the flags in CONFIGS.

Reported per config: samples/s, real (non-padding) tokens/s, model-FLOPs utilisation against the card's
measured bf16 matmul peak (model_flops says what counts), peak memory, mean loss of the last steps; ratios
ours / naive, and for a config that only adds one option (-liger, -compile), ours / the same config without it.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    times, losses, batch_tokens = [], [], []  # real tokens of each batch, in the order the steps take them

    def collate_and_count(b):
        out = collate(b, loaded.template.tokenizer.pad_token_id)
        batch_tokens.append(int(out["attention_mask"].sum()))
        return out

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir="/tmp/naive-out", per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5 if full else 1e-4,
                             bf16=True, logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_and_count, callbacks=[Timer()])
    trainer.train()
    span = times[-1] - times[warmup - 1]
    result = {"samples_per_s": round((steps - warmup) * batch / span, 3), "real_tokens_per_s": round(sum(batch_tokens[warmup:steps]) / span, 1), "step_s": round(span / (steps - warmup), 4),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4)}  # fmt: skip
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
    return timed_throughput(records, batch=batch, warmup=warmup)


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
# checkpointing, length grouping or packing. A "-liger" or "-compile" config is the config named without
# that suffix plus one option, so the two measure it on and off.
NOGC = ["--gradient_checkpointing", "false"]
GC = ["--gradient_checkpointing", "true"]
LIGER = ["--use_liger_kernel", "true"]
COMPILE = ["--torch_compile", "true"]
CONFIGS = {
    "naive-lora": ("naive", False, "real", 4, []),
    "ours-lora-b4": ("ours", False, "real", 4, NOGC + ["--group_by_length", "false"]),
    "ours-lora-b8": ("ours", False, "real", 8, NOGC),
    "ours-lora-b8-liger": ("ours", False, "real", 8, NOGC + LIGER),
    "ours-lora-b8-gc": ("ours", False, "real", 8, GC),
    "ours-lora-b8-gc-liger": ("ours", False, "real", 8, GC + LIGER),
    "ours-lora-b8-gc-compile": ("ours", False, "real", 8, GC + COMPILE),
    "ours-lora-b8-gc-packed": ("ours", False, "real", 8, GC + ["--packing", "true"]),
    "ours-lora-b8-gc-packed-flex": ("ours", False, "real", 8, GC + ["--packing", "true", "--attn_impl", "flex_attention"]),
    "naive-full": ("naive", True, "real", 4, []),
    "ours-full-b4": ("ours", True, "real", 4, NOGC + ["--group_by_length", "false"]),
    "ours-full-b8": ("ours", True, "real", 8, NOGC),
    "ours-full-b8-liger": ("ours", True, "real", 8, NOGC + LIGER),
    "ours-full-b8-gc": ("ours", True, "real", 8, GC),
    "ours-full-b8-gc-liger": ("ours", True, "real", 8, GC + LIGER),
    "ours-full-b16-gc": ("ours", True, "real", 16, GC),
    "ours-full-b16-gc-liger": ("ours", True, "real", 16, GC + LIGER),
    # Fixed 4,096-token rows (one tile each; no padding whatever the batch): the MFU rows.
    "naive-full-fixed": ("naive", True, "fixed", 4, []),
    "ours-full-fixed": ("ours", True, "fixed", 4, NOGC),
    "ours-full-fixed-liger": ("ours", True, "fixed", 4, NOGC + LIGER),
    "ours-full-fixed-compile": ("ours", True, "fixed", 4, NOGC + COMPILE),
    "ours-full-fixed-b8": ("ours", True, "fixed", 8, NOGC),
    "ours-full-fixed-b8-liger": ("ours", True, "fixed", 8, NOGC + LIGER),
    "ours-full-fixed-b8-gc-liger": ("ours", True, "fixed", 8, GC + LIGER),
}
OPTION_SUFFIXES = ("-liger", "-compile")
FIXED_TOKENS = 4096


def describe(name: str) -> str:
    kind, full, data, batch, extra = CONFIGS[name]
    what = ("HF Trainer" + ("" if full else " + PEFT") + ", defaults") if kind == "naive" else "internvl sft " + " ".join(extra)
    return f"{name:30s} {'full' if full else 'LoRA':4s} {data:5s} batch {batch:<3d} {what}"


def missing_requirement(extra: list[str]) -> str | None:
    """Why a config cannot measure what it names here (sft would fall back with a warning), or None."""
    if "--use_liger_kernel" in extra and importlib.util.find_spec("liger_kernel") is None:
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


def write_record(args, results: dict, stats: dict, peak: float, shape: dict) -> None:
    """Rewritten after every config, so a run cut short still leaves what it measured."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    ratios = {}
    for name, r in results.items():
        if name.startswith("ours-") and "error" not in r:
            base = "naive-" + name.split("-")[1] + ("-fixed" if "-fixed" in name else "")
            if base in results and "samples_per_s" in results[base]:
                ratios[f"{name}_speedup"] = round(r["samples_per_s"] / results[base]["samples_per_s"], 3)
                ratios[f"{name}_token_speedup"] = round(r["real_tokens_per_s"] / results[base]["real_tokens_per_s"], 3)
            for suffix in OPTION_SUFFIXES:  # the option on / off, same run
                off = name.removesuffix(suffix)
                if off != name and "samples_per_s" in results.get(off, {}):
                    ratios[f"{name}_vs_{off}"] = round(r["samples_per_s"] / results[off]["samples_per_s"], 3)
    config = {"model": "InternVL3-1B layout, random weights", "steps": args.steps, "warmup_steps_excluded": args.warmup,
              "data": {k: {"rows": len(s), "mean_tokens": round(mean([r['tokens'] for r in s])), "min_tokens": min(r['tokens'] for r in s), "max_tokens": max(r['tokens'] for r in s),
                           "mean_tiles": round(mean([r['tiles'] for r in s]), 2), "mean_answer_tokens": round(mean([r['answer_tokens'] for r in s]))} for k, s in stats.items()},
              "lora": "r 8, alpha 32, dropout 0 (PEFT's default, as naive), all LLM linear layers; ViT frozen", "full": "LLM + projector trained, ViT frozen", "measured_peak_tflops": round(peak, 1),
              "model_shape": shape, "mfu": "measured real tokens/s x the data's useful FLOPs per real token (model_flops: 6N/4N per token, causal attention, answer-only LM head, frozen ViT forward) / measured peak"}  # fmt: skip
    path = write_result(args.results_dir, "train", args.what, config=config, baselines={k: v for k, v in results.items() if k.startswith("naive")},
                        ours={k: v for k, v in results.items() if k.startswith("ours")}, ratios=ratios)  # fmt: skip
    print(json.dumps(ratios), "written", path, flush=True)


if __name__ == "__main__":
    sys.exit(main())
