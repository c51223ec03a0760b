"""--gradient_checkpointing auto on the CPU: the layer count from the memory budget, the per-token measurement,
and a partly checkpointed step with the same loss and gradients as a plain one but fewer saved bytes."""

import copy

import pytest
import torch

from internvl_worker.checkpointing import CheckpointPlan, _saved_bytes, layers_left_plain, saved_bytes_per_token
from internvl_worker.cli import build_parser
from internvl_worker.sft_args import from_namespace
from internvl_worker.speedups import language_model
from internvl_worker.train import answer_loss_sum, enable_checkpointing


def test_layers_left_plain_is_the_most_that_fit():
    # 10 layers, 1,000 tokens, 100 bytes a token plain, 10 checkpointed: all checkpointed takes 100,000 bytes,
    # each plain layer 90,000 more.
    assert layers_left_plain(1000, 100_000 + 3 * 90_000, 10, 100, 10) == 3
    assert layers_left_plain(1000, 100_000 + 3 * 90_000 - 1, 10, 100, 10) == 2
    assert layers_left_plain(1000, 10 * 100 * 1000, 10, 100, 10) == 10  # everything fits
    assert layers_left_plain(1000, 50_000, 10, 100, 10) == 0  # not even all-checkpointed fits: the most it can do
    assert layers_left_plain(1000, -5, 10, 100, 10) == 0
    assert layers_left_plain(0, 0, 10, 100, 10) == 10


def test_flag_defaults_to_auto_which_is_all_layers_on_a_cpu_and_with_offloading():
    parse = lambda *extra: from_namespace(build_parser().parse_args(["sft", "--dataset", "d.jsonl", *extra]))  # noqa: E731
    assert parse().gradient_checkpointing is None
    assert parse().resolved_checkpointing(on_gpu=True) == "auto"
    assert parse().resolved_checkpointing(on_gpu=False) == "all"
    assert parse("--offload_activations", "true").resolved_checkpointing(on_gpu=True) == "all"
    assert parse("--gradient_checkpointing", "true").resolved_checkpointing(on_gpu=True) == "all"
    assert parse("--gradient_checkpointing", "false").resolved_checkpointing(on_gpu=True) == "none"


def test_a_checkpointed_layer_keeps_far_less_than_a_plain_one(tiny):
    model = copy.deepcopy(tiny.model)
    enable_checkpointing(model)
    lm = language_model(model)
    flags = [layer.gradient_checkpointing for layer in lm.layers]
    plain, checkpointed = saved_bytes_per_token(lm, autocast_dtype=None, tokens=64)
    hidden = lm.config.hidden_size
    assert checkpointed >= hidden * 4  # its fp32 input at least
    assert plain > 3 * checkpointed, (plain, checkpointed)
    assert [layer.gradient_checkpointing for layer in lm.layers] == flags and len(lm.layers) == tiny.model.config.text_config.num_hidden_layers


@pytest.fixture()
def lm_batch(tiny):
    ids = torch.randint(10, 200, (2, 48))
    labels = ids.clone()
    labels[:, :20] = -100
    return {"input_ids": ids, "labels": labels}


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    holder = {}
    saved = _saved_bytes(lambda: holder.setdefault("loss", answer_loss_sum(model, batch)[0]), torch.device("cpu"))
    holder.pop("loss").backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plan_leaves_as_many_layers_plain_as_the_budget_allows_with_the_same_gradients(tiny, lm_batch):
    model = copy.deepcopy(tiny.model).train()
    lm = language_model(model)
    layers = len(lm.layers)
    assert layers >= 2
    enable_checkpointing(model)
    a, c = saved_bytes_per_token(lm, autocast_dtype=None, tokens=64)
    tokens = lm_batch["input_ids"].numel()
    # A budget for exactly one plain layer (and half a layer to spare), nothing else in use.
    budget = layers * tokens * c + tokens * (a - c) * 1.5
    plan = CheckpointPlan(lm, plain_bytes=a, checkpointed_bytes=c, reserve_bytes=0, reserve_per_token=0, reserve_per_answer_token=0, fraction=1.0, total_bytes=int(budget), allocated=lambda: 0)
    assert plan.apply(tokens) == layers - 1
    assert [layer.gradient_checkpointing for layer in lm.layers] == [False] + [True] * (layers - 1)
    saved_partial, grads_partial = _step(model, lm_batch)

    for layer in lm.layers:
        layer.gradient_checkpointing = True
    saved_all, grads_all = _step(model, lm_batch)
    for layer in lm.layers:
        layer.gradient_checkpointing = False
    saved_none, grads_none = _step(model, lm_batch)

    assert saved_all < saved_partial < saved_none, (saved_all, saved_partial, saved_none)
    assert grads_partial.keys() == grads_none.keys() == grads_all.keys() and grads_none
    assert all(torch.allclose(grads_partial[k], grads_none[k], rtol=1e-5, atol=1e-7) for k in grads_none)
    # More tokens in the same budget: every layer checkpointed; fewer: all plain.
    assert plan.apply(tokens * 4) == layers
    assert plan.apply(tokens // 8) == 0 and not any(layer.gradient_checkpointing for layer in lm.layers)
    assert plan.last == 0


@pytest.mark.parametrize("total_bytes", [0, 10**15])
def test_sft_applies_the_plan_before_each_step_and_logs_it(tiny_model_dir, tmp_path, monkeypatch, total_bytes):
    """The trainer asks the plan before every training forward (here with a fake card: none or a huge one; the
    real plan needs CUDA) and each progress line says how many layers were checkpointed."""
    import json

    from internvl_worker import train as train_module
    from internvl_worker.sft_args import SftArguments

    from .synth import color_dataset

    calls = []

    def fake_plan(model, lm, **kw):
        plan = CheckpointPlan(lm, plain_bytes=1000.0, checkpointed_bytes=10.0, reserve_bytes=0, reserve_per_token=0, reserve_per_answer_token=0, fraction=1.0, total_bytes=total_bytes, allocated=lambda: 0)
        apply = plan.apply
        plan.apply = lambda *a: calls.append(a) or apply(*a)
        return plan

    monkeypatch.setattr(SftArguments, "resolved_checkpointing", lambda self, on_gpu: "auto")
    monkeypatch.setattr(train_module, "plan_checkpointing", fake_plan)
    data = color_dataset(tmp_path / "data", 12, seed=2)
    last = train_module.run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=3, save_steps=3, logging_steps=1, batch_size=4, gradient_accumulation_steps=1, dataloader_num_workers=0, dataset_test_ratio=0))
    layers = len(language_model(train_module.load_model(str(tiny_model_dir)).model).layers)
    records = [json.loads(line) for line in (last.parent / "logging.jsonl").read_text().splitlines()]
    logged = [r["checkpointed_layers"] for r in records if r["event"] == "progress" and "loss" in r]
    assert len(calls) == 3 and all(tokens > 0 for tokens, *_ in calls)
    assert logged == [layers if total_bytes == 0 else 0] * 3
    assert json.loads((last / "sft_args.json").read_text())["checkpointing"] == "auto"


def test_plan_reserves_room_for_a_vision_tower_that_trains(tiny):
    """A trainable ViT keeps its checkpointed layers' inputs for every tile, so a batch with images leaves fewer
    decoder layers plain than the same batch with a frozen ViT; with the ViT frozen the tiles cost nothing."""
    from internvl_worker.checkpointing import plan_checkpointing

    plans = {}
    for vit_trains in (False, True):
        model = copy.deepcopy(tiny.model).train()
        for name, p in model.named_parameters():
            p.requires_grad_(vit_trains or "vision_tower" not in name)
        enable_checkpointing(model)
        lm = language_model(model)
        plans[vit_trains] = plan_checkpointing(model, lm, autocast_dtype=None, fused_loss=False, tokens=64, total_bytes=10**9, allocated=lambda: 0)
    frozen, trains = plans[False], plans[True]
    assert frozen.reserve_per_tile == 0 and trains.reserve_per_tile > 0
    tokens = 1000
    # A card with room for exactly all layers plain, with nothing else: the trainable ViT's tiles take some of it.
    for plan in (frozen, trains):
        plan.fraction = 1.0
        plan.total_bytes = plan.reserve_bytes + tokens * (plan.reserve_per_token + len(plan.layers) * plan.plain_bytes) + 1
    assert frozen.apply(tokens, 0, 40) == 0
    assert trains.apply(tokens, 0, 0) == 0 and trains.apply(tokens, 0, 40) > 0
