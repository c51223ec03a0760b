"""`internvl convert`: an original-format checkpoint becomes a native one with the same outputs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from internvl_worker.cli import main
from internvl_worker.convert import split_internlm2_wqkv
from internvl_worker.infer import prepare_inputs
from internvl_worker.modeling import load_model
from internvl_worker.templates import Conversation


def to_original(native_state: dict, *, internlm2: bool, heads: int, kv_heads: int) -> dict:
    """Write a native state dict in InternVL's original layout (what OpenGVLab publishes)."""
    out = {}
    for key, value in native_state.items():
        if key.startswith("model.vision_tower."):
            k = "vision_model." + key[len("model.vision_tower.") :]
            k = k.replace(".layer.", ".layers.").replace("embeddings.cls_token", "embeddings.class_embedding")
            k = k.replace("embeddings.position_embeddings", "embeddings.position_embedding").replace("patch_embeddings.projection", "patch_embedding")
            k = k.replace("lambda_1", "ls1").replace("lambda_2", "ls2").replace("attention.projection_layer", "attn.proj")
            k = k.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2").replace(".attention.", ".attn.")
            if ".attn.q_proj." in k:
                kind = k.rsplit(".", 1)[1]
                base = key.rsplit(".", 1)[0].rsplit(".", 1)[0]
                parts = [native_state[f"{base}.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj") if f"{base}.{n}.{kind}" in native_state]
                out[k.replace(".attn.q_proj.", ".attn.qkv.")] = torch.cat(parts)
            elif ".attn.k_proj." in k or ".attn.v_proj." in k:
                continue
            else:
                out[k] = value
        elif key.startswith("model.multi_modal_projector."):
            k = key.replace("model.multi_modal_projector.", "mlp1.").replace("layer_norm", "0").replace("linear_1", "1").replace("linear_2", "3")
            out[k] = value
        elif key == "lm_head.weight":
            out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = value
        else:
            k = "language_model.model." + key[len("model.language_model.") :]
            if internlm2:
                if ".self_attn.q_proj." in k:
                    base = key.replace(".self_attn.q_proj.weight", ".self_attn")
                    q, kk, v = (native_state[f"{base}.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj"))
                    hd = q.shape[0] // heads
                    groups = heads // kv_heads
                    # InternLM2's wqkv rows: for each kv head, its `groups` query heads, then its k, then its v.
                    rows = []
                    for h in range(kv_heads):
                        rows += [q[(h * groups + g) * hd : (h * groups + g + 1) * hd] for g in range(groups)]
                        rows += [kk[h * hd : (h + 1) * hd], v[h * hd : (h + 1) * hd]]
                    out[k.replace(".self_attn.q_proj.", ".attention.wqkv.")] = torch.cat(rows)
                    continue
                if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
                    continue
                k = k.replace("embed_tokens", "tok_embeddings").replace("self_attn.o_proj", "attention.wo")
                k = k.replace("mlp.gate_proj", "feed_forward.w1").replace("mlp.down_proj", "feed_forward.w2").replace("mlp.up_proj", "feed_forward.w3")
                k = k.replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm")
            out[k] = value
    return out


def test_wqkv_split_recovers_each_head():
    heads, kv, hd, dim = 4, 2, 3, 5
    q = torch.arange(heads * hd * dim, dtype=torch.float32).reshape(heads * hd, dim)
    k = -torch.arange(kv * hd * dim, dtype=torch.float32).reshape(kv * hd, dim) - 1
    v = 1000 + torch.arange(kv * hd * dim, dtype=torch.float32).reshape(kv * hd, dim)
    fused = torch.cat([q[0:3], q[3:6], k[0:3], v[0:3], q[6:9], q[9:12], k[3:6], v[3:6]])  # kv head 0, then 1
    q2, k2, v2 = split_internlm2_wqkv(fused, num_heads=heads, num_kv_heads=kv, head_dim=hd)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("internlm2", [False, True], ids=["qwen2", "internlm2"])
def test_convert_gives_the_same_logits(tmp_path, internlm2):
    from transformers import LlamaConfig

    from internvl_worker.tiny import random_model

    model, tokenizer = random_model("tiny", seed=3)
    if internlm2:  # an InternLM2-style LM is a Llama after conversion: rebuild the tiny model with one
        from transformers import InternVLForConditionalGeneration

        text = model.config.text_config
        config = model.config
        config.text_config = LlamaConfig(**{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")}, tie_word_embeddings=False, initializer_range=0.3)
        config.tie_word_embeddings = False
        torch.manual_seed(3)
        model = InternVLForConditionalGeneration(config).eval()
    text = model.config.text_config
    original_dir = tmp_path / "original"
    original_dir.mkdir()
    save_file({k: t.clone().contiguous() for k, t in to_original(model.state_dict(), internlm2=internlm2, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads).items()}, original_dir / "model.safetensors")
    tokenizer.save_pretrained(original_dir)
    v = model.config.vision_config
    llm_config = {"architectures": ["InternLM2ForCausalLM" if internlm2 else "Qwen2ForCausalLM"], **{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps")}, "tie_word_embeddings": not internlm2}
    llm_config["rope_theta"] = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", 10000.0)  # as the original configs spell it
    (original_dir / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "template": "internvl2_5", "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
        "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers,
                          "image_size": v.image_size[0], "patch_size": v.patch_size[0], "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm, "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps},
        "llm_config": llm_config,
    }))  # fmt: skip
    # The original format is refused with the command that fixes it.
    with pytest.raises(Exception, match="internvl convert"):
        load_model(original_dir, model_type="internvl-tiny", dtype="fp32")
    assert main(["convert", "--model_id_or_path", str(original_dir), "--output_dir", str(tmp_path / "native"), "--model_type", "internvl-tiny", "--dtype", "fp32"]) == 0
    converted = load_model(tmp_path / "native", dtype="fp32")
    assert converted.spec.model_type == "internvl-tiny"
    from PIL import Image

    conv = Conversation(turns=[("What color?", None)], images=[Image.new("RGB", (50, 30), (200, 10, 10))])
    from internvl_worker.modeling import build_template

    template, _ = build_template(model.config, tokenizer, converted.spec)
    with torch.no_grad():
        expected = model(**prepare_inputs(model, template, conv)).logits
        got = converted.model(**prepare_inputs(converted.model, converted.template, conv)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_convert_refuses_what_it_cannot_read(tmp_path, tiny_model_dir, capsys):
    assert main(["convert", "--model_id_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "x")]) == 2
    assert "already a native InternVL checkpoint" in capsys.readouterr().err
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "llm_config": {"architectures": ["X"]}, "vision_config": {}}))
    (tmp_path / "orig" / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["convert", "--model_id_or_path", str(tmp_path / "orig"), "--output_dir", str(tmp_path / "y")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
