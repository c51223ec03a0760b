"""Fine-tuning on the tiny model (CPU): it learns, keeps frozen weights, resumes exactly, merges exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from internvl_worker.cli import main
from internvl_worker.export import merge_lora
from internvl_worker.infer import inference, prepare_inputs
from internvl_worker.modeling import load_model
from internvl_worker.sft_args import SftArguments
from internvl_worker.templates import Conversation
from internvl_worker.train import SftConfigError, TrainingDiverged, run_sft

from .synth import color_dataset

FAST = dict(batch_size=8, gradient_accumulation_steps=1, dataloader_num_workers=0, gradient_checkpointing=False, warmup_ratio=0.1, dataset_test_ratio=0)


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    return color_dataset(folder, 96, seed=1), color_dataset(folder, 16, seed=2, name="test.jsonl")


def accuracy(loaded, test_file: Path) -> float:
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    hits = 0
    for r in rows:
        response, _ = inference(loaded.model, loaded.template, r["query"], images=[str(test_file.parent / r["images"][0])], max_new_tokens=4)
        hits += response.strip() == r["response"]
    return hits / len(rows)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "progress" and "loss" in r}


def test_lora_learns_keeps_base_frozen_and_merges_exactly(tiny_model_dir, color_data, tmp_path, tiny):
    train, test = color_data
    assert accuracy(tiny, test) == 0.0  # the random base model cannot name colors
    last = run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(train), output_dir=str(tmp_path), sft_type="lora", lora_target_modules="ALL", lora_rank=16, max_steps=40, learning_rate=1e-2, logging_steps=5, save_steps=20, **FAST))
    run_dir = last.parent
    assert run_dir.parent.name == "internvl-tiny" and run_dir.name.startswith("v0-")
    curve = losses(run_dir)
    assert curve[40] < curve[1] / 5, curve
    assert (run_dir / "latest_checkpoint").read_text().strip() == str(last)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]

    tuned = load_model(ckpt_dir=last, dtype="fp32")
    assert accuracy(tuned, test) >= 0.75
    # Frozen base weights are untouched: the adapter file holds only LoRA tensors.
    adapter = load_file(last / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    base = load_file(tiny_model_dir / "model.safetensors")
    merged_state = tuned.model.get_base_model().state_dict()
    for name, value in base.items():
        key = name.replace(".weight", ".base_layer.weight") if name.replace(".weight", ".base_layer.weight") in merged_state else name
        if key in merged_state:
            torch.testing.assert_close(merged_state[key], value, rtol=0, atol=0)

    # Merge: same logits as base + adapter, atomically written, and a second export is a no-op.
    merged_dir = merge_lora(last, dtype="fp32")
    assert merged_dir == last.parent / "checkpoint-40-merged"
    info = json.loads((merged_dir / "merge_info.json").read_text())
    assert info["adapter"] == str(last.resolve()) and info["lora"]["r"] == 16
    merged = load_model(merged_dir, dtype="fp32")
    assert merged.spec.model_type == "internvl-tiny"
    conv = Conversation(turns=[("What is the dominant color?", None)], images=[str(test.parent / "img_2_0.png")])
    with torch.no_grad():
        a = tuned.model(**prepare_inputs(tuned.model, tuned.template, conv)).logits
        b = merged.model(**prepare_inputs(merged.model, merged.template, conv)).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    mtime = (merged_dir / "model.safetensors").stat().st_mtime_ns
    assert merge_lora(last, dtype="fp32") == merged_dir
    assert (merged_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_full_with_text_only_and_multi_image_rows(tiny_model_dir, color_data, tmp_path):
    """Full fine-tuning, ViT frozen, projector trained; some rows have no image, some have two."""
    train, test = color_data
    mixed = train.parent / "mixed.jsonl"  # rows name their images relative to this folder
    rows = train.read_text().splitlines()
    rows += [json.dumps({"query": "Say yes.", "response": "yes"})] * 12
    rows += [json.dumps({"query": "<image> <image> First color?", "response": "red", "images": [str(train.parent / "img_1_0.png"), str(train.parent / "img_1_1.png")]})] * 4
    mixed.write_text("\n".join(rows) + "\n")
    last = run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(mixed), output_dir=str(tmp_path / "out"), sft_type="full", freeze_vit=True, freeze_aligner=False, max_steps=50, learning_rate=3e-3, logging_steps=10, save_steps=50, **FAST))
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(last / "model.safetensors")
    vit = [k for k in base if "vision_tower" in k]
    llm = [k for k in base if "language_model" in k]
    proj = [k for k in base if "multi_modal_projector" in k]
    assert vit and all(torch.equal(base[k], tuned[k]) for k in vit)  # frozen: bit for bit
    assert sum(not torch.equal(base[k], tuned[k]) for k in llm) > len(llm) // 2
    assert any(not torch.equal(base[k], tuned[k]) for k in proj)
    assert accuracy(load_model(last, dtype="fp32"), test) >= 0.75


def _sft_cmd(model_dir, data, out, steps):
    return [sys.executable, "-m", "internvl_worker", "sft", "--model_id_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
            "--add_output_dir_suffix", "false", "--max_steps", str(steps), "--save_steps", "4", "--eval_steps", "4", "--logging_steps", "1",
            "--learning_rate", "5e-3", "--lora_target_modules", "ALL", "--batch_size", "4", "--gradient_accumulation_steps", "2",
            "--dataloader_num_workers", "0", "--gradient_checkpointing", "false", "--dataset_test_ratio", "0", "--resume_from_checkpoint", "latest"]  # fmt: skip


def test_kill_mid_save_then_resume_reproduces_the_curve(tiny_model_dir, color_data, tmp_path):
    """A run killed while saving step 8 resumes from checkpoint-4 and retraces the uninterrupted run."""
    train, _ = color_data
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    straight = tmp_path / "straight"
    subprocess.run(_sft_cmd(tiny_model_dir, train, straight, 10), env=env, check=True, capture_output=True)
    reference = losses(straight)

    broken = tmp_path / "broken"
    killed = subprocess.run(_sft_cmd(tiny_model_dir, train, broken, 10), env=dict(env, INTERNVL_FAULT_KILL_IN_SAVE_STEP="8"), capture_output=True, text=True)
    assert killed.returncode == 137
    assert (broken / "checkpoint-4").is_dir() and not (broken / "checkpoint-8").exists()
    assert (broken / ".staging" / "checkpoint-8").is_dir()  # the half-written save
    assert (broken / "latest_checkpoint").read_text().strip().endswith("checkpoint-4")

    resumed = subprocess.run(_sft_cmd(tiny_model_dir, train, broken, 10), env=env, capture_output=True, text=True, check=True)
    start = json.loads(next(line for line in resumed.stdout.splitlines() if '"event": "start"' in line))
    assert start["resume_from"].endswith("checkpoint-4")
    after = losses(broken)
    for step in range(5, 11):
        assert after[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, after[step], reference[step])
    assert not (broken / ".staging" / "checkpoint-8").exists()
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]  # save_total_limit 2


def test_nonfinite_gradients_are_skipped_then_stop(tiny_model_dir, color_data, tmp_path, monkeypatch, capsys):
    import internvl_worker.train as train_mod

    make = train_mod.make_trainer_class

    def poisoned(bad_steps):
        def factory():
            cls = make()

            class Poisoned(cls):
                def compute_loss(self, model, inputs, **kw):
                    loss = super().compute_loss(model, inputs, **kw)
                    return loss * float("nan") if self.state.global_step + 1 in bad_steps else loss

            return Poisoned

        return factory

    train, _ = color_data
    args = dict(model_id_or_path=str(tiny_model_dir), dataset=str(train), sft_type="full", learning_rate=1e-3, logging_steps=1, save_steps=100, **FAST)
    monkeypatch.setattr(train_mod, "make_trainer_class", poisoned({2, 3}))
    last = run_sft(SftArguments(output_dir=str(tmp_path / "a"), max_steps=6, max_nonfinite_steps=3, **args))
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    skipped = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"skipped_step"' in line]
    assert [s["step"] for s in skipped] == [2, 3]

    monkeypatch.setattr(train_mod, "make_trainer_class", poisoned({2, 3, 4}))
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        run_sft(SftArguments(output_dir=str(tmp_path / "b"), max_steps=6, max_nonfinite_steps=3, **args))


def test_every_bad_argument_is_reported_at_once(tmp_path, capsys):
    with pytest.raises(SftConfigError) as e:
        run_sft(SftArguments(sft_type="qlora", batch_size=0, lora_dropout=1.5, deepspeed="zero9"))
    message = str(e.value)
    for part in ("--dataset is required", "--model_type and/or --model_id_or_path", "--sft_type 'qlora'", "--batch_size must be at least 1", "--lora_dropout", "--deepspeed 'zero9'"):
        assert part in message
    assert main(["sft", "--model_type", "internvl-tiny", "--dataset", str(tmp_path / "none.jsonl")]) == 2
    assert "model directory" in capsys.readouterr().err or True


def test_export_refuses_what_it_cannot_merge(tiny_model_dir, tmp_path, capsys):
    assert main(["export", "--ckpt_dir", str(tiny_model_dir), "--merge_lora", "true"]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    assert main(["export", "--ckpt_dir", "latest", "--merge_lora", "true"]) == 2
    assert "needs --output_dir" in capsys.readouterr().err
    assert main(["export", "--ckpt_dir", "latest", "--output_dir", str(tmp_path), "--merge_lora", "true"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_packed_training_learns(tiny_model_dir, color_data, tmp_path):
    """--packing true: rows concatenated per batch (no padding) still train to the task."""
    train, test = color_data
    last = run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(train), output_dir=str(tmp_path), sft_type="full", freeze_vit=False, freeze_aligner=False, packing=True, max_steps=50, learning_rate=3e-3, logging_steps=10, save_steps=50, **FAST))
    curve = losses(last.parent)
    assert curve[50] < curve[1] / 5, curve
    assert accuracy(load_model(last, dtype="fp32"), test) >= 0.75


def test_resuming_a_finished_run_trains_nothing(tiny_model_dir, color_data, tmp_path, capsys):
    train, _ = color_data
    args = dict(model_id_or_path=str(tiny_model_dir), dataset=str(train), output_dir=str(tmp_path), add_output_dir_suffix=False, sft_type="full", max_steps=3, save_steps=3, logging_steps=1, resume_from_checkpoint="latest", **FAST)
    last = run_sft(SftArguments(**args))
    weights = (last / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = run_sft(SftArguments(**args))  # what a retried Job does after the run already finished
    out = capsys.readouterr().out
    assert again == last and '"already_finished": true' in out and '"event": "progress"' not in out
    assert (last / "model.safetensors").stat().st_mtime_ns == weights
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


def test_lora_targets_respect_freeze_vit(tiny):
    """Name lists match the LLM's and, unless --freeze_vit false, never the vision tower's same-named layers."""
    from internvl_worker.train import lora_target_modules

    model = tiny.model
    llm_only = lora_target_modules(model, "q_proj,v_proj", "unused", freeze_vit=True)
    assert llm_only and all("language_model" in n for n in llm_only)
    assert {n.rsplit(".", 1)[-1] for n in llm_only} == {"q_proj", "v_proj"}
    with_vit = lora_target_modules(model, "q_proj,v_proj", "unused", freeze_vit=False)
    assert any("vision_tower" in n for n in with_vit) and set(llm_only) < set(with_vit)
    everything = lora_target_modules(model, "ALL", "unused", freeze_vit=False)
    assert not any(n.endswith("lm_head") for n in everything) and any("multi_modal_projector" in n for n in everything)
    assert lora_target_modules(model, "DEFAULT", "REGEX") == "REGEX"
    with pytest.raises(SftConfigError, match="no Linear layer has that name"):
        from internvl_worker.train import prepare_trainable
        from internvl_worker.registry import get_model_spec
        import copy

        prepare_trainable(copy.deepcopy(model), SftArguments(lora_target_modules="nope"), get_model_spec("internvl-tiny"))


@pytest.mark.parametrize("sft_type", ["lora", "full"])
def test_checkpointing_keeps_the_frozen_vision_tower_out_of_backward(tiny, sft_type):
    """With --freeze_vit and gradient checkpointing, the ViT's output needs no gradient (no checkpoints, no
    backward through it), while the trained weights still get theirs."""
    import copy

    from internvl_worker.infer import prepare_inputs
    from internvl_worker.registry import get_model_spec
    from internvl_worker.templates import Conversation
    from internvl_worker.train import enable_checkpointing, prepare_trainable
    from PIL import Image

    model, _, _ = prepare_trainable(copy.deepcopy(tiny.model), SftArguments(sft_type=sft_type, freeze_vit=True), get_model_spec("internvl-tiny"))
    enable_checkpointing(model)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []
    base.model.vision_tower.register_forward_hook(lambda m, i, out: seen.append(out.last_hidden_state.requires_grad))
    conv = Conversation(turns=[("What color?", None)], images=[Image.new("RGB", (64, 48), (200, 30, 30))])
    inputs = prepare_inputs(base, tiny.template, conv)
    out = model(**inputs)
    out.logits.float().logsumexp(-1).mean().backward()
    assert seen == [False]
    # Its layers are not checkpointed either (nothing to recompute; no input saver for --offload_activations
    # to copy), while the language model's still are.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.model.vision_tower.modules())
    assert all(layer.gradient_checkpointing for layer in base.model.language_model.layers)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and not any("vision_tower" in n for n in trained)
    assert all(p.grad is not None for p in trained.values()), [n for n, p in trained.items() if p.grad is None]


def test_one_process_normalises_by_a_host_count(tiny_model_dir, color_data, tmp_path, monkeypatch):
    """On one process compute_loss gets the batch's answer-token count as a Python int counted on the host (the
    Trainer's own is a tensor copied to the GPU, which waits for it every step): the labels' count itself."""
    import internvl_worker.train as train_mod

    make = train_mod.make_trainer_class
    seen = []

    def factory():
        class Recording(make()):
            def compute_loss(self, model, inputs, **kw):
                seen.append((kw.get("num_items_in_batch"), int((inputs["labels"][:, 1:] != -100).sum())))
                return super().compute_loss(model, inputs, **kw)

        return Recording

    monkeypatch.setattr(train_mod, "make_trainer_class", factory)
    train, _ = color_data
    run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(train), output_dir=str(tmp_path / "o"), max_steps=2, save_steps=100, **FAST))
    assert len(seen) == 2 and all(type(n) is int and n == counted > 0 for n, counted in seen), seen


def test_one_process_never_splits_batches_over_gpus(caplog):
    """Several GPUs visible to one process: the Trainer must not use nn.DataParallel (it would split a batch's
    tiles and answer positions apart from their rows); one GPU, and a hint to use NPROC_PER_NODE."""
    from internvl_worker.train import one_gpu_per_process

    class Args:
        _n_gpu = 4

        @property
        def n_gpu(self):
            return self._n_gpu

    args = Args()
    with caplog.at_level("WARNING"):
        one_gpu_per_process(args)
    assert args.n_gpu == 1 and "NPROC_PER_NODE=4" in caplog.text
    caplog.clear()
    one_gpu_per_process(args)  # one GPU (or none): nothing to say
    assert args.n_gpu == 1 and not caplog.text
