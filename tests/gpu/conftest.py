"""Fixtures of the GPU tests."""

import pytest
import torch


@pytest.fixture
def restore_qwen2(monkeypatch):
    """Liger replaces transformers' Qwen2 RoPE function and module classes process-wide: undo it afterwards, so
    that a later test's model (a compiled one, say) is built from transformers' own classes."""
    from transformers.models.qwen2 import modeling_qwen2

    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, name, getattr(modeling_qwen2, name))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
