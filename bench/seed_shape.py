"""The seed's memory table at the seed's shape: InternVL-Chat-V1.5 (25.5B parameters), random bf16 weights.

    python bench/seed_shape.py                     # 1 GPU: inference, naive LoRA, ours (+ offload flag, a what-if), ~4-5 min
    python bench/seed_shape.py --zero2             # adds ours under DeepSpeed ZeRO-2 on 2 GPUs (torchrun)
    python bench/seed_shape.py --shape tiny        # the same phases on the CPU with a miniature config (< 1 min)

Shape: InternViT-6B-448px-V1-5 (45 layers x 3200, 25 heads, MLP 12800, RMSNorm, q/k norm, layer scale, no qkv
bias) -> pixel shuffle -> MLP projector -> a 20B language model shaped like InternLM2-20B as a Llama config
(48 x 6144, 48 heads, 8 KV heads, MLP 16384, vocabulary 92,553, untied head). The model is built on the GPU
directly (random init under `torch.device("cuda")`): writing 51 GB of random weights to disk and reading them
back would take longer than the measurements. Our trainer runs on it through `run_sft` with its model loader
replaced by one that returns this in-memory model (train.py has no other hook for an in-memory model); the
model directory it is given holds config, tokenizer and model type, no weights.

Phases, each in its own process so that one's peak memory (or out-of-memory) cannot leak into the next:
  infer               bf16 inference: one 13-tile image (12 tiles + thumbnail) + a short prompt, 8 new tokens
  naive-lora-gc       transformers' Trainer + PEFT, gradient checkpointing on, the model's own loss
  ours-lora-gc        `run_sft` (internvl sft defaults: LoRA on the LLM's q/k/v, ViT frozen, checkpointing)
  ours-lora-gc-vit-nograd   what-if: the frozen ViT run under no_grad (train.py does so since b5d7c83)
  ours-lora-gc-offload      `run_sft` with --offload_activations true (train.py's own flag: what autograd saves
                            in the forward, each decoder layer's input, held in pinned host memory)
Training rows: one 12-tile image (+ thumbnail) and text up to --max_length (4096) tokens, batch 1.

Reported: peak memory (torch.cuda.max_memory_allocated and max_memory_reserved, 1e9 bytes), seconds per
step, against the seed's published A100 numbers (inference 55 GB, LoRA 80 GB) and our target (LoRA <= 55 GB).
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
sys.path.insert(0, str(ROOT / "worker"))

MODEL_TYPE = "internvl-chat-v1_5"  # the seed's model type: internlm2 template, LoRA on the LLM's q/k/v
SEED_PUBLISHED_GB = {"inference": 55, "lora": 80}  # ms-swift's InternVL best-practice doc, A100, v1.5
TARGET_LORA_GB = 55

# InternVL-Chat-V1.5's config.json (vision_config of InternViT-6B-448px-V1-5, llm_config of InternLM2-20B),
# in transformers' native field names (as worker/internvl_worker/convert.py maps them).
SHAPES = {
    "seed": {
        "vision": dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800, image_size=448, patch_size=14),
        "text": dict(vocab_size=92_553, hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8),
        "max_length": 4096,
    },
    # Same architecture, a few hundred kB: the CPU test runs every phase with it.
    "tiny": {
        "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=4),
        "text": dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "max_length": 512,
    },
}
GRID = (4, 3)  # 4 x 3 tiles: a 4:3 image picks exactly this grid at 12 tiles max; + thumbnail = 13
PHASES = {
    # name: (kind, what-if patches, `internvl sft` arguments over its defaults)
    "infer": ("infer", (), {}),
    "naive-lora-gc": ("naive", (), {}),
    "ours-lora-gc": ("ours", (), {}),
    "ours-lora-gc-vit-nograd": ("ours", ("vit_nograd",), {}),
    "ours-lora-gc-offload": ("ours", (), {"offload_activations": True}),
}


def build_config(shape: str, tokenizer):
    from transformers import InternVLConfig, LlamaConfig
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    s = SHAPES[shape]
    # InternViT-6B: RMSNorm, q/k RMSNorm, no qkv bias, layer scale 0.1, mean pooling (no final norm).
    vision = InternVLVisionConfig(**s["vision"], attention_bias=False, use_qk_norm=True, norm_type="rms_norm", layer_scale_init_value=0.1, use_mean_pooling=True)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = LlamaConfig(
        **{**s["text"], "vocab_size": s["text"]["vocab_size"] or len(tokenizer)},
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    size, patch = s["vision"]["image_size"], s["vision"]["patch_size"]
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(size // patch) ** 2 // 4,  # 256 = (448/14)^2 * 0.5^2
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def build_model(config, *, device: str, dtype, attn: str = "sdpa"):
    """Random weights, allocated and initialised on `device` in `dtype` (no CPU copy of 51 GB)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def count_params(config) -> dict:
    """Parameter counts from a meta-device build (no memory): the real model's layout, exactly."""
    import torch

    model = build_model(config, device="meta", dtype=torch.bfloat16)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"total": n(model), "vision": n(model.model.vision_tower), "projector": n(model.model.multi_modal_projector),
            "llm": n(model.model.language_model) + n(model.lm_head)}  # fmt: skip


def memory_estimate(config, params: dict, *, tokens: int, tiles: int, answer_tokens: int) -> dict:
    """What a bf16 LoRA step holds at its peak (bytes), to read the measurements against. LM checkpoints:
    one hidden state per decoder layer; ViT checkpoints: the same for the 45 ViT layers when its output needs
    a gradient (it does whenever `enable_input_require_grads` hooks its patch embedding); logits: bf16 +
    fp32 copy + fp32 gradient over the whole vocabulary, for every position (naive) or the answer's (ours)."""
    v, t = config.vision_config, config.text_config
    vit_tokens = tiles * ((v.image_size[0] // v.patch_size[0]) ** 2 + 1)
    return {
        "weights": params["total"] * 2,
        "lm_checkpoints": t.num_hidden_layers * tokens * t.hidden_size * 2,
        "vit_checkpoints": v.num_hidden_layers * vit_tokens * v.hidden_size * 2,
        "logits_all_positions": tokens * t.vocab_size * 10,
        "logits_answer_only": answer_tokens * t.vocab_size * 10,
    }


def estimated_seconds(params: dict, *, tokens: int, tiles: int, phases: list[str], tflops: float = 350.0) -> float:
    """Rough wall time on one H100: per phase ~25 s of start-up (imports, random init, data) plus the steps.
    A LoRA step costs about 3 LLM forwards (forward, recompute, input-gradient backward) + the ViT forward
    (x3 when it keeps a graph), at ~350 TFLOP/s achieved."""
    vit = 2 * params["vision"] * tiles * 1025
    llm = 2 * params["llm"] * tokens
    total = 0.0
    for name in phases:
        kind, patches, _ = PHASES[name]
        step = (llm * 3 + vit * (1 if "vit_nograd" in patches else 3)) / (tflops * 1e12)
        total += 25 + (vit + llm) / (tflops * 1e12) + (0 if kind == "infer" else 6 * step)
    return total


# ------------------------------------------------------------------------------------------------ data


def make_row(folder: Path, template, *, max_length: int, tile: int) -> dict:
    """One training row: a 4:3 image of 12 tiles (+ thumbnail) and the longest answer that keeps the row
    within max_length tokens (rows over it would be dropped by our trainer)."""
    from PIL import Image

    from internvl_worker.templates import Conversation
    from train_bench import WORDS

    image = folder / "image.jpg"
    Image.new("RGB", (GRID[0] * tile, GRID[1] * tile), (90, 140, 200)).save(image)
    tiles = template.tiler.num_tiles(GRID[0] * tile, GRID[1] * tile)
    if tiles != GRID[0] * GRID[1] + 1:
        raise SystemExit(f"the image tiles into {tiles} tiles, expected {GRID[0] * GRID[1] + 1} (12 + thumbnail)")
    query = "<image>\nDescribe the picture in detail."

    def encode(n_words: int):
        answer = " ".join(WORDS[i % len(WORDS)] for i in range(n_words))
        return answer, template.encode(Conversation(turns=[(query, answer)], images=[str(image)]), [tiles], check_length=False)

    lo, hi = 1, max_length  # more words never means fewer tokens: bisect for the longest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(encode(mid)[1]) <= max_length else (lo, mid - 1)
    answer, enc = encode(lo)
    return {"query": query, "response": answer, "images": [str(image)], "tokens": len(enc), "tiles": tiles,
            "answer_tokens": sum(1 for x in enc.labels if x != -100), "image_tokens": enc.image_tokens}  # fmt: skip


def prepare(out: Path, shape: str, steps: int, max_length: int) -> dict:
    """Model directory without weights (config, tokenizer, model type), the dataset, and the row's numbers."""
    from internvl_worker.modeling import build_template
    from internvl_worker.registry import get_model_spec, write_meta
    from internvl_worker.tiny import _train_tokenizer

    tokenizer = _train_tokenizer()
    config = build_config(shape, tokenizer)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_meta(model_dir, model_type=MODEL_TYPE)
    template, _ = build_template(config, tokenizer, get_model_spec(MODEL_TYPE), max_length=max_length)
    row = make_row(out, template, max_length=max_length, tile=SHAPES[shape]["vision"]["image_size"])
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({k: row[k] for k in ("query", "response", "images")}) + "\n" for _ in range(steps)))
    return {"model_dir": str(model_dir), "data": str(data), **{k: row[k] for k in ("tokens", "tiles", "answer_tokens", "image_tokens")}}


# ---------------------------------------------------------------------------------------------- phases


def load_in_memory(model_dir: str, patches: tuple = ()):
    """A stand-in for modeling.load_model that builds the model in memory; run_sft calls it as it calls
    load_model (same keywords), so the rest of our training path runs unchanged."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from internvl_worker.modeling import LoadedModel, build_template, torch_dtype
    from internvl_worker.registry import get_model_spec

    def load(model_id_or_path=None, *, model_type=None, dtype="auto", device_map=None, max_length=None, max_tiles=None, attn_impl=None, **_):
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if isinstance(device_map, dict):
            device = f"cuda:{device_map['']}"
        else:
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        model = build_model(config, device=device, dtype=torch_dtype(dtype), attn=attn_impl or "sdpa")
        if "vit_nograd" in patches:
            # What-if: the frozen ViT keeps no graph. Today `enable_input_require_grads` also hooks the
            # ViT's patch embedding, so its 45 layers keep checkpoints and run backward for nothing.
            tower = model.model.vision_tower
            forward = tower.forward
            tower.forward = lambda *a, **kw: torch.no_grad()(forward)(*a, **kw)
        model.eval()
        spec = get_model_spec(model_type or MODEL_TYPE)
        template, tiler = build_template(config, tokenizer, spec, max_length=max_length, max_tiles=max_tiles)
        load.model = model
        return LoadedModel(model=model, template=template, tiler=tiler, spec=spec, model_dir=Path(model_dir))

    return load


def gpu_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_mem_gb": None, "peak_reserved_gb": None}
    return {"peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)}


def run_infer(prep: dict, args) -> dict:
    import torch

    from internvl_worker.infer import inference

    loaded = load_in_memory(prep["model_dir"])(dtype="bf16" if torch.cuda.is_available() else "fp32", max_length=args.max_length)
    image = json.loads(Path(prep["data"]).read_text().splitlines()[0])["images"][0]
    kwargs = dict(images=[image], max_new_tokens=8, min_new_tokens=8)
    inference(loaded.model, loaded.template, "Describe the picture.", **kwargs)  # warm-up: kernels, caches
    sync()
    t0 = time.perf_counter()
    response, _ = inference(loaded.model, loaded.template, "Describe the picture.", **kwargs)
    sync()
    return {"seconds": round(time.perf_counter() - t0, 3), "new_tokens": 8, "tiles": prep["tiles"], **gpu_peaks()}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_naive(prep: dict, args) -> dict:
    """transformers' Trainer + PEFT with gradient checkpointing on (the docs' recipe), the model's own
    loss over full-vocabulary logits; same LoRA as ours (r 8, alpha 32, dropout 0.05, the LLM's q/k/v)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from internvl_worker.data import read_dataset
    from internvl_worker.registry import get_model_spec
    from internvl_worker.train import SftDataset, collate, setup_numerics

    setup_numerics()  # the same cuDNN-SDPA guard as ours
    on_gpu = torch.cuda.is_available()
    loaded = load_in_memory(prep["model_dir"])(dtype="bf16" if on_gpu else "fp32", max_length=args.max_length)
    loaded.model.config.use_cache = False
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=get_model_spec(MODEL_TYPE).lora_targets, task_type="CAUSAL_LM"))
    rows = read_dataset(prep["data"])
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    targs = TrainingArguments(output_dir=str(Path(args.out) / "naive"), per_device_train_batch_size=1, max_steps=args.steps, learning_rate=1e-4,
                              gradient_checkpointing=True, bf16=on_gpu, use_cpu=not on_gpu, logging_steps=1, save_strategy="no", report_to=[],
                              remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    pad = loaded.template.tokenizer.pad_token_id
    Trainer(model=model, args=targs, train_dataset=SftDataset(rows, loaded.template, [0] * len(rows)), data_collator=lambda b: {k: v for k, v in collate(b, pad).items() if not k.startswith("answer_")}, callbacks=[Timer()]).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_s": round((times[-1] - times[args.warmup - 1]) / (len(times) - args.warmup), 3), "loss_last": round(losses[-1], 4), "trainable_params": trainable, **gpu_peaks()}


def run_ours(prep: dict, args, patches: tuple, flags: dict | None = None, name: str = "ours") -> dict:
    """Our `internvl sft` path (run_sft) on the in-memory model, its defaults but for the step count and `flags`."""
    from unittest import mock

    import torch

    from internvl_worker import train
    from internvl_worker.sft_args import SftArguments

    flags = flags or {}
    out = Path(args.out) / (name + (f"-{args.deepspeed}" if args.deepspeed else ""))
    sft = SftArguments(model_type=MODEL_TYPE, model_id_or_path=prep["model_dir"], dataset=prep["data"], output_dir=str(out), add_output_dir_suffix=False,
                       max_steps=args.steps, batch_size=1, gradient_accumulation_steps=1, logging_steps=1, dataset_test_ratio=0.0, max_length=args.max_length,
                       warmup_ratio=0.0, dataloader_num_workers=2 if torch.cuda.is_available() else 0, max_nonfinite_steps=10_000, deepspeed=args.deepspeed,
                       # every layer checkpointed, as the seed's table was measured: sft's default (auto) would spend the free memory on speed
                       **({"gradient_checkpointing": True} | flags))  # fmt: skip
    load = load_in_memory(prep["model_dir"], patches)
    with mock.patch.object(train, "load_model", load):
        train.run_sft(sft)
    rank = int(os.environ.get("RANK", 0))
    result = {"trainable_params": sum(p.numel() for p in load.model.parameters() if p.requires_grad), "what_if": list(patches), "flags": flags, **gpu_peaks()}
    if rank == 0:  # only rank 0 writes the progress log
        records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
        progress = [r for r in records if r["event"] == "progress" and "loss" in r]
        steady = [r for r in progress if r["step"] > args.warmup]
        world = int(os.environ.get("WORLD_SIZE", 1))
        # samples_per_s counts every rank's batch of 1; a step is one batch per rank.
        result |= {"step_s": round(sum(world / r["samples_per_s"] for r in steady) / len(steady), 3), "loss_last": progress[-1]["loss"], "skipped_steps": progress[-1]["skipped_steps"]}
        if "offloaded_gb" in progress[-1]:  # --offload_activations: what one step's forward held in host memory
            result["offloaded_gb"] = progress[-1]["offloaded_gb"]
    return result


def phase_main(args) -> int:
    prep = json.loads(Path(args.prep).read_text())
    kind, patches, flags = PHASES[args.phase]
    t0 = time.perf_counter()
    result = {"infer": run_infer, "naive": run_naive}[kind](prep, args) if kind != "ours" else run_ours(prep, args, patches, flags, name=args.phase)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    rank = os.environ.get("RANK")
    Path(args.part if rank is None else f"{args.part}.rank{rank}").write_text(json.dumps(result))
    return 0


# -------------------------------------------------------------------------------------------- orchestration


def run_phase(name: str, args, prep_path: Path, *, label: str | None = None, nproc: int = 1, deepspeed: str | None = None) -> dict:
    label = label or name
    part = Path(args.out) / f"part-{label}.json"
    cmd = [__file__, "--phase", name, "--prep", str(prep_path), "--part", str(part), "--out", args.out, "--steps", str(args.steps), "--warmup", str(args.warmup), "--max_length", str(args.max_length)]
    if deepspeed:
        cmd += ["--deepspeed", deepspeed]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *cmd] if nproc > 1 else [sys.executable, *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "worker"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (Path(args.out) / f"{label}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-30000:])
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": "out of memory" if "OutOfMemoryError" in proc.stderr else "failed", "stderr_tail": tail}
    if nproc == 1:
        return json.loads(part.read_text())
    ranks = [json.loads(Path(f"{part}.rank{r}").read_text()) for r in range(nproc)]
    merged = ranks[0] | {k: max((r[k] for r in ranks if r[k] is not None), default=None) for k in ("peak_mem_gb", "peak_reserved_gb")}
    return merged | {"gpus": nproc, "peak_mem_gb_per_rank": [r["peak_mem_gb"] for r in ranks]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="seed")
    ap.add_argument("--steps", type=int, default=6, help="training steps per phase (first --warmup not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=None, help="default: 4096 (seed), 512 (tiny)")
    ap.add_argument("--only", default="", help="comma-separated phases (default: all)")
    ap.add_argument("--zero2", action="store_true", help="also ours under DeepSpeed ZeRO-2 on 2 GPUs")
    ap.add_argument("--out", default="/tmp/seed-shape")
    ap.add_argument("--results_dir", default=None, help="default: bench/results (seed), --out (tiny)")
    # internal: one phase in a child process
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--prep", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--deepspeed", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return phase_main(args)
    args.max_length = args.max_length or SHAPES[args.shape]["max_length"]
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    import torch

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(out, args.shape, args.steps, args.max_length)
    prep_path = out / "prep.json"
    prep_path.write_text(json.dumps(prep))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(prep["model_dir"])
    params = count_params(config)
    estimate = memory_estimate(config, params, tokens=prep["tokens"], tiles=prep["tiles"], answer_tokens=prep["answer_tokens"])
    phases = [p for p in (args.only.split(",") if args.only else PHASES)]
    print(f"shape {args.shape}: {params['total']:,} parameters (ViT {params['vision']:,}, projector {params['projector']:,}, LLM {params['llm']:,})", flush=True)
    print(f"training row: {prep['tokens']} tokens ({prep['image_tokens']} image tokens, {prep['tiles']} tiles, {prep['answer_tokens']} answer tokens), max_length {args.max_length}", flush=True)
    print("memory estimate (GB):", json.dumps({k: round(v / 1e9, 2) for k, v in estimate.items()}), flush=True)
    if torch.cuda.is_available():
        print(f"estimated GPU time: about {estimated_seconds(params, tokens=prep['tokens'], tiles=prep['tiles'], phases=phases) / 60:.1f} min for {len(phases)} phases", flush=True)

    results = {}
    for name in phases:
        t0 = time.perf_counter()
        results[name] = run_phase(name, args, prep_path)
        print(f"{name} ({time.perf_counter() - t0:.0f} s):", json.dumps(results[name]), flush=True)
        write_record(args, params, prep, estimate, results)
    if args.zero2:
        if torch.cuda.device_count() < 2:
            results["ours-lora-gc-zero2"] = {"error": f"needs 2 GPUs, found {torch.cuda.device_count()}"}
        else:
            results["ours-lora-gc-zero2"] = run_phase("ours-lora-gc", args, prep_path, label="ours-lora-gc-zero2", nproc=2, deepspeed="default-zero2")
        print("ours-lora-gc-zero2:", json.dumps(results["ours-lora-gc-zero2"]), flush=True)
    path = write_record(args, params, prep, estimate, results)
    print(f"done in {time.perf_counter() - started:.0f} s; written {path}", flush=True)
    return 0


def write_record(args, params: dict, prep: dict, estimate: dict, results: dict) -> Path:
    """Rewritten after every phase, so a run cut short still leaves what it measured."""
    from record import card_name, write_record as write_result

    card = card_name()
    ours = {k: v for k, v in results.items() if k.startswith("ours") or k == "infer"}
    ratios = {}
    naive = results.get("naive-lora-gc", {})
    plain = results.get("ours-lora-gc", {})
    for name, r in ours.items():
        if r.get("peak_mem_gb"):  # against the seed's published A100 numbers (not measured here)
            ratios[f"{name}_peak_mem_vs_seed"] = round(r["peak_mem_gb"] / SEED_PUBLISHED_GB["inference" if name == "infer" else "lora"], 3)
        if name == "infer" or "error" in r:
            continue
        if r.get("step_s") and naive.get("step_s"):
            ratios[f"{name}_speedup"] = round(naive["step_s"] / r["step_s"], 3)
        if r.get("peak_mem_gb"):
            ratios[f"{name}_within_target"] = r["peak_mem_gb"] <= TARGET_LORA_GB
            if naive.get("peak_mem_gb"):
                ratios[f"{name}_peak_mem_vs_naive"] = round(r["peak_mem_gb"] / naive["peak_mem_gb"], 3)
        if name != "ours-lora-gc" and r.get("step_s") and plain.get("step_s"):  # an option on / off, same run
            ratios[f"{name}_step_time_vs_ours-lora-gc"] = round(r["step_s"] / plain["step_s"], 3)
    config = {
        "model": f"InternVL-Chat-V1.5 layout ({args.shape}), random weights, bf16, SDPA" if args.shape == "seed" else f"{args.shape} layout, random weights",
        "params": params,
        "row": {k: prep[k] for k in ("tokens", "tiles", "answer_tokens", "image_tokens")},
        "max_length": args.max_length,
        "batch_size": 1,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup,
        "lora": "r 8, alpha 32, dropout 0.05, the LLM's q/k/v (the seed's default targets); ViT and projector frozen; gradient checkpointing on",
        "memory_estimate_bytes": estimate,
        "seed_published_gb": SEED_PUBLISHED_GB,
        "target_lora_gb": TARGET_LORA_GB,
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    results_dir = Path(args.results_dir or (ROOT / "bench" / "results" if args.shape == "seed" else args.out))
    return write_result(results_dir, "train", "seedshape", card=card, config=config, baselines={k: v for k, v in results.items() if k.startswith("naive")}, ours=ours, ratios=ratios)


if __name__ == "__main__":
    sys.exit(main())
