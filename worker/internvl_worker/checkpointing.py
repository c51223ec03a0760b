"""`--gradient_checkpointing auto` (the default on a GPU): each step recomputes only as many of the language
model's decoder layers as that batch needs to fit in GPU memory, none when it fits.

Checkpointing every layer (ms-swift's default, `--gradient_checkpointing true`) runs each layer's forward a
second time in backward: on the 1B shape's realistic rows at batch 8 the step is 1.15x (full) to 1.28x (LoRA)
slower than without (H200, bench/README.md), although those batches fit an 80 GB card without it (LoRA 42.5 GB,
full 57.8 GB). Longer rows or bigger batches do not fit. So before each forward the plan takes the batch's
padded token count T and leaves the first k decoder layers plain, k as large as the budget allows:

    k = (budget - L * T * c) / (T * (a - c)),   0 <= k <= L

L decoder layers; a = bytes one plain layer saves for backward per token, c = bytes per token a checkpointed
layer keeps (its input), both measured once on this model, device and dtype by `saved_bytes_per_token`;
budget = the card's memory x `fraction` - what is allocated when the step starts (weights, optimizer state)
- the step's other transients (gradients of the trained weights, the answer logits when the loss is not
fused, a few layer-wide tensors in backward).
"""

from __future__ import annotations

import logging

import torch

from .modeling import tile_and_patch
from .speedups import LOGITS_CHUNK_TOKENS, unwrap_peft

log = logging.getLogger(__name__)


def layers_left_plain(tokens: int, budget: float, layers: int, plain_bytes: float, checkpointed_bytes: float) -> int:
    """How many decoder layers may run without checkpointing: the largest k with
    k * T * a + (L - k) * T * c <= budget (0 when even all-checkpointed does not fit: that is the most
    checkpointing can do)."""
    if tokens <= 0:
        return layers
    extra = tokens * max(plain_bytes - checkpointed_bytes, 1.0)
    k = int((budget - layers * tokens * checkpointed_bytes) // extra)
    return max(0, min(layers, k))


def _saved_bytes(run, device: torch.device) -> int:
    """Bytes that `run()`'s graph keeps for backward: the distinct tensors autograd's saved-tensor hooks see
    (parameters excluded: they are held anyway; a weight's transposed view or autocast's bf16 copy is counted,
    which errs on the safe side), and on a GPU at least the allocator's growth while the graph lives, which also
    counts what a kernel keeps on its context and the inputs that checkpoints hold."""
    seen: dict[tuple[int, tuple], int] = {}

    def pack(t: torch.Tensor):
        if t.layout == torch.strided and not isinstance(t, torch.nn.Parameter):
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    grown = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    if device.type == "cuda":
        grown = torch.cuda.memory_allocated(device) - before - out.numel() * out.element_size()
    del out
    return max(grown, sum(seen.values()))


def saved_bytes_per_token(lm: torch.nn.Module, *, autocast_dtype: torch.dtype | None, tokens: int = 4096) -> tuple[float, float]:
    """(a, c): bytes per token that one decoder layer of `lm` saves for backward, run plainly and
    checkpointed. Measured as the difference between the language model run with its first two layers and
    with its first one, so that the embedding, rotary and final-norm parts cancel; every kernel choice of the
    real step (Liger, LoRA, attention, dtype) is in it because the real layers run. Call it after
    `train.enable_checkpointing` (which gives the layers their checkpoint function)."""
    layers = lm.layers
    param = next(lm.parameters())
    # the residual stream has the embeddings' dtype (fp32 for full fine-tuning's fp32 weights, under autocast too)
    x = torch.randn(1, tokens, lm.config.hidden_size, device=param.device, dtype=param.dtype) * 0.02
    flags = [getattr(layer, "gradient_checkpointing", False) for layer in layers[:2]]
    was_training = lm.training
    lm.train()
    sizes = {}
    try:
        # The first run is not used: one-time allocations (cuBLAS's workspace, kernel autotuning buffers) that
        # stay allocated would otherwise count in the one-layer run and hide most of a layer's bytes.
        for key in ("warmup", (False, 1), (False, 2), (True, 1), (True, 2)):
            checkpointed, n = (False, 2) if key == "warmup" else key
            for layer in layers[:n]:
                layer.gradient_checkpointing = checkpointed
            lm.layers = torch.nn.ModuleList(layers[:n])
            with torch.autocast(param.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                sizes[key] = _saved_bytes(lambda: lm(inputs_embeds=x, use_cache=False).last_hidden_state, param.device)
        result = [max(sizes[(checkpointed, 2)] - sizes[(checkpointed, 1)], 0) / tokens for checkpointed in (False, True)]
    finally:
        lm.layers = layers
        for layer, flag in zip(layers[:2], flags):
            layer.gradient_checkpointing = flag
        lm.train(was_training)
    # A checkpointed layer holds at least its input (held by the checkpoint's closure, which no hook sees).
    return result[0], max(result[1], lm.config.hidden_size * x.element_size())


class CheckpointPlan:
    """Sets, before each training forward, which decoder layers of `lm` are checkpointed. `apply` returns how
    many are; `last` keeps it for the progress log."""

    def __init__(self, lm: torch.nn.Module, *, plain_bytes: float, checkpointed_bytes: float, reserve_bytes: float, reserve_per_token: float, reserve_per_answer_token: float, reserve_per_tile: float = 0.0, fraction: float = 0.9, total_bytes: int | None = None, allocated=None):
        self.layers = list(lm.layers)
        self.plain_bytes, self.checkpointed_bytes = plain_bytes, checkpointed_bytes
        self.reserve_bytes, self.reserve_per_token, self.reserve_per_answer_token = reserve_bytes, reserve_per_token, reserve_per_answer_token
        self.reserve_per_tile = reserve_per_tile
        device = next(lm.parameters()).device
        self.total_bytes = total_bytes if total_bytes is not None else torch.cuda.get_device_properties(device).total_memory
        self.allocated = allocated if allocated is not None else (lambda: torch.cuda.memory_allocated(device))
        self.fraction = fraction
        self.last: int | None = None

    def budget(self, tokens: int, answer_tokens: int, tiles: int = 0) -> float:
        reserved = self.reserve_bytes + tokens * self.reserve_per_token + answer_tokens * self.reserve_per_answer_token + tiles * self.reserve_per_tile
        return self.total_bytes * self.fraction - self.allocated() - reserved

    def apply(self, tokens: int, answer_tokens: int = 0, tiles: int = 0) -> int:
        plain = layers_left_plain(tokens, self.budget(tokens, answer_tokens, tiles), len(self.layers), self.plain_bytes, self.checkpointed_bytes)
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = i >= plain
        self.last = len(self.layers) - plain
        return self.last


def plan_checkpointing(model, lm: torch.nn.Module, *, autocast_dtype: torch.dtype | None, fused_loss: bool, world_size: int = 1, fraction: float = 0.9, tokens: int = 4096, **card) -> CheckpointPlan:
    """The plan for `model`'s training step on this GPU: measures a and c, and reserves room for what the step
    holds besides the decoder layers' saved tensors. `card` (total_bytes, allocated) stands in for the GPU's
    figures in CPU tests."""
    a, c = saved_bytes_per_token(lm, autocast_dtype=autocast_dtype, tokens=tokens)
    config = lm.config
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32 gradients
    width = max(config.hidden_size, getattr(config, "intermediate_size", 0) or 0)
    head = model.get_output_embeddings().weight
    vision = unwrap_peft(model).model.vision_tower
    vc = vision.config
    vision_trains = any(p.requires_grad for p in vision.parameters())
    size, patch = tile_and_patch(vc)
    plan = CheckpointPlan(
        lm,
        plain_bytes=a,
        checkpointed_bytes=c,
        # gradients, and DDP's buckets beside them on several GPUs; Liger's fused loss also builds the LM head's
        # weight gradient in fp32 during the forward, beside a bf16 copy of the head and one chunk's logits
        reserve_bytes=trained * (2 if world_size > 1 else 1) + (head.numel() * 6 + 2 * LOGITS_CHUNK_TOKENS * head.shape[0] * 2 if fused_loss else 0),
        # backward's working set: a few layer-wide tensors (gradients of the MLP's activations) in fp32 at most
        reserve_per_token=6 * width * 4,
        # the answer logits in fp32, their bf16 copy and their gradient; Liger's fused loss stores none of them
        reserve_per_answer_token=0 if fused_loss else head.shape[0] * 10,
        # a vision tower that trains keeps each (checkpointed) layer's input per tile; a frozen one keeps nothing
        reserve_per_tile=((size // patch) ** 2 + 1) * vc.hidden_size * 4 * vc.num_hidden_layers if vision_trains else 0.0,
        fraction=fraction,
        **card,
    )
    log.info("gradient checkpointing auto: a decoder layer saves %.1f KB a token plain, %.1f KB checkpointed; %d layers; %.1f GB of %.1f GB in use before the first step",
             a / 1e3, c / 1e3, len(plan.layers), plan.allocated() / 1e9, plan.total_bytes / 1e9)  # fmt: skip
    return plan
