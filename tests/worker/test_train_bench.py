"""bench/train_bench.py's CPU-testable parts: the fixed 4,096-token rows, what MFU counts, throughput from
sft's progress records, the on/off ratios, and --list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports train_check from its own folder
    try:
        spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train_bench.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


@pytest.fixture(scope="module")
def template_1b(tiny_model_dir):
    """The InternVL3-1B layout's template (448-px tiles, 256 image tokens) without building its weights."""
    from transformers import AutoTokenizer, InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from internvl_worker.modeling import build_template
    from internvl_worker.registry import get_model_spec
    from internvl_worker.tiny import SHAPES

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the 1B benchmark model has the same tokenizer
    shape = SHAPES["internvl3-1b"]
    config = InternVLConfig(vision_config=InternVLVisionConfig(**shape["vision"]), text_config=Qwen2Config(vocab_size=shape["vocab_size"], **shape["text"]),
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=256, downsample_ratio=0.5)  # fmt: skip
    return build_template(config, tokenizer, get_model_spec("internvl3-1b"))[0]


def test_fixed_rows_are_exactly_4096_tokens_of_one_tile(bench, template_1b, tmp_path):
    path = bench.make_fixed_dataset(tmp_path, 12, seed=0, tokens=4096, template=template_1b)
    stats = bench.row_stats(path, template_1b)  # measured as the benchmark measures every data set
    assert len(stats) == 12
    assert {r["tokens"] for r in stats} == {4096} and {r["tiles"] for r in stats} == {1}
    assert all(1500 < r["answer_tokens"] < 2300 for r in stats)  # about half the row is answer
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["response"] for r in rows}) == 12  # different rows, not one row repeated


def test_model_flops_counts_what_each_method_trains(bench, tiny_model_dir, tiny):
    shape = bench.model_shape(tiny_model_dir)
    params = dict(tiny.model.named_parameters())
    assert shape["n_llm"] == sum(p.numel() for k, p in params.items() if "language_model" in k and "embed_tokens" not in k)
    assert shape["n_projector"] == sum(p.numel() for k, p in params.items() if "multi_modal_projector" in k)
    assert shape["vocab"] == tiny.model.config.text_config.vocab_size and shape["image_tokens"] == 16 and shape["vit_tokens"] == 65

    row = {"tokens": 1000, "tiles": 2, "answer_tokens": 100}
    full, lora = bench.model_flops([row], full=True, shape=shape), bench.model_flops([row], full=False, shape=shape)
    # Full fine-tuning adds exactly the weight gradients: LLM, LM head on answer tokens, projector on image tokens.
    # Attention (no weights) and the frozen ViT cost the same in both.
    weight_grads = 2 * shape["n_llm"] * 1000 + 2 * shape["vocab"] * shape["d"] * 100 + 2 * shape["n_projector"] * shape["image_tokens"] * 2
    assert full - lora == weight_grads
    attention = 3 * 2 * shape["layers"] * 1000**2 * shape["d"]
    assert lora > attention + 4 * shape["n_llm"] * 1000
    # Twice the rows, twice the FLOPs; a row twice as long more than twice (attention is quadratic).
    assert bench.model_flops([row, row], full=True, shape=shape) == 2 * full
    assert bench.model_flops([dict(row, tokens=2000)], full=True, shape=shape) > full + 6 * shape["n_llm"] * 1000


def test_throughput_is_time_weighted(bench):
    """Two timed steps of 8 rows at 4 and 12 rows/s take 2 s + 0.67 s: 6 rows/s, not the mean rate of 8."""
    records = [{"event": "start"}] + [
        {"event": "progress", "step": step, "loss": 1.0, "samples_per_s": rate, "tokens_per_s": tokens, "gpu_mem_gb": 10.0 + step}
        for step, rate, tokens in ((1, 1.0, 100.0), (2, 4.0, 8000.0), (3, 12.0, 6000.0))
    ]
    r = bench.timed_throughput(records, batch=8, warmup=1)
    assert r["samples_per_s"] == pytest.approx(6.0, abs=1e-3)
    assert r["real_tokens_per_s"] == pytest.approx((8000 * 2 + 6000 * 8 / 12) / (2 + 8 / 12), abs=0.1)
    assert r["peak_mem_gb"] == 13.0


def test_record_has_on_off_and_naive_ratios(bench, tmp_path):
    args = type("Args", (), {"steps": 10, "warmup": 3, "results_dir": str(tmp_path), "what": "speed"})()
    results = {
        "naive-lora": {"samples_per_s": 4.0, "real_tokens_per_s": 10000.0},
        "ours-lora-b8-gc": {"samples_per_s": 8.0, "real_tokens_per_s": 22000.0},
        "ours-lora-b8-gc-liger": {"samples_per_s": 10.0, "real_tokens_per_s": 27000.0},
        "ours-lora-b8-gc-compile": {"error": ["boom"]},
    }
    stats = {"real": [{"tokens": 2000, "tiles": 3, "answer_tokens": 100}]}
    bench.write_record(args, results, stats, 700.0, {"n_llm": 1})
    record = json.loads(next(tmp_path.glob("train-speed-*.json")).read_text())
    assert record["ratios"] == {
        "ours-lora-b8-gc_speedup": 2.0, "ours-lora-b8-gc_token_speedup": 2.2,
        "ours-lora-b8-gc-liger_speedup": 2.5, "ours-lora-b8-gc-liger_token_speedup": 2.7, "ours-lora-b8-gc-liger_vs_ours-lora-b8-gc": 1.25,
    }  # fmt: skip
    assert set(record["baselines"]) == {"naive-lora"} and record["ours"]["ours-lora-b8-gc-compile"] == {"error": ["boom"]}


def test_list_names_every_config_without_a_gpu(bench):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--list"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == list(bench.CONFIGS)
    for name, (_, full, data, batch, extra) in bench.CONFIGS.items():
        for suffix, flag in (("-liger", "--use_liger_kernel"), ("-compile", "--torch_compile")):
            if name.endswith(suffix):
                assert extra[-2:] == [flag, "true"], name
                off = bench.CONFIGS.get(name.removesuffix(suffix))
                if off is not None:  # an on/off pair: the same config plus exactly that option
                    assert off == ("ours", full, data, batch, extra[:-2]), name
