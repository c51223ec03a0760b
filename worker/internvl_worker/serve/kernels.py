"""Triton kernels of our own for the fused decode step (fused.py), where a batch-1 step is bound by kernel
latency, not by bytes:

- `decode_attention`: split-KV ("flash decoding") attention over the KV slots. cuDNN's and the other SDPA
  kernels give one block of work per (row, KV head): at batch 1 with 2 KV heads that is 2 busy SMs of 132,
  17.6 us a layer on an H100 for 1,024 columns (28% of the whole step). Here each (row, KV head) is split
  into column chunks that run side by side, each writes its partial softmax (output and log-sum-exp), and a
  second small kernel combines them. Each row reads only the columns up to its own position (no mask
  tensor), and a KV head's `group` query heads are one query block (no repeated keys).
- `rope_store`: RoPE on the new queries and keys, and the new key and value written into their slot column:
  one kernel where the step ran RoPE plus two indexed writes.
- `silu_mul`: SiLU(gate) * up from the fused gate/up GEMM's output, one kernel instead of two.

They run inside CUDA graphs, so only their GPU time counts. Without CUDA they run in Triton's interpreter
(TRITON_INTERPRET=1, set before this module is imported), which is how the CPU tests check them against
transformers' forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Split-KV sizing: chunks of at least MIN_CHUNK columns, doubled while the (row, KV head, chunk) programs
# outnumber MAX_PROGRAMS (about 8 per SM of an H100; more only adds partial results to combine).
MIN_CHUNK = 32
MAX_PROGRAMS = 1024


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, keys_ptr, values_ptr,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cb, s_slot, s_head, s_col,
    NQ: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)  # 0..NQ-1: a query head; NQ..: a KV head
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    c1 = tl.load(cos_ptr + row * s_cb + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + row * s_cb + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + row * s_cb + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + row * s_cb + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if head < NQ:
        q_src = q_ptr + row * s_qb + head * s_qh
        q1 = tl.load(q_src + d, mask=mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_src + HALF + d, mask=mask, other=0.0).to(tl.float32)
        q_dst = q_out_ptr + (row * NQ + head) * (2 * HALF)  # (b, NQ, head_dim) contiguous
        tl.store(q_dst + d, (q1 * c1 - q2 * s1).to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(q_dst + HALF + d, (q2 * c2 + q1 * s2).to(q_out_ptr.dtype.element_ty), mask=mask)
    else:  # (each branch names its own variables: compiled Triton wants one type per name across branches)
        kv = head - NQ
        pos = tl.load(pos_ptr + row)
        k_src = k_ptr + row * s_kb + kv * s_kh
        k1 = tl.load(k_src + d, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_src + HALF + d, mask=mask, other=0.0).to(tl.float32)
        column = row * s_slot + kv * s_head + pos * s_col  # row i lives in slot i
        tl.store(keys_ptr + column + d, (k1 * c1 - k2 * s1).to(keys_ptr.dtype.element_ty), mask=mask)
        tl.store(keys_ptr + column + HALF + d, (k2 * c2 + k1 * s2).to(keys_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + row * s_vb + kv * s_vh
        tl.store(values_ptr + column + d, tl.load(v_src + d, mask=mask, other=0.0), mask=mask)
        tl.store(values_ptr + column + HALF + d, tl.load(v_src + HALF + d, mask=mask, other=0.0), mask=mask)


def rope_store(q, k, v, cos, sin, pos, keys, values) -> torch.Tensor:
    """q (b, heads, dim), k and v (b, kv_heads, dim) (strided views are fine; the last dim contiguous);
    cos, sin (b, dim) as the model's rotary embedding gives them (rotate-half layout); pos (b,). Writes the
    rotated key and the value of row i at keys/values[i, :, pos[i]] and returns the rotated queries
    (b, heads, dim), contiguous."""
    b, nq, dim = q.shape
    nkv = k.shape[1]
    if dim % 2 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos.stride(-1) != 1:
        raise ValueError("rope_store: an even head dim, contiguous in memory")
    q_out = torch.empty((b, nq, dim), dtype=q.dtype, device=q.device)
    half = dim // 2
    _rope_store_kernel[(b, nq + nkv)](
        q, k, v, cos, sin, pos, q_out, keys, values,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2),
        NQ=nq, HALF=half, BLOCK=triton.next_power_of_2(half),
    )  # fmt: skip
    return q_out


@triton.jit
def _attention_chunk_kernel(
    q_ptr, keys_ptr, values_ptr, pos_ptr, part_out_ptr, part_lse_ptr, scale_log2,
    s_slot, s_head, s_col,
    NKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (row, KV head)
    split = tl.program_id(1)
    row = pid // NKV
    kv = pid % NKV
    pos = tl.load(pos_ptr + row)
    start = split * CHUNK
    if start <= pos:  # chunks past the row's own position have nothing to read
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gmask = g < G
        dmask = d < D
        # the KV head's G query heads, rows of one block: q is (b, NKV * G, D) contiguous
        q = tl.load(q_ptr + ((row * NKV + kv) * G + g)[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        base = row * s_slot + kv * s_head
        for offset in range(0, CHUNK, BLOCK_N):
            cols = start + offset + tl.arange(0, BLOCK_N)
            cmask = cols <= pos
            tile = base + cols[:, None] * s_col + d[None, :]
            k = tl.load(keys_ptr + tile, mask=cmask[:, None] & dmask[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # base-2 logits
            scores = tl.where(cmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))  # finite: the chunk's first column is <= pos
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(values_ptr + tile, mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        part = ((row * NKV + kv) * SPLITS + split) * BLOCK_G + g
        tl.store(part_out_ptr + part[:, None] * D + d[None, :], acc / total[:, None], mask=gmask[:, None] & dmask[None, :])
        tl.store(part_lse_ptr + part, m + tl.log2(total), mask=gmask)


@triton.jit
def _attention_combine_kernel(
    part_out_ptr, part_lse_ptr, pos_ptr, out_ptr,
    NKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv = head // G
    g = head % G
    pos = tl.load(pos_ptr + row)
    s = tl.arange(0, BLOCK_S)
    smask = s <= pos // CHUNK  # the chunks this row's columns reach
    part = ((row * NKV + kv) * SPLITS + s) * BLOCK_G + g
    lse = tl.load(part_lse_ptr + part, mask=smask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    o = tl.load(part_out_ptr + part[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(out_ptr + (row * NKV * G + head) * D + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def chunk_size(rows: int, kv_heads: int, length: int) -> int:
    """Columns per split: the smallest power of two >= MIN_CHUNK that keeps the programs <= MAX_PROGRAMS."""
    chunk = MIN_CHUNK
    while rows * kv_heads * triton.cdiv(length, chunk) > MAX_PROGRAMS and chunk < length:
        chunk *= 2
    return chunk


def decode_attention(q, keys, values, pos, scale: float, length: int) -> torch.Tensor:
    """One new token per row: q (b, heads, dim) contiguous; keys/values the KV slots (slots, kv_heads,
    max_len, dim), row i in slot i; row i attends columns 0..pos[i] (all < `length`). Returns (b, heads * dim)."""
    b, nq, dim = q.shape
    nkv = keys.shape[1]
    if nq % nkv or not q.is_contiguous() or keys.stride(-1) != 1 or keys.stride() != values.stride():
        raise ValueError("decode_attention: heads a multiple of KV heads, contiguous q, keys and values alike")
    group = nq // nkv
    chunk = chunk_size(b, nkv, length)
    splits = triton.cdiv(length, chunk)
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(dim))
    part_out = torch.empty((b * nkv * splits * block_g, dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((b * nkv * splits * block_g,), dtype=torch.float32, device=q.device)
    _attention_chunk_kernel[(b * nkv, splits)](
        q, keys, values, pos, part_out, part_lse, scale * 1.4426950408889634,  # log2(e): exp via exp2
        keys.stride(0), keys.stride(1), keys.stride(2),
        NKV=nkv, G=group, BLOCK_G=block_g, D=dim, BLOCK_D=block_d, CHUNK=chunk, BLOCK_N=min(chunk, 64), SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32 rounding)
    )  # fmt: skip
    out = torch.empty((b, nq * dim), dtype=q.dtype, device=q.device)
    _attention_combine_kernel[(b, nq)](
        part_out, part_lse, pos, out,
        NKV=nkv, G=group, BLOCK_G=block_g, D=dim, BLOCK_D=block_d, CHUNK=chunk, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, s_xb, s_ob, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < INTER
    gate = tl.load(x_ptr + row * s_xb + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * s_xb + INTER + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_ob + c, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """SiLU(gate_up[:, :inter]) * gate_up[:, inter:], (b, inter)."""
    b = gate_up.shape[0]
    if gate_up.stride(-1) != 1 or gate_up.shape[1] != 2 * inter:
        raise ValueError("silu_mul: (b, 2 * inter), contiguous rows")
    out = torch.empty((b, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block)
    return out
