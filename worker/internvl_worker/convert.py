"""`internvl convert`: an original-format InternVL checkpoint -> transformers' native InternVL.

The original checkpoints (InternVL-Chat-V1.5, Mini-InternVL, InternVL2/2.5; `model_type: internvl_chat`)
ship their own modelling code and need `trust_remote_code`. We never run that code: the config and
safetensors are read as data and renamed into `InternVLForConditionalGeneration`'s layout, so training,
merging and serving have one code path. The renames follow transformers' own converter
(convert_internvl_weights_to_hf.py, which is not shipped in the wheel):

- InternViT: `vision_model.*` -> `model.vision_tower.*`; the fused `attn.qkv` is cut into q/k/v rows
  [0:d), [d:2d), [2d:3d); ls1/ls2 -> lambda_1/lambda_2; norm1/norm2 -> layernorm_before/after.
- Projector: `mlp1.0/1/3` -> `model.multi_modal_projector.layer_norm/linear_1/linear_2`.
- InternLM2 -> Llama: `wqkv` rows are grouped per key/value head as [q x groups, k, v] (each head_dim
  rows), so q/k/v are gathered group by group; wo/w1/w2/w3/norm names map to Llama's.
- Qwen2, Llama and Phi-3 language models keep their names under `model.language_model` / `lm_head`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .fsutil import AtomicDir
from .modeling import ModelLoadError
from .registry import write_meta

LLM_KINDS = {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Phi3ForCausalLM": "phi3"}

_VISION_RENAMES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_INTERNLM2_RENAMES = [
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def map_key(key: str, llm: str) -> str:
    if key.startswith("vision_model."):
        return _rename(key, _VISION_RENAMES)
    if key.startswith("mlp1."):
        return re.sub(r"^mlp1\.(\d)\.", lambda m: f"model.multi_modal_projector.{ {'0': 'layer_norm', '1': 'linear_1', '3': 'linear_2'}[m.group(1)] }.", key)
    if key.startswith("language_model."):
        rest = key[len("language_model.") :]
        if llm == "internlm2":
            rest = _rename(rest, _INTERNLM2_RENAMES)
            if rest.startswith("output."):
                return "lm_head." + rest[len("output.") :]
        if rest.startswith("lm_head."):
            return rest
        if rest.startswith("model."):
            return "model.language_model." + rest[len("model.") :]
    raise ModelLoadError(f"unexpected tensor {key!r} in the original checkpoint")


def split_internlm2_wqkv(w, *, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused wqkv (rows: per kv head, `groups` q heads then k then v) -> (q, k, v)."""
    groups = num_heads // num_kv_heads
    blocks = w.reshape(num_kv_heads, groups + 2, head_dim, w.shape[-1])
    q = blocks[:, :groups].reshape(num_heads * head_dim, -1)
    k = blocks[:, groups].reshape(num_kv_heads * head_dim, -1)
    v = blocks[:, groups + 1].reshape(num_kv_heads * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_state_dict(state: dict, *, llm: str, vision_hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model.") and ".attn.qkv." in key:
            base = map_key(key, llm)
            d = vision_hidden
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (value[:d], value[d : 2 * d], value[2 * d :])):
                out[base.replace(".attention.qkv.", f".attention.{name}.")] = part.contiguous()
        elif llm == "internlm2" and ".attention.wqkv." in key:
            base = map_key(key.replace(".attention.wqkv.", ".attention.WQKV."), llm).replace(".attention.WQKV.", ".self_attn.QKV.")
            q, k, v = split_internlm2_wqkv(value, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[base.replace(".self_attn.QKV.", f".self_attn.{name}.")] = part
        else:
            out[map_key(key, llm)] = value
    return out


def native_config(original: dict, image_token_id: int):
    from transformers import InternVLConfig, LlamaConfig, Phi3Config, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    if original.get("ps_version", "v2") != "v2":
        raise ModelLoadError(f"ps_version {original.get('ps_version')!r}: only the v2 pixel shuffle (InternVL 1.5 and later) has a native equivalent")
    llm_cfg = dict(original["llm_config"])
    arch = (llm_cfg.get("architectures") or ["?"])[0]
    if arch not in LLM_KINDS:
        raise ModelLoadError(f"language model {arch!r} is not supported by the converter (known: {', '.join(LLM_KINDS)})")
    llm = LLM_KINDS[arch]
    v = original["vision_config"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_attention_heads=v["num_attention_heads"],
        num_hidden_layers=v["num_hidden_layers"],
        image_size=v.get("image_size", 448),
        patch_size=v.get("patch_size", 14),
        attention_bias=v.get("qkv_bias", True),
        use_qk_norm=v.get("qk_normalization", False),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act=v.get("hidden_act", "gelu"),
        use_absolute_position_embeddings=True,
    )
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "hidden_act", "sliding_window", "attention_dropout")  # fmt: skip
    text_kwargs = {k: llm_cfg[k] for k in keep if k in llm_cfg}
    text_cls = {"internlm2": LlamaConfig, "llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}[llm]
    if llm == "internlm2":
        text_kwargs.setdefault("attention_bias", bool(llm_cfg.get("bias", False)))
    text = text_cls(**text_kwargs)
    size, patch = vision.image_size[0], vision.patch_size[0]
    ratio = original.get("downsample_ratio", 0.5)
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((size // patch) ** 2 * ratio**2),
        downsample_ratio=ratio,
        vision_feature_layer=original.get("select_layer", -1),
        tie_word_embeddings=bool(llm_cfg.get("tie_word_embeddings", False)),
    )
    return config, llm


def load_original_tensors(src: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickles = sorted(src.glob("*.bin")) + sorted(src.glob("*.pt"))
        hint = " (pickle .bin files are refused: they can run code when loaded; convert them to safetensors first)" if pickles else ""
        raise ModelLoadError(f"{src} has no .safetensors weights{hint}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_tokenizer(src: Path):
    """The checkpoint's tokenizer without its remote code: tokenizer.json, else the sentencepiece model."""
    from transformers import AutoTokenizer, LlamaTokenizerFast

    extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    if (src / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(src, trust_remote_code=False, extra_special_tokens=extra)
    if (src / "tokenizer.model").is_file():
        try:
            return LlamaTokenizerFast(vocab_file=str(src / "tokenizer.model"), legacy=False, extra_special_tokens=extra)
        except Exception as e:  # the sentencepiece conversion needs the `sentencepiece`/`protobuf` packages
            raise ModelLoadError(f"could not read {src}/tokenizer.model without remote code ({type(e).__name__}: {e})") from None
    raise ModelLoadError(f"{src} has no tokenizer.json or tokenizer.model")


def convert_checkpoint(src: str | Path, dst: str | Path, *, model_type: str | None = None, dtype: str = "bf16") -> Path:
    import torch
    from transformers import InternVLForConditionalGeneration

    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{src} has no config.json")
    original = json.loads(config_path.read_text())
    if original.get("model_type") == "internvl":
        raise ModelLoadError(f"{src} is already a native InternVL checkpoint: nothing to convert")
    if original.get("model_type") != "internvl_chat":
        raise ModelLoadError(f"{src}/config.json has model_type {original.get('model_type')!r}, not 'internvl_chat'")
    tokenizer = load_tokenizer(src)
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ModelLoadError(f"{src}'s tokenizer has no <IMG_CONTEXT> token")
    config, llm = native_config(original, image_token_id)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    state = convert_state_dict(
        load_original_tensors(src),
        llm=llm,
        vision_hidden=config.vision_config.hidden_size,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
    )
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"converted weights do not fit the native model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}) of {len(expected)} expected"
        )
    target = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    with AtomicDir(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "GotOcr2ImageProcessorPil",
                    "crop_to_patches": True,
                    "min_patches": 1,
                    "max_patches": original.get("max_dynamic_patch", 12),
                    "size": {"height": config.vision_config.image_size[0], "width": config.vision_config.image_size[0]},
                    "image_mean": [0.485, 0.456, 0.406],
                    "image_std": [0.229, 0.224, 0.225],
                },
                indent=2,
            )
        )
        meta = {"converted_from": str(src.resolve()), "original_template": original.get("template")}
        if model_type:
            meta["model_type"] = model_type
        write_meta(tmp, **meta)
    return dst
