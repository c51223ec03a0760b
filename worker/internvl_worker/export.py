"""`internvl export --ckpt_dir .../checkpoint-N --merge_lora true`: fold a LoRA adapter into its base.

Writes `<ckpt>-merged` (or `<output_dir>/merged`): the full model in safetensors, the tokenizer, the
image processor config, sft_args.json, and merge_info.json saying what was merged. The directory is built
under a temporary name and renamed into place, so a failed merge leaves earlier outputs intact, and a
complete one is never rewritten (re-running is a no-op, as the operator's retried Jobs need).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .checkpoints import resolve_checkpoint_arg
from .fsutil import AtomicDir, write_json_atomic
from .modeling import ModelLoadError, load_model
from .registry import write_meta

MERGE_INFO = "merge_info.json"


def merged_dir_for(ckpt: Path, output_dir: str | Path | None) -> Path:
    return Path(output_dir) / "merged" if output_dir else ckpt.parent / f"{ckpt.name}-merged"


def merge_lora(ckpt_dir: str | Path, *, output_dir: str | Path | None = None, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Merge the adapter in `ckpt_dir` (`latest` = the newest checkpoint under output_dir)."""
    import torch

    if str(ckpt_dir) == "latest" and output_dir is None:
        raise ModelLoadError("--ckpt_dir latest needs --output_dir (the training run's directory)")
    ckpt = resolve_checkpoint_arg(str(ckpt_dir), output_dir or ".")
    if not (ckpt / "adapter_config.json").is_file():
        raise ModelLoadError(f"{ckpt} holds no LoRA adapter (adapter_config.json): nothing to merge; a full fine-tune checkpoint is already a complete model")
    target = merged_dir_for(ckpt, output_dir)
    if (target / MERGE_INFO).is_file() and not overwrite:
        info = json.loads((target / MERGE_INFO).read_text())
        if info.get("adapter") == str(ckpt.resolve()):
            print(json.dumps({"event": "merged", "path": str(target), "skipped": "already merged"}), flush=True)
            return target

    # Merge on the CPU in the weights' own dtype: bf16 by default, like the checkpoint the base came in.
    loaded = load_model(ckpt_dir=ckpt, dtype="bf16" if dtype == "auto" else dtype, device_map={"": "cpu"})
    if loaded.spec.quantization:
        raise ModelLoadError(f"{loaded.spec.model_type} is quantized ({loaded.spec.quantization}): merging LoRA into quantized weights is not supported; merge into the unquantized base")
    lora_config = json.loads((ckpt / "adapter_config.json").read_text())
    model = loaded.model.merge_and_unload()
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"{len(leftover)} LoRA parameters left after merging, e.g. {leftover[0]}")
    with AtomicDir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.template.tokenizer.save_pretrained(tmp)
        for name in ("preprocessor_config.json", "sft_args.json"):
            src = ckpt / name if (ckpt / name).is_file() else loaded.model_dir / name
            if src.is_file():
                shutil.copy(src, tmp / name)
        write_meta(tmp, model_type=loaded.spec.model_type)
        write_json_atomic(
            tmp / MERGE_INFO,
            {
                "base": str(loaded.model_dir.resolve()),
                "adapter": str(ckpt.resolve()),
                "model_type": loaded.spec.model_type,
                "lora": {k: lora_config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")},
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
            },
        )
    print(json.dumps({"event": "merged", "path": str(target)}), flush=True)
    return target
