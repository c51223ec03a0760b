"""Our own Triton decode kernels (serve/kernels.py) against plain PyTorch, in fp32: on a CPU machine in
Triton's interpreter (tests/conftest.py turns it on; it has no bfloat16), on a GPU compiled (fp32 dots in
IEEE precision, not TF32). tests/gpu/test_serve_graphs.py checks the bf16 step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def kernels():
    from internvl_worker.serve import kernels as module

    torch.set_default_device(DEVICE)
    yield module
    torch.set_default_device("cpu")


def _reference_attention(q, keys, values, pos, scale):
    """Row i's query heads over its slot's columns 0..pos[i], keys repeated per query head."""
    group = q.shape[1] // keys.shape[1]
    out = []
    for i, p in enumerate(pos.tolist()):
        k = keys[i, :, : p + 1].repeat_interleave(group, 0)
        v = values[i, :, : p + 1].repeat_interleave(group, 0)
        out.append(torch.softmax(q[i][:, None] @ k.transpose(-1, -2) * scale, -1) @ v)
    return torch.stack(out).reshape(q.shape[0], -1)


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (14, 2, 64), (4, 4, 24)])
def test_split_kv_attention_equals_softmax_attention(kernels, heads, kv_heads, dim):
    """Rows at positions on and around chunk edges (32-column chunks at length 256), the first column, the
    last of the bucket; a query group that is not a power of two (7) and a head dim that is not (24)."""
    torch.manual_seed(0)
    pos = torch.tensor([0, 31, 32, 100, 255])
    keys = torch.randn(6, kv_heads, 300, dim)
    values = torch.randn(6, kv_heads, 300, dim)
    q = torch.randn(len(pos), heads, dim)
    assert kernels.chunk_size(len(pos), kv_heads, 256) == 32  # several chunks to combine
    out = kernels.decode_attention(q, keys, values, pos, 0.3, 256)
    torch.testing.assert_close(out, _reference_attention(q, keys, values, pos, 0.3), **TOL)
    # columns past a row's position are never read: garbage there changes nothing
    keys[:, :, 256:] = float("nan")
    keys[0, :, 1:] = float("nan")
    torch.testing.assert_close(kernels.decode_attention(q, keys, values, pos, 0.3, 256), out)


def test_chunks_grow_with_the_batch_to_bound_the_programs(kernels):
    assert kernels.chunk_size(1, 2, 1024) == 32  # batch 1: 64 programs of 32 columns
    assert kernels.chunk_size(64, 2, 1024) == 128  # 64 rows: 1,024 programs
    assert kernels.chunk_size(256, 8, 256) == 256  # never past the length


def test_rope_store_rotates_and_writes_the_slot_column(kernels):
    """Queries and keys as transformers' Llama RoPE rotates them; the key and value land at column pos[i] of
    slot i and nothing else in the cache changes."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(1)
    b, heads, kv_heads, dim = 3, 8, 2, 16
    qkv = torch.randn(b, (heads + 2 * kv_heads) * dim)  # strided views into one GEMM output, as in a step
    q = qkv[:, : heads * dim].view(b, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(b, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(b, kv_heads, dim)
    cos, sin = torch.randn(b, dim), torch.randn(b, dim)
    pos = torch.tensor([4, 0, 9])
    keys, values = torch.randn(4, kv_heads, 12, dim), torch.randn(4, kv_heads, 12, dim)
    before_k, before_v = keys.clone(), values.clone()
    q_rot = kernels.rope_store(q, k, v, cos, sin, pos, keys, values)
    ref_q, ref_k = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None])
    torch.testing.assert_close(q_rot, ref_q[:, :, 0], **TOL)
    for i, p in enumerate(pos.tolist()):
        torch.testing.assert_close(keys[i, :, p], ref_k[i, :, 0], **TOL)
        torch.testing.assert_close(values[i, :, p], v[i])
        keys[i, :, p], values[i, :, p] = before_k[i, :, p], before_v[i, :, p]
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)


def test_silu_mul(kernels):
    x = torch.randn(5, 2 * 1100)  # two blocks of 1,024, the second partial
    torch.testing.assert_close(kernels.silu_mul(x, 1100), torch.nn.functional.silu(x[:, :1100]) * x[:, 1100:], **TOL)
    with pytest.raises(ValueError, match="silu_mul"):
        kernels.silu_mul(x[:, :100], 1100)
