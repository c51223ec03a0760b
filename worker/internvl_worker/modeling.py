"""Load an InternVL checkpoint (base, merged, or base + LoRA adapter) with its tokenizer and template.

One code path for every model: transformers' native `InternVLForConditionalGeneration`. A directory in
the original (trust_remote_code) format is refused with the `internvl convert` command that fixes it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .images import ImageTiler
from .registry import ModelSpec, read_meta, resolve_model_type
from .templates import TEMPLATES, Template

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: object  # InternVLForConditionalGeneration, or a peft.PeftModel around one
    template: Template
    tiler: ImageTiler
    spec: ModelSpec
    model_dir: Path
    adapter_dir: Path | None = None


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise ModelLoadError(f"--dtype {name!r}: use one of bf16, fp16, fp32, auto") from None


def attn_implementation(use_flash_attn: bool | None) -> str:
    """flash-attn when asked for and installed; SDPA otherwise (with a warning if it was asked for)."""
    if use_flash_attn:
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        log.warning("--use_flash_attn true but flash-attn is not installed: falling back to SDPA attention")
    return "sdpa"


def default_device_map():
    """All visible GPUs for one process (the seed's 2x30 GB case); one GPU per rank under torchrun."""
    import torch

    if not torch.cuda.is_available():
        return None
    if "LOCAL_RANK" in os.environ:
        return {"": int(os.environ["LOCAL_RANK"])}
    return "auto" if torch.cuda.device_count() > 1 else {"": 0}


def check_model_dir(model_dir: Path) -> None:
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist")
    if not config_path.is_file():
        raise ModelLoadError(f"model directory {str(model_dir)!r} has no config.json")
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "internvl_chat" or "auto_map" in config:
        raise ModelLoadError(
            f"{model_dir} is an original-format (trust_remote_code) InternVL checkpoint; convert it once with "
            f"`internvl convert --model_id_or_path {model_dir} --output_dir {model_dir}-hf`"
        )
    if config.get("model_type") != "internvl":
        raise ModelLoadError(f"{model_dir}/config.json has model_type {config.get('model_type')!r}, not 'internvl'")


# Weights are read from safetensors only: a pickle (`pytorch_model.bin`, `adapter_model.bin`, `.pt`) can
# run code when loaded. INTERNVL_ALLOW_PICKLE=1 is the explicit opt-in for a trusted old checkpoint.
ALLOW_PICKLE_ENV = "INTERNVL_ALLOW_PICKLE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def allow_pickle() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_safetensors(directory: Path, *, what: str, stem: str) -> None:
    """Refuse a model/adapter directory whose weights exist only as pickles (unless allowed)."""
    if allow_pickle() or any(directory.glob(f"{stem}*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{what} {directory} has only pickle weights ({', '.join(pickles[:3])}): they can run code when loaded, "
            f"so they are refused; convert them to safetensors, or set {ALLOW_PICKLE_ENV}=1 if you trust the file"
        )
    raise ModelLoadError(f"{what} {directory} has no {stem}*.safetensors weights")


def _looks_like_hub_id(name: str) -> bool:
    return bool(name) and not name.startswith(("/", ".", "~")) and name.count("/") == 1


def download_model(repo_id: str) -> Path:
    """A hub id into a local snapshot (HF_TOKEN from the environment); a clear error where offline."""
    if not _looks_like_hub_id(repo_id):
        raise ModelLoadError(f"model directory {repo_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:  # offline, gated, missing: one line that says what to do
        raise ModelLoadError(
            f"could not download {repo_id!r} from the hub ({type(e).__name__}); pass --model_id_or_path a local directory"
        ) from None


def resolve_model_source(model_id_or_path, model_type: str | None, *, adapter_dir: Path | None = None) -> tuple[ModelSpec, Path]:
    """(model spec, checked local model directory) from a path or hub id and/or a model type.

    The type is the one given, else the one recorded in the adapter's or model's directory; a hub id
    (or only a type) is downloaded."""
    if model_id_or_path is None and model_type is None:
        raise ModelLoadError("give --model_type, --model_id_or_path (a local model directory) or --ckpt_dir")
    local = model_id_or_path is not None and Path(model_id_or_path).exists()
    if model_id_or_path is not None and not local and not _looks_like_hub_id(str(model_id_or_path)):
        raise ModelLoadError(f"model directory {str(model_id_or_path)!r} does not exist")
    recorded = read_meta(adapter_dir or model_id_or_path).get("model_type") if local else None
    spec = resolve_model_type(model_type or recorded, model_id_or_path if local else None)
    model_dir = Path(model_id_or_path) if local else download_model(model_id_or_path or spec.hub_id)
    check_model_dir(model_dir)
    return spec, model_dir


def resolve_checkpoint(ckpt_dir: str | Path) -> tuple[Path, Path | None, dict]:
    """(base model dir, adapter dir or None, recorded sft args) for a LoRA checkpoint or a full/merged dir."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise ModelLoadError(f"--ckpt_dir {str(ckpt)!r} does not exist")
    args: dict = {}
    for candidate in (ckpt / "sft_args.json", ckpt.parent / "sft_args.json"):
        if candidate.is_file():
            args = json.loads(candidate.read_text())
            break
    if (ckpt / "adapter_config.json").is_file():
        base = args.get("model_id_or_path") or json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{ckpt} is a LoRA adapter but names no base model (sft_args.json / adapter_config.json)")
        return Path(base), ckpt, args
    return ckpt, None, args


def load_model(
    model_id_or_path: str | Path | None = None,
    *,
    model_type: str | None = None,
    ckpt_dir: str | Path | None = None,
    dtype: str | None = "auto",
    use_flash_attn: bool | None = None,
    device_map=None,
    max_length: int | None = None,
    max_tiles: int | None = None,
    merge_adapter: bool = False,
    attn_impl: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer + template + tiler, ready for `inference()` or training."""
    import torch
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    adapter_dir, sft_args = None, {}
    if ckpt_dir is not None:
        base, adapter_dir, sft_args = resolve_checkpoint(ckpt_dir)
        model_id_or_path = model_id_or_path or base
        model_type = model_type or sft_args.get("model_type")
    spec, model_dir = resolve_model_source(model_id_or_path, model_type, adapter_dir=adapter_dir)
    if spec.quantization and dtype not in ("bf16", "bfloat16", "auto", None):
        # ms-swift's note: the int8 v1.5 model gives garbled output or inf/nan unless run in bf16.
        raise ModelLoadError(f"{spec.model_type} must run with --dtype bf16 (fp16 overflows into inf/nan)")

    kwargs = dict(dtype=torch_dtype(dtype), attn_implementation=attn_impl or attn_implementation(use_flash_attn))
    device_map = device_map if device_map is not None else default_device_map()
    if device_map is not None:
        kwargs["device_map"] = device_map
    check_safetensors(model_dir, what="model directory", stem="model")
    if adapter_dir is not None:
        check_safetensors(adapter_dir, what="LoRA adapter", stem="adapter_model")
    if not allow_pickle():
        kwargs["use_safetensors"] = True
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, **kwargs)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template, tiler = build_template(model.config, tokenizer, spec, max_length=max_length, max_tiles=max_tiles)
    return LoadedModel(model=model, template=template, tiler=tiler, spec=spec, model_dir=model_dir, adapter_dir=adapter_dir)


def tile_and_patch(vision_config) -> tuple[int, int]:
    """(tile size, patch size) in pixels from a vision config, which may hold either as an int or a pair."""
    size, patch = vision_config.image_size, vision_config.patch_size
    return (size[0] if isinstance(size, (list, tuple)) else size), (patch[0] if isinstance(patch, (list, tuple)) else patch)


def build_template(config, tokenizer, spec: ModelSpec, *, max_length: int | None = None, max_tiles: int | None = None):
    """The model's template and tiler; tile size and image tokens per tile come from the model config."""
    size, patch = tile_and_patch(config.vision_config)
    per_tile = int((size // patch) ** 2 * config.downsample_ratio**2)  # 256 = (448/14)^2 * 0.5^2
    if per_tile != config.image_seq_length:
        raise ModelLoadError(f"config image_seq_length {config.image_seq_length} != (image_size/patch)^2 * ratio^2 = {per_tile}")
    tiles = max_tiles or int(os.environ.get("MAX_NUM", 0)) or spec.max_tiles
    tiler = ImageTiler(size=size, max_tiles=tiles)
    template = Template(
        TEMPLATES[spec.template], tokenizer, image_seq_length=per_tile, default_system=spec.system, max_length=max_length, tiler=tiler
    )
    return template, tiler
