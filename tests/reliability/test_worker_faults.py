"""Faults in the worker: training killed mid-step, a damaged checkpoint on the volume, the disk filling up
while saving, an export interrupted. Each time the newest complete checkpoint survives, is the one resumed,
and at most one save interval of steps is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_worker import checkpoints as ckpt
from internvl_worker.checkpoints import CheckpointSaveError
from internvl_worker.export import merge_lora
from internvl_worker.sft_args import SftArguments
from internvl_worker.train import run_sft

from tests.worker.synth import color_dataset

FAST = dict(batch_size=4, gradient_accumulation_steps=1, dataloader_num_workers=0, gradient_checkpointing=False, dataset_test_ratio=0,
            learning_rate=5e-3, lora_target_modules="ALL", logging_steps=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return color_dataset(tmp_path_factory.mktemp("colors"), 32, seed=3)


def sft_cmd(model_dir, data, out, steps):
    return [sys.executable, "-m", "internvl_worker", "sft", "--model_id_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
            "--add_output_dir_suffix", "false", "--max_steps", str(steps), "--save_steps", "4", "--logging_steps", "1", "--learning_rate", "5e-3",
            "--batch_size", "4", "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0", "--gradient_checkpointing", "false",
            "--dataset_test_ratio", "0", "--resume_from_checkpoint", "latest"]  # fmt: skip


def test_killed_mid_step_resumes_from_the_last_complete_checkpoint_never_a_damaged_one(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(sft_cmd(tiny_model_dir, data, out, 10), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed_at = None
    for line in proc.stdout:  # SIGKILL (what the OOM killer or a lost node does) in the middle of step 6
        if line.startswith("{") and json.loads(line).get("event") == "progress" and json.loads(line)["step"] == 5:
            proc.send_signal(signal.SIGKILL)
            killed_at = 5
            break
    proc.wait(60)
    assert killed_at and proc.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-4"]
    assert (out / "latest_checkpoint").read_text().strip().endswith("checkpoint-4")

    # A damaged checkpoint on the volume (a copy cut short, a restore that lost a file): newer by name, never picked.
    damaged = out / "checkpoint-8"
    shutil.copytree(out / "checkpoint-4", damaged)
    (damaged / "adapter_model.safetensors").unlink()
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-4"
    assert "no weights" in ckpt.incomplete_reason(damaged)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve_checkpoint_arg(str(damaged), out)

    resumed = subprocess.run(sft_cmd(tiny_model_dir, data, out, 10), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = json.loads(next(line for line in resumed.stdout.splitlines() if '"event": "start"' in line))
    assert start["resume_from"].endswith("checkpoint-4")
    assert killed_at - 4 <= 4  # lost at most one save interval
    steps = [json.loads(line)["step"] for line in resumed.stdout.splitlines() if '"event": "progress"' in line]
    assert steps[0] == 5 and steps[-1] == 10, steps
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-8", "checkpoint-10"]  # the damaged one replaced by a real save
    assert ckpt.incomplete_reason(out / "checkpoint-8") is None


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_says_so(tiny_model_dir, data, tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # the second save runs out of space half-way (weights written, optimizer not)
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    args = SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path), add_output_dir_suffix=False,
                        max_steps=6, save_steps=2, resume_from_checkpoint="latest", **FAST)
    with pytest.raises(CheckpointSaveError) as exc:
        run_sft(args)
    message = str(exc.value)
    assert "ENOSPC" in message and "volume is full" in message and "checkpoint-2 is intact" in message, message
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "latest_checkpoint").read_text().strip().endswith("checkpoint-2")
    assert not (tmp_path / ".staging" / "checkpoint-4").exists()  # the half copy was removed: its space is free again
    # Space is back: the same command continues from checkpoint-2 and finishes.
    monkeypatch.setattr(torch, "save", real_save)
    last = run_sft(args)
    assert last.name == "checkpoint-6" and ckpt.incomplete_reason(last) is None


def test_export_interrupted_leaves_no_half_merged_model(tiny_model_dir, data, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    args = SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path), add_output_dir_suffix=False,
                        max_steps=2, save_steps=2, **FAST)
    last = run_sft(args)
    merged = last.parent / f"{last.name}-merged"
    real = PreTrainedModel.save_pretrained

    def dies_half_way(self, save_directory, *a, **kw):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_half_way)
    with pytest.raises(OSError):
        merge_lora(last, dtype="fp32")
    assert not merged.exists() and not list(last.parent.glob(".tmp-*"))
    # A merge killed outright (SIGKILL: no cleanup ran) by another pod left its temporary copy behind.
    stale = last.parent / f".tmp-{merged.name}-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert merge_lora(last, dtype="fp32") == merged
    assert (merged / "merge_info.json").is_file() and not list(last.parent.glob(".tmp-*"))


def test_gpu_out_of_memory_says_what_to_change_and_keeps_earlier_checkpoints(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    """A step that runs out of GPU memory (raised here at step 3, after checkpoint-2) ends the run with one
    `internvl: error:` line naming the step and the settings to change, exit code 2 (the log's last line,
    which the operator's FallbackToLogsOnError turns into the pod's termination message), and checkpoint-2
    intact and still the one to resume."""
    import torch
    import transformers

    from internvl_worker.cli import main

    real_step = transformers.Trainer.training_step
    calls = []

    def step(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "training_step", step)
    out = tmp_path / "run"
    argv = sft_cmd(tiny_model_dir, data, out, 6)[3:]  # after "python -m internvl_worker"
    argv[argv.index("--save_steps") + 1] = "2"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("internvl: error: GPU out of memory at step 3"), err
    assert "--batch_size (now 4)" in err and "--max_length" in err and "--resume_from_checkpoint latest" in err
    assert "--gradient_checkpointing true" in err  # the run had it off
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-2"]
    assert (out / "latest_checkpoint").read_text().strip().endswith("checkpoint-2")
