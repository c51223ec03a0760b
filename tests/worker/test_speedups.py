"""Opt-in training speed-ups on the CPU: --use_liger_kernel falls back with a warning where Liger cannot run
(its loss path is checked in test_loss_packing.py, its kernels in tests/gpu), --torch_compile compiles
each decoder layer once for every layer and every length, with the eager model's loss and gradients, and
--offload_activations moves what autograd saves into host buffers without changing a loss or a gradient."""

import copy
import importlib.machinery
import json
import logging
import sys
import types

import pytest
import torch

from internvl_worker import speedups
from internvl_worker import train as train_module
from internvl_worker.cli import build_parser
from internvl_worker.sft_args import SftArguments, from_namespace
from internvl_worker.speedups import compile_decoder_layers, setup_liger
from internvl_worker.templates import Conversation
from internvl_worker.train import answer_loss_sum, collate, run_sft

from .synth import color_dataset


def test_flags_parse_and_defaults():
    parse = lambda *extra: from_namespace(build_parser().parse_args(["sft", "--dataset", "d.jsonl", *extra]))  # noqa: E731
    assert parse().use_liger_kernel is None and not parse().torch_compile  # Liger: auto
    assert parse().resolved_liger(available=True) == "all" and parse().resolved_liger(available=False) == "none"
    assert parse("--torch_compile", "true").resolved_liger(available=True) == "loss"  # not in compiled layers
    assert parse("--use_liger_kernel", "false").resolved_liger(available=True) == "none"
    assert parse("--use_liger_kernel", "true").resolved_liger(available=True) == "all"
    assert parse("--use_liger_kernel", "true", "--torch_compile", "true").resolved_liger(available=True) == "loss"  # not in compiled layers
    assert parse("--use_liger_kernel", "true").resolved_liger(available=False) == "all"  # asked for: setup_liger warns, falls back
    on = parse("--use_liger_kernel", "true", "--torch_compile", "yes")
    assert on.use_liger_kernel and on.torch_compile
    with pytest.raises(SystemExit):
        parse("--use_liger_kernel", "maybe")


def _fake_installed_liger() -> types.ModuleType:
    module = types.ModuleType("liger_kernel")
    module.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    return module


@pytest.mark.parametrize("installed", [False, True])
def test_liger_falls_back_with_a_warning(tiny, monkeypatch, caplog, installed):
    monkeypatch.setitem(sys.modules, "liger_kernel", _fake_installed_liger() if installed else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="internvl_worker.speedups"):
        assert setup_liger(tiny.model) is None
    expected = "needs a CUDA GPU" if installed else "pip install liger-kernel"
    assert [r.getMessage() for r in caplog.records if expected in r.getMessage()], caplog.text
    layer = tiny.model.model.language_model.layers[0]
    assert "forward" not in layer.mlp.__dict__ and "forward" not in layer.input_layernorm.__dict__  # nothing patched


def test_sft_with_liger_flag_but_no_liger_trains_on_the_plain_path(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed, also on a GPU machine
    data = color_dataset(tmp_path / "data", 16, seed=3)
    with caplog.at_level(logging.WARNING):
        last = run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), use_liger_kernel=True, max_steps=2, save_steps=2, logging_steps=1, batch_size=4, gradient_accumulation_steps=1, dataloader_num_workers=0, gradient_checkpointing=False, dataset_test_ratio=0))
    assert "pip install liger-kernel" in caplog.text
    written = json.loads((last / "sft_args.json").read_text())
    assert written["use_liger_kernel"] is True and written["liger_kernels"] == "none"  # asked for, not run
    records = [json.loads(line) for line in (last.parent / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "progress" and "loss" in r] == [1, 2]


@pytest.mark.slow
def test_compiled_decoder_layers_match_eager_with_one_graph(tiny, sft_dataset, tmp_path):
    """One graph for both layers and two sequence lengths (dynamic shapes, no recompiles), with gradient
    checkpointing on; parameter names unchanged (checkpoints load as before); the eager model's loss and
    gradients. aot_eager traces what inductor would compile, without the minutes of C++ code generation."""
    from torch._dynamo.utils import counters
    from PIL import Image

    Image.new("RGB", (60, 20), (10, 200, 10)).save(img := str(tmp_path / "g.png"))
    rows = [
        Conversation(turns=[("What color?", "green")], images=[img]),
        Conversation(turns=[("Say something longer, please.", "one two three four five six")]),
        Conversation(turns=[("Hi.", "yes")]),
    ]
    ds = sft_dataset(rows)
    pad = tiny.template.tokenizer.pad_token_id
    # Two padded batches of two rows and different lengths. (Dynamo specialises a batch of 1, and a batch
    # without padding passes no attention mask: each of those compiles one more graph, once.)
    batches = [collate([ds[0], ds[1]], pad), collate([ds[1], ds[2]], pad)]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    assert all(not b["attention_mask"].all() for b in batches)

    eager = copy.deepcopy(tiny.model).train().requires_grad_(True)
    # sft's default: each layer's forward runs inside torch.utils.checkpoint, which dynamo traces as one op
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = copy.deepcopy(eager)
    names = list(compiled.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(compiled, backend="aot_eager") == 2
    assert list(compiled.state_dict()) == names
    for batch in batches:
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss, _, _ = answer_loss_sum(model, batch)
            loss.backward()
            results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
        (a, grads_a), (b, grads_b) = results
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert grads_a.keys() == grads_b.keys()
        for k in grads_a:
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert speedups.language_model(compiled).layers[0]._compiled_call_impl is not None


# ------------------------------------------------------------------------------ --offload_activations


def test_offload_flag_refuses_compiled_layers():
    parse = lambda *extra: from_namespace(build_parser().parse_args(["sft", "--dataset", "d.jsonl", "--model_type", "internvl3-1b", *extra]))  # noqa: E731
    problems = parse("--offload_activations", "true", "--torch_compile", "true").validate()
    assert len(problems) == 1 and "--offload_activations" in problems[0] and "--torch_compile" in problems[0], problems
    assert parse("--offload_activations", "true").validate() == [] and parse("--torch_compile", "true").validate() == []


def test_offload_flag_parses_defaults_off_and_refuses_zero3(tmp_path):
    parse = lambda *extra: from_namespace(build_parser().parse_args(["sft", "--dataset", "d.jsonl", "--model_type", "internvl3-1b", *extra]))  # noqa: E731
    assert parse().offload_activations is False
    assert parse("--offload_activations", "true").offload_activations is True
    assert "--offload_activations" in build_parser()._subparsers._group_actions[0].choices["sft"].format_help()
    assert parse("--offload_activations", "true", "--deepspeed", "default-zero2").validate() == []
    assert parse("--deepspeed", "default-zero3").validate() == []  # ZeRO-3 alone is fine
    zero3_json = tmp_path / "ds.json"
    zero3_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for ds in ("default-zero3", str(zero3_json)):
        problems = parse("--offload_activations", "true", "--deepspeed", ds).validate()
        assert len(problems) == 1 and "--offload_activations" in problems[0] and "ZeRO-3" in problems[0] and ds in problems[0], problems


@pytest.fixture(scope="module")
def offload_batch(tiny, sft_dataset, tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("offload")
    Image.new("RGB", (60, 20), (10, 200, 10)).save(folder / "g.png")
    rows = [
        Conversation(turns=[("What color?", "green and some more words")], images=[str(folder / "g.png")]),
        Conversation(turns=[("Say something longer, please.", "one two three four five six")]),
    ]
    ds = sft_dataset(rows)
    return collate([ds[0], ds[1]], tiny.template.tokenizer.pad_token_id)


def _lora(model, layers: str):
    """The model frozen with rank-4 adapters on the LLM's `layers` (a regex alternation); B drawn non-zero (it
    starts at 0) so that A gets a gradient too."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=rf".*language_model.*\.({layers})$", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("sft_type", ["lora", "full"])
def test_offloaded_saved_tensors_give_the_same_loss_and_gradients(tiny, offload_batch, checkpointing, sft_type):
    """The offload hooks move what autograd saves (and only that: weights stay) to host buffers of their own and
    bring it back for backward; the loss and every gradient are exactly those of the plain forward."""
    from internvl_worker.speedups import OffloadActivations

    plain = copy.deepcopy(tiny.model).train()
    if sft_type == "lora":
        plain = _lora(plain, "q_proj|k_proj|v_proj")
    else:
        for name, p in plain.named_parameters():
            p.requires_grad_("vision_tower" not in name)
    if checkpointing:
        train_module.enable_checkpointing(plain)
    offloaded = copy.deepcopy(plain)
    weights = {p.untyped_storage().data_ptr() for p in offloaded.parameters()}

    packed = []

    class Recording(OffloadActivations):  # sees what each saved tensor became
        def _pack(self, t):
            packed.append(super()._pack(t))
            return packed[-1]

    hooks = Recording(offloaded)
    results = []
    for model, context in ((plain, None), (offloaded, hooks)):
        model.zero_grad(set_to_none=True)
        if context is None:
            loss, n, _ = answer_loss_sum(model, offload_batch)
        else:
            with context:
                loss, n, _ = answer_loss_sum(model, offload_batch)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = results

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0, msg=k)
    moved = [p[1] for p in packed if isinstance(p, tuple)]
    assert hooks.moved == len(moved) > 0 and hooks.moved_bytes == sum(t.numel() * t.element_size() for t in moved) > 0
    assert {t.device.type for t in moved} == {"cpu"} == hooks.host_devices  # saved tensors live in host buffers
    assert not any(t.untyped_storage().data_ptr() in weights for t in moved)  # copies, never a weight
    assert hooks.kept > 0  # the Linear weights autograd saves stay where they are
    assert all(p.untyped_storage().data_ptr() in weights for p in packed if isinstance(p, torch.Tensor))
    if checkpointing:
        # Only what lies outside the checkpointed layers is saved: each layer's input, the head's input...
        assert hooks.moved < 40, hooks.moved


def test_sft_offload_activations_trains_the_same_curve(tiny_model_dir, tmp_path, monkeypatch):
    """`internvl sft --offload_activations true` end to end: the hooks wrap each training forward (the
    progress log shows what they held), and the loss curve equals the plain run's, step for step."""
    from internvl_worker import speedups as sp

    made = []
    real = sp.OffloadActivations

    class Counting(real):
        def __init__(self, model):
            super().__init__(model)
            made.append(self)

    monkeypatch.setattr(train_module, "OffloadActivations", Counting)
    data = color_dataset(tmp_path / "data", 16, seed=5)
    curves = {}
    for flag in (False, True):
        last = run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / f"out-{flag}"), offload_activations=flag, max_steps=3, save_steps=3, logging_steps=1, batch_size=4, gradient_accumulation_steps=1, dataloader_num_workers=0, dataset_test_ratio=0, lora_dropout=0.0))
        records = [json.loads(line) for line in (last.parent / "logging.jsonl").read_text().splitlines()]
        progress = [r for r in records if r["event"] == "progress" and "loss" in r]
        curves[flag] = [r["loss"] for r in progress]
        assert all(("offloaded_gb" in r) == flag for r in progress)
        assert json.loads((last / "sft_args.json").read_text())["offload_activations"] is flag
    assert len(made) == 3 and all(h.moved > 0 for h in made)  # one per training forward, none without the flag
    assert curves[True] == curves[False]


def test_lora_without_input_casts_is_exact_under_autocast(tiny, offload_batch):
    """A bf16 base with fp32 adapters (PEFT's default) under bf16 autocast: without PEFT's input casts the loss
    and every adapter gradient are bit for bit the same, with fewer copy kernels."""
    from torch.profiler import ProfilerActivity, profile

    from internvl_worker.speedups import skip_adapter_input_casts
    from internvl_worker.train import answer_loss_sum

    plain = _lora(copy.deepcopy(tiny.model).to(torch.bfloat16).train(), "q_proj|v_proj|down_proj")
    assert {p.dtype for n, p in plain.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's autocast_adapter_dtype
    fast = copy.deepcopy(plain)
    assert skip_adapter_input_casts(fast) > 0

    def run(model):
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = answer_loss_sum(model, offload_batch)
            loss.backward()
        copies = sum(e.count for e in prof.key_averages() if e.key in ("aten::_to_copy", "aten::copy_"))
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, copies

    loss_a, grads_a, copies_a = run(plain)
    loss_b, grads_b, copies_b = run(fast)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    print(f"LoRA under bf16 autocast: copy/cast ops {copies_a} with PEFT's input casts, {copies_b} without; loss {float(loss_a):.5f} both")
    assert copies_b < copies_a, (copies_a, copies_b)


def _loss_and_grads(model, batch, autocast: bool = False):
    from internvl_worker.train import answer_loss_sum

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _, _ = answer_loss_sum(model, batch)
        loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_update_gives_peft_loss_and_gradients(tiny, offload_batch, dropout):
    """In fp32 the fused forward (one addmm into the base output) gives PEFT's loss and adapter gradients, with
    LoRA dropout too (the same random mask from the same seed: dropout runs once on the same input)."""
    from internvl_worker.speedups import fuse_lora_updates

    plain = _lora(copy.deepcopy(tiny.model).train(), "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
    for module in plain.modules():
        if hasattr(module, "lora_dropout") and dropout:
            module.lora_dropout["default"] = torch.nn.Dropout(dropout)
    fused = copy.deepcopy(plain)
    assert fuse_lora_updates(fused) == 7 * len(tiny.model.model.language_model.layers)
    torch.manual_seed(1)
    loss_a, grads_a = _loss_and_grads(plain, offload_batch)
    torch.manual_seed(1)
    loss_b, grads_b = _loss_and_grads(fused, offload_batch)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * len(tiny.model.model.language_model.layers)
    worst = max(_rel(grads_b[k], grads_a[k]) for k in grads_a)
    assert worst < 1e-5, worst


def _graph_nodes(loss) -> list[str]:
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_layer_is_one_autograd_node(tiny, offload_batch, dropout):
    """Each adapted layer with a frozen base records one backward node (the step was bound by the host's work
    per node, not by the GPU), and the whole graph has fewer nodes than PEFT's; a base that trains keeps the
    general path."""
    from internvl_worker.speedups import fuse_lora_updates
    from internvl_worker.train import answer_loss_sum

    plain = _lora(copy.deepcopy(tiny.model).train(), "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
    for module in plain.modules():
        if hasattr(module, "lora_dropout") and dropout:
            module.lora_dropout["default"] = torch.nn.Dropout(dropout)
    fused = copy.deepcopy(plain)
    adapted = fuse_lora_updates(fused)
    plain_nodes = _graph_nodes(answer_loss_sum(plain, offload_batch)[0])
    fused_nodes = _graph_nodes(answer_loss_sum(fused, offload_batch)[0])
    assert fused_nodes.count("_FrozenLinearWithLoraBackward") == adapted
    assert len(fused_nodes) < len(plain_nodes) - 3 * adapted, (len(plain_nodes), len(fused_nodes))
    fused.base_model.model.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    assert _graph_nodes(answer_loss_sum(fused, offload_batch)[0]).count("_FrozenLinearWithLoraBackward") == adapted - 1


def test_fused_lora_update_under_bf16_autocast_runs_no_output_sized_multiply_or_add(tiny, offload_batch):
    """A bf16 base with fp32 adapters under bf16 autocast (the Trainer's LoRA setting): PEFT's multiply and add
    over each adapted layer's output are gone from forward and backward, and the loss and gradients are as close
    to an fp32 run's as PEFT's own bf16 path is (one rounding of the sum instead of three)."""
    from torch.profiler import ProfilerActivity, profile

    from internvl_worker.speedups import fuse_lora_updates, skip_adapter_input_casts

    reference = _lora(copy.deepcopy(tiny.model).train(), "gate_proj|up_proj")
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    for name, p in plain.named_parameters():  # PEFT's default: fp32 adapters on a bf16 base
        if "lora_" in name:
            p.data = p.data.float()
    skip_adapter_input_casts(plain)
    fused = copy.deepcopy(plain)
    fuse_lora_updates(fused)
    intermediate = tiny.model.config.text_config.intermediate_size

    def output_sized_ops(model):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            loss, grads = _loss_and_grads(model, offload_batch, autocast=True)
        ops = [e for e in prof.events() if e.name in ("aten::mul", "aten::add") and e.input_shapes and len(e.input_shapes[0]) == 3 and e.input_shapes[0][-1] == intermediate]
        return loss, grads, len(ops)

    loss_ref, grads_ref = _loss_and_grads(reference, offload_batch)
    loss_p, grads_p, ops_p = output_sized_ops(plain)
    loss_f, grads_f, ops_f = output_sized_ops(fused)
    err = (_rel(loss_p, loss_ref), max(_rel(grads_p[k], grads_ref[k]) for k in grads_ref), _rel(loss_f, loss_ref), max(_rel(grads_f[k], grads_ref[k]) for k in grads_ref))
    print(f"bf16 autocast vs fp32: PEFT loss {err[0]:.2e}, worst gradient {err[1]:.2e}; fused loss {err[2]:.2e}, worst gradient {err[3]:.2e}; multiply/add ops over the MLP's width {ops_p} -> {ops_f}")
    assert grads_f.keys() == grads_ref.keys()
    assert ops_f < ops_p, (ops_p, ops_f)
    assert err[2] <= max(2 * err[0], 1e-3) and err[3] <= max(2 * err[1], 1e-2), err


def test_fused_lora_forward_defers_to_peft_when_adapters_are_off_or_merged(tiny, offload_batch):
    from internvl_worker.speedups import fuse_lora_updates

    model = _lora(copy.deepcopy(tiny.model).eval(), "q_proj|v_proj")
    fuse_lora_updates(model)
    base_model = copy.deepcopy(tiny.model).eval()
    inputs = {k: v for k, v in offload_batch.items() if k != "labels"}
    with torch.no_grad():
        base = base_model(**inputs).logits
        adapted = model(**inputs).logits
        with model.disable_adapter():
            off = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapters do something
    assert torch.equal(off, base)
    assert (merged - adapted).abs().max() < 1e-3 * adapted.abs().max()  # fp32 merge rounding only


def test_frozen_vision_runs_in_bf16_without_autocast(tiny, offload_batch):
    """Under bf16 autocast the frozen tower gives exactly what a plain bf16 forward of the same weights gives
    (LayerNorms in bf16, no fp32 round trip), its fp32 weights are cast once, the loss still flows to the
    trained weights; a tower that trains is left alone."""
    from internvl_worker.speedups import frozen_vision_without_autocast

    model = copy.deepcopy(tiny.model).train()  # fp32, as full fine-tuning loads it
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    reference = copy.deepcopy(model.model.vision_tower).to(torch.bfloat16)
    assert frozen_vision_without_autocast(model, torch.bfloat16)
    assert {p.dtype for p in model.model.vision_tower.parameters()} == {torch.bfloat16}
    pixels = offload_batch["pixel_values"]
    from internvl_worker.images import pixels_on_device

    pixels = pixels_on_device(pixels).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model.model.vision_tower(pixel_values=pixels).last_hidden_state
    with torch.no_grad():
        plain = reference(pixel_values=pixels.to(torch.bfloat16)).last_hidden_state
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, plain)
    loss, grads = _loss_and_grads(model, offload_batch, autocast=True)
    assert torch.isfinite(loss) and grads and not any("vision_tower" in k for k in grads)

    trained = copy.deepcopy(tiny.model)
    assert not frozen_vision_without_autocast(trained, torch.bfloat16)
    assert {p.dtype for p in trained.model.vision_tower.parameters()} == {torch.float32}


def _liger_chunk(tokens: int, vocab: int, hidden: int, const: int) -> int:
    """Liger 0.8's chunk size for `chunk_mem_const` (ops/fused_linear_cross_entropy.py), restated."""
    inc = -(-vocab // (const * hidden))
    return min(1 << (-(-tokens // inc) - 1).bit_length(), tokens)


@pytest.mark.parametrize(("tokens", "vocab", "hidden"), [(5461, 151674, 896), (100, 151674, 896), (32768, 151674, 896), (900, 92553, 6144), (32768, 92553, 6144), (20000, 32000, 4096)])
def test_liger_chunks_hold_about_chunk_tokens(tokens, vocab, hidden):
    """The constant passed to Liger gives chunks of LOGITS_CHUNK_TOKENS (up to twice that after Liger's rounding to
    a power of two), where Liger's default of 1 gives chunks as small as the head's input (64 answer tokens of
    the 1B shape's 5,461: 86 chunks)."""
    n = speedups.LOGITS_CHUNK_TOKENS
    chunk = _liger_chunk(tokens, vocab, hidden, speedups.liger_chunk_mem_const(tokens, vocab, hidden))
    assert chunk <= 2 * n
    assert chunk >= min(tokens, n // 2)  # never many more chunks than the budget needs
    if (tokens, vocab, hidden) == (5461, 151674, 896):
        assert _liger_chunk(tokens, vocab, hidden, 1) == 64 and chunk == 2048  # 3 chunks instead of 86


def test_liger_layer_kernels_never_in_compiled_layers(tiny, monkeypatch, tmp_path):
    """With --torch_compile prepare_model asks setup_liger for the fused loss alone, asked for or auto: no decoder
    layer module is patched (dynamo cannot trace Liger's autograd Functions inside compiled layers)."""
    monkeypatch.setattr(speedups, "liger_unavailable", lambda: None)
    monkeypatch.setattr(train_module, "liger_unavailable", lambda: None)
    monkeypatch.setattr(speedups, "apply_liger_kernels", lambda model: pytest.fail("layers patched"))
    assert setup_liger(tiny.model, layers=False) is speedups.liger_linear_cross_entropy
    layer = tiny.model.model.language_model.layers[0]
    assert "forward" not in layer.mlp.__dict__ and "forward" not in layer.input_layernorm.__dict__
    seen = []
    monkeypatch.setattr(train_module, "setup_liger", lambda model, layers=True: seen.append(layers))
    monkeypatch.setattr(train_module, "compile_decoder_layers", lambda model: 0)
    from internvl_worker.registry import get_model_spec

    for asked, compiled in ((True, True), (True, False), (None, False), (None, True)):
        args = SftArguments(sft_type="lora", use_liger_kernel=asked, torch_compile=compiled, output_dir=str(tmp_path))
        train_module.prepare_model(copy.deepcopy(tiny.model), args, get_model_spec("internvl3-1b"), on_gpu=False)
    assert seen == [False, True, True, False]


def test_sft_trains_with_the_garbage_collector_frozen_and_thaws_it(tiny_model_dir, tmp_path, monkeypatch):
    """run_sft freezes what is alive before the first step (a full collection then skips the model and libraries)
    and thaws it after the last, so the process is left as it was."""
    import gc

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    loss = train_module.answer_loss_sum
    monkeypatch.setattr(train_module, "answer_loss_sum", lambda *a, **kw: calls.append("step") or loss(*a, **kw))
    data = color_dataset(tmp_path / "data", 8, seed=5)
    run_sft(SftArguments(model_id_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, logging_steps=1, batch_size=4, gradient_accumulation_steps=1, dataloader_num_workers=0, gradient_checkpointing=False, dataset_test_ratio=0))
    assert calls == ["freeze", "step", "step", "unfreeze"], calls


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_chunked_linear_cross_entropy_gives_the_plain_loss_and_gradients(monkeypatch, head):
    """The fused loss in several chunks (the last one short) on Liger's cross-entropy kernel, here in Triton's
    interpreter and fp32: the plain logits + cross-entropy's summed loss, and its gradients scaled by the
    output gradient (a mean over the batch's answers is not 1.0); a frozen head gets no gradient and costs
    no weight-gradient pass; under no_grad only the loss."""
    pytest.importorskip("liger_kernel")
    if speedups._liger_ce_kernel() is None:
        pytest.fail("liger-kernel's cross-entropy kernel takes other arguments than speedups passes: update _LIGER_CE_KERNEL_ARGS")
    monkeypatch.setattr(speedups, "LOGITS_CHUNK_TOKENS", 16)
    torch.manual_seed(0)
    weight = (torch.randn(300, 24) * 0.2).requires_grad_(head == "trained")
    hidden = torch.randn(53, 24, requires_grad=True)  # 4 chunks: 16, 16, 16, 5
    targets = torch.randint(0, 300, (53,))

    def loss_and_grads(fn):
        loss = fn(weight, hidden, targets)
        wrt = [hidden] + ([weight] if weight.requires_grad else [])
        return loss.detach(), torch.autograd.grad(loss / 7.0, wrt)

    loss, grads = loss_and_grads(speedups.liger_linear_cross_entropy)
    ref_loss, ref_grads = loss_and_grads(speedups.plain_linear_cross_entropy)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads) == (2 if head == "trained" else 1)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(speedups.liger_linear_cross_entropy(weight, hidden, targets), ref_loss, rtol=1e-5, atol=1e-5)


def test_chunked_linear_cross_entropy_falls_back_to_liger_when_its_kernel_changed(monkeypatch):
    """A liger-kernel whose cross-entropy kernel takes other arguments is not called with ours: Liger's own fused
    function runs instead (with the chunk constant that gives LOGITS_CHUNK_TOKENS)."""
    pytest.importorskip("liger_kernel")
    import liger_kernel.transformers.functional as functional

    monkeypatch.setattr(speedups, "_LIGER_CE_KERNEL_ARGS", ("X_ptr", "Y_ptr"))
    assert speedups._liger_ce_kernel() is None
    calls = []
    monkeypatch.setattr(functional, "liger_fused_linear_cross_entropy", lambda *a, **kw: calls.append(kw) or torch.tensor(1.0))
    speedups.liger_linear_cross_entropy(torch.randn(300, 24), torch.randn(5, 24), torch.randint(0, 300, (5,)))
    assert calls and calls[0]["reduction"] == "sum" and calls[0]["chunk_mem_const"] == speedups.liger_chunk_mem_const(5, 300, 24)


def test_image_placeholders_found_without_the_device_check(tiny, offload_batch):
    """The model's own placeholder search without transformers' count check (a wait on the GPU): the same mask
    and the same loss; a forward from embeddings still gets transformers' search."""
    from internvl_worker.speedups import image_placeholders_without_sync

    model = copy.deepcopy(tiny.model)
    inner = model.model
    ids = offload_batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    n_features = int((ids == inner.config.image_token_id).sum())
    features = torch.zeros(n_features, embeds.shape[-1])
    before = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    with torch.no_grad():
        loss_before, _, _ = answer_loss_sum(model, offload_batch)
    assert image_placeholders_without_sync(model)
    assert "get_placeholder_mask" in inner.__dict__
    assert torch.equal(inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features), before)
    with torch.no_grad():
        loss_after, _, _ = answer_loss_sum(model, offload_batch)
    assert torch.equal(loss_after, loss_before)
    # embeddings alone: transformers' search, which also checks the count (a feature short fails)
    with pytest.raises(Exception, match="do not match"):
        inner.get_placeholder_mask(None, inputs_embeds=embeds, image_features=features[1:])


def test_dataset_refuses_a_row_whose_tiles_and_image_tokens_differ(tiny, sft_dataset, tmp_path, monkeypatch):
    """The model's forward trusts that each row has image_seq_length tokens per tile; SftDataset checks it on the host."""
    from PIL import Image

    from internvl_worker.data import RowError

    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "a.png")
    ds = sft_dataset([Conversation(turns=[("What?", "a square")], images=[str(tmp_path / "a.png")])])
    assert ds[0]["pixel_values"].shape[0] >= 1
    tiler = ds.template.tiler

    def one_tile_too_many(images, **kw):
        pixels, tiles = tiler(images, **kw)
        return torch.cat([pixels, pixels[:1]]), tiles

    monkeypatch.setattr(ds.template, "tiler", one_tile_too_many)
    with pytest.raises(RowError, match="image tokens for"):
        ds[0]
