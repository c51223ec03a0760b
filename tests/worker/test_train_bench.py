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
        "ours-lora-b8-gc-noliger": {"samples_per_s": 10.0, "real_tokens_per_s": 27000.0},
        "ours-lora-b8-gc-compile": {"error": ["boom"]},
    }
    stats = {"real": [{"tokens": 2000, "tiles": 3, "answer_tokens": 100}]}
    bench.write_record(args, results, stats, 700.0, {"n_llm": 1})
    record = json.loads(next(tmp_path.glob("train-speed-*.json")).read_text())
    assert record["ratios"] == {
        "ours-lora-b8-gc_speedup": 2.0, "ours-lora-b8-gc_token_speedup": 2.2,
        "ours-lora-b8-gc-noliger_speedup": 2.5, "ours-lora-b8-gc-noliger_token_speedup": 2.7, "ours-lora-b8-gc-noliger_vs_ours-lora-b8-gc": 1.25,
    }  # fmt: skip
    assert set(record["baselines"]) == {"naive-lora"} and record["ours"]["ours-lora-b8-gc-compile"] == {"error": ["boom"]}


def test_list_names_every_config_without_a_gpu(bench):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--list"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == list(bench.CONFIGS)
    for name, (_, full, data, batch, extra) in bench.CONFIGS.items():
        for suffix, flag, value in (("-noliger", "--use_liger_kernel", "false"), ("-compile", "--torch_compile", "true")):
            if name.endswith(suffix):
                assert extra[-2:] == [flag, value], name
                off = bench.CONFIGS.get(name.removesuffix(suffix))
                if off is not None:  # an on/off pair: the same config plus exactly that option
                    assert off == ("ours", full, data, batch, extra[:-2]), name


def test_curve_configs_train_as_naive_does(bench):
    """Each -curve config is its naive counterpart's method, data and batch, and the `internvl sft` command it
    runs resolves to the naive loop's TrainingArguments: learning rate, schedule, warmup, weight decay,
    clipping, seed and data seed, one batch per step, the random sampler, no validation split, no packing,
    and naive's LoRA (r 8, alpha 32, dropout 0)."""
    from internvl_worker.cli import build_parser
    from internvl_worker.sft_args import from_namespace

    curves = [name for name in bench.CONFIGS if name.endswith(bench.CURVE_SUFFIX)]
    assert curves == ["ours-lora-curve", "ours-full-curve"]
    for name in curves:
        kind, full, data, batch, extra = bench.CONFIGS[name]
        base = bench.naive_counterpart(name)
        assert (kind, extra) == ("ours", bench.CURVE) and bench.CONFIGS[base][:4] == ("naive", full, data, batch), name
        cmd = bench.ours_command(Path("/m"), Path("/d.jsonl"), Path("/o"), full=full, steps=16, batch=batch, extra=extra)
        ours = from_namespace(build_parser().parse_args(cmd[3:]))
        naive = bench.naive_training_args(full=full, steps=16, batch=batch, on_gpu=False)
        assert ours.sft_type == ("full" if full else "lora") and ours.max_steps == naive.max_steps == 16
        assert ours.resolved_learning_rate() == naive.learning_rate
        assert ours.lr_scheduler_type == naive.lr_scheduler_type.value == "linear"
        assert ours.warmup_ratio == naive.warmup_steps == 0  # run_sft passes warmup_ratio as warmup_steps
        assert ours.weight_decay == naive.weight_decay == 0.0
        assert ours.max_grad_norm == naive.max_grad_norm
        assert ours.seed == naive.seed == naive.data_seed  # run_sft sets data_seed = seed
        assert ours.batch_size == naive.per_device_train_batch_size == batch
        assert ours.resolved_grad_accum(1) == naive.gradient_accumulation_steps == 1
        assert naive.train_sampling_strategy == "random" and not ours.group_by_length and not ours.packing
        assert ours.dataset_test_ratio == 0 and ours.val_dataset is None
        if not full:
            assert (ours.lora_rank, ours.lora_alpha, ours.lora_dropout) == (8, 32, 0.0)  # naive: LoraConfig(r=8, lora_alpha=32), PEFT's dropout 0
        else:
            assert ours.freeze_vit and not ours.freeze_aligner  # naive trains all but the vision tower


def test_curve_ratios_from_given_losses(bench, tmp_path):
    naive = {"samples_per_s": 4.0, "real_tokens_per_s": 10000.0, "rows": 256, "losses": [10.0, 9.0, 9.5, 8.5], "batch_tokens": [1000, 2000, 3000, 4000]}
    ours = {"samples_per_s": 8.0, "real_tokens_per_s": 20000.0, "train_rows": 256, "val_rows": 0, "dropped_rows": 0,
            "losses": [10.1, 9.0, 9.2], "batch_tokens": [1001, 2000, 3000]}  # fmt: skip
    r = bench.curve_ratios("ours-lora-curve", ours, naive)
    assert r == {
        "ours-lora-curve_loss_steps": 3, "ours-lora-curve_loss_nonfinite_steps": 0,
        "ours-lora-curve_loss_max_abs_diff": 0.3, "ours-lora-curve_loss_mean_abs_diff": round(0.4 / 3, 6),
        "ours-lora-curve_naive_loss_step_noise": round(2.5 / 3, 6),  # |9-10|, |9.5-9|, |8.5-9.5| over all naive steps
        "ours-lora-curve_rows_match": True, "ours-lora-curve_batch_tokens_max_rel_diff": 0.001,
    }  # fmt: skip
    # A non-finite loss is counted and left out; rows held out or dropped are not naive's rows.
    r = bench.curve_ratios("c", ours | {"losses": [float("nan"), 9.5, 9.2], "val_rows": 3}, naive)
    assert r["c_loss_nonfinite_steps"] == 1 and r["c_loss_max_abs_diff"] == 0.5 and r["c_loss_mean_abs_diff"] == 0.4
    assert r["c_rows_match"] is False

    # In the record: only where the naive counterpart ran too.
    args = type("Args", (), {"steps": 4, "warmup": 1, "results_dir": str(tmp_path), "what": "curve"})()
    results = {"naive-lora": naive, "ours-lora-curve": ours, "ours-full-curve": ours}
    bench.write_record(args, results, {"real": [{"tokens": 2000, "tiles": 3, "answer_tokens": 100}]}, 700.0, {"n_llm": 1})
    record = json.loads(next(tmp_path.glob("train-curve-*.json")).read_text())
    assert record["ratios"]["ours-lora-curve_loss_max_abs_diff"] == 0.3 and record["ratios"]["ours-lora-curve_speedup"] == 2.0
    assert not any(k.startswith("ours-full-curve") for k in record["ratios"])
    assert record["baselines"]["naive-lora"]["losses"] == naive["losses"]


def test_step_records_give_every_step_loss_and_tokens(bench):
    """sft logs rates, not counts: a step of 4 rows at 2 rows/s and 5,000 tokens/s took 2 s and held 10,000
    real tokens. Every step counts, warmup included, in step order."""
    records = [{"event": "start"}] + [
        {"event": "progress", "step": step, "loss": loss, "samples_per_s": rate, "tokens_per_s": tokens}
        for step, loss, rate, tokens in ((2, 9.5, 4.0, 6000.0), (1, 10.0, 2.0, 5000.0), (3, 9.0, 8.0, 8000.5))
    ] + [{"event": "summary", "step": 3, "train_loss": 9.5}]  # fmt: skip
    assert bench.step_records(records, batch=4) == {"losses": [10.0, 9.5, 9.0], "batch_tokens": [10000, 6000, 4000]}


@pytest.mark.slow
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_curve_run_sees_naive_rows_in_naive_order(bench, tiny_model_dir, tiny, tmp_path, monkeypatch, full):
    """naive (in this process, as the benchmark runs it, fp32 on the CPU) and the -curve config (`internvl sft`
    in a subprocess) on the tiny model and 12 realistic rows, 3 steps of 4: both take the rows in the order
    of torch.randperm seeded by the shared seed (the real tokens of every batch say which rows it held), and
    their losses agree step by step. The learning rate is 1e-2 for both so that what the curve flags remove
    moves the loss by more than the tolerance: on this setup weight decay 0.1 moves step 3 by 1e-3 (LoRA) and
    7e-3 (full), the cosine schedule by 0.05-0.09, length grouping by 0.05, an unseeded LoRA init by 6e-4 at
    the benchmark's own rate; naive and ours agree to 1e-6."""
    import torch

    monkeypatch.setattr(bench, "learning_rate", lambda full: 1e-2)
    data = bench.make_dataset(tmp_path / "data", 12, seed=0)
    tokens = [r["tokens"] for r in bench.row_stats(data, tiny.template)]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(bench.SEED)).tolist()
    expected = [sum(tokens[i] for i in order[k : k + 4]) for k in (0, 4, 8)]
    assert expected != [sum(tokens[k : k + 4]) for k in (0, 4, 8)]  # shuffled: file order would fail

    name = "ours-full-curve" if full else "ours-lora-curve"
    naive = bench.run_naive(tiny_model_dir, data, full=full, steps=3, batch=4, warmup=1)
    ours = bench.run_ours(tiny_model_dir, data, tmp_path / name, full=full, steps=3, batch=4, warmup=1, extra=bench.CONFIGS[name][4], workers=0)
    assert "error" not in ours, ours
    assert naive["batch_tokens"] == expected
    assert all(abs(a - b) <= 2 for a, b in zip(ours["batch_tokens"], expected, strict=True)), (ours["batch_tokens"], expected)  # rounded rates
    assert (ours["train_rows"], ours["val_rows"], ours["dropped_rows"]) == (12, 0, 0)
    assert len(naive["losses"]) == len(ours["losses"]) == 3
    assert naive["losses"][-1] < naive["losses"][0] - 0.3  # it trained: the optimisation shows in the losses
    r = bench.curve_ratios(name, ours, naive)
    assert r[f"{name}_rows_match"] and r[f"{name}_batch_tokens_max_rel_diff"] < 1e-3
    assert r[f"{name}_loss_max_abs_diff"] < 1e-4 < r[f"{name}_naive_loss_step_noise"], (ours["losses"], naive["losses"])
