"""Training speed-ups, measured on/off in bench/train_bench.py and bench/train_profile.py.

Behind `internvl sft` flags:
    --use_liger_kernel        Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in the language model, and the
                              answer-only loss through Liger's fused linear cross-entropy: the LM head and the
                              loss run chunk by chunk, so no 151,674-wide logits are ever stored. On by default
                              where liger-kernel and a CUDA GPU are present.
    --torch_compile true      torch.compile on each decoder layer of the language model (opt-in).
    --offload_activations true   what autograd saves during the forward (with gradient checkpointing: each
                              decoder layer's input) is held in pinned host memory and copied back in backward
                              (opt-in: it trades time for memory).

Always on where they apply (train.prepare_model): the fused LoRA layer, PEFT's input casts skipped under
autocast, a frozen vision tower in plain bf16, and image placeholders found without waiting on the GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import inspect
import logging
import types
from typing import Callable

import torch
from torch.nn.modules import module as _module_mod

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


def setup_liger(model, layers: bool = True) -> LinearCrossEntropy | None:
    """Patch the language model with Liger's kernels (unless `layers` is False); return the fused linear
    cross-entropy to use for the loss, or None (after a warning) where Liger cannot run, as --use_flash_attn
    falls back to SDPA.

    layers=False is for compiled decoder layers: inductor fuses the norms and the MLP itself, and dynamo
    cannot trace Liger's autograd Functions inside them (torch 2.11, H100); the loss runs outside the layers.
    Call before PEFT wraps the model: Liger rebinds the forward of the existing MLP and norm modules, and
    LoRA then wraps the Linear layers those forwards call."""
    why = liger_unavailable()
    if why:
        log.warning("--use_liger_kernel true but %s: using the plain PyTorch kernels and loss", why)
        return None
    if not layers:
        log.info("Liger's fused linear cross-entropy for the loss; the decoder layers keep torch's kernels (compiled)")
        return liger_linear_cross_entropy
    kind = apply_liger_kernels(model)
    if kind is None:
        log.warning("liger-kernel has no kernels for a %r language model: only its fused loss is used", language_model(model).config.model_type)
    else:
        log.info("Liger kernels applied to the %s language model", kind)
    return liger_linear_cross_entropy


# Liger's fused loss splits the answer tokens into chunks and, per chunk, reads the whole LM head (272 MB in bf16
# on the 1B shape) once for the logits, once for their input gradient and, when the head trains, adds into its
# fp32 gradient. Its default chunk keeps the chunk's logits as small as the head's input (64 of 5,461 answer
# tokens on the 1B shape: 86 chunks), so those weight passes and each chunk's Python and kernel launches made
# the loss 119 ms of a 629 ms LoRA step on an H100 (bench/train_profile.py). Our chunks hold 2,048 x 151,674 bf16
# logits (621 MB) at a time; Liger's own function, sized by liger_chunk_mem_const, at most twice that.
LOGITS_CHUNK_TOKENS = 2048


def liger_chunk_mem_const(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's `chunk_mem_const` for chunks of about LOGITS_CHUNK_TOKENS tokens (at most twice that: Liger rounds
    the chunk up to a power of two). Liger sizes a chunk as next_pow2(ceil(tokens / ceil(vocab / (C x hidden))))."""
    chunks = max(1, -(-tokens // LOGITS_CHUNK_TOKENS))
    return max(1, -(-vocab // (hidden * chunks)))


def liger_linear_cross_entropy(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of hidden @ weight^T against targets (every target a real token), chunk by
    chunk on Liger's Triton cross-entropy kernel (_ChunkedLinearCrossEntropy); through Liger's own fused
    function where its kernel takes other arguments than this code knows. Under autocast the head's matmuls
    run in autocast's dtype, as a Linear's would."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    kernel = _liger_ce_kernel()
    if kernel is not None:
        if not torch.is_grad_enabled():  # evaluation: the kernel then leaves the logits as they are
            hidden, weight = hidden.detach(), weight.detach()
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets.contiguous(), dtype, kernel)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # Liger's function reads the target count back from the GPU (and compares the output gradient with 1.0
    # in backward): two waits a step. An fp32 head is cast once here, not in every chunk's matmul.
    weight = weight.to(dtype)
    const = liger_chunk_mem_const(hidden.shape[0], weight.shape[0], weight.shape[1])
    accum = torch.float32 if weight.requires_grad and weight.dtype != torch.float32 else None
    return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum", accum_dtype=accum, chunk_mem_const=const)


# The arguments of liger_kernel.ops.cross_entropy.liger_cross_entropy_kernel (liger-kernel 0.5 to 0.8) that
# _ChunkedLinearCrossEntropy passes; another set means another kernel, and Liger's own function is used.
_LIGER_CE_KERNEL_ARGS = (
    "X_ptr", "X_stride", "Y_ptr", "Y_stride", "weight_ptr", "loss_ptr", "z_loss_ptr", "loss_stride", "token_accuracy_ptr",
    "token_accuracy_stride", "predicted_tokens_ptr", "predicted_tokens_stride", "n_cols", "n_non_ignore", "sum_non_ignore_weight",
    "weight_sum", "ignore_index", "lse_square_scale", "label_smoothing", "reduction", "softcap", "RETURN_Z_LOSS",
    "RETURN_TOKEN_ACCURACY", "RETURN_PREDICTED_TOKENS", "BLOCK_SIZE", "HAS_WEIGHT", "HAS_SOFTCAPPING", "HAS_GRADIENTS",
)  # fmt: skip


def _liger_ce_kernel():
    """Liger's cross-entropy Triton kernel when its arguments are the ones _ChunkedLinearCrossEntropy passes."""
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    except ImportError:
        return None
    return liger_cross_entropy_kernel if tuple(getattr(liger_cross_entropy_kernel, "arg_names", ())) == _LIGER_CE_KERNEL_ARGS else None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i CE(hidden_i @ weight^T, targets_i), computed LOGITS_CHUNK_TOKENS tokens at a time: a chunk's
    logits (bf16 under autocast), Liger's kernel writes each row's loss and, in place of the logits, their
    gradient; that gradient times the head gives the chunk's input gradient and, when the head trains, is
    summed into an fp32 weight gradient. Backward only scales the two by the output gradient.

    What Liger's fused function does, less its two waits on the GPU (the count of targets read back in the
    forward, the output gradient compared with 1.0 in backward): the targets are the answer tokens that
    answer_loss_sum picked, so none is ignored and the summed loss needs no count. The host then never waits
    inside a training step's loss (see answer_loss_sum on what that is worth)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, kernel):
        import triton

        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x, w = _as(hidden, dtype), _as(weight, dtype)
        n, vocab = x.shape[0], w.shape[0]
        chunk = min(LOGITS_CHUNK_TOKENS, n)
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        buffer = torch.empty(chunk, vocab, dtype=dtype, device=x.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            xc, logits = x[start:end], buffer[: end - start]
            torch.mm(xc, w.t(), out=logits)
            kernel[(end - start,)](
                X_ptr=logits, X_stride=logits.stride(0), Y_ptr=targets[start:end], Y_stride=1, weight_ptr=None,
                loss_ptr=loss[start:end], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None, token_accuracy_stride=0,
                predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=vocab, n_non_ignore=1, sum_non_ignore_weight=1,
                weight_sum=0.0, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None,
                RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
                BLOCK_SIZE=min(32768, triton.next_power_of_2(vocab)), HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
                HAS_GRADIENTS=need_x or need_w, num_warps=32,
            )  # fmt: skip
            if need_x:
                torch.mm(logits, w, out=grad_x[start:end])
            if need_w and dtype == torch.float32:
                grad_w.addmm_(logits.t(), xc)
            elif need_w:  # bf16 operands summed into fp32 inside the GEMM (CUDA's addmm with out_dtype)
                torch.addmm(grad_w, logits.t(), xc, out_dtype=torch.float32, out=grad_w)
        ctx.grads = (grad_x, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = ctx.grads
        del ctx.grads
        x_dtype, w_dtype = ctx.dtypes
        if grad_x is not None:
            grad_x = _as(grad_x.mul_(grad.to(grad_x.dtype)), x_dtype)
        if grad_w is not None:
            grad_w = _as(grad_w.mul_(grad), w_dtype)
        return grad_x, grad_w, None, None, None


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


def skip_adapter_input_casts(model) -> int:
    """Stop PEFT's LoRA layers casting each input to their adapters' dtype; returns how many layers. For use
    under autocast only.

    With a bf16 base PEFT keeps the adapters in fp32 and casts every adapted layer's input to fp32, a copy of
    the activation, which autocast then casts straight back to bf16 for the adapter's matmul: two copies per
    layer, per forward and per recomputation, for the same result (bf16 -> fp32 -> bf16 is exact). Copies and
    casts were ~16% of a LoRA step's kernel time on an H100 (bench/train_profile.py)."""
    n = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):  # peft's BaseTunerLayer (peft >= 0.15)
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def fuse_lora_updates(model) -> int:
    """Give every plain PEFT LoRA Linear the fused forward below; returns how many layers.

    PEFT adds an adapter's update as `result + lora_B(lora_A(dropout(x))) * scaling`: after the two small
    matmuls, a multiply and an add over the layer's whole output, each its own kernel, and the multiply again
    in backward. For the 1B shape's seven adapted layers a decoder layer that is 12,672 output values per token
    read and written three more times than needed: 63 + 33 ms of a 758 ms LoRA step's kernels on an H100
    (bench/train_profile.py). The fused forward scales the small [out, rank] B matrix instead and lets one
    `addmm` add the update into the base layer's output (beta = 1: cuBLAS accumulates into it, in fp32 inside
    the GEMM, so the sum is rounded once instead of three times)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # not a subclass (quantized bases have forwards of their own)
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA Linear's forward with one adapter's update added by addmm; PEFT's own forward wherever
    anything else is asked (extra arguments, adapters off or merged, several or variant adapters such as
    DoRA, a bias on B, or mixed dtypes that only autocast would reconcile).

    PEFT's state is read from plain attributes and the module dicts, not through its properties and
    nn.Module's __getattr__ (the fallback for submodules): this dispatch runs once per adapted layer (168 a
    forward on the 1B shape), and took 50 us of its own before (bench/lora_host_probe.py), when the LoRA
    step was bound by its host."""
    modules = self._modules
    name = self._active_adapter  # plain attributes (the instance's or PEFT's class defaults): no __getattr__
    if type(name) is not str:  # a list: one active adapter only
        name = name[0] if len(name) == 1 else None
    a_mod = modules["lora_A"]._modules.get(name) if name is not None else None
    if args or kwargs or a_mod is None or self._disable_adapters or self.merged_adapters or name in self.lora_variant:
        return _peft_forward(self, x, *args, **kwargs)
    a, b_mod = a_mod._parameters["weight"], modules["lora_B"]._modules[name]
    b = b_mod._parameters["weight"]
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if b_mod._parameters.get("bias") is not None or (x.dtype != a.dtype and not autocast):
        return _peft_forward(self, x, *args, **kwargs)
    base, dropout = modules["base_layer"], modules["lora_dropout"]._modules[name]
    xd = x if type(dropout) is torch.nn.Identity else dropout(x)
    scaling = self.scaling[name]
    weight = base._parameters.get("weight") if type(base) is torch.nn.Linear else None
    if weight is not None and not weight.requires_grad and not _has_forward_hooks(base):
        return _FrozenLinearWithLora.apply(x, xd, weight, base._parameters["bias"], a, b, scaling, torch.get_autocast_dtype(device) if autocast else x.dtype)
    result = base(x)  # a base that trains or has hooks (DeepSpeed ZeRO-3 gathers its weight in one)
    down = torch.nn.functional.linear(xd, a)  # [..., rank]
    up = (b * scaling).t()  # [rank, out]: the scaling on 8 x out values, not on the output
    return torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), up).view(result.shape)


def _peft_forward(self, x, *args, **kwargs):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return LoraLinear.forward(self, x, *args, **kwargs)


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or _module_mod._global_forward_pre_hooks or _module_mod._global_forward_hooks)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (a dtype test costs far less host time than a no-op .to)."""
    return t if t.dtype == dtype else t.to(dtype)


class _FrozenLinearWithLora(torch.autograd.Function):
    """y = x W^T + bias + (xd A^T)(s B)^T for a frozen base (W, bias) and one adapter (A [r, in], B [out, r]),
    xd being x after LoRA dropout (x itself without dropout), all in `dtype` (autocast's, or x's).

    One autograd node instead of the ~9 that the same ops record (linear, casts of A and s*B, the scaling,
    transposes, views, addmm, and the add of the two input gradients). A LoRA step of the 1B shape was bound by
    the host, not the GPU: the GPU idled 195 ms of a 584 ms step, 84 ms of it waiting on the adapted layers'
    forward and their backward's small matmuls (H100, bench/train_profile.py). Backward does the same
    four small matmuls as autograd would, and without dropout adds the adapter's input gradient into the base
    layer's in the GEMM (addmm) instead of a separate add over the layer's input."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, scaling, dtype):
        shape = x.shape
        x2 = _as(x.reshape(-1, shape[-1]), dtype)
        xd2 = x2 if xd is x else _as(xd.reshape(-1, shape[-1]), dtype)
        w, a_c, up = _as(weight, dtype), _as(a, dtype), _as(b * scaling, dtype)  # up: [out, r], scaled on out x r values
        down = torch.mm(xd2, a_c.t())  # [N, r]
        # In place: addmm's out-of-place form first copies the base output into a new tensor (a device-to-device
        # copy of the layer's whole output per call).
        out = torch.nn.functional.linear(x2, w, None if bias is None else _as(bias, dtype)).addmm_(down, up.t())
        ctx.save_for_backward(xd2, w, a_c, up, down)
        ctx.same_input, ctx.scaling = xd is x, scaling
        ctx.dtypes = (x.dtype, xd.dtype, a.dtype, b.dtype)
        ctx.shape = shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd2, w, a_c, up, down = ctx.saved_tensors
        x_dtype, xd_dtype, a_dtype, b_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        g = _as(grad.reshape(-1, grad.shape[-1]), w.dtype)
        d_down = torch.mm(g, up)  # [N, r]
        grad_a = _as(torch.mm(d_down.t(), xd2), a_dtype) if needs[4] else None
        grad_b = _as(torch.mm(g.t(), down), b_dtype) * ctx.scaling if needs[5] else None
        grad_x = grad_xd = None
        if ctx.same_input:
            if needs[0]:
                grad_x = _as(torch.mm(g, w).addmm_(d_down, a_c).view(ctx.shape), x_dtype)
        else:
            if needs[0]:
                grad_x = _as(torch.mm(g, w).view(ctx.shape), x_dtype)
            if needs[1]:
                grad_xd = _as(torch.mm(d_down, a_c).view(ctx.shape), xd_dtype)
        return grad_x, grad_xd, None, None, grad_a, grad_b, None, None


def frozen_vision_without_autocast(model, dtype: torch.dtype) -> bool:
    """Run a frozen vision tower in `dtype` with autocast off, as serving runs it; returns False (nothing
    changed) when any of its weights trains.

    Under autocast every LayerNorm writes fp32 and each of the q/k/v and fc1 linears casts it back on its own;
    in plain bf16 the InternVL3-1B ViT's forward over a batch of 76 tiles took 133.6 ms instead of 154.9 ms
    (H200, bench/vit_probe.py). Full fine-tuning loads fp32 weights; the frozen tower needs no fp32 master, so
    it is cast once (0.6 GB less on the 1B shape)."""
    vision = unwrap_peft(model).model.vision_tower
    if any(p.requires_grad for p in vision.parameters()):
        return False
    vision.to(dtype)
    inner = vision.forward

    def forward(*args, pixel_values=None, **kwargs):
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(dtype)
        with torch.autocast(next(vision.parameters()).device.type, enabled=False):
            return inner(*args, **kwargs)

    vision.forward = forward
    return True


def image_placeholders_without_sync(model) -> bool:
    """Let InternVL's forward find its image-token positions without reading a count back from the GPU;
    returns False (nothing changed) for a model without transformers' `get_placeholder_mask`.

    transformers checks there that the batch has as many image tokens as the vision tower gave features, a
    comparison of a GPU count that waits for the vision tower to finish: the host then starts the language
    model with nothing queued, and loses the lead that the vision tower's long kernels had given it
    (bench/train_profile.py --sync_sites). SftDataset checks the same equality on the
    host for every row (its token count from the tiles it made), and masked_scatter still checks on the
    device that no image token lacks a feature."""
    inner = unwrap_peft(model).model
    own = getattr(type(inner), "get_placeholder_mask", None)
    if own is None:
        return False
    image_token_id = inner.config.image_token_id

    def get_placeholder_mask(input_ids, inputs_embeds, image_features):
        if input_ids is None:  # embeddings given: transformers' own search and check
            return own(inner, input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        return (input_ids == image_token_id).unsqueeze(-1).to(inputs_embeds.device)

    inner.get_placeholder_mask = get_placeholder_mask
    return True


_ROWS_NOT_PACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("rows_not_packed", default=False)


@contextlib.contextmanager
def rows_not_packed():
    """Within: transformers takes a batch's rows as not packed without looking for position-id restarts.

    Given no attention mask (training passes none: padding is on the right) transformers' decoders search
    the position ids for packed rows, and the search ends in a test of a GPU tensor: the host waits there for
    the vision tower's kernels, and then launches the language model with nothing queued. Where the caller
    knows the rows are not packed (it passed no position ids: transformers makes them 0..n-1 for every row),
    the search's answer is known: no packed rows. Outside this context transformers' search runs as it is."""
    from transformers import masking_utils

    search = masking_utils.find_packed_sequence_indices
    if not getattr(search, "_skips_when_not_packed", False):

        def find_packed_sequence_indices(position_ids):
            return None if _ROWS_NOT_PACKED.get() else search(position_ids)

        find_packed_sequence_indices._skips_when_not_packed = True
        masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    token = _ROWS_NOT_PACKED.set(True)
    try:
        yield
    finally:
        _ROWS_NOT_PACKED.reset(token)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """--offload_activations: every tensor autograd saves inside this context goes to (pinned) host memory
    and comes back to its device when backward needs it; torch.autograd.graph.save_on_cpu(pin_memory=True)
    with two differences.

    1. Tensors that share storage with a model parameter (the weight itself, or the `weight.t()` view a
       Linear saves) stay where they are: moving them would free nothing, and at the seed's shape the LM
       head alone is 1.1 GB (92,553 x 6,144 bf16) that save_on_cpu would copy out and back every step.
    2. The device-to-host copy is asynchronous (pinned memory): the forward does not wait for it. The copy
       back runs on the same stream, so it is ordered after it; the caching allocators keep both buffers
       until their copies are done.

    With gradient checkpointing (non-reentrant), what is saved outside the checkpointed layers is mainly each
    decoder layer's input (layers x tokens x hidden x 2 bytes: 48 x 4,096 x 6,144 x 2 = 2.4 GB at the seed's
    25.5B shape) plus the answer-only head's input and logits; inside a layer the checkpoint's own hooks
    take precedence, so nothing there is copied. Without checkpointing every activation is copied: the
    largest saving and the slowest step. On a machine without CUDA the tensors are copied to plain host
    memory (already there: the CPU tests use it to check that the round trip changes no loss or gradient).

    `moved` / `moved_bytes` count what the last forward sent to the host, `kept` what stayed (weights, and on
    a GPU machine tensors already in host memory)."""

    def __init__(self, model: torch.nn.Module):
        self.pin = torch.cuda.is_available()
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.moved, self.moved_bytes, self.kept = 0, 0, 0
        self.host_devices: set[str] = set()
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        on_host = self.pin and t.device.type == "cpu"  # with a GPU, a host tensor has nothing to free
        if on_host or t.layout != torch.strided or t.untyped_storage().data_ptr() in self.weights:
            self.kept += 1
            return t.detach()  # detached: a saved output holding itself would keep its graph alive in a cycle
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=self.pin)
        host.copy_(t, non_blocking=self.pin)
        self.moved += 1
        self.moved_bytes += host.numel() * host.element_size()
        self.host_devices.add(host.device.type)
        return (t.device, host)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin)
