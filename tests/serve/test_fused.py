"""The fused decode layers (serve/fused.py): the same logits as the model's own forward, for each covered
architecture, without storing any weight twice; and a clear reason where they cannot run."""

from __future__ import annotations

import os

import pytest
import torch

from internvl_worker.serve import fused, slots

from serve.test_slots import check_steps_against_forward  # tests/ is on sys.path (pytest prepend mode)


def _internvl(text_config):
    """A tiny InternVL around the given language-model config (random weights, fp32, CPU)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=4)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(InternVLConfig(vision_config=vision, text_config=text_config, image_token_id=5, image_seq_length=16)).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def _text_config(arch: str, **over):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=1024)
    if arch == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, **over)
    if arch == "qwen3":  # q/k norms, head_dim apart from hidden/heads
        return Qwen3Config(**common, head_dim=16, **over)
    if arch == "llama-bias":  # attention and MLP biases, including o_proj and down_proj
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True, **over)
    return LlamaConfig(**common, **over)


@pytest.mark.parametrize("own_kernels", [False, True], ids=["aten", "triton"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", "llama-bias"])
def test_fused_step_equals_the_model_forward(arch, own_kernels):
    """Two rows of different lengths, three steps, then a compaction: each step's logits equal a no-cache
    forward of the model, and the fused path is the one that ran (with our own Triton kernels: in the
    interpreter on a CPU machine)."""
    if own_kernels:
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine: kernels compile for CUDA tensors only
            pytest.skip("our Triton kernels on CPU tensors run in the interpreter (CPU machines); tests/gpu runs them compiled")
    model = _internvl(_text_config(arch))
    lm = model.model.language_model
    dec = slots.SlotDecoder(model, slots=3, max_len=300, use_graphs=False, triton=own_kernels)
    assert dec.fused is not None, dec.fused_why
    assert (dec.fused.kernels is not None) == own_kernels, dec.triton_why
    # the modules' weights are views into the fused tensors: nothing is stored twice
    first = dec.fused.layers[0]
    attn, mlp = lm.layers[0].self_attn, lm.layers[0].mlp
    assert attn.k_proj.weight.untyped_storage().data_ptr() == first.qkv_w.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == first.gate_up_w.untyped_storage().data_ptr()
    check_steps_against_forward(model, dec)


def test_fused_and_transformers_layers_agree_on_the_same_slots():
    """The same decoder state through both step paths (fused=False is transformers' layers)."""
    model = _internvl(_text_config("qwen2"))
    a = slots.SlotDecoder(model, slots=4, max_len=256, use_graphs=False)
    b = slots.SlotDecoder(model, slots=4, max_len=256, use_graphs=False, fused=False)
    assert a.fused is not None and b.fused is None and b.fused_why == "turned off"
    torch.manual_seed(1)
    with torch.inference_mode():
        for layer_a, layer_b in zip(a.layers, b.layers):  # same random prompt caches in both (a has a scratch slot more)
            layer_b.keys.copy_(layer_a.keys.normal_()[: a.slots])
            layer_b.values.copy_(layer_a.values.normal_()[: a.slots])
        tokens, positions = [3, 50, 7], [10, 0, 33]
        torch.testing.assert_close(a.step(tokens, positions).clone(), b.step(tokens, positions).clone(), rtol=1e-4, atol=1e-4)
        for layer_a, layer_b in zip(a.layers, b.layers):  # and both wrote the same new keys/values
            torch.testing.assert_close(layer_a.keys[: a.slots], layer_b.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer_a.values[: a.slots], layer_b.values, rtol=1e-5, atol=1e-5)


def test_unsupported_language_models_say_why():
    sliding = _internvl(_text_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1))
    why = fused.unsupported(sliding.model.language_model)
    assert why is not None and "sliding_attention" in why
    dec = slots.SlotDecoder(sliding, slots=2, max_len=256, use_graphs=False)
    assert dec.fused is None and dec.fused_why == why  # it decodes through transformers' layers instead

    dynamic = _internvl(_text_config("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    assert "RoPE type 'dynamic'" in fused.unsupported(dynamic.model.language_model)

    assert "'dynamic'" in slots.SlotDecoder(dynamic, slots=1, max_len=256, use_graphs=False, triton=True).triton_why
    gelu = _internvl(_text_config("llama", hidden_act="gelu"))
    assert "activation 'gelu'" in fused.unsupported(gelu.model.language_model)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_internvl(_text_config("qwen2")), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "not plain nn.Linear" in fused.unsupported(lora.get_base_model().model.language_model)
    with pytest.raises(ValueError, match="fused decode layers: layer 0: projections are not plain nn.Linear"):
        fused.FusedLayers(lora.get_base_model().model.language_model)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama-bias"])
def test_fused_prefill_writes_the_cache_transformers_would(arch):
    """Two right-padded prompts prefilled straight into slots 1 and 2: last-token logits and every layer's
    keys/values equal transformers' forward with a DynamicCache; a decode step after it is right too."""
    from transformers.cache_utils import DynamicCache

    model = _internvl(_text_config(arch))
    emb = model.get_input_embeddings()
    dec = slots.SlotDecoder(model, slots=3, max_len=64, use_graphs=False)
    prompts = [[5, 9, 13, 2, 7, 30, 31], [8, 3, 22]]
    embeds = torch.zeros(2, 7, model.config.text_config.hidden_size)
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            embeds[i, : len(p)] = emb(torch.tensor(p))
        logits = dec.prefill(embeds, 1, [len(p) - 1 for p in prompts])
        for i, p in enumerate(prompts):
            cache = DynamicCache()
            ref = model(input_ids=torch.tensor([p]), use_cache=True, cache=cache).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
            for layer, ref_layer in zip(dec.layers, cache.layers):
                torch.testing.assert_close(layer.keys[1 + i, :, : len(p)], ref_layer.keys[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(layer.values[1 + i, :, : len(p)], ref_layer.values[0], rtol=1e-4, atol=1e-4)
        # decode on from slot 2 (the shorter prompt, written over padding columns)
        dec.compact([2], used_columns=len(prompts[1]))
        step = dec.step([44], [len(prompts[1])]).clone()
        ref = model(input_ids=torch.tensor([prompts[1] + [44]])).logits[0, -1]
        torch.testing.assert_close(step[0], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="over 3 slots"):
        dec.prefill(embeds, 2, [6, 2])


def test_liger_norms_only_for_llama_style_rmsnorm():
    """Liger's RMSNorm (Llama casting, no offset) replaces only the norms it equals; others keep their code."""
    class OffsetRMSNorm(torch.nn.Module):  # e.g. Gemma's x * (1 + weight)
        pass

    odd = OffsetRMSNorm()
    assert fused._liger_norm(odd) is odd
    assert fused._LLAMA_NORMS >= {"Qwen2RMSNorm", "LlamaRMSNorm", "Qwen3RMSNorm"}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama-bias"])
def test_chunked_prefill_equals_one_prefill(arch):
    """A 23-token prompt prefilled in chunks of 7, 7, 7 and 2 into the scratch slot, then moved into slot 1,
    holds the keys/values and gives the last-token logits of the whole prompt prefilled at once (slot 0) and
    of transformers' forward; decoding on from slot 1 gives the forward's next logits."""
    model = _internvl(_text_config(arch))
    emb = model.get_input_embeddings()
    dec = slots.SlotDecoder(model, slots=2, max_len=64, use_graphs=False)
    assert dec.scratch == 2 and dec.layers[0].keys.shape[0] == 3  # one slot more than decode rows
    prompt = [(7 * i + 3) % 110 + 5 for i in range(23)]
    with torch.inference_mode():
        embeds = emb(torch.tensor(prompt))
        whole = dec.prefill(embeds[None], 0, [len(prompt) - 1])[0]
        chunks = [(0, 7), (7, 14), (14, 21), (21, 23)]
        for start, end in chunks:
            got = dec.prefill_chunk(embeds[start:end], start, last=end == len(prompt))
            assert (got is None) == (end < len(prompt))
        dec.take_scratch(1, len(prompt))
        ref = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for layer in dec.layers:
            torch.testing.assert_close(layer.keys[1, :, :23], layer.keys[0, :, :23], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[1, :, :23], layer.values[0, :, :23], rtol=1e-5, atol=1e-5)
        dec.compact([1], used_columns=len(prompt))
        step = dec.step([44], [len(prompt)]).clone()
        torch.testing.assert_close(step[0], model(input_ids=torch.tensor([prompt + [44]])).logits[0, -1], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match=r"prompt chunk \[60, 70\) over the slot length 64"):
            dec.prefill_chunk(embeds[:10], 60, last=True)
