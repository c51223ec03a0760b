"""Where a training step's time goes on train_bench's realistic rows: the data side and the GPU step apart.

    python bench/train_profile.py                                        # 1B layout: data side, LoRA and full, GC off and on
    python bench/train_profile.py --kernels                              # + one step under torch.profiler: top 25 CUDA kernels
    python bench/train_profile.py --methods lora --gc on --steps 10      # one config
    python bench/train_profile.py --shape tiny --device cpu --rows 8 --steps 2   # smoke test on a CPU (about a minute)

Model: the InternVL3-1B layout with random weights (`internvl_worker.tiny`, as train_bench builds it), loaded
with `modeling.load_model` as `internvl sft` loads it: LoRA on a bf16 base, full with fp32 master weights, both
under bf16 autocast (the Trainer's bf16=True); fp32 without autocast on a CPU. Data: train_bench's
`make_dataset(seed=0)` rows (0-2 images of 1-13 tiles, a 10-400 word answer).

1. Data side alone: `train.SftDataset` + `train.collate` through a torch DataLoader (batch 8, pinned memory on
   a GPU, length-grouped sampler as `internvl sft` uses by default) with 2 workers (the CLI default) and 6
   (what train_bench passes): samples/s after the first batch, the first batch's wait, pixel_values bytes per
   batch; one batch's host-to-device copy; and `SftDataset.__getitem__` split in the main process into image
   decode (`load_image`), tiling (`template.tiler`) and tokenization (`template.encode`).
2. GPU step alone, on batches collated and copied to the GPU beforehand (no data loading): `--methods lora`
   (PEFT LoRA r 8, alpha 32, dropout 0 on the LLM's 7 linear layers, ViT and projector frozen) and `full`
   (LLM + projector trained, ViT frozen), both through run_sft's own `train.prepare_model` with an
   `SftArguments` (Liger's kernels and fused loss where installed (--use_liger_kernel), the fused LoRA update, PEFT's casts skipped and the frozen
   ViT in plain bf16 under autocast), with gradient checkpointing off and on for every layer. One step = the trainer's loss
   (`train.answer_loss_sum`, the function `InternVLTrainer.compute_loss` calls, divided by the answer tokens)
   under autocast, backward, `clip_grad_norm_(1.0)`, the trainer's non-finite guard (`_foreach_norm` + a sync),
   fused AdamW (two groups, weight decay 0.1 off biases and norms) and `zero_grad`. CUDA events (perf_counter
   on a CPU) split it into: embed (input embeddings), vit (vision tower), projector (pixel shuffle + MLP),
   merge (image features into the embeddings), llm_fwd (decoder stack), head_loss (LM head on answer tokens +
   cross-entropy), backward (with checkpointing: the recomputed forward too), clip, optimizer (guard + AdamW +
   zero_grad). Also: real vs padded tokens per batch, tiles, the step's time, samples/s and real tokens/s of
   the GPU step alone, achieved TFLOP/s of the ViT and LLM forward phases, MFU (train_bench.model_flops
   against the measured bf16 matmul peak) and peak memory.
   Batches: the sampler's first `--warmup` batches (it puts the longest first, so memory is tried early),
   then `--steps` batches spread evenly over the rest of the epoch (the sampler sorts a 400-row megabatch by
   length, so consecutive batches are not representative).
3. `--sync_sites`: one more step of each config in CUDA's sync debug mode: each call that made the host wait
   for the GPU, by its Python caller. A step whose host waits loses the lead that the vision tower's long
   kernels give it, which matters where the host is the slower side.
4. `--kernels`: one more step of each `--kernels_config` under torch.profiler (with Python stacks): the top 25
   CUDA kernels by total time, the kernel time by kind (GEMM, attention, elementwise, ...), and where the GPU
   waited (`gpu_idle`): the time no kernel ran, each gap charged to the code that launched the kernel after it
   (a step whose GPU waits on its host gains nothing from faster kernels).

The GPU steps run as run_sft's do: Liger's kernels per --use_liger_kernel, layers compiled with --compile, the
garbage collector frozen (train.frozen_gc).

Prints JSON lines as it goes and a table at the end; writes bench/results/train-profile-<card>-<date>.json
(bench/record.py), rewritten after each phase.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))

import train_bench  # noqa: E402  (this folder: make_dataset, row_stats, model_shape, model_flops, peak)
from record import card_name, write_record  # noqa: E402

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # train_bench's LoRA configs
PHASES = ("embed", "vit", "projector", "merge", "llm_fwd", "head_loss", "backward", "clip", "optimizer")
# Marks in step order; a phase is the time from the previous mark that was reached to its own mark (a batch
# without images reaches no vit/projector mark: those phases are 0 and embed..merge fall into "merge").
MARKS = ("start", "vit_start", "vit", "projector", "llm_start", "llm_fwd", "head_loss", "backward", "clip", "optimizer")
PHASE_OF_MARK = {"vit_start": "embed", "vit": "vit", "projector": "projector", "llm_start": "merge", "llm_fwd": "llm_fwd",
                 "head_loss": "head_loss", "backward": "backward", "clip": "clip", "optimizer": "optimizer"}  # fmt: skip


class StepTimer:
    """Marks on the GPU stream (CUDA events) or on the host clock (CPU); each mark kept once per step, so the
    hooks that a checkpointed recompute fires again in backward do not move it."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch, self.marks = cuda, torch, {}

    def reset(self):
        self.marks = {}

    def mark(self, name: str):
        if name in self.marks:
            return
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks[name] = e
        else:
            self.marks[name] = time.perf_counter()

    def phases_ms(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
        out, prev = dict.fromkeys(PHASES, 0.0), "start"
        for name in MARKS[1:]:
            if name not in self.marks:
                continue
            a, b = self.marks[prev], self.marks[name]
            out[PHASE_OF_MARK[name]] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            prev = name
        return out


def install_hooks(model, timer: StepTimer) -> list:
    """Forward hooks on the vision tower, projector and decoder stack of the InternVL inside any wrapper."""
    from internvl_worker.speedups import unwrap_peft

    inner = unwrap_peft(model).model
    return [
        inner.vision_tower.register_forward_pre_hook(lambda *a: timer.mark("vit_start")),
        inner.vision_tower.register_forward_hook(lambda *a: timer.mark("vit")),
        inner.multi_modal_projector.register_forward_hook(lambda *a: timer.mark("projector")),
        inner.language_model.register_forward_pre_hook(lambda *a: timer.mark("llm_start")),
        inner.language_model.register_forward_hook(lambda *a: timer.mark("llm_fwd")),
    ]


# ----------------------------------------------------------------------------------------------- data side


def sampler_batches(lengths: list[int], batch: int, *, grouped: bool, seed: int = 0) -> list[list[int]]:
    """The epoch's batches as `internvl sft` draws them: LengthGroupedSampler (the default) or random."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g)) if grouped else torch.randperm(len(lengths), generator=g).tolist()
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def padding_share(batches: list[list[int]], lengths: list[int]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return round(1 - real / padded, 4)


def time_getitem(ds, n: int) -> dict:
    """SftDataset.__getitem__'s three parts, in this process, over the first n rows (ms per row)."""
    from internvl_worker.images import load_image

    parts = {"decode": [], "tile": [], "encode": []}
    tiles = 0
    for i in range(n):
        conv = ds.rows[i].conversation
        t0 = time.perf_counter()
        images = [load_image(src) for src in conv.images]
        t1 = time.perf_counter()
        pixel_values, per_image = ds.template.tiler(images) if images else (None, [])
        t2 = time.perf_counter()
        ds.template.encode(conv, per_image, check_length=False)
        t3 = time.perf_counter()
        parts["decode"].append(t1 - t0)
        parts["tile"].append(t2 - t1)
        parts["encode"].append(t3 - t2)
        tiles += sum(per_image)
    ms = {k: round(sum(v) / n * 1e3, 2) for k, v in parts.items()}
    total = sum(ms.values())
    return {"rows": n, "tiles_per_row": round(tiles / n, 2), **{f"{k}_ms_per_row": v for k, v in ms.items()}, "total_ms_per_row": round(total, 2),
            "share": {k: round(v / total, 3) for k, v in ms.items()}, "one_process_samples_per_s": round(1e3 / total, 2)}  # fmt: skip


def time_loader(ds, batches: list[list[int]], *, workers: int, pad_id: int, pin: bool) -> dict:
    """samples/s of the DataLoader after its first batch (workers started, first batch in), and that wait."""
    import torch

    from internvl_worker.train import collate

    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=lambda b: collate(b, pad_id), pin_memory=pin)
    t0 = time.perf_counter()
    stamps, pixel_bytes, samples = [], [], []
    for b in loader:
        stamps.append(time.perf_counter())
        pv = b.get("pixel_values")
        pixel_bytes.append(pv.numel() * pv.element_size() if pv is not None else 0)
        samples.append(len(b["input_ids"]))
    first = stamps[0] - t0
    if len(stamps) > 1:
        rate = sum(samples[1:]) / (stamps[-1] - stamps[0])
    else:  # one batch: only the rate with start-up is known
        rate = samples[0] / first
    return {"num_workers": workers, "batches": len(stamps), "samples_per_s": round(rate, 2), "first_batch_s": round(first, 3),
            "pixel_mb_per_batch_mean": round(statistics.mean(pixel_bytes) / 1e6, 1), "pixel_mb_per_batch_max": round(max(pixel_bytes) / 1e6, 1),
            "pixel_dtype": str(pv.dtype).removeprefix("torch.") if pv is not None else None}  # fmt: skip


# ------------------------------------------------------------------------------------------------ GPU step


def load_for(method: str, model_dir: Path, device, compile_layers: bool = False, liger: bool | None = None):
    """(model, trainable, total, Liger's fused loss or None) prepared by run_sft's own `train.prepare_model` for
    this method; every layer checkpointed (run_config turns it off per config instead of planning it)."""
    import torch

    from internvl_worker.modeling import load_model
    from internvl_worker.sft_args import SftArguments
    from internvl_worker.train import prepare_model

    on_gpu = device.type == "cuda"
    dtype = "fp32" if method == "full" or not on_gpu else "bf16"  # run_sft: full keeps fp32 masters
    loaded = load_model(model_dir, dtype=dtype, device_map={"": device.index or 0} if on_gpu else None, max_length=8192)
    model = loaded.model
    if not on_gpu:
        model.to(device)
    if method == "lora":
        args = SftArguments(sft_type="lora", lora_rank=8, lora_alpha=32, lora_dropout=0.0, lora_target_modules=LORA_TARGETS, freeze_vit=True, freeze_aligner=True, gradient_checkpointing=True, torch_compile=compile_layers, use_liger_kernel=liger)
    else:
        args = SftArguments(sft_type="full", freeze_vit=True, freeze_aligner=False, gradient_checkpointing=True, torch_compile=compile_layers, use_liger_kernel=liger)
    prepared = prepare_model(model, args, loaded.spec, on_gpu=on_gpu)
    model = prepared.model
    model.train()
    del loaded
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return model, prepared.trainable, prepared.total, prepared.linear_ce


def make_optimizer(model, device):
    """AdamW as the Trainer builds it for `adamw_torch_fused` (CPU: plain): decay off biases and norm weights."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, fused=device.type == "cuda"), decay + no_decay


def train_step(model, batch: dict, optimizer, params, timer: StepTimer, *, autocast: bool, linear_ce=None) -> float:
    import torch

    from internvl_worker.train import answer_loss_sum

    timer.reset()
    timer.mark("start")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss_sum, n_targets, _ = answer_loss_sum(model, batch, linear_ce)
        loss = loss_sum / max(n_targets, 1)
    timer.mark("head_loss")
    loss.backward()
    timer.mark("backward")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    timer.mark("clip")
    grads = [p.grad for p in params if p.grad is not None]
    finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())  # the trainer's guard: a sync
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.mark("optimizer")
    return float(loss.detach())


def batch_stats(batch: dict, rows: list[dict], idx: list[int]) -> dict:
    mask = batch["attention_mask"]
    return {"real_tokens": int(mask.sum()), "padded_tokens": mask.numel(), "tiles": sum(rows[i]["tiles"] for i in idx), "answer_tokens": sum(rows[i]["answer_tokens"] for i in idx)}


def phase_flops(rows: list[dict], idx: list[int], shape: dict) -> dict:
    """Forward FLOPs of the ViT (all tiles) and of the decoder stack (real tokens: weights + causal attention)."""
    s = shape
    tiles = sum(rows[i]["tiles"] for i in idx)
    vit = tiles * (2 * s["n_vit"] * s["vit_tokens"] + 4 * s["vit_layers"] * s["vit_tokens"] ** 2 * s["vit_d"])
    llm = sum(2 * s["n_llm"] * rows[i]["tokens"] + 2 * s["layers"] * rows[i]["tokens"] ** 2 * s["d"] for i in idx)
    return {"vit": vit, "llm_fwd": llm}


def run_config(model, method: str, gc_on: bool, batches: list[tuple[dict, list[int]]], *, warmup: int, rows: list[dict], device, shape: dict, peak: float | None, kernels: bool, linear_ce=None, sync_debug: bool = False) -> dict:
    import torch

    from internvl_worker.train import enable_checkpointing

    cuda = device.type == "cuda"
    gc.collect()  # what an earlier config's out-of-memory left
    if cuda:
        torch.cuda.empty_cache()
    if gc_on:
        enable_checkpointing(model)
    else:
        model.gradient_checkpointing_disable()
    optimizer, params = make_optimizer(model, device)
    timer = StepTimer(cuda)
    hooks = install_hooks(model, timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_step, losses, walls = [], [], []
    try:
        for k, (batch, idx) in enumerate(batches):
            t0 = time.perf_counter()
            losses.append(train_step(model, batch, optimizer, params, timer, autocast=cuda, linear_ce=linear_ce))
            phases = timer.phases_ms()  # synchronizes
            walls.append(time.perf_counter() - t0)
            if k >= warmup:
                per_step.append((phases, batch_stats(batch, rows, idx), phase_flops(rows, idx, shape), idx))
        profile = profile_step(model, batches[warmup][0], optimizer, params, timer, cuda=cuda, linear_ce=linear_ce) if kernels else None
        syncs = sync_sites(lambda: train_step(model, batches[warmup][0], optimizer, params, timer, autocast=cuda, linear_ce=linear_ce)) if sync_debug and cuda else None
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
    finally:
        for h in hooks:
            h.remove()
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    n = len(per_step)
    total = {p: sum(s[0][p] for s in per_step) for p in PHASES}
    step_ms = sum(total.values())
    real = sum(s[1]["real_tokens"] for s in per_step)
    padded = sum(s[1]["padded_tokens"] for s in per_step)
    samples = sum(len(s[3]) for s in per_step)
    r = {
        "method": method, "gradient_checkpointing": gc_on, "timed_steps": n, "batch_size": len(per_step[0][3]),
        "step_ms": round(step_ms / n, 1), "wall_ms": round(sum(walls[warmup:]) / n * 1e3, 1),
        "phases_ms": {p: round(total[p] / n, 2) for p in PHASES}, "phases_share": {p: round(total[p] / step_ms, 3) for p in PHASES},
        "samples_per_s": round(samples / (step_ms / 1e3), 2), "real_tokens_per_s": round(real / (step_ms / 1e3), 1),
        "real_tokens_per_batch": round(real / n), "padded_tokens_per_batch": round(padded / n), "padding_share": round(1 - real / padded, 4),
        "tiles_per_batch": round(sum(s[1]["tiles"] for s in per_step) / n, 1), "answer_tokens_per_batch": round(sum(s[1]["answer_tokens"] for s in per_step) / n),
        "vit_tflops_per_s": round(sum(s[2]["vit"] for s in per_step) / (total["vit"] / 1e3) / 1e12, 2) if total["vit"] else None,
        "llm_fwd_tflops_per_s": round(sum(s[2]["llm_fwd"] for s in per_step) / (total["llm_fwd"] / 1e3) / 1e12, 2) if total["llm_fwd"] else None,
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
    }  # fmt: skip
    if peak:
        useful = train_bench.model_flops([rows[i] for s in per_step for i in s[3]], full=method == "full", shape=shape)
        r["mfu"] = round(useful / (step_ms / 1e3) / (peak * 1e12), 4)
    if cuda:
        r["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    if profile is not None:
        r["kernels"] = profile
    if syncs is not None:
        r["syncs_per_step"], r["sync_sites"] = sum(x["count"] for x in syncs), syncs
    return r


def sync_sites(step) -> list[dict]:
    """Run step() with CUDA's sync debug mode on: each call that made the host wait for the GPU, counted by the
    innermost Python frame outside torch that led to it (file:line; "in" the torch frame that waited, where
    that differs), most frequent first. The profile's own step ends with two such waits that the trainer also
    has or reads less often: the non-finite guard and the loss read back."""
    import traceback
    import warnings
    from collections import Counter

    import torch

    sites: Counter = Counter()
    counting = [False]  # turning the mode on reports one wait of its own, the first time in a process: not the step's

    def record(message, category, filename, lineno, file=None, line=None):
        if not counting[0] or "synchroniz" not in str(message):
            return
        frames = [f"{_short_frame(f.filename)}:{f.lineno}" for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        ours = [f for f in frames if not f.startswith("torch/")]
        where = ours[-1] if ours else frames[-1]
        sites[where if where == frames[-1] else f"{where} in {frames[-1]}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        counting[0] = True
        try:
            # backward on this thread: a wait there is seen with its stack (autograd's device threads would
            # hand their warnings over at the end of backward, stack lost)
            with torch.autograd.set_multithreading_enabled(False):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"where": where, "count": n} for where, n in sites.most_common()]


KERNEL_KINDS = [  # first match wins; names as CUDA/cuBLAS/PyTorch/Triton give them
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention|cutlassF|cutlassB"),
    ("gemm", r"gemm|sm90_xmma|nvjet|cutlass|wgmma|ampere_|sm80_|splitK|cublas|aten::(add|b)?mm$"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_adam"),
    ("softmax/loss", r"softmax|cross_entropy|nll_loss|log_softmax"),
    ("norm", r"norm"),
    ("reduce", r"reduce|sum_kernel|Reduce"),
    ("copy/cast", r"copy|Memcpy|Memset|(?<!no)cast|CatArray|index|scatter|gather|masked"),  # not "gpu_kernel_impl_nocast"
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|Elementwise"),
]


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile_step(model, batch, optimizer, params, timer, *, cuda: bool, linear_ce=None) -> dict:
    """One step under torch.profiler: top 25 CUDA kernels by total time (CPU: top 25 ops by self CPU time)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=cuda) as prof:
        train_step(model, batch, optimizer, params, timer, autocast=cuda, linear_ce=linear_ce)
        if cuda:
            torch.cuda.synchronize()
    idle = None
    if cuda:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json") as f:
                idle = gpu_idle(json.load(f).get("traceEvents", []))
    rows = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            us = max(getattr(e, "self_device_time_total", 0), getattr(e, "device_time_total", 0))
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, e.count, us))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    kinds: dict[str, float] = {}
    for name, _, us in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0) + us
    return {
        "what": "CUDA kernels" if cuda else "CPU ops (self time)", "total_ms": round(total / 1e3, 2),
        "by_kind_ms": {k: round(v / 1e3, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:160], "calls": calls, "ms": round(us / 1e3, 3), "share": round(us / total, 4), "kind": kernel_kind(name)} for name, calls, us in rows[:25]],
        **({"gpu_idle": idle} if idle else {}),
    }  # fmt: skip


GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_EVENTS = ("cuda_runtime", "cuda_driver")


def _short_frame(name: str) -> str:
    """A Python frame as the trace names it ("/.../site-packages/peft/tuners/lora/layer.py(770): forward"),
    from its package on."""
    return re.sub(r"^.*?(site-packages|dist-packages)/", "", name).replace(str(ROOT) + "/", "")


def _is_library_internal(frame: str) -> bool:
    """Frames of torch itself and built-ins: not where a step's own code is."""
    return frame.startswith(("torch/", "<built-in", "<string>", "contextlib", "functools", "threading", "typing")) or frame.startswith("nn.Module:")


def gpu_idle(events: list[dict], *, min_gap_us: float = 5.0, top: int = 15) -> dict:
    """Where the GPU waited in one profiled step (torch.profiler's Chrome trace with_stack=True): the time
    between the first kernel's start and the last one's end that no kernel, copy or memset covered, and
    each gap of at least `min_gap_us` charged to the code that launched the kernel after it: the innermost
    Python frame outside torch (the layer, the loss, the optimizer) around the launch, or the innermost
    CPU op where no Python frame is (autograd's backward thread). A GPU that waits while the host is
    still launching is the sign of a step bound by Python and launch overhead, not by its kernels."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_EVENTS), key=lambda e: e["ts"])
    if not gpu:
        return {}
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") in LAUNCH_EVENTS and "correlation" in e.get("args", {})}
    # Gaps, each with the launch of the kernel that ended it.
    gaps, busy_until, busy = [], gpu[0]["ts"], 0.0
    for e in gpu:
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if start - busy_until >= min_gap_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            gaps.append((start - busy_until, launch))
        busy += max(0.0, end - max(start, busy_until))
        busy_until = max(busy_until, end)
    span = busy_until - gpu[0]["ts"]
    # The enclosing frames and ops of each launch: a sweep over each thread's nested events in start order.
    spans: dict[tuple, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op"):
            name = _short_frame(e["name"]) if e["cat"] == "python_function" else e["name"]
            spans.setdefault((e.get("tid"), e["cat"]), []).append((e["ts"], e["ts"] + e.get("dur", 0), name))
    starts = {}
    for key, v in spans.items():
        v.sort(key=lambda t: (t[0], -t[1]))
        starts[key] = [t[0] for t in v]

    def innermost(tid, cat: str, t: float, keep) -> str | None:
        """Walking back from t, the first event that still encloses t started latest: it is the innermost."""
        v = spans.get((tid, cat), ())
        for i in range(bisect.bisect_right(starts.get((tid, cat), []), t) - 1, -1, -1):
            _, end, name = v[i]
            if end >= t and keep(name):
                return name
        return None

    by_place: dict[str, list[float]] = {}
    for gap, launch in gaps:
        place = "(launch not in the trace)"
        if launch is not None:
            t, tid = launch["ts"], launch.get("tid")
            place = innermost(tid, "python_function", t, lambda n: not _is_library_internal(n)) or innermost(tid, "cpu_op", t, lambda n: True) or place
        slot = by_place.setdefault(place, [0.0, 0])
        slot[0] += gap
        slot[1] += 1
    ranked = sorted(by_place.items(), key=lambda kv: -kv[1][0])
    return {
        "span_ms": round(span / 1e3, 2), "busy_ms": round(busy / 1e3, 2), "idle_ms": round((span - busy) / 1e3, 2),
        "idle_share": round((span - busy) / span, 4) if span else 0.0, "gaps": len(gaps), "min_gap_us": min_gap_us,
        "top": [{"where": place[:160], "idle_ms": round(ms / 1e3, 2), "gaps": n} for place, (ms, n) in ranked[:top]],
    }  # fmt: skip


# -------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="internvl3-1b", choices=["internvl3-1b", "tiny"], help="model layout (default: internvl3-1b; tiny for a CPU smoke test)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--rows", type=int, default=192, help="rows in the realistic data set (default: 192)")
    ap.add_argument("--batch", type=int, default=8, help="rows per batch (default: 8)")
    ap.add_argument("--steps", type=int, default=6, help="timed GPU steps per config (default: 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed GPU steps first, the longest batch among them (default: 2)")
    ap.add_argument("--methods", default="lora,full", help="comma-separated: lora, full (default: both)")
    ap.add_argument("--gc", default="off,on", help="gradient checkpointing: off, on or off,on (default: both)")
    ap.add_argument("--workers", default="2,6", help="DataLoader worker counts to time (default: 2,6)")
    ap.add_argument("--getitem_rows", type=int, default=48, help="rows whose __getitem__ is split in the main process (default: 48)")
    ap.add_argument("--group_by_length", type=lambda s: s.lower() in ("1", "true", "yes"), default=True, metavar="BOOL", help="length-grouped sampler, as internvl sft's default (default: true)")
    ap.add_argument("--use_liger_kernel", choices=["auto", "true", "false"], default="auto", help="as internvl sft's flag (default: auto, sft's default)")
    ap.add_argument("--compile", action="store_true", help="--torch_compile true: compiled decoder layers (give --warmup 3 or more: the first batches compile)")
    ap.add_argument("--kernels", action="store_true", help="one more step of --kernels_config under torch.profiler: top 25 CUDA kernels")
    ap.add_argument("--kernels_config", default="lora-gc", help="comma-separated method-gc or method-nogc names (default: lora-gc)")
    ap.add_argument("--sync_sites", action="store_true", help="one more step of each config in CUDA's sync debug mode: where the host waited for the GPU (file:line, count)")
    ap.add_argument("--out", default="/tmp/train-profile", help="work folder: the random model (kept), the data")
    ap.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--what", default="profile", help="names the record train-<what>-<card>-<date>.json (default: profile)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    gcs = [{"off": False, "on": True}[g] for g in args.gc.split(",") if g]
    if set(methods) - {"lora", "full"}:
        ap.error(f"--methods {args.methods}: use lora and/or full")

    import torch
    from transformers.utils import logging as hf_logging

    from internvl_worker.data import read_dataset
    from internvl_worker.tiny import build_tiny_model
    from internvl_worker.train import SftDataset, collate, frozen_gc, setup_numerics

    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    setup_numerics()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill the log
    t_start = time.time()
    out = Path(args.out)
    model_dir = out / f"model-{args.shape}"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, shape=args.shape)
    data = train_bench.make_dataset(out / "data", args.rows, seed=0)

    from transformers import AutoConfig, AutoTokenizer

    from internvl_worker.modeling import build_template
    from internvl_worker.registry import read_meta, resolve_model_type

    spec = resolve_model_type(read_meta(model_dir).get("model_type"), model_dir)
    template, _ = build_template(AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), spec, max_length=8192)
    stats = train_bench.row_stats(data, template)
    lengths = [r["tokens"] for r in stats]
    rows = read_dataset(data)
    ds = SftDataset(rows, template, lengths)  # float32 tiles, as the naive loop gets them
    ds8 = SftDataset(rows, template, lengths, uint8=True)  # uint8 tiles, as internvl sft gets them
    pad_id = template.tokenizer.pad_token_id
    shape = train_bench.model_shape(model_dir)
    peak = train_bench.measured_peak_tflops() if cuda else None
    card = card_name() if cuda else "cpu"
    mean = statistics.mean
    header = {"card": card, "torch_device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__, "cpus": os.cpu_count(), "shape": args.shape,
              "measured_peak_tflops": round(peak, 1) if peak else None, "rows": len(stats), "mean_tokens": round(mean(lengths)), "mean_tiles": round(mean(r["tiles"] for r in stats), 2),
              "mean_answer_tokens": round(mean(r["answer_tokens"] for r in stats))}  # fmt: skip
    print(json.dumps({"event": "setup", **header}), flush=True)

    batches = sampler_batches(lengths, args.batch, grouped=args.group_by_length)
    config = {**header, "batch_size": args.batch, "group_by_length": args.group_by_length, "warmup_steps": args.warmup, "timed_steps": args.steps, "compiled_layers": args.compile, "use_liger_kernel": args.use_liger_kernel,
              "epoch_padding_share": {"length_grouped": padding_share(sampler_batches(lengths, args.batch, grouped=True), lengths),
                                      "random": padding_share(sampler_batches(lengths, args.batch, grouped=False), lengths)},
              "model_shape": shape,
              "lora": f"PEFT r 8, alpha 32, dropout 0 on {LORA_TARGETS} of the LLM (train.prepare_trainable); bf16 base, ViT and projector frozen",
              "full": "LLM + projector trained, ViT frozen (train.prepare_trainable); fp32 master weights",
              "step": "train.answer_loss_sum / answer tokens under bf16 autocast (the trainer's compute_loss without the Trainer), backward, clip_grad_norm_ 1.0, "
                      "non-finite guard, fused AdamW, zero_grad; batches collated and on the device beforehand",
              "timing": "CUDA events on the step's stream" if cuda else "perf_counter (CPU)"}  # fmt: skip
    ours: dict = {"data": {}, "gpu": {}}

    def save() -> Path:
        ratios = {}
        for name, r in ours["gpu"].items():
            for key, d in ours["data"].items():
                if key.startswith("loader_") and "samples_per_s" in r:
                    ratios[f"{key}_vs_{name}"] = round(d["samples_per_s"] / r["samples_per_s"], 3)  # > 1: the loader keeps up
        return write_record(args.results_dir, "train", args.what, card=card, config=config, baselines={}, ours=ours, ratios=ratios)

    # ---- 1. data side
    ours["data"]["getitem"] = r = time_getitem(ds, min(args.getitem_rows, len(rows)))
    print(json.dumps({"event": "getitem", **r}), flush=True)
    for w in [int(x) for x in args.workers.split(",") if x]:
        for key, dataset in ((f"loader_{w}w", ds), (f"loader_{w}w_uint8", ds8)):
            ours["data"][key] = r = time_loader(dataset, batches, workers=w, pad_id=pad_id, pin=cuda)
            print(json.dumps({"event": "loader", **r}), flush=True)
    # The batches the GPU steps take: warmup first (the longest among them), then spread over the epoch.
    rest = list(range(args.warmup, len(batches))) or list(range(len(batches)))
    picks = list(range(min(args.warmup, len(batches)))) + [rest[round(k * (len(rest) - 1) / max(args.steps - 1, 1))] if len(rest) > 1 else rest[0] for k in range(args.steps)]
    while len(picks) < args.warmup + args.steps:  # fewer batches than warmup: repeat the first
        picks.insert(0, 0)
    t0 = time.perf_counter()
    host = [(collate([ds8[i] for i in batches[b]], pad_id), batches[b]) for b in picks]  # the loss normalizes them
    collate_s = time.perf_counter() - t0
    h2d = []
    on_device = []
    for b, idx in host:
        if cuda:
            b = {k: v.pin_memory() for k, v in b.items()}
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b = {k: v.to(device, non_blocking=False) for k, v in b.items()}
        if cuda:
            torch.cuda.synchronize()
        h2d.append(time.perf_counter() - t0)
        on_device.append((b, idx))
    del host
    ours["data"]["prefetch"] = r = {"batches": len(on_device), "main_process_collate_s": round(collate_s, 2), "h2d_ms_per_batch_pinned": round(mean(h2d) * 1e3, 2)}
    print(json.dumps({"event": "prefetch", **r}), flush=True)
    path = save()

    # ---- 2. GPU step alone
    for method in methods:
        model, trainable, total, linear_ce = load_for(method, model_dir, device, compile_layers=args.compile, liger={"auto": None, "true": True, "false": False}[args.use_liger_kernel])
        for gc_on in gcs:
            name = f"{method}-{'gc' if gc_on else 'nogc'}"
            t0 = time.time()
            with frozen_gc():  # as run_sft's training loop
                r = run_config(model, method, gc_on, on_device, warmup=args.warmup, rows=stats, device=device, shape=shape, peak=peak, kernels=args.kernels and name in args.kernels_config.split(","), linear_ce=linear_ce, sync_debug=args.sync_sites)
            r.update(trainable_parameters=trainable, wall_s=round(time.time() - t0, 1))
            ours["gpu"][name] = r
            print(json.dumps({"event": "gpu_step", "config": name, **{k: v for k, v in r.items() if k != "kernels"}}), flush=True)
            path = save()
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    print_tables(ours, config)
    print(json.dumps({"event": "done", "written": str(path), "wall_s": round(time.time() - t_start, 1)}), flush=True)
    return 0


def print_tables(ours: dict, config: dict) -> None:
    d = ours["data"]
    g = d["getitem"]
    print(f"\n== data side ({config['card']}, {config['cpus']} CPUs; rows: {config['mean_tokens']} tokens, {config['mean_tiles']} tiles mean; "
          f"epoch padding {config['epoch_padding_share']['length_grouped']:.1%} length-grouped, {config['epoch_padding_share']['random']:.1%} random)")  # fmt: skip
    print(f"__getitem__ per row: decode {g['decode_ms_per_row']} ms, tile {g['tile_ms_per_row']} ms, encode {g['encode_ms_per_row']} ms = {g['total_ms_per_row']} ms "
          f"({g['one_process_samples_per_s']} samples/s in one process)")  # fmt: skip
    for k, r in d.items():
        if k.startswith("loader_"):
            print(f"DataLoader {r['num_workers']} workers, {r['pixel_dtype']} tiles: {r['samples_per_s']} samples/s, first batch {r['first_batch_s']} s, pixel_values {r['pixel_mb_per_batch_mean']} MB/batch mean ({r['pixel_mb_per_batch_max']} max)")
    print(f"host->device copy of a collated batch (pinned): {d['prefetch']['h2d_ms_per_batch_pinned']} ms")
    gpu = {k: v for k, v in ours["gpu"].items() if "error" not in v}
    for k, v in ours["gpu"].items():
        if "error" in v:
            print(f"{k}: {v['error']}")
    if gpu:
        names = list(gpu)
        print("\n== GPU step alone (ms per step, mean of the timed steps)")
        print(f"{'phase':22s}" + "".join(f"{n:>16s}" for n in names))
        for p in PHASES:
            print(f"{p:22s}" + "".join(f"{gpu[n]['phases_ms'][p]:>9.1f} ({gpu[n]['phases_share'][p]:>4.0%})" for n in names))
        rows = [("step ms", "step_ms"), ("samples/s (GPU alone)", "samples_per_s"), ("real tokens/s", "real_tokens_per_s"), ("real tokens/batch", "real_tokens_per_batch"),
                ("padded tokens/batch", "padded_tokens_per_batch"), ("padding share", "padding_share"), ("tiles/batch", "tiles_per_batch"), ("ViT TFLOP/s", "vit_tflops_per_s"),
                ("LLM fwd TFLOP/s", "llm_fwd_tflops_per_s"), ("MFU", "mfu"), ("peak mem GB", "peak_mem_gb")]  # fmt: skip
        for label, key in rows:
            print(f"{label:22s}" + "".join(f"{str(gpu[n].get(key, '-')):>16s}" for n in names))
    for n, v in ours["gpu"].items():
        if "kernels" in v:
            kp = v["kernels"]
            print(f"\n== {n}: one step's {kp['what']}, {kp['total_ms']} ms in all; by kind: " + ", ".join(f"{k} {ms}" for k, ms in kp["by_kind_ms"].items()))
            for e in kp["top"]:
                print(f"{e['ms']:>9.2f} ms {e['share']:>6.1%} {e['calls']:>5d}x  {e['kind']:12s} {e['name'][:100]}")
            if "gpu_idle" in kp:
                gi = kp["gpu_idle"]
                print(f"\n== {n}: the GPU idle {gi['idle_ms']} ms of {gi['span_ms']} ms ({gi['idle_share']:.1%}) in {gi['gaps']} gaps of >= {gi['min_gap_us']} us; by the code launching after the gap:")
                for e in gi["top"]:
                    print(f"{e['idle_ms']:>9.2f} ms {e['gaps']:>5d} gaps  {e['where'][:130]}")
    for n, v in ours["gpu"].items():
        if "sync_sites" in v:
            print(f"\n== {n}: {v['syncs_per_step']} waits for the GPU in one step: " + ", ".join(f"{e['where']} x{e['count']}" for e in v["sync_sites"]))


if __name__ == "__main__":
    sys.exit(main())
