"""`internvl sft` arguments: one dataclass, its flags, defaults as ms-swift's, and one check of them all.

The command line and the output layout are a contract with the operator's training Jobs:
    output/<model_type>/v<N>-<YYYYmmdd-HHMMSS>/checkpoint-<step>/   (or exactly --output_dir with
    --add_output_dir_suffix false), each checkpoint holding the adapter or weights, tokenizer, image
    processor config, trainer state and sft_args.json; `latest_checkpoint` names the newest complete one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

DEEPSPEED_PRESETS = ("default-zero2", "default-zero3")


@dataclass
class SftArguments:
    # model
    model_type: str | None = field(default=None, metadata={"help": "registered model type (`internvl models`)"})
    model_id_or_path: str | None = field(default=None, metadata={"help": "base model directory (or hub id)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where supported) | bf16 | fp16 | fp32"})
    use_flash_attn: bool | None = field(default=None, metadata={"help": "flash-attn 2 when installed; else SDPA"})
    # data
    dataset: str = field(default="", metadata={"help": "comma-separated .jsonl/.json files"})
    val_dataset: str | None = field(default=None, metadata={"help": "comma-separated validation files"})
    dataset_test_ratio: float = field(default=0.01, metadata={"help": "share of --dataset held out for validation when no --val_dataset"})
    max_length: int = field(default=2048, metadata={"help": "rows longer than this (image tokens included) are dropped"})
    max_num: int | None = field(default=None, metadata={"help": "max 448-px tiles per image (default: the model's)"})
    dataloader_num_workers: int = field(default=2, metadata={"help": "processes that decode and tile images"})
    group_by_length: bool = field(default=True, metadata={"help": "batch rows of similar length together (less padding)"})
    packing: bool = field(default=False, metadata={"help": "concatenate each batch's rows into one sequence with per-row attention (no padding at all)"})
    attn_impl: str | None = field(default=None, metadata={"help": "attention kernel: sdpa | flex_attention | flash_attention_2 | eager (default: flash-attn if installed and asked for, else sdpa)"})
    use_liger_kernel: bool | None = field(default=None, metadata={"help": "Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in the LLM and its fused LM head + loss, which never stores the answer tokens' logits; auto (unset): on where liger-kernel and a CUDA GPU are present; beside --torch_compile only the fused loss; true without Liger warns and runs the plain path; false: off"})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile each LLM decoder layer (dynamic shapes); the first batches are slow while it compiles"})
    offload_activations: bool = field(default=False, metadata={"help": "hold what autograd saves in the forward (with gradient checkpointing: each decoder layer's input) in pinned host memory, copied back in backward: less GPU memory (2.4 GB at the 25B seed shape, 4,096 tokens), a slower step; not with ZeRO-3"})
    # method
    sft_type: str = field(default="lora", metadata={"help": "lora | full"})
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="DEFAULT", metadata={"help": "DEFAULT (LLM q/k/v) | ALL (every linear layer, vision too) | comma-separated names"})
    freeze_vit: bool = field(default=True, metadata={"help": "keep the vision tower frozen"})
    freeze_aligner: bool = field(default=True, metadata={"help": "keep the vision-language projector frozen"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "recompute decoder layers' activations in backward: true = every layer (least memory; 1.15-1.28x slower steps on the 1B shape, bench/README.md); false = none; auto = before each step, only as many of the language model's layers as that batch needs to fit in 90% of the GPU's memory (none when it fits); auto is true on a CPU and with --offload_activations"})
    deepspeed: str | None = field(default=None, metadata={"help": "default-zero2 | default-zero3 | path to a DeepSpeed JSON config"})
    # optimisation
    learning_rate: float | None = field(default=None, metadata={"help": "default 1e-4 for LoRA, 1e-5 for full"})
    num_train_epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: epochs decide)"})
    batch_size: int = field(default=1, metadata={"help": "rows per GPU per forward pass"})
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": "default ceil(16 / batch_size / world_size)"})
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    seed: int = 42
    max_nonfinite_steps: int = field(default=5, metadata={"help": "stop after this many consecutive steps with non-finite loss or gradients"})
    # saving and logging
    output_dir: str = field(default="output", metadata={"help": "where runs go"})
    add_output_dir_suffix: bool = field(default=True, metadata={"help": "write to <output_dir>/<model_type>/v<N>-<time>; false = exactly <output_dir>"})
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int | None = field(default=None, metadata={"help": "default = eval_steps"})
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir, or `latest` (the newest complete one; none = start fresh)"})

    def validate(self) -> list[str]:
        """Every problem at once (litgpt's validate_args), so a user fixes a command line in one go."""
        problems = []
        if not self.dataset:
            problems.append("--dataset is required (comma-separated .jsonl/.json files)")
        if not (self.model_type or self.model_id_or_path):
            problems.append("give --model_type and/or --model_id_or_path")
        if self.sft_type not in ("lora", "full"):
            problems.append(f"--sft_type {self.sft_type!r}: use lora or full")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"--dtype {self.dtype!r}: use auto, bf16, fp16 or fp32")
        for name in ("max_length", "batch_size", "lora_rank", "lora_alpha", "logging_steps", "eval_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            problems.append(f"--gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}")
        if not 0 <= self.dataset_test_ratio < 1:
            problems.append(f"--dataset_test_ratio must be in [0, 1), got {self.dataset_test_ratio}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            problems.append("--num_train_epochs or --max_steps must be positive")
        if self.deepspeed and self.deepspeed not in DEEPSPEED_PRESETS and not os.path.isfile(self.deepspeed):
            problems.append(f"--deepspeed {self.deepspeed!r}: use {' or '.join(DEEPSPEED_PRESETS)} or a path to a JSON config")
        if self.attn_impl not in (None, "sdpa", "flex_attention", "flash_attention_2", "eager"):
            problems.append(f"--attn_impl {self.attn_impl!r}: use sdpa, flex_attention, flash_attention_2 or eager")
        if self.max_num is not None and self.max_num < 1:
            problems.append(f"--max_num must be at least 1, got {self.max_num}")
        if self.offload_activations and self.deepspeed and zero_stage(self.deepspeed) == 3:
            # ZeRO-3 frees each gathered weight after use and gathers it again in backward through its own
            # hooks; the offload hooks would copy every gathered weight to the host instead.
            problems.append(f"--offload_activations true does not work with ZeRO-3 (--deepspeed {self.deepspeed}): use ZeRO-2 (default-zero2) or turn offloading off")
        if self.offload_activations and self.torch_compile:
            # torch 2.11: dynamo fails an assertion tracing a checkpointed compiled layer under the offload's
            # saved-tensor hooks (H100, tests/gpu/test_gpu_speedups.py).
            problems.append("--offload_activations true does not work with --torch_compile true (torch.compile cannot trace the offload hooks): turn one of them off")
        return problems

    def resolved_checkpointing(self, on_gpu: bool) -> str:
        """all | none | auto (per batch, as memory needs: on a GPU, without offloading)."""
        if self.gradient_checkpointing is None:
            return "auto" if on_gpu and not self.offload_activations else "all"
        return "all" if self.gradient_checkpointing else "none"

    def resolved_liger(self, available: bool) -> str:
        """What of Liger runs: "all" (its kernels in the decoder layers and its fused loss), "loss" (the fused loss
        alone: beside --torch_compile, whose compiled layers dynamo cannot trace with Liger's autograd Functions
        inside) or "none". Unset: on where Liger can run here. Without the layer kernels a profiled full
        fine-tuning step at the 1B shape peaked at 71.2 GB instead of 54.7 GB (H100, bench/README.md)."""
        if self.use_liger_kernel is False or (self.use_liger_kernel is None and not available):
            return "none"
        return "loss" if self.torch_compile else "all"

    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (1e-4 if self.sft_type == "lora" else 1e-5)

    def resolved_grad_accum(self, world_size: int) -> int:
        # ms-swift: an effective batch of about 16 rows per optimizer step.
        return self.gradient_accumulation_steps or max(1, math.ceil(16 / self.batch_size / world_size))

    def to_json(self) -> dict:
        return asdict(self)


def zero_stage(deepspeed: str) -> int | None:
    """The ZeRO stage of a --deepspeed preset or JSON file (None when the file cannot be read)."""
    if deepspeed in DEEPSPEED_PRESETS:
        return 2 if deepspeed == "default-zero2" else 3
    try:
        with open(deepspeed) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def add_sft_arguments(parser: argparse.ArgumentParser, str2bool) -> None:
    """One flag per field, spelled as the field (ms-swift style: --lora_rank 8, --freeze_vit true)."""
    for f in fields(SftArguments):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = f.default
        if "bool" in kind:
            shown = "auto" if default is None else default
            parser.add_argument(f"--{f.name}", type=str2bool, default=default, metavar="BOOL", help=f"{help_text} (default: {shown})")
        elif kind.startswith("int"):
            parser.add_argument(f"--{f.name}", type=int, default=default, help=f"{help_text} (default: {default})")
        elif kind.startswith("float"):
            parser.add_argument(f"--{f.name}", type=float, default=default, help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(f"--{f.name}", default=default, help=f"{help_text} (default: {default})")


def from_namespace(ns: argparse.Namespace) -> SftArguments:
    return SftArguments(**{f.name: getattr(ns, f.name) for f in fields(SftArguments)})
