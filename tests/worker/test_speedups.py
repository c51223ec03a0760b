"""Opt-in training speed-ups on the CPU: --use_liger_kernel falls back with a warning where Liger cannot run
(its loss path is checked in test_loss_packing.py, its kernels in tests/gpu), and --torch_compile compiles
each decoder layer once for every layer and every length, with the eager model's loss and gradients."""

import copy
import importlib.machinery
import json
import logging
import sys
import types

import pytest
import torch

from internvl_worker import speedups
from internvl_worker.cli import build_parser
from internvl_worker.sft_args import SftArguments, from_namespace
from internvl_worker.speedups import compile_decoder_layers, setup_liger
from internvl_worker.templates import Conversation
from internvl_worker.train import SftDataset, answer_loss_sum, collate, run_sft

from .synth import color_dataset


def test_flags_parse_and_default_off():
    parse = lambda *extra: from_namespace(build_parser().parse_args(["sft", "--dataset", "d.jsonl", *extra]))  # noqa: E731
    assert not parse().use_liger_kernel and not parse().torch_compile
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
    assert json.loads((last / "sft_args.json").read_text())["use_liger_kernel"] is True
    records = [json.loads(line) for line in (last.parent / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "progress" and "loss" in r] == [1, 2]


@pytest.mark.slow
def test_compiled_decoder_layers_match_eager_with_one_graph(tiny, tmp_path):
    """One graph for both layers and two sequence lengths (dynamic shapes, no recompiles), with gradient
    checkpointing on; parameter names unchanged (checkpoints load as before); the eager model's loss and
    gradients. aot_eager traces what inductor would compile, without the minutes of C++ code generation."""
    from torch._dynamo.utils import counters
    from PIL import Image

    Image.new("RGB", (60, 20), (10, 200, 10)).save(img := str(tmp_path / "g.png"))

    class Row:
        def __init__(self, conv):
            self.conversation = conv

    rows = [
        Conversation(turns=[("What color?", "green")], images=[img]),
        Conversation(turns=[("Say something longer, please.", "one two three four five six")]),
        Conversation(turns=[("Hi.", "yes")]),
    ]
    ds = SftDataset([Row(c) for c in rows], tiny.template, [0, 0, 0])
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
