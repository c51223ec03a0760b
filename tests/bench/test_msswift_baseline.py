"""bench/msswift_baseline.py's CPU-testable parts: train_bench rows into ms-swift's messages format, the
processor config ms-swift needs, the flags per method, the timing arithmetic; and, where ms-swift is
importable (not in CI: bench/device_wheels.sh gathers it for the GPU machine), the whole run at the tiny shape."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import ROOT, load_bench_module


@pytest.fixture(scope="module")
def msb(bench_path):
    return load_bench_module("msswift_baseline")


@pytest.fixture(scope="module")
def bench_rows(bench_path, tmp_path_factory):
    tb = load_bench_module("train_bench")
    return tb.make_dataset(tmp_path_factory.mktemp("data"), 40, seed=0)


def test_rows_become_messages_with_one_image_tag_per_image(msb, bench_rows, tmp_path):
    original = [json.loads(line) for line in bench_rows.read_text().splitlines()]
    converted = [json.loads(line) for line in msb.to_swift_rows(bench_rows, tmp_path / "swift.jsonl").read_text().splitlines()]
    assert len(converted) == len(original)
    counts = set()
    for src, row in zip(original, converted):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"], assistant["content"]) == ("user", "assistant", src["response"])
        images = row.get("images", [])
        counts.add(len(images))
        assert len(images) == len(src["images"]) and all(p.startswith("/") and (bench_rows.parent / p).is_file() for p in images)
        # Our template puts "<image>\n" per image before an untagged question; ms-swift is given the same text.
        assert user["content"] == "<image>\n" * len(images) + src["query"]
    assert counts == {0, 1, 2}  # text-only, one-image and two-image rows all occur in 40 rows


def test_processor_config_carries_the_models_image_tokens_per_tile(msb, tiny_model_dir, tmp_path):
    import shutil

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    msb.write_processor_config(model_dir)
    assert json.loads((model_dir / "processor_config.json").read_text())["image_seq_length"] == 16  # 32-px tiles, 4-px patches


def test_flags_per_method(msb, tmp_path):
    def flags(full):
        argv = msb.swift_argv(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o", full=full, steps=24, on_gpu=True)
        keys = argv[0::2]
        assert all(k.startswith("--") for k in keys) and len(keys) == len(set(keys)), argv  # pairs, each flag once
        return dict(zip(keys, argv[1::2]))

    lora, full = flags(False), flags(True)
    for f in (lora, full):
        assert (f["--per_device_train_batch_size"], f["--gradient_accumulation_steps"], f["--gradient_checkpointing"]) == ("4", "1", "false")
        assert (f["--model_type"], f["--template"], f["--torch_dtype"], f["--freeze_vit"]) == ("internvl", "internvl_hf", "bfloat16", "true")
        assert f["--check_model"] == "false"  # no hub round trip on machines without network
    assert (lora["--tuner_type"], lora["--target_modules"], lora["--lora_rank"], lora["--lora_dropout"]) == ("lora", "all-linear", "8", "0")
    assert (full["--tuner_type"], full["--freeze_aligner"]) == ("full", "false") and "--lora_rank" not in full


def test_timing_leaves_out_the_warmup_steps(msb):
    # Step ends at 10, 11, 13, 14, 15 s; warm-up 2 -> the last 3 steps span 15 - 11 = 4 s.
    r = msb.timed([10.0, 11.0, 13.0, 14.0, 15.0], [999, 999, 1000, 2000, 3000], batch=4, warmup=2)
    assert r == {"samples_per_s": 3.0, "real_tokens_per_s": 1500.0, "step_s": 1.3333}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("swift") is None, reason="ms-swift is not installed here (bench/device_wheels.sh gathers it for the GPU machine)")
def test_tiny_shape_runs_swift_sft_and_writes_the_record(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "msswift_baseline.py"), "--shape", "tiny", "--no_ours", "--steps", "3", "--warmup", "1", "--rows", "16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("train-msswift-*.json")
    record = json.loads(path.read_text())
    assert {"card", "command", "git_commit", "date", "config", "baselines", "ours", "ratios"} <= set(record)
    lora, full = record["baselines"]["msswift-lora"], record["baselines"]["msswift-full"]
    assert lora["samples_per_s"] > 0 and full["samples_per_s"] > 0
    # r 8 on the tiny LLM's 7 linear layers x 2 layers = 16,384; full = LLM 99,904 + projector 12,672: no ViT.
    assert (lora["trainable_params"], full["trainable_params"]) == (16_384, 112_576)


def test_every_ours_config_gets_a_ratio_to_msswift_of_its_method():
    import msswift_baseline

    results = {"msswift-lora": {"samples_per_s": 6.0}, "msswift-full": {"samples_per_s": 7.0}, "ours-lora-b8-auto": {"samples_per_s": 16.2},
               "ours-full-b8-auto": {"samples_per_s": 14.0}, "ours-full-b4": {"error": ["oom"]}}  # fmt: skip
    assert msswift_baseline.msswift_ratios(results) == {"ours-lora-b8-auto_vs_msswift": 2.7, "ours-full-b8-auto_vs_msswift": 2.0}
