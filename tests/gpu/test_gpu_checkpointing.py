"""GPU: --gradient_checkpointing auto's memory plan on the InternVL3-1B layout (random weights, LoRA on every LLM
linear layer, Liger when installed, as `internvl sft` sets it up): a step planned to leave half the decoder
layers plain stays inside the budget it was planned for, and the all-plain step, which the plan would not
allow, does not; the measured per-token bytes predict the all-plain step's activations."""

import subprocess
import sys

import pytest
import torch

from internvl_worker.checkpointing import plan_checkpointing
from internvl_worker.sft_args import SftArguments
from internvl_worker.speedups import fuse_lora_updates, language_model, liger_unavailable, setup_liger, skip_adapter_input_casts
from internvl_worker.train import answer_loss_sum, enable_checkpointing, prepare_trainable

pytestmark = pytest.mark.gpu


def _step(model, batch, linear_ce):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, n, _ = answer_loss_sum(model, batch, linear_ce)
    (loss / n).backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


def test_planned_step_stays_in_its_budget(tmp_path, restore_qwen2):
    from internvl_worker.modeling import load_model
    from internvl_worker.registry import get_model_spec

    subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", "internvl3-1b", "--output_dir", str(tmp_path / "m")], check=True)
    model = load_model(tmp_path / "m", dtype="bf16", device_map={"": 0}).model
    model.config.use_cache = False
    linear_ce = setup_liger(model) if liger_unavailable() is None else None
    args = SftArguments(sft_type="lora", lora_target_modules="ALL", lora_dropout=0.0)
    model, _, _ = prepare_trainable(model, args, get_model_spec("internvl3-1b"))
    fuse_lora_updates(model)
    skip_adapter_input_casts(model)
    enable_checkpointing(model)
    model.train()
    lm = language_model(model)
    layers = len(lm.layers)
    plan = plan_checkpointing(model, lm, autocast_dtype=torch.bfloat16, fused_loss=linear_ce is not None)
    a, c = plan.plain_bytes, plan.checkpointed_bytes

    torch.manual_seed(0)
    ids = torch.randint(1000, 100000, (4, 3072), device="cuda")
    labels = ids.clone()
    labels[:, :-600] = -100
    batch = {"input_ids": ids, "labels": labels}
    tokens, answers = ids.numel(), int((labels != -100).sum())

    # A card just big enough for half the layers plain (and a quarter layer to spare).
    half = layers // 2
    other = plan.reserve_bytes + tokens * plan.reserve_per_token + answers * plan.reserve_per_answer_token
    activations = layers * tokens * c + half * tokens * (a - c) + tokens * (a - c) / 4
    plan.total_bytes = (torch.cuda.memory_allocated() + other + activations) / plan.fraction
    assert plan.apply(tokens, answers) == layers - half
    budget = plan.budget(tokens, answers) + other  # what this step may add to the memory in use
    planned = _step(model, batch, linear_ce)

    plan.apply(1, 0)  # a tiny batch: every layer plain
    assert not any(layer.gradient_checkpointing for layer in lm.layers)
    plain = _step(model, batch, linear_ce)
    print(f"a decoder layer saves {a / 1e3:.1f} KB a token plain, {c / 1e3:.1f} KB checkpointed; {tokens} tokens, {layers} layers: "
          f"half plain: peak +{planned / 1e9:.2f} GB for a budget of {budget / 1e9:.2f} GB; all plain: +{plain / 1e9:.2f} GB "
          f"(predicted activations {layers * tokens * a / 1e9:.2f} GB)")  # fmt: skip
    assert planned <= budget, (planned, budget)
    assert plain > budget
    # The measured bytes are neither an underestimate (the reserve covers the rest) nor a gross overestimate.
    assert 0.8 * layers * tokens * a <= plain <= layers * tokens * a + other, (plain, layers * tokens * a, other)
