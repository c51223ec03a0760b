"""Model registry: the seed's model types and the newer InternVL families.

Each entry says where the weights live, which chat template and default system prompt the model was
trained with, which layers LoRA adapts by default, and how many 448-px tiles an image may use.

All models run through transformers' native `InternVLForConditionalGeneration`. Original-format
checkpoints (InternVL-Chat-V1.5, Mini-InternVL, InternVL2/2.5) are converted once with
`internvl convert`; their InternLM2 `wqkv` is split into q/k/v projections there, so the default LoRA
targets below use the native names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Default system prompts, as the models were trained (InternVL's conversation.py / ms-swift templates).
SYSTEM_INTERNLM2 = "You are an AI assistant whose name is InternLM (书生·浦语)."
SYSTEM_PHI3 = "You are an AI assistant whose name is Phi-3."
SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_INTERNVL2_5 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# LoRA targets. The seed's default adapts only the LLM's attention input projections (qkv); `ALL`
# adapts every linear layer, vision tower included, except the output head.
LORA_LLM_QKV = r".*language_model.*\.(q_proj|k_proj|v_proj|qkv_proj)$"
LORA_ALL = "ALL"


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hub_id: str
    template: str  # a name in templates.TEMPLATES
    system: str | None = None  # default system prompt; None = the template sends none
    llm: str = "qwen2"  # language model family after conversion: qwen2 | llama | phi3
    native: bool = False  # the hub checkpoint is already transformers-native (-hf)
    max_tiles: int = 12  # InternVL's max_dynamic_patch
    lora_targets: str = LORA_LLM_QKV
    quantization: str | None = None  # "int8": bitsandbytes 8-bit weights (merging refused)
    tags: tuple[str, ...] = field(default_factory=tuple)


def _spec(model_type: str, hub_id: str, template: str, system: str | None, llm: str, **kw) -> ModelSpec:
    return ModelSpec(model_type=model_type, hub_id=hub_id, template=template, system=system, llm=llm, **kw)


def _build_registry() -> dict[str, ModelSpec]:
    specs = [
        # The seed's four model types (ms-swift 2.1).
        _spec("internvl-chat-v1_5", "OpenGVLab/InternVL-Chat-V1-5", "internlm2", SYSTEM_INTERNLM2, "llama"),
        _spec(
            "internvl-chat-v1_5-int8",
            "OpenGVLab/InternVL-Chat-V1-5-int8",
            "internlm2",
            SYSTEM_INTERNLM2,
            "llama",
            quantization="int8",
        ),
        _spec("mini-internvl-chat-2b-v1_5", "OpenGVLab/Mini-InternVL-Chat-2B-V1-5", "internlm2", SYSTEM_INTERNLM2, "llama"),
        _spec("mini-internvl-chat-4b-v1_5", "OpenGVLab/Mini-InternVL-Chat-4B-V1-5", "phi3", SYSTEM_PHI3, "phi3"),
    ]
    # InternVL2: the LLM decides the template (InternVL's conversation.py).
    internvl2 = {
        "1b": ("hermes2", "qwen2"),
        "2b": ("internlm2", "llama"),
        "4b": ("phi3", "phi3"),
        "8b": ("internlm2", "llama"),
        "26b": ("internlm2", "llama"),
        "40b": ("hermes2", "llama"),
        "76b": ("hermes2", "llama"),
    }
    for size, (template, llm) in internvl2.items():
        hub = "OpenGVLab/InternVL2-Llama3-76B" if size == "76b" else f"OpenGVLab/InternVL2-{size.upper()}"
        name = "internvl2-llama3-76b" if size == "76b" else f"internvl2-{size}"
        specs.append(_spec(name, hub, template, SYSTEM_INTERNVL2, llm))
    for size, llm in {"1b": "qwen2", "2b": "llama", "4b": "qwen2", "8b": "llama", "26b": "llama", "38b": "qwen2", "78b": "qwen2"}.items():
        specs.append(_spec(f"internvl2_5-{size}", f"OpenGVLab/InternVL2_5-{size.upper()}", "internvl2_5", SYSTEM_INTERNVL2_5, llm))
    # InternVL3 and 3.5 publish transformers-native checkpoints (-hf / -HF).
    for size, llm in {"1b": "qwen2", "2b": "qwen2", "8b": "qwen2", "9b": "llama", "14b": "qwen2", "38b": "qwen2", "78b": "qwen2"}.items():
        specs.append(
            _spec(f"internvl3-{size}", f"OpenGVLab/InternVL3-{size.upper()}-hf", "internvl2_5", SYSTEM_INTERNVL2_5, llm, native=True)
        )
    for size in ("1b", "2b", "4b", "8b", "14b", "38b"):
        specs.append(
            _spec(f"internvl3_5-{size}", f"OpenGVLab/InternVL3_5-{size.upper()}-HF", "internvl2_5", None, "qwen2", native=True)
        )
    # A random model of a few MB, built locally by `internvl tiny` (tests, demo, operator e2e).
    # 4 tiles at most keeps its CPU runs short (5 x 16 = 80 image tokens per image).
    specs.append(_spec("internvl-tiny", "", "internvl2_5", "You are a tiny test model.", "qwen2", native=True, max_tiles=4))
    return {s.model_type: s for s in specs}


MODELS: dict[str, ModelSpec] = _build_registry()

# Written next to checkpoints we create (tiny, converted, merged) so a directory names its model type.
META_FILE = "internvl_worker.json"


class UnknownModelType(ValueError):
    pass


def get_model_spec(model_type: str) -> ModelSpec:
    try:
        return MODELS[model_type]
    except KeyError:
        close = [m for m in MODELS if model_type.split("-")[0] in m][:5]
        hint = f" Close: {', '.join(close)}." if close else ""
        raise UnknownModelType(
            f"unknown --model_type {model_type!r}.{hint} Run `internvl models` for the {len(MODELS)} known types."
        ) from None


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_meta(model_dir: str | Path, **fields) -> None:
    meta = read_meta(model_dir)
    meta.update(fields)
    (Path(model_dir) / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def resolve_model_type(model_type: str | None, model_dir: str | Path | None) -> ModelSpec:
    """The explicit --model_type wins; else the type recorded in the checkpoint directory."""
    if model_type:
        return get_model_spec(model_type)
    if model_dir is not None:
        recorded = read_meta(model_dir).get("model_type")
        if recorded:
            return get_model_spec(recorded)
    where = f" and {model_dir}/{META_FILE} names none" if model_dir else ""
    raise UnknownModelType(f"--model_type is required{where}. Run `internvl models` for the known types.")
