"""GPU: the cuDNN SDPA NaN trap is avoided, and a LoRA step on the real 1B layout gives finite gradients."""

import pytest
import torch

pytestmark = pytest.mark.gpu

# 3776 = 29 * 128 + 64: a padded length of 64 mod 128, where the cuDNN SDPA backward of torch 2.11+ on
# H100/H200 returns NaN gradients when an attention mask is passed (pytorch#196678); a naive LoRA run
# on this shape went NaN at step 28 with exactly this length.
NAN_LENGTH = 3776


def _lora_1b():
    from peft import LoraConfig, get_peft_model

    from internvl_worker.registry import LORA_LLM_QKV
    from internvl_worker.tiny import random_model

    model, _ = random_model("internvl3-1b")
    model = model.to("cuda", torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=LORA_LLM_QKV, task_type="CAUSAL_LM"))


def _grads_finite(model) -> bool:
    torch.manual_seed(0)
    input_ids = torch.randint(10, 400, (2, NAN_LENGTH), device="cuda")
    mask = torch.ones_like(input_ids)
    mask[1, 3000:] = 0  # the second row is padding after 3000 tokens
    labels = input_ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return bool(torch.isfinite(out.loss)) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cudnn_sdpa_nan_length_is_guarded():
    from internvl_worker.train import setup_numerics

    model = _lora_1b()
    torch.backends.cuda.enable_cudnn_sdp(True)
    unguarded = _grads_finite(model)
    setup_numerics()
    guarded = _grads_finite(model)
    print(f"padded length {NAN_LENGTH}: gradients finite with cuDNN SDPA: {unguarded}; with our setting: {guarded}")
    assert guarded
    assert not torch.backends.cuda.cudnn_sdp_enabled()
