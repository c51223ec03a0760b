"""Optional training speed-ups, each behind an `internvl sft` flag and measured on/off in bench/train_bench.py.

    --use_liger_kernel true   Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in the language model, and the
                              answer-only loss through Liger's fused linear cross-entropy: the LM head and the
                              loss run chunk by chunk, so no 151,674-wide logits are ever stored.
    --torch_compile true      torch.compile on each decoder layer of the language model.

Both are off by default until the benchmark shows they pay on the card.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

# (LM head weight [vocab, hidden], answer hidden states [n, hidden], next tokens [n]) -> summed cross-entropy
LinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plain_linear_cross_entropy(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What the fused kernel computes, in plain PyTorch: the LM head's logits (upcast to fp32, as the
    logits path does) and their cross-entropy summed over the tokens."""
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets, reduction="sum")


def unwrap_peft(model) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(model) -> torch.nn.Module:
    """The decoder-only LM inside an InternVL model (through a PEFT wrapper if there is one)."""
    return unwrap_peft(model).model.language_model


def liger_unavailable() -> str | None:
    """Why Liger's kernels cannot run here (None when they can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not torch.cuda.is_available():
        return "Liger's kernels are Triton: it needs a CUDA GPU"
    return None


def apply_liger_kernels(model) -> str | None:
    """Patch the language model's RMSNorm, SwiGLU MLP and RoPE with Liger's Triton kernels (fewer, fused
    kernels: faster training steps and decode steps). Returns the LM's model type when patched, None when
    liger-kernel has no kernels for it. Liger's own loss patches stay off (training computes its own loss;
    with fused_linear_cross_entropy, its default, Liger would also replace the instance's forward)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    lm = language_model(model)
    kind = lm.config.model_type
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(kind)
    if patch is None:
        return None
    # Per-architecture functions differ in which switches they take; pass those this one has.
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    accepted = inspect.signature(patch).parameters
    patch(model=lm, **{k: v for k, v in wanted.items() if k in accepted})
    return kind


def setup_liger(model) -> LinearCrossEntropy | None:
    """Patch the language model with Liger's kernels; return the fused linear cross-entropy to use for the
    loss, or None (after a warning) where Liger cannot run, as --use_flash_attn falls back to SDPA.

    Call before PEFT wraps the model: Liger rebinds the forward of the existing MLP and norm modules, and
    LoRA then wraps the Linear layers those forwards call."""
    why = liger_unavailable()
    if why:
        log.warning("--use_liger_kernel true but %s: using the plain PyTorch kernels and loss", why)
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    kind = apply_liger_kernels(model)
    if kind is None:
        log.warning("liger-kernel has no kernels for a %r language model: only its fused loss is used", language_model(model).config.model_type)
    else:
        log.info("Liger kernels applied to the %s language model", kind)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer of the language model in place; returns how many.

    Per layer, not the whole model: InternVL's forward scatters a varying number of image features and
    slices answer positions with a boolean mask (data-dependent shapes, graph breaks), while the decoder
    layers are identical, so one compiled graph serves all of them. dynamic=True because every batch has
    another length. Module.compile keeps parameter names, so checkpoints are unchanged. (CPU tests pass
    backend="aot_eager": the same traced graphs without generating kernels, which takes minutes there.)"""
    layers = language_model(model).layers
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)
