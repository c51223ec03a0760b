"""ms-swift 4.6.0 `swift sft` as a second training baseline: same data, same model, same card, same run as ours.

    # on the GPU machine (bench/README.md): ms-swift and its pins live in their own folder
    python3 -m pip install -q --no-deps .carry/wheels/*.whl
    python3 -m pip install -q --no-deps --target /tmp/swift-site .carry/msswift/*.whl
    PYTHONPATH=$PWD/worker python3 bench/msswift_baseline.py --swift_site /tmp/swift-site

Model: the InternVL3-1B layout with random weights (`internvl tiny --shape internvl3-1b`), in its transformers-
native form, which ms-swift knows as model type `internvl` with template `internvl_hf`. Data: train_bench's
realistic rows (make_dataset, seed 0: 1-13 tiles, 10-400 word answers), turned into ms-swift's row format
(messages + images, one `<image>\\n` per image in front of the question, as our template puts it).

Configs, batch 4, no gradient checkpointing, bf16, SDPA, as train_bench's b4 rows:
  msswift-lora   LoRA r 8, alpha 32, dropout 0 on every LLM linear layer (`--target_modules all-linear`; ViT frozen)
  msswift-full   LLM + projector trained, ViT frozen
  ours-lora-b4, ours-full-b4   `internvl sft` with the same settings (train_bench's configs), unless --no_ours

ms-swift runs in a child process whose PYTHONPATH starts with --swift_site: its own transformers 5.17 and
peft 0.20 (it declares transformers<5.20, peft<0.21) stay apart from ours (5.24). Timing as train_bench's
naive loop: a callback takes the time at each step end (after a CUDA sync), and real tokens are counted
from each step's attention mask; the first --warmup steps are left out.
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

CONFIGS = {
    # name: (runner, full fine-tuning, batch)
    "msswift-lora": ("swift", False, 4),
    "msswift-full": ("swift", True, 4),
    "ours-lora-b4": ("ours", False, 4),
    "ours-full-b4": ("ours", True, 4),
    # internvl sft's defaults (checkpointing as memory needs, Liger where installed) at the batch its memory
    # allows (ms-swift: 4 at 73 GiB), and with every layer checkpointed (ms-swift's own default)
    "ours-lora-b8-auto": ("ours", False, 8),
    "ours-full-b8-auto": ("ours", True, 8),
    "ours-lora-b8-gc": ("ours", False, 8),
    "ours-full-b8-gc": ("ours", True, 8),
}
BATCH = 4  # ms-swift's: batch 8 runs out of memory on an 80 GB card (its full-vocabulary fp32 logits)
TIMER = "bench_step_timer"  # the name our callback is registered under in ms-swift's callbacks_map


def to_swift_rows(data: Path, out: Path) -> Path:
    """train_bench rows ({query, response, images}) -> ms-swift rows ({messages, images}), images by absolute
    path. ms-swift would add a bare `<image>` for an untagged image; ours adds `<image>\\n`: write ours."""
    lines = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        images = [str((data.parent / p).resolve()) for p in row.get("images", [])]
        query = row["query"] if "<image>" in row["query"] else "<image>\n" * len(images) + row["query"]
        swift_row = {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": row["response"]}]}
        if images:
            swift_row["images"] = images
        lines.append(json.dumps(swift_row))
    out.write_text("\n".join(lines) + "\n")
    return out


def write_processor_config(model_dir: Path) -> None:
    """InternVLProcessor's image_seq_length defaults to 256: right for 448-px tiles, wrong for the tiny model's
    32-px ones, so say it (ms-swift repeats <IMG_CONTEXT> that many times per tile)."""
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor", "image_seq_length": config["image_seq_length"]}, indent=2))


def swift_argv(model_dir: Path, data: Path, out: Path, *, full: bool, steps: int, on_gpu: bool) -> list[str]:
    # --check_model false: otherwise the trainer asks the ModelScope hub whether the local model is current,
    # retrying for seconds where there is no network (the GPU machines have none).
    argv = ["--model", str(model_dir), "--model_type", "internvl", "--template", "internvl_hf", "--dataset", str(data),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", str(BATCH),
            "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", "--max_length", "8192",
            "--torch_dtype", "bfloat16" if on_gpu else "float32", "--attn_impl", "sdpa", "--split_dataset_ratio", "0",
            "--logging_steps", "1", "--save_steps", "100000", "--report_to", "none", "--warmup_ratio", "0", "--seed", "0",
            "--dataloader_num_workers", "6" if on_gpu else "0", "--freeze_vit", "true",
            "--check_model", "false"]  # fmt: skip
    if full:
        return argv + ["--tuner_type", "full", "--freeze_aligner", "false", "--learning_rate", "1e-5"]
    return argv + ["--tuner_type", "lora", "--target_modules", "all-linear", "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0", "--learning_rate", "1e-4"]


def timed(times: list[float], tokens: list[int], *, batch: int, warmup: int) -> dict:
    """Throughput of the steps after `warmup`, as train_bench's naive loop counts it: `times` are step-end
    clocks, `tokens` each step's real (unpadded) tokens."""
    steps = len(times)
    span = times[-1] - times[warmup - 1]
    return {"samples_per_s": round((steps - warmup) * batch / span, 3), "real_tokens_per_s": round(sum(tokens[warmup:steps]) / span, 1), "step_s": round(span / (steps - warmup), 4)}


# --------------------------------------------------------------------------------------- child: swift sft


def child_main(spec_path: Path) -> int:
    """Runs `swift sft` in this process with a step timer; writes the raw timings for the parent."""
    spec = json.loads(spec_path.read_text())
    import torch
    from transformers import TrainerCallback

    import swift
    from swift.callbacks import callbacks_map
    from swift.pipelines import sft_main

    if torch.cuda.is_available():
        # The same guard as naive and ours (train.setup_numerics): cuDNN's SDPA backward gives NaN gradients at
        # some padded lengths on torch 2.11+; all three then use the same attention kernels.
        torch.backends.cuda.enable_cudnn_sdp(False)
    seen = {"times": [], "tokens": [], "losses": [], "trainable_params": None}

    class StepTimer(TrainerCallback):
        def __init__(self, args, trainer):
            step = trainer.training_step

            def counted(model, inputs, *a, **kw):  # one call per optimizer step (no gradient accumulation)
                mask = inputs.get("attention_mask")
                seen["tokens"].append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
                return step(model, inputs, *a, **kw)

            trainer.training_step = counted  # built before Trainer.__init__ runs (ms-swift's mixin), which keeps it

        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seen["times"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                seen["losses"].append(float(logs["loss"]))

    callbacks_map[TIMER] = StepTimer
    sft_main(spec["argv"] + ["--callbacks", TIMER])
    import peft
    import transformers

    seen["versions"] = {"ms-swift": swift.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__}
    seen["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None
    Path(spec["result"]).write_text(json.dumps(seen))
    return 0


def run_swift(name: str, model_dir: Path, data: Path, out: Path, *, full: bool, steps: int, warmup: int, swift_site: str, on_gpu: bool) -> dict:
    spec = {"argv": swift_argv(model_dir, data, out / name, full=full, steps=steps, on_gpu=on_gpu), "result": str(out / f"{name}.raw.json")}
    spec_path = out / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    path = [p for p in (swift_site, os.environ.get("PYTHONPATH", "")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], capture_output=True, text=True, env=env)
    (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-30000:])
    if proc.returncode != 0:
        return {"error": [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]}
    raw = json.loads(Path(spec["result"]).read_text())
    if len(raw["times"]) != steps:
        return {"error": [f"{len(raw['times'])} step ends timed, expected {steps}"]}
    return {**timed(raw["times"], raw["tokens"], batch=BATCH, warmup=warmup), "peak_mem_gb": raw["peak_mem_gb"], "loss_last": round(sum(raw["losses"][-5:]) / len(raw["losses"][-5:]), 4),
            "trainable_params": raw["trainable_params"], "versions": raw["versions"]}  # fmt: skip


# ------------------------------------------------------------------------------------------------ parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("internvl3-1b", "tiny"), default="internvl3-1b", help="tiny: a CPU check of the whole path")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--only", default="", help=f"comma-separated configs (default: all): {', '.join(CONFIGS)}")
    ap.add_argument("--no_ours", action="store_true", help="ms-swift only (when this Python cannot run ours)")
    ap.add_argument("--swift_site", default=os.environ.get("MSSWIFT_SITE", ""), help="folder with ms-swift and its pins (pip install --target), put first on its PYTHONPATH")
    ap.add_argument("--out", default="/tmp/msswift-bench")
    ap.add_argument("--results_dir", default=None, help="default: bench/results (internvl3-1b), --out (tiny)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(Path(args.child))
    wanted = args.only.split(",") if args.only else [c for c in CONFIGS if not (args.no_ours and CONFIGS[c][0] == "ours")]
    if unknown := [c for c in wanted if c not in CONFIGS]:
        ap.error(f"unknown config(s) {', '.join(unknown)}")
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    import torch

    from train_bench import CONFIGS as BENCH_CONFIGS, make_dataset, row_stats, run_ours

    on_gpu = torch.cuda.is_available()
    out = Path(args.out)
    model_dir = out / f"model-{args.shape}"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", args.shape, "--output_dir", str(model_dir)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "worker")))
    write_processor_config(model_dir)
    data = make_dataset(out / "data", args.rows, seed=0)  # the same rows as train_bench's "real" data
    swift_data = to_swift_rows(data, out / "data" / "swift.jsonl")
    from transformers import AutoConfig, AutoTokenizer

    from internvl_worker.modeling import build_template
    from internvl_worker.registry import get_model_spec

    template, _ = build_template(AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), get_model_spec("internvl3-1b"))
    stats = row_stats(data, template)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"data: {len(stats)} rows, mean {mean([r['tokens'] for r in stats]):.0f} tokens (our template), {mean([r['tiles'] for r in stats]):.1f} tiles", flush=True)

    results = {}
    for name in wanted:
        runner, full, batch = CONFIGS[name]
        t0 = time.time()
        if runner == "swift":
            r = run_swift(name, model_dir, swift_data, out, full=full, steps=args.steps, warmup=args.warmup, swift_site=args.swift_site, on_gpu=on_gpu)
        else:
            extra = BENCH_CONFIGS[name][4]
            r = run_ours(model_dir, data, out / name, full=full, steps=args.steps, batch=batch, warmup=args.warmup, extra=extra) | {"flags": " ".join(extra)}
        r["batch_size"] = batch
        r["wall_s"] = round(time.time() - t0, 1)
        results[name] = r
        print(name, json.dumps(r), flush=True)
        path = write_record(args, results, stats)
    print("written", path, flush=True)
    return 0


def write_record(args, results: dict, stats: list[dict]) -> Path:
    """Rewritten after every config, so a run cut short still leaves what it measured."""
    from record import write_record as write_result

    ratios = msswift_ratios(results)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    config = {
        "model": f"{args.shape} layout (InternVL-HF), random weights; ms-swift model_type internvl, template internvl_hf",
        "data": {"rows": len(stats), "mean_tokens": round(mean([r["tokens"] for r in stats])), "mean_tiles": round(mean([r["tiles"] for r in stats]), 2)},
        "batch_size": BATCH, "steps": args.steps, "warmup_steps_excluded": args.warmup,
        "lora": "r 8, alpha 32, dropout 0, every LLM linear layer; ViT frozen; no gradient checkpointing",
        "full": "LLM + projector trained, ViT frozen; ms-swift loads bf16 weights (its default), ours fp32 master weights",
    }  # fmt: skip
    results_dir = Path(args.results_dir or (ROOT / "bench" / "results" if args.shape == "internvl3-1b" else args.out))
    path = write_result(results_dir, "train", "msswift", config=config, baselines={k: v for k, v in results.items() if k.startswith("msswift")},
                        ours={k: v for k, v in results.items() if k.startswith("ours")}, ratios=ratios)  # fmt: skip
    return path


def msswift_ratios(results: dict) -> dict:
    """<ours config>_vs_msswift: each ours config's samples/s over ms-swift's for the same method."""
    ratios = {}
    for name, ours in results.items():
        base = results.get(f"msswift-{name.split('-')[1]}", {}) if name.startswith("ours-") else {}
        if "samples_per_s" in ours and "samples_per_s" in base:
            ratios[f"{name}_vs_msswift"] = round(ours["samples_per_s"] / base["samples_per_s"], 3)
    return ratios


if __name__ == "__main__":
    sys.exit(main())
