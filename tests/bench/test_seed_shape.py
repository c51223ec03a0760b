"""bench/seed_shape.py on the CPU: the seed's 25.5B layout (counted on the meta device, nothing allocated),
its 13-tile training row at 4,096 tokens, the frozen-ViT what-if, and the whole script at the tiny shape
(the offload phase through run_sft's real --offload_activations)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import ROOT, load_bench_module


@pytest.fixture(scope="module")
def seed(bench_path):
    return load_bench_module("seed_shape")


@pytest.fixture(scope="module")
def tokenizer():
    from internvl_worker.tiny import _train_tokenizer

    return _train_tokenizer()


def test_seed_layout_matches_internvl_chat_v1_5(seed, tokenizer):
    config = seed.build_config("seed", tokenizer)
    v, t = config.vision_config, config.text_config
    assert (v.use_qk_norm, v.norm_type, v.attention_bias, v.layer_scale_init_value) == (True, "rms_norm", False, 0.1)
    assert config.image_seq_length == 256  # (448/14)^2 * 0.5^2
    params = seed.count_params(config)
    assert params["total"] == params["vision"] + params["projector"] + params["llm"]
    # ms-swift's doc gives 25.5B for v1.5; InternViT-6B's first 45 of 48 layers are 5.5B, InternLM2-20B 19.9B.
    assert 25.4e9 < params["total"] < 25.6e9, params
    assert 5.5e9 < params["vision"] < 5.6e9 and 19.8e9 < params["llm"] < 19.9e9, params
    est = seed.memory_estimate(config, params, tokens=4096, tiles=13, answer_tokens=700)
    assert est["weights"] == 2 * params["total"]  # bf16: 51.0 GB before anything else
    assert est["lm_checkpoints"] == 48 * 4096 * 6144 * 2  # one bf16 hidden state per decoder layer
    assert est["vit_checkpoints"] == 45 * 13 * 1025 * 3200 * 2  # 1024 patches + class token per tile
    # On an 80 GB card the weights leave 4 GB under the 55 GB target: the ViT's checkpoints alone would not fit.
    assert est["weights"] + est["lm_checkpoints"] < 55e9 < est["weights"] + est["lm_checkpoints"] + est["vit_checkpoints"]


def test_estimated_gpu_time_stays_under_six_minutes(seed, tokenizer):
    params = seed.count_params(seed.build_config("seed", tokenizer))
    assert seed.estimated_seconds(params, tokens=4096, tiles=13, phases=list(seed.PHASES)) < 6 * 60


def test_seed_row_fills_max_length_with_12_tiles_and_a_thumbnail(seed, tmp_path):
    from internvl_worker.data import read_dataset
    from internvl_worker.modeling import build_template
    from internvl_worker.registry import get_model_spec
    from internvl_worker.train import measure_rows
    from transformers import AutoConfig, AutoTokenizer

    prep = seed.prepare(tmp_path, "seed", steps=3, max_length=4096)
    assert prep["tiles"] == 13 and prep["image_tokens"] == 13 * 256
    assert 4096 - 8 <= prep["tokens"] <= 4096, prep  # the longest answer that fits
    model_dir = tmp_path / "model"
    assert (model_dir / "config.json").is_file() and not list(model_dir.glob("*.safetensors"))  # no 51 GB on disk
    # Our trainer keeps the row (rows over --max_length are dropped): what run_sft will see.
    config = AutoConfig.from_pretrained(model_dir)
    template, _ = build_template(config, AutoTokenizer.from_pretrained(model_dir), get_model_spec(seed.MODEL_TYPE), max_length=4096)
    kept, lengths, dropped = measure_rows(read_dataset(prep["data"]), template, max_length=4096, rank=0)
    assert (len(kept), dropped, lengths[0]) == (3, 0, prep["tokens"])


def test_frozen_vit_keeps_a_graph_unless_run_under_no_grad(seed, tmp_path):
    """Today's path (`enable_input_require_grads` hooks every input embedding, the ViT's patch embedding
    too) makes the frozen ViT's output require grad, so it keeps activations and runs backward; the
    what-if patch stops that without changing the model's outputs."""
    import torch

    prep = seed.prepare(tmp_path, "tiny", steps=1, max_length=512)
    pixels = torch.rand(2, 3, 32, 32)
    outputs = {}
    for patches in ((), ("vit_nograd",)):
        model = seed.load_in_memory(prep["model_dir"], patches)(dtype="fp32").model
        model.requires_grad_(False)
        model.enable_input_require_grads()
        outputs[patches] = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert outputs[()].requires_grad and not outputs[("vit_nograd",)].requires_grad
    torch.testing.assert_close(outputs[()].detach(), outputs[("vit_nograd",)])


@pytest.mark.slow
def test_tiny_shape_runs_every_phase_and_writes_the_record(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seed_shape.py"), "--shape", "tiny", "--steps", "3", "--warmup", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training row: " in proc.stdout and "written" in proc.stdout
    (path,) = tmp_path.glob("train-seedshape-*.json")
    record = json.loads(path.read_text())
    assert {"card", "command", "git_commit", "date", "config", "baselines", "ours", "ratios"} <= set(record)
    assert record["config"]["row"]["tiles"] == 13 and record["config"]["row"]["tokens"] <= 512
    naive = record["baselines"]["naive-lora-gc"]
    ours = record["ours"]
    assert set(ours) == {"infer", "ours-lora-gc", "ours-lora-gc-vit-nograd", "ours-lora-gc-offload"}
    assert all("error" not in r for r in [naive, *ours.values()]), record
    assert ours["infer"]["new_tokens"] == 8 and ours["infer"]["seconds"] > 0
    vocab = math.log(400)  # a random model's loss sits near ln(vocabulary)
    for r in [naive, *(ours[k] for k in ours if k != "infer")]:
        assert r["step_s"] > 0 and abs(r["loss_last"] - vocab) < 1.0, r
        assert r["trainable_params"] == naive["trainable_params"] > 0  # the same LoRA (LLM q/k/v) everywhere
    # Running the frozen ViT under no_grad changes memory and time, not the loss.
    assert ours["ours-lora-gc-vit-nograd"]["loss_last"] == pytest.approx(ours["ours-lora-gc"]["loss_last"], abs=1e-5)
    assert ours["ours-lora-gc-vit-nograd"]["what_if"] == ["vit_nograd"]
    # The offload phase is run_sft with --offload_activations true (train.py's own path, no what-if patch):
    # what the forward saved went to host memory, and the loss is the plain phase's.
    offload = ours["ours-lora-gc-offload"]
    assert (offload["what_if"], offload["flags"]) == ([], {"offload_activations": True})
    assert offload["offloaded_gb"] > 0 and "offloaded_gb" not in ours["ours-lora-gc"]
    assert offload["loss_last"] == pytest.approx(ours["ours-lora-gc"]["loss_last"], abs=1e-5)
    assert "ours-lora-gc-offload_step_time_vs_ours-lora-gc" in record["ratios"]
    assert record["ratios"]["ours-lora-gc_speedup"] > 0


@pytest.mark.slow
def test_two_rank_phase_merges_each_ranks_record(seed, tmp_path):
    """The --zero2 path's plumbing (torchrun, one in-memory model per rank, one part file per rank, merged),
    here as plain DDP on the CPU: DeepSpeed needs GPUs."""
    import argparse

    prep = seed.prepare(tmp_path, "tiny", steps=4, max_length=512)
    (tmp_path / "prep.json").write_text(json.dumps(prep))
    args = argparse.Namespace(out=str(tmp_path), steps=4, warmup=1, max_length=512)
    r = seed.run_phase("ours-lora-gc", args, tmp_path / "prep.json", label="ours-ddp", nproc=2)
    assert "error" not in r, (tmp_path / "ours-ddp.log").read_text()[-3000:]
    assert r["gpus"] == 2 and len(r["peak_mem_gb_per_rank"]) == 2
    assert r["step_s"] > 0 and r["trainable_params"] > 0 and r["skipped_steps"] == 0
