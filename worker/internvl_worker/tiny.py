"""A tiny random InternVL (about 1 MB) built from a config, for tests, the demo and operator e2e runs.

Same architecture as the real models (InternViT -> pixel shuffle -> MLP projector -> Qwen2), only
small: 32-px tiles with 4-px patches give (32/4)^2 = 64 patches, and the 0.5 pixel shuffle leaves
64 * 0.5^2 = 16 image tokens per tile (the real 448/14 ViT gives 256). The tokenizer is a byte-level
BPE trained here on a fixed word list, so it encodes any text, and it carries the image tokens that
transformers' InternVL expects. Nothing is downloaded and nothing is committed: it is rebuilt on demand.
"""

from __future__ import annotations

import json
from pathlib import Path

from .registry import write_meta

TILE_SIZE = 32
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
]  # fmt: skip
_WORDS = """
the a an is are was this that image picture photo shows what which color colour dominant main of in on
red green blue yellow white black orange purple pink gray grey brown cyan magenta square circle stripe
left right top bottom center large small one two three four five six seven eight nine ten zero
describe answer question please tell me you i it there here how many where who why when yes no
cat dog sheep road city distance kilometers poem text ocr model assistant user system hello world
"""


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _WORDS.split()
    corpus = [" ".join(words[i : i + 12]) + "." for i in range(0, len(words), 3)] + [w.capitalize() for w in words]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        model_max_length=4096,
    )


# Model shapes. "tiny" is for CPU tests; "internvl3-1b" is the real InternVL3-1B layout (InternViT-300M
# + Qwen2-0.5B, 0.94B parameters) with random weights, for GPU benchmarks: speed does not depend on values.
SHAPES = {
    "tiny": {
        "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=TILE_SIZE, patch_size=4),
        # initializer_range wider than the usual 0.02 so that a random model's greedy output varies from
        # token to token, which makes stream-vs-batch and merge-vs-adapter comparisons meaningful.
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3),
        "vocab_size": None,  # = the tokenizer's
        "model_type": "internvl-tiny",
    },
    "internvl3-1b": {
        "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448, patch_size=14),
        "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0),
        "vocab_size": 151_674,
        "model_type": "internvl3-1b",
    },
}


def random_model(shape: str = "tiny", *, seed: int = 0, tokenizer=None):
    """(model, tokenizer): a randomly initialised InternVL of the given shape, in fp32 on the CPU."""
    import torch
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    s = SHAPES[shape]
    tokenizer = tokenizer or _train_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = InternVLVisionConfig(**s["vision"])
    text = Qwen2Config(
        vocab_size=s["vocab_size"] or len(tokenizer),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **s["text"],
    )
    size, patch = s["vision"]["image_size"], s["vision"]["patch_size"]
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(size // patch) ** 2 // 4,  # pixel shuffle 0.5: 4 patches -> 1 token
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    return model, tokenizer


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, shape: str = "tiny") -> Path:
    """Write a complete checkpoint directory (config, safetensors, tokenizer, image processor)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = random_model(shape, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = SHAPES[shape]["vision"]["image_size"]
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "GotOcr2ImageProcessorPil",
                "crop_to_patches": True,
                "min_patches": 1,
                "max_patches": 12,
                "size": {"height": size, "width": size},
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            },
            indent=2,
        )
    )
    write_meta(out, model_type=SHAPES[shape]["model_type"])
    return out
