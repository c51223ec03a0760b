"""The example the e2e tests apply is consistent with what the harness sets up (no cluster needed)."""
from __future__ import annotations

import base64
import io
import json

from .cluster import DATASET_CONFIGMAP, EXAMPLE, EXAMPLE_DATASET, MODELS_CLAIM, OUTPUT_CLAIM, TINY_MODEL_PATH, example_finetune
from .data import color_rows


def _decoded(row: dict) -> tuple:
    from PIL import Image

    (url,) = row["images"]
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return row["query"], row["response"], img.size, img.tobytes()


def test_example_dataset_is_the_generated_one():
    """examples/data/tiny-colors.jsonl == `python -m tests.e2e.data` (same rows, same pixels)."""
    committed = [json.loads(line) for line in EXAMPLE_DATASET.read_text().splitlines()]
    assert [_decoded(r) for r in committed] == [_decoded(r) for r in color_rows()]
    assert len(committed) == 32 and {r["response"] for r in committed} <= {"red", "green", "blue", "yellow"}


def test_example_uses_what_the_harness_creates():
    spec = example_finetune()["spec"]
    assert spec["model"]["pvc"] == {"claimName": MODELS_CLAIM, "path": TINY_MODEL_PATH}
    assert spec["dataset"] == {"configMap": {"name": DATASET_CONFIGMAP}, "files": ["train.jsonl"]}
    assert spec["output"]["claimName"] == OUTPUT_CLAIM
    # CPU-only and tiny, so it runs on the emulator and on any cluster without GPUs.
    assert spec["gpusPerNode"] == 0 and spec["serve"]["gpus"] == 0
    assert spec["training"]["maxSteps"] <= 10 and spec["training"]["dataloaderWorkers"] == 0
    assert "kubectl apply -f examples/finetune-lora-tiny-e2e.yaml" in EXAMPLE.read_text()
