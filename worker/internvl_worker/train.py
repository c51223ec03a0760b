"""`internvl sft`: supervised fine-tuning of InternVL (LoRA or full; one GPU, DDP, DeepSpeed ZeRO-2/3).

    internvl sft --model_type internvl3-1b --model_id_or_path /models/InternVL3-1B-hf --dataset train.jsonl
    NPROC_PER_NODE=2 internvl sft ... --deepspeed default-zero2        # starts torchrun itself
    torchrun --nproc_per_node 8 --nnodes 2 --node_rank $RANK --master_addr $ADDR -m internvl_worker.cli sft ...

Setup -> train -> save, on transformers' Trainer (DeepSpeed, DDP, resume, scheduling) with our pieces:
datasets that decode and tile images inside DataLoader workers, a vision pass for image-free batches
(so DDP/ZeRO see every trainable parameter used), a guard that skips steps with non-finite gradients,
checkpoints staged and renamed into place, and one JSON progress line per logging step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .checkpointing import CheckpointPlan, plan_checkpointing
from .data import RowError, read_dataset
from .fsutil import write_json_atomic
from .images import load_image, pixels_on_device
from .modeling import load_model, torch_dtype
from .registry import META_FILE, write_meta
from .sft_args import DEEPSPEED_PRESETS, SftArguments
from .speedups import LinearCrossEntropy, OffloadActivations, compile_decoder_layers, frozen_vision_without_autocast, fuse_lora_updates, image_placeholders_without_sync, rows_not_packed, language_model, liger_unavailable, plain_linear_cross_entropy, setup_liger, skip_adapter_input_casts, unwrap_peft
from .templates import IGNORE_INDEX, PromptTooLong, TemplateError

log = logging.getLogger(__name__)


class SftConfigError(ValueError):
    pass


class TrainingDiverged(RuntimeError):
    pass


def rank_info() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from torchrun's environment; (0, 0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_numerics() -> None:
    # torch 2.11+ on H100/H200: the cuDNN SDPA backward returns NaN gradients when the padded length is
    # 64 mod 128 and a mask is passed (pytorch#196678); a naive 1B LoRA run went NaN at step 28. The
    # flash and memory-efficient SDPA kernels are unaffected, so take cuDNN out of SDPA's choices.
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------- data


class SftDataset(torch.utils.data.Dataset):
    """Rows -> {input_ids, labels, pixel_values}; images are decoded and tiled here (in workers).

    uint8=True (what `internvl sft` uses): the tiles' uint8 pixels, normalized on the GPU by answer_loss_sum
    (images.normalize_pixels: the processor's float32 values, bit for bit). The workers skip the float work
    (the rescale and normalize were 43% of the tiler's CPU time on the benchmark rows) and each batch crosses
    from the workers and to the GPU 4x smaller (156 MB of float32 pixels a batch of 8 realistic rows)."""

    def __init__(self, rows, template, lengths: list[int], uint8: bool = False):
        self.rows, self.template, self.lengths, self.uint8 = rows, template, lengths, uint8

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        conv = self.rows[i].conversation
        images = [load_image(src) for src in conv.images]
        pixel_values, tiles = self.template.tiler(images, normalize=not self.uint8) if images else (None, [])
        enc = self.template.encode(conv, tiles, check_length=False)
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if enc.image_tokens != n_tiles * self.template.image_seq_length:
            # The model's forward trusts this (speedups.image_placeholders_without_sync): checked here, on the host.
            raise RowError(f"{self.rows[i].where}: {enc.image_tokens} image tokens for {n_tiles} tiles of {self.template.image_seq_length}")
        return {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), "pixel_values": pixel_values}


def collate(batch: list[dict], pad_id: int, packing: bool = False) -> dict:
    """Right-pad to the longest row, or (packing) concatenate the rows into one sequence whose position
    ids restart at 0 for each row: with no attention mask, transformers reads the restarts as row
    boundaries and keeps attention inside each row. Tiles of all rows are concatenated in row order.
    Also the answer positions and their next tokens (answer_index), found here on the host so that the
    training step never waits on the GPU to find them."""
    tiles = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    if packing:
        out = {
            "input_ids": torch.cat([b["input_ids"] for b in batch])[None],
            "labels": torch.cat([b["labels"] for b in batch])[None],
            "position_ids": torch.cat([torch.arange(len(b["input_ids"])) for b in batch])[None],
        }
    else:
        longest = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for k, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[k, :n], labels[k, :n], attention_mask[k, :n] = b["input_ids"], b["labels"], 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if tiles:
        out["pixel_values"] = torch.cat(tiles)
    out["answer_positions"], out["answer_targets"] = answer_index(out["labels"])
    return out


def answer_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets): the flat positions in labels' [rows x length] whose next token is labelled
    (the positions the loss reads), and those next tokens. On a GPU tensor this waits for the GPU (a
    boolean selection has a data-dependent size); collate() calls it on the host."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t+1
    flat = targets.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return positions, flat.index_select(0, positions)


def measure_rows(rows, template, *, max_length: int, rank: int) -> tuple[list, list[int], int]:
    """(kept rows, their token lengths, dropped count): rows over max_length are dropped (ms-swift's
    `truncation_strategy delete`); cutting a row would cut image tokens or the answer."""
    from tqdm import tqdm

    from .images import image_size

    kept, lengths, dropped = [], [], 0
    for row in tqdm(rows, desc="measuring rows", unit="row", disable=rank != 0 or not sys.stderr.isatty(), leave=False):
        conv = row.conversation
        try:
            tiles = [template.tiler.num_tiles(*image_size(src, verify=False)) for src in conv.images]
            n = len(template.encode(conv, tiles, check_length=False))
        except (TemplateError, ValueError) as e:
            raise RowError(f"{row.where}: {e} (run `internvl data check` to list every bad row)") from None
        if n > max_length:
            dropped += 1
            continue
        kept.append(row)
        lengths.append(n)
    return kept, lengths, dropped


def split_rows(rows: list, ratio: float, seed: int) -> tuple[list, list]:
    """Hold out round(ratio * n) rows (at least 1 when ratio > 0 and n >= 10) for validation."""
    n_val = max(1, round(len(rows) * ratio)) if ratio > 0 and len(rows) >= 10 else 0
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def write_rows_jsonl(path: Path, rows) -> None:
    lines = []
    for r in rows:
        c = r.conversation
        *history, (query, response) = c.turns
        obj = {"query": query, "response": response, "history": [list(t) for t in history], "images": list(c.images)}
        if c.system is not None:
            obj["system"] = c.system
        lines.append(json.dumps(obj, ensure_ascii=False))
    from .fsutil import write_text_atomic

    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


# --------------------------------------------------------------------------------------------- model


def answer_loss_sum(model, inputs: dict, linear_ce: LinearCrossEntropy | None = None):
    """(summed cross-entropy over the answer tokens, their count, model outputs).

    Most positions of a VLM sample are image and prompt tokens (label -100), so the LM head runs only
    where a label follows: for a 2,500-token row with a 200-token answer that is 12x fewer 151,674-wide
    logits than the usual full-sequence loss. For the length of the forward the LM head's forward is
    replaced: it takes the answer positions' hidden states and returns the summed loss in place of logits
    (`outputs.logits` is that scalar), through `linear_ce` (Liger's fused linear cross-entropy under
    --use_liger_kernel: not even the answer tokens' logits are stored) or plain logits + cross-entropy.
    The loss is computed inside the head's forward so that it runs where the model's forward runs: under
    the Trainer's autocast, inside DDP's forward, and with the head's weight gathered under ZeRO-3.

    Nothing here waits for the GPU when the batch comes from collate(): the answer positions and targets
    were found on the host (`answer_positions`, `answer_targets`), and the count is their length. The host
    then keeps the lead that the vision tower's long kernels give it, which matters where the host is the
    slower side; on an H100 at the 1B shape the step is bound by the GPU and measured the same either way
    (bench/README.md, session 7)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    positions, answer_targets = inputs.pop("answer_positions", None), inputs.pop("answer_targets", None)
    if positions is None:  # a batch not made by collate()
        positions, answer_targets = answer_index(labels)
    if inputs.get("pixel_values") is not None:  # SftDataset(uint8=True)'s uint8 tiles are normalized here
        inputs["pixel_values"] = pixels_on_device(inputs["pixel_values"])
    # collate() right-pads, so the causal mask alone keeps every real token's attention off the padding (the
    # padded positions' own outputs carry no label). Without a mask SDPA runs flash attention; with one it
    # falls back to the memory-efficient kernel, 36% of a LoRA step's kernel time (H100, 1B shape, realistic
    # rows: bench/train_profile.py).
    inputs.pop("attention_mask", None)
    head = output_head(model)
    loss_fn = linear_ce or plain_linear_cross_entropy

    def head_loss(hidden):  # hidden: [rows, length, hidden size] (logits_to_keep=0: every position)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        # Liger's kernel divides by its chunk count, which is 0 for a batch without answer tokens.
        return (loss_fn if picked.shape[0] else plain_linear_cross_entropy)(head.weight, picked, answer_targets)

    own_forward = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook), if any
    head.forward = head_loss
    # Right-padded rows (no position ids given) are not packed: transformers need not search the position ids it
    # makes for restarts, a test that waits for the GPU once the vision tower is queued.
    unpacked = rows_not_packed() if "position_ids" not in inputs else contextlib.nullcontext()
    try:
        # use_cache=False also matters for packing: transformers reads position-id restarts as row
        # boundaries only when no KV cache is being built.
        with unpacked:
            outputs = model(**inputs, logits_to_keep=0, use_cache=False)
    finally:
        if own_forward is None:
            del head.forward  # the class's forward again
        else:
            head.forward = own_forward
    return outputs.logits, positions.numel(), outputs


def output_head(model) -> torch.nn.Module:
    """The LM head Linear, through DDP's and DeepSpeed's `.module` and PEFT's wrapper."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_output_embeddings()


VISION_PREFIXES = ("model.vision_tower", "vision_tower")


def lora_target_modules(model, targets: str, default_regex: str, *, freeze_vit: bool = True):
    """DEFAULT -> the model type's regex (LLM q/k/v); ALL -> every Linear except the output head;
    `q_proj,v_proj` -> the Linear layers with those names. The vision tower shares names with the LLM
    (q_proj, k_proj, v_proj), so with --freeze_vit true (the default) its layers are left out of ALL and of
    name lists: an adapter there would make the 300M-6B ViT keep activations for backward."""
    if targets == "DEFAULT":
        return default_regex
    wanted = None if targets == "ALL" else {t.strip() for t in targets.split(",") if t.strip()}
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if freeze_vit and name.startswith(VISION_PREFIXES):
            continue
        if wanted is None or name.rsplit(".", 1)[-1] in wanted:
            found.append(name)
    return sorted(found)


def prepare_trainable(model, args: SftArguments, spec):
    """Freeze what stays fixed, wrap LoRA, and check that something trains."""
    vision_prefixes = VISION_PREFIXES
    aligner_prefixes = ("model.multi_modal_projector", "multi_modal_projector")
    if args.sft_type == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        targets = lora_target_modules(model, args.lora_target_modules, spec.lora_targets, freeze_vit=args.freeze_vit)
        if not targets:
            raise SftConfigError(f"--lora_target_modules {args.lora_target_modules}: no Linear layer has that name" + (" outside the vision tower (--freeze_vit true)" if args.freeze_vit else ""))
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            modules_to_save=None if args.freeze_aligner else ["multi_modal_projector"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    else:
        for name, p in model.named_parameters():
            frozen = (args.freeze_vit and name.startswith(vision_prefixes)) or (args.freeze_aligner and name.startswith(aligner_prefixes))
            p.requires_grad_(not frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise SftConfigError(f"no parameter is trainable (--sft_type {args.sft_type}, --lora_target_modules {args.lora_target_modules}): no module matched")
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    return model, trainable, total


def deepspeed_config(name: str | None) -> dict | str | None:
    """Built-in ZeRO configs; "auto" values are filled by the Trainer from our arguments."""
    if name is None:
        return None
    if name not in DEEPSPEED_PRESETS:
        return name  # a user's JSON file
    stage = 2 if name == "default-zero2" else 3
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 2:
        # ZeRO-2 shards gradients and optimizer state; weights stay whole on every GPU.
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        # ZeRO-3 shards the weights too; gather them whole when saving so checkpoints load anywhere.
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


# ------------------------------------------------------------------------------------------- trainer


def make_trainer_class():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ProgressLog(TrainerCallback):
        """One JSON line per logging step on stdout and in <run>/logging.jsonl; a bar on stderr."""

        def __init__(self, trainer, run_dir: Path):
            self.trainer, self.path, self.bar = trainer, run_dir / "logging.jsonl", None
            self.t0, self.tokens0, self.step0 = time.perf_counter(), 0, 0

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step", file=sys.stderr)
            self.step0 = state.global_step

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            tr = self.trainer
            world = args.world_size
            steps = max(1, state.global_step - self.step0)
            elapsed = max(1e-9, now - self.t0)
            kind = "eval" if any(k.startswith("eval_") for k in logs) else "summary" if "train_runtime" in logs else "progress"
            record = {"event": kind, "step": state.global_step, "total_steps": state.max_steps, "epoch": round(state.epoch or 0, 4)}
            for key, value in logs.items():
                if isinstance(value, (int, float)) and key != "total_flos":
                    record[key if key != "learning_rate" else "lr"] = round(value, 8) if isinstance(value, float) else value
            if record["event"] == "progress":
                record["samples_per_s"] = round(steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * world / elapsed, 3)
                record["tokens_per_s"] = round((tr.tokens_seen - self.tokens0) * world / elapsed, 1)
                record["skipped_steps"] = tr.skipped_steps
                if torch.cuda.is_available():
                    record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                if tr.checkpoint_plan is not None and tr.checkpoint_plan.last is not None:  # --gradient_checkpointing auto
                    record["checkpointed_layers"] = tr.checkpoint_plan.last
                if tr.last_offload is not None:  # --offload_activations: what the last forward held on the host
                    record["offloaded_gb"] = round(tr.last_offload.moved_bytes / 1e9, 3)
                self.t0, self.tokens0, self.step0 = now, tr.tokens_seen, state.global_step
            line = json.dumps(record)
            print(line, flush=True)
            with self.path.open("a") as f:
                f.write(line + "\n")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    class InternVLTrainer(Trainer):
        def __init__(self, *a, run_dir: Path, save_extras, max_nonfinite_steps: int, keep_checkpoints: int | None, group_by_length: bool = False, packing: bool = False, linear_ce: LinearCrossEntropy | None = None, offload_activations: bool = False, checkpoint_plan: CheckpointPlan | None = None, **kw):
            super().__init__(*a, **kw)
            self.checkpoint_plan = checkpoint_plan
            self.group_by_length, self.packing, self.linear_ce = group_by_length, packing, linear_ce
            self.offload_activations, self.last_offload = offload_activations, None
            self.run_dir, self.save_extras, self.keep_checkpoints = run_dir, save_extras, keep_checkpoints
            self.max_nonfinite_steps = max_nonfinite_steps
            self._tokens_seen = 0
            self.skipped_steps = 0
            self._bad_in_a_row = 0
            self.vision_trainable = any(
                p.requires_grad for n, p in self.model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n
            )
            for printer in (PrinterCallback, ProgressCallback):  # replaced by ProgressLog's JSON lines and bar
                self.remove_callback(printer)
            self.add_callback(ProgressLog(self, run_dir))

        @property
        def tokens_seen(self) -> int:
            """Real (non-padding) tokens trained on so far by this rank."""
            return int(self._tokens_seen)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Cross-entropy on the answer tokens only (answer_loss_sum), normalised as transformers does."""
            mask = inputs.get("attention_mask")
            # Summed on the device: read (a wait for the GPU) only when a progress line is written.
            self._tokens_seen = self._tokens_seen + (mask.sum() if mask is not None else inputs["input_ids"].numel())
            training = model.training and torch.is_grad_enabled()
            if self.checkpoint_plan is not None and training:
                plan, pixels = self.checkpoint_plan, inputs.get("pixel_values")
                if "answer_positions" in inputs:  # from collate(): counted on the host
                    answers = inputs["answer_positions"].numel()
                else:  # counting on the GPU waits for it: only where the plan reserves room for the answers' logits
                    answers = int((inputs["labels"] != IGNORE_INDEX).sum()) if plan.reserve_per_answer_token else 0
                plan.apply(inputs["input_ids"].numel(), answers, 0 if pixels is None else pixels.shape[0])
            if self.offload_activations and training:
                # The forward only: backward (Trainer.training_step, after this returns) copies them back.
                self.last_offload = OffloadActivations(model)
                with self.last_offload:
                    return self._loss(model, inputs, return_outputs, num_items_in_batch)
            return self._loss(model, inputs, return_outputs, num_items_in_batch)

        def _loss(self, model, inputs, return_outputs, num_items_in_batch):
            loss, n_targets, outputs = answer_loss_sum(model, inputs, self.linear_ce)
            if num_items_in_batch is not None:
                # Normalised by the answer tokens of the whole accumulated (and, across GPUs, global) batch,
                # as transformers does; DDP's gradient averaging is undone by the world-size factor.
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes
            else:
                loss = loss / max(n_targets, 1)
            if "pixel_values" not in inputs and self.vision_trainable and (self.accelerator.num_processes > 1 or self.is_deepspeed_enabled):
                # No image in this batch: still run the vision tower on one blank tile (weight 0), so DDP
                # and ZeRO see a gradient for every trainable vision parameter on every rank. Not on one GPU:
                # there the zero gradient would still let AdamW's momentum move the projector.
                loss = loss + 0.0 * self._blank_image_features(model).sum()
            return (loss, outputs) if return_outputs else loss

        def _get_num_items_in_batch(self, batch_samples, device):
            """The answer tokens the loss is normalised by. On one process a Python int counted on the host:
            the Trainer's own count is a CPU tensor copied to the GPU, a copy that waits for the GPU at every
            step. Across processes the Trainer's gather (the count is global)."""
            if self.args.world_size > 1:
                return super()._get_num_items_in_batch(batch_samples, device)
            n = super()._get_num_items_in_batch(batch_samples, torch.device("cpu"))
            return int(n) if torch.is_tensor(n) else n

        def _blank_image_features(self, model):
            base = unwrap_peft(self.accelerator.unwrap_model(model))
            size = base.config.vision_config.image_size
            size = size[0] if isinstance(size, (list, tuple)) else size
            param = next(base.model.vision_tower.parameters())
            blank = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
            return base.model.get_image_features(pixel_values=blank).pooler_output

        def _get_train_sampler(self, train_dataset=None):
            if self.group_by_length and not self.packing:
                from transformers.trainer_pt_utils import LengthGroupedSampler

                return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=self.train_dataset.lengths)
            return super()._get_train_sampler(train_dataset)

        def create_optimizer(self, *a, **kw):
            optimizer = super().create_optimizer(*a, **kw)
            if not self.is_deepspeed_enabled and not getattr(optimizer, "_nonfinite_guard", False):
                self._guard_optimizer(optimizer)
            return optimizer

        def _guard_optimizer(self, optimizer):
            """Skip a step whose gradients hold inf/nan (one bad batch must not poison the weights);
            stop after `max_nonfinite_steps` such steps in a row. DDP has already all-reduced the
            gradients, so every rank takes the same decision."""
            step = optimizer.step

            def guarded_step(closure=None):
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                finite = True
                if grads:
                    norms = torch._foreach_norm(grads)  # one fused pass; a single sync below
                    finite = bool(torch.stack([n.to(norms[0].device) for n in norms]).isfinite().all())
                if finite:
                    self._bad_in_a_row = 0
                    return step(closure) if closure is not None else step()
                self.skipped_steps += 1
                self._bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if self.args.process_index == 0:
                    print(json.dumps({"event": "skipped_step", "step": self.state.global_step + 1, "reason": "non-finite gradients", "in_a_row": self._bad_in_a_row}), flush=True)
                if self._bad_in_a_row >= self.max_nonfinite_steps:
                    raise TrainingDiverged(f"{self._bad_in_a_row} optimizer steps in a row had non-finite gradients; stopping (lower --learning_rate, check the data)")
                return None

            optimizer.step = guarded_step
            optimizer._nonfinite_guard = True

        def _save_checkpoint(self, model, trial):
            """Write into .staging/checkpoint-N, then rename to checkpoint-N once every rank is done."""
            step = self.state.global_step
            staging_root = self.run_dir / ckpt.STAGING
            final = self.run_dir / f"checkpoint-{step}"
            if self.args.should_save and (staging_root / final.name).exists():
                shutil.rmtree(staging_root / final.name)
            original = self._get_output_dir
            self._get_output_dir = lambda trial=None: str(staging_root)
            try:
                super()._save_checkpoint(model, trial)
                if self.args.should_save:
                    self.save_extras(staging_root / final.name)
            except OSError as e:  # disk full, quota, I/O error: earlier checkpoints stay as they are
                raise ckpt.save_failed(self.run_dir, step, e) from e
            finally:
                self._get_output_dir = original
            if os.environ.get("INTERNVL_FAULT_KILL_IN_SAVE_STEP") == str(step):
                os._exit(137)  # fault injection for tests: die like a SIGKILL between writing and renaming
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if final.exists():  # a re-save of the same step after a resume
                    shutil.rmtree(final)
                os.replace(staging_root / final.name, final)
                ckpt.record_latest(self.run_dir, final)
                print(json.dumps({"event": "checkpoint", "step": step, "path": str(final)}), flush=True)
                if self.keep_checkpoints:
                    for old in ckpt.checkpoints(self.run_dir)[: -self.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
            self.accelerator.wait_for_everyone()

    return InternVLTrainer


# ------------------------------------------------------------------------------------------------ run


def resolve_run_dir(args: SftArguments, model_type: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None)."""
    resume = None
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        resume = Path(args.resume_from_checkpoint)
        if not resume.is_dir():
            raise SftConfigError(f"--resume_from_checkpoint {str(resume)!r} does not exist")
        return resume.parent, resume
    if not args.add_output_dir_suffix:
        run_dir = Path(args.output_dir)
        if args.resume_from_checkpoint == "latest":
            resume = ckpt.latest_checkpoint(run_dir)
        return run_dir, resume
    if args.resume_from_checkpoint == "latest":
        previous = ckpt.latest_run_dir(args.output_dir, model_type)
        if previous is not None:
            return previous, ckpt.latest_checkpoint(previous)
    return ckpt.new_run_dir(args.output_dir, model_type), None


def finished_step(resume: Path | None, args: SftArguments) -> int | None:
    """The checkpoint's step if it already ends the run it belongs to (and --max_steps asks no more)."""
    if resume is None or not (resume / "trainer_state.json").is_file():
        return None
    state = json.loads((resume / "trainer_state.json").read_text())
    step, planned = state.get("global_step", 0), state.get("max_steps", 0)
    if planned and step >= planned and (args.max_steps <= 0 or args.max_steps <= step):
        return step
    return None


def enable_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant), keeping a frozen vision tower out of backward.

    transformers 5 follows it with `enable_input_require_grads()`, which hooks every input embedding it
    finds, the vision tower's patch embedding included: a frozen ViT's output then requires grad, so the ViT
    keeps checkpoints for all its layers and runs a backward that nobody needs (at 7 tiles a row more work
    than the 0.5B LM's whole step; 3.8 GB at the seed's 25B shape with 13 tiles). Non-reentrant checkpoints
    need no grad-requiring inputs, so that hook is removed again when the ViT has nothing to train.

    The frozen ViT's layers are then also left unwrapped: with nothing to recompute, a checkpoint only adds
    bookkeeping, and its input saver (a node it records even when nothing needs a gradient) would hand each
    layer's input to --offload_activations' hooks: 45 x 13 tiles x 1,025 x 3,200 x 2 bytes = 3.8 GB copied to
    the host per step for nothing at the seed's shape."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision = unwrap_peft(model).model.vision_tower
    if any(p.requires_grad for p in vision.parameters()):
        return
    for module in vision.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del module._forward_hooks[key]
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False


class GpuOutOfMemory(SftConfigError):
    """The GPU ran out of memory in a training step: the settings must change (earlier checkpoints stay)."""


def out_of_memory_message(args: SftArguments, trainer, plan: CheckpointPlan | None) -> str:
    """One line that says where memory ran out and what to change."""
    where = f"at step {trainer.state.global_step + 1}"
    if torch.cuda.is_available():
        where += f" ({torch.cuda.max_memory_allocated() / 1e9:.1f} GB at the peak of {torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9:.1f} GB"
        where += f"; {plan.last} of {len(plan.layers)} decoder layers checkpointed)" if plan is not None and plan.last is not None else ")"
    fixes = [f"a smaller --batch_size (now {args.batch_size}) with more --gradient_accumulation_steps", f"a smaller --max_length (now {args.max_length})"]
    if args.gradient_checkpointing is not True:
        fixes.insert(0, "--gradient_checkpointing true (every layer; auto measures and may misjudge)" if args.gradient_checkpointing is None else "--gradient_checkpointing true")
    if args.sft_type == "full" and not args.deepspeed:
        fixes.append("--deepspeed default-zero2 on several GPUs (shards gradients and optimizer state)")
    return f"GPU out of memory {where}; try " + ", or ".join(fixes) + ". Earlier checkpoints are intact; --resume_from_checkpoint latest continues from the newest."


@dataclass
class PreparedModel:
    model: torch.nn.Module
    trainable: int
    total: int
    linear_ce: LinearCrossEntropy | None  # Liger's fused LM head + loss, when its kernels run
    checkpointing: str  # all | none | auto
    checkpoint_plan: CheckpointPlan | None  # --gradient_checkpointing auto on a GPU
    liger: str = "none"  # what of Liger runs: all | loss | none


@contextlib.contextmanager
def frozen_gc():
    """Python's garbage collector with everything alive before training moved out of its view (gc.freeze), for
    the length of the block.

    The training loop's host is on the critical path (the 1B LoRA step left the GPU idle a third of the time,
    bench/train_profile.py), and a full collection walks every tracked object: with the 1B layout, LoRA and the
    libraries loaded that is 441,628 objects and 184 ms on our CI's CPU (bench/gc_probe.py), a stall whenever
    one falls inside a step. Frozen, the model, tokenizer and libraries are never walked again (they live for
    the whole run anyway); what the steps create is still collected as before."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def one_gpu_per_process(training_args) -> None:
    """One process trains on one GPU. With several GPUs visible and no torchrun the Trainer would wrap the model
    in nn.DataParallel, which splits each batch's tensors along their first dimension on its own: a row's image
    tiles (concatenated over the batch) and its answer positions would land on other GPUs than its tokens."""
    n = training_args.n_gpu
    if n > 1:
        log.warning("%d GPUs visible to one process: training on the first only; NPROC_PER_NODE=%d internvl sft ... trains on all of them (DDP)", n, n)
        training_args._n_gpu = 1


def prepare_model(model, args: SftArguments, spec, *, on_gpu: bool, world: int = 1) -> PreparedModel:
    """Everything run_sft does to a loaded model before the Trainer gets it (bench/train_profile.py calls it
    too, so a profile times the step that trains): Liger's kernels, LoRA or freezing, gradient checkpointing,
    compiled layers, the fused LoRA update; under autocast PEFT's input casts skipped and the frozen vision
    tower in plain bf16; last, for --gradient_checkpointing auto, the memory plan measured on the result."""
    compute = torch_dtype(args.dtype)
    model.config.use_cache = False
    liger = args.resolved_liger(available=liger_unavailable() is None)
    linear_ce = setup_liger(model, layers=liger == "all") if liger != "none" else None  # before PEFT wraps the layers
    liger = liger if linear_ce is not None else "none"
    model, trainable, total = prepare_trainable(model, args, spec)
    checkpointing = args.resolved_checkpointing(on_gpu)
    if checkpointing != "none":
        enable_checkpointing(model)
    if args.torch_compile:
        log.info("torch.compile: %d decoder layers (compiled on their first batch)", compile_decoder_layers(model))
    if args.offload_activations and checkpointing == "none":
        log.warning("--offload_activations true without gradient checkpointing copies every activation to the host and back: a much slower step")
    if args.sft_type == "lora":
        log.info("LoRA updates added by one addmm into the base output: %d layers", fuse_lora_updates(model))
    # The dtype the Trainer's autocast runs the forward in; None where it runs none (a CPU, fp32, DeepSpeed,
    # whose model is already in its dtype): there PEFT's casts stay and the vision tower is left as it is.
    autocast = compute if on_gpu and compute in (torch.bfloat16, torch.float16) and not args.deepspeed else None
    if autocast is not None:
        if args.sft_type == "lora":
            log.info("LoRA layers take their inputs as autocast gives them: %d layers", skip_adapter_input_casts(model))
        if frozen_vision_without_autocast(model, autocast):
            log.info("frozen vision tower: %s weights, autocast off", autocast)
    image_placeholders_without_sync(model)
    plan = None
    if checkpointing == "auto":  # after the changes above: the measured layers are the ones that train
        plan = plan_checkpointing(model, language_model(model), autocast_dtype=autocast, fused_loss=linear_ce is not None, world_size=world)
    return PreparedModel(model, trainable, total, linear_ce, checkpointing, plan, liger)


def run_sft(args: SftArguments) -> Path:
    """Train; returns the last checkpoint directory."""
    from transformers import TrainingArguments, set_seed

    problems = args.validate()
    if problems:
        raise SftConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    rank, local_rank, world = rank_info()
    setup_numerics()
    set_seed(args.seed)
    on_gpu = torch.cuda.is_available()
    if args.deepspeed and not on_gpu:
        raise SftConfigError("--deepspeed needs CUDA GPUs")

    # Model. Full fine-tuning without DeepSpeed keeps fp32 master weights and runs in bf16 autocast;
    # LoRA keeps the frozen base in bf16 (PEFT makes the adapters fp32); DeepSpeed keeps its own fp32 copy.
    compute = torch_dtype(args.dtype)
    load_dtype = "fp32" if (args.sft_type == "full" and not args.deepspeed) or compute == torch.float32 else {torch.bfloat16: "bf16", torch.float16: "fp16"}[compute]
    device_map = {"": local_rank} if on_gpu and (world > 1 or args.deepspeed) else None
    loaded = load_model(
        args.model_id_or_path,
        model_type=args.model_type,
        dtype=load_dtype,
        use_flash_attn=args.use_flash_attn,
        device_map=device_map,
        max_length=args.max_length,
        max_tiles=args.max_num,
        attn_impl=args.attn_impl,
    )
    spec, template, tokenizer = loaded.spec, loaded.template, loaded.template.tokenizer
    run_dir, resume = resolve_run_dir(args, spec.model_type)
    finished = finished_step(resume, args)
    if finished is not None:
        # A retried Job whose run already reached its last step: report it, train nothing more.
        if rank == 0:
            print(json.dumps({"event": "done", "checkpoint": str(resume), "step": finished, "already_finished": True}), flush=True)
        return resume
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / ckpt.STAGING, ignore_errors=True)  # a save that was cut off

    # Data: measure every row once (tiles from image headers), drop rows over max_length, split.
    train_rows = read_dataset(args.dataset)
    if args.val_dataset:
        val_rows = read_dataset(args.val_dataset)
    else:
        train_rows, val_rows = split_rows(train_rows, args.dataset_test_ratio, args.seed)
    train_rows, train_lengths, dropped = measure_rows(train_rows, template, max_length=args.max_length, rank=rank)
    val_rows, val_lengths, val_dropped = measure_rows(val_rows, template, max_length=args.max_length, rank=rank)
    if dropped or val_dropped:
        log.warning("dropped %d training and %d validation rows over --max_length %d", dropped, val_dropped, args.max_length)
    if not train_rows:
        raise SftConfigError(f"no training rows left (dropped {dropped} over --max_length {args.max_length})")

    prepared = prepare_model(loaded.model, args, spec, on_gpu=on_gpu, world=world)
    model, trainable, total, linear_ce = prepared.model, prepared.trainable, prepared.total, prepared.linear_ce

    sft_args = args.to_json() | {
        "model_type": spec.model_type,
        "model_id_or_path": str(loaded.model_dir.resolve()),
        "template": spec.template,
        "run_dir": str(run_dir.resolve()),
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "dropped_rows": dropped + val_dropped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": world,
        "liger_kernels": prepared.liger,
        "checkpointing": prepared.checkpointing,
    }
    if rank == 0:
        write_json_atomic(run_dir / "sft_args.json", sft_args)
        write_rows_jsonl(run_dir / "val_dataset.jsonl", val_rows)

    def save_extras(checkpoint_dir: Path) -> None:
        """What makes a checkpoint self-describing: model type, args, image processor config."""
        write_json_atomic(checkpoint_dir / "sft_args.json", sft_args)
        write_meta(checkpoint_dir, model_type=spec.model_type)
        pre = loaded.model_dir / "preprocessor_config.json"
        if pre.is_file():
            shutil.copy(pre, checkpoint_dir / pre.name)

    grad_accum = args.resolved_grad_accum(world)
    bf16 = on_gpu and compute == torch.bfloat16
    training_args = TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=args.resolved_learning_rate(),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if val_rows else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps or args.eval_steps,
        save_total_limit=None,  # we rotate complete checkpoints ourselves after the rename
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        fp16=on_gpu and compute == torch.float16,
        use_cpu=not on_gpu,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_persistent_workers=args.dataloader_num_workers > 0,
        remove_unused_columns=False,
        report_to=[],
        deepspeed=deepspeed_config(args.deepspeed),
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        save_only_model=False,
        prediction_loss_only=True,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        # Batches are copied from pinned memory without waiting for the GPU. (The loss log's NaN filter still
        # reads each step's loss back, after backward, where the non-finite guard waits anyway.)
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": on_gpu},
    )
    one_gpu_per_process(training_args)
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=SftDataset(train_rows, template, train_lengths, uint8=True),
        eval_dataset=SftDataset(val_rows, template, val_lengths, uint8=True) if val_rows else None,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id, packing=args.packing),
        processing_class=tokenizer,
        run_dir=run_dir,
        save_extras=save_extras,
        max_nonfinite_steps=args.max_nonfinite_steps,
        keep_checkpoints=args.save_total_limit,
        group_by_length=args.group_by_length,
        packing=args.packing,
        linear_ce=linear_ce,
        offload_activations=args.offload_activations,
        checkpoint_plan=prepared.checkpoint_plan,
    )
    if rank == 0:
        print(json.dumps({"event": "start", "run_dir": str(run_dir), "train_rows": len(train_rows), "val_rows": len(val_rows), "dropped_rows": dropped + val_dropped, "trainable_parameters": trainable, "world_size": world, "resume_from": str(resume) if resume else None, "liger_kernels": prepared.liger, "checkpointing": prepared.checkpointing}), flush=True)
    try:
        with frozen_gc():
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError as e:
        raise GpuOutOfMemory(out_of_memory_message(args, trainer, prepared.checkpoint_plan)) from e
    last = run_dir / f"checkpoint-{trainer.state.global_step}"
    if not last.is_dir():
        trainer._save_checkpoint(trainer.model, None)
    if rank == 0:
        print(json.dumps({"event": "done", "checkpoint": str(last), "step": trainer.state.global_step}), flush=True)
    return last
