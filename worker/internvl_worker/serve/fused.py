"""The decode step's decoder layers with fewer kernels, on the language model's own weights.

A decode step is launch-bound: at batch 1 the 0.5B LM of InternVL3-1B reads its weights in 0.3 ms, while
transformers' layers launch ~20 kernels each with Liger's kernels (~40 without), about 2 ms a step as a CUDA
graph on an H200. Per layer this step launches instead:

    norm | one QKV GEMM (bias in its epilogue) | [q/k norms] | RoPE | key and value writes |
    one attention call | output projection added into the residual by the GEMM itself (addmm_) |
    norm | one gate+up GEMM | SiLU | multiply | down projection added into the residual (addmm_)

and no key/value copies: grouped-query attention runs with each KV head's queries as a (kv_heads, group)
query block against that head's keys, where transformers' SDPA path with a mask repeats the keys and values
for every query head (at 64 rows and 512 columns that is ~2.8 GB of copies a step for the 1B layout).

The fused QKV and gate/up weights are one tensor each, and the modules' own weights become views into
them: nothing is stored twice, and prefill (transformers' layers) reads the same memory.

Covered: the Llama family as transformers writes it (Qwen2/2.5, Qwen3 with its q/k norms, Llama, InternLM2
converted to Llama), on one device. `unsupported(lm)` says why anything else (sliding windows, MoE, dynamic
RoPE, adapters) runs transformers' layers instead.

Norms and RoPE are the model's own (torch) code, or with `liger=True` Liger's Triton kernels called here
directly: the model itself is then left unpatched, because a Triton kernel launched eagerly from Python
costs much more CPU time than an aten kernel, which made the eager prefill slower (1B shape on an H100:
prefill with the vision tower 28 -> 38 ms with Liger patched in), while inside a CUDA graph only the GPU
time counts (batch-1 step 2.9 -> 1.7 ms).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .slots import kv_shape

_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rotary_fn"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYER = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def _rope_type(cfg) -> str:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"


def unsupported(lm) -> str | None:
    """Why the fused step cannot run this language model (None when it can)."""
    cfg = lm.config
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {cfg.hidden_act!r} (the fused MLP is SiLU-gated)"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full attention is fused)"
    if "dynamic" in _rope_type(cfg) or _rope_type(cfg) == "longrope":  # transformers' dynamic_rope_update
        return f"RoPE type {_rope_type(cfg)!r} (its scaling depends on the length: not graph-safe)"
    if not hasattr(lm, "rotary_emb") or not hasattr(lm, "embed_tokens") or not hasattr(lm, "norm"):
        return f"{type(lm).__name__} lacks embed_tokens/rotary_emb/norm"
    device = lm.embed_tokens.weight.device
    if any(p.device != device for p in lm.parameters()):
        return "the language model is split over devices"
    for i, layer in enumerate(lm.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {i} has no self_attn/mlp"
        extra = ({n for n, _ in layer.named_children()} - _LAYER) | ({n for n, _ in attn.named_children()} - _ATTN) | ({n for n, _ in mlp.named_children()} - _MLP)
        if extra:
            return f"layer {i} has {sorted(extra)} (not a Llama-family layer)"
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(m) is nn.Linear for m in linears):  # noqa: E721 - a LoRA-wrapped Linear is a subclass or another module
            return f"layer {i}: projections are not plain nn.Linear (adapters?)"
    return None


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of out features, in) weight (and bias) for several Linears; each Linear's weight becomes a
    view into it, so the memory is not doubled."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


_LLAMA_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}  # x * rsqrt(mean(x^2) + eps) in fp32, times weight


def _liger_norm(module):
    """A transformers RMSNorm module's computation through Liger's kernel (Llama casting: fp32 inside); a norm
    of another kind keeps its own code."""
    if type(module).__name__ not in _LLAMA_NORMS:
        return module
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    weight, eps = module.weight, getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return lambda x: LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


class _Layer:
    def __init__(self, layer, liger: bool):
        attn, mlp = layer.self_attn, layer.mlp
        norm = _liger_norm if liger else (lambda m: m)
        self.norm1, self.norm2 = norm(layer.input_layernorm), norm(layer.post_attention_layernorm)
        self.q_norm = norm(attn.q_norm) if getattr(attn, "q_norm", None) is not None else None
        self.k_norm = norm(attn.k_norm) if getattr(attn, "k_norm", None) is not None else None
        self.qkv_w, self.qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_w, self.gate_up_b = _fuse([mlp.gate_proj, mlp.up_proj])
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.scale = attn.scaling
        if liger:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            self.rope = liger_rotary_pos_emb
        else:  # transformers' RoPE function of this architecture
            self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb


# Architectures whose RoPE is transformers' rotate-half form, the layout kernels.rope_store computes.
_ROTATE_HALF = ("llama", "qwen2", "qwen3", "mistral")


def triton_unsupported(lm) -> str | None:
    """Why the step cannot use our own Triton kernels (kernels.py) for this language model (None when it can)."""
    import importlib.util

    why = unsupported(lm)
    if why:
        return why
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    module = type(lm.layers[0].self_attn).__module__.rsplit(".", 1)[-1]
    if module.removeprefix("modeling_") not in _ROTATE_HALF:
        return f"{module}: RoPE layout not known to be rotate-half"
    if kv_shape(lm.config)[2] % 2:
        return "odd head dim"
    return None


class FusedLayers:
    """The decode step over fixed KV slots (see slots.py) with the layers above. With `triton=True` RoPE with
    the KV write, the attention and SiLU x up are our own kernels (kernels.py)."""

    def __init__(self, lm, liger: bool = False, triton: bool = False):
        why = triton_unsupported(lm) if triton else unsupported(lm)
        if why:
            raise ValueError(f"fused decode layers: {why}")
        self.kernels = None
        if triton:
            from . import kernels

            self.kernels = kernels
        cfg = lm.config
        self.lm = lm
        self.heads = cfg.num_attention_heads
        _, self.kv_heads, self.head_dim = kv_shape(cfg)
        self.inter = lm.layers[0].mlp.gate_proj.out_features
        with torch.inference_mode(False), torch.no_grad():
            self.layers = [_Layer(layer, liger) for layer in lm.layers]
        self.final_norm = _liger_norm(lm.norm) if liger else lm.norm

    def _qkv(self, layer, h):
        x = layer.norm1(h)
        return torch.addmm(layer.qkv_b, x, layer.qkv_w.t()) if layer.qkv_b is not None else torch.mm(x, layer.qkv_w.t())

    def _finish_layer(self, layer, h, attn, own_kernels: bool = False) -> None:
        """Output projection and MLP, each added into the residual stream `h` (rows, hidden) in place.
        own_kernels: SiLU x up by kernels.py (decode steps; the eager prefill keeps aten's cheaper launches)."""
        h.addmm_(attn, layer.o_w.t())  # h += attention @ W_o^T: the residual add inside the GEMM
        if layer.o_b is not None:
            h += layer.o_b
        x = layer.norm2(h)
        gate_up = torch.addmm(layer.gate_up_b, x, layer.gate_up_w.t()) if layer.gate_up_b is not None else torch.mm(x, layer.gate_up_w.t())
        if own_kernels:
            act = self.kernels.silu_mul(gate_up, self.inter)
        else:
            act = torch.nn.functional.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
        h.addmm_(act, layer.down_w.t())
        if layer.down_b is not None:
            h += layer.down_b

    def forward(self, ids, pos, bias, slots: list, rows, length: int):
        """One decode step. ids, pos: (b,) tokens and positions; bias: (b, 1, 1, length) additive mask (0 or
        -inf; unused with our own kernels, which read each row's columns up to its position); slots: per layer
        (keys, values) buffers (slots, kv_heads, max_len, head_dim); rows: arange(b).
        Returns the final-normed hidden states (b, hidden)."""
        b, nq, nkv, hd = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        qw, kw = nq * hd, nkv * hd
        h = self.lm.embed_tokens(ids)
        cos, sin = self.lm.rotary_emb(h, pos[:, None])  # (b, 1, head_dim)
        for layer, (keys, values) in zip(self.layers, slots):
            qkv = self._qkv(layer, h)
            q, k, v = qkv[:, :qw].view(b, nq, hd), qkv[:, qw : qw + kw].view(b, nkv, hd), qkv[:, qw + kw :].view(b, nkv, hd)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            if self.kernels is not None:
                q = self.kernels.rope_store(q, k, v, cos[:, 0], sin[:, 0], pos, keys, values)
                self._finish_layer(layer, h, self.kernels.decode_attention(q, keys, values, pos, layer.scale, length), own_kernels=True)
                continue
            q, k = layer.rope(q[:, :, None], k[:, :, None], cos, sin)  # (b, heads, 1, hd)
            keys[:b][rows, :, pos] = k[:, :, 0]
            values[:b][rows, :, pos] = v
            # Each KV head's `group` query heads as the query rows of one attention: no repeated keys.
            out = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(b, nkv, nq // nkv, hd), keys[:b, :, :length], values[:b, :, :length], attn_mask=bias, scale=layer.scale
            )
            self._finish_layer(layer, h, out.reshape(b, qw))
        return self.final_norm(h)

    def prefill(self, embeds, slots: list, slot_ids, last, start: int = 0):
        """Prompts in: embeds (b, T, hidden), right-padded (the causal mask alone keeps padding out of every
        real token's attention). Writes row i's keys/values for columns [0, T) straight into slot
        slot_ids[i] of every layer (the padded columns are overwritten by decode before any mask admits
        them). Returns the final-normed hidden state at position last[i] of each row, (b, hidden).
        transformers' forward launches ~40 kernels a layer from Python plus a cache object; this is the
        decode step's ~14, so a short prompt's prefill is no longer bound by launches.
        start > 0: a later chunk of prompts whose columns [0, start) are already in their slots; these T
        tokens sit at positions start.. and attend to those columns too."""
        b, t, hidden = embeds.shape
        nq, nkv, hd = self.heads, self.kv_heads, self.head_dim
        qw, kw = nq * hd, nkv * hd
        h = embeds.reshape(b * t, hidden).clone()  # the residual stream, updated in place
        positions = torch.arange(start, start + t, device=embeds.device)[None].expand(b, t)
        if start:  # query i (position start + i) sees columns 0 .. start + i: causal, aligned bottom-right
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(t, start + t)
        cos, sin = self.lm.rotary_emb(embeds, positions)  # (b, T, head_dim)
        for layer, (keys, values) in zip(self.layers, slots):
            qkv = self._qkv(layer, h)
            q, k, v = qkv[:, :qw].view(b, t, nq, hd), qkv[:, qw : qw + kw].view(b, t, nkv, hd), qkv[:, qw + kw :].view(b, t, nkv, hd)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = layer.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (b, heads, T, hd)
            v = v.transpose(1, 2)
            keys[slot_ids, :, start : start + t] = k
            values[slot_ids, :, start : start + t] = v
            if start:
                # Every earlier column too. The keys are repeated per query head: the lower-right causal bias
                # dispatches to the flash / memory-efficient kernels, but not with enable_gqa (an explicit
                # boolean mask would send it to the math kernel: a 3,500-token prompt's 1,024-token chunks took
                # longer than the whole prompt in one forward).
                k = keys[slot_ids, :, : start + t].repeat_interleave(nq // nkv, dim=1)
                v = values[slot_ids, :, : start + t].repeat_interleave(nq // nkv, dim=1)
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scale)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scale, enable_gqa=nq != nkv)
            self._finish_layer(layer, h, out.transpose(1, 2).reshape(b * t, qw))
        return self.final_norm(h.view(b, t, hidden)[torch.arange(b, device=h.device), last])
