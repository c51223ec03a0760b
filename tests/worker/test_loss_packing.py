"""The training loss: answer-only logits give HF's loss, and packed rows give the padded batch's loss."""

import pytest
import torch

from internvl_worker.templates import Conversation
from internvl_worker.train import answer_loss_sum, collate


@pytest.fixture(scope="module")
def batch_rows(sft_dataset, tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("rows")
    Image.new("RGB", (60, 20), (10, 200, 10)).save(folder / "g.png")
    Image.new("RGB", (30, 30), (10, 10, 200)).save(folder / "b.png")
    convs = [
        Conversation(turns=[("What color?", "green")], images=[str(folder / "g.png")]),
        Conversation(turns=[("Say something longer, please.", "one two three four five six")]),  # text only
        Conversation(turns=[("<image> vs <image>", "blue then green"), ("again?", "yes")], images=[str(folder / "b.png"), str(folder / "g.png")]),
    ]
    ds = sft_dataset(convs)
    return [ds[i] for i in range(len(ds))]


def test_answer_only_logits_give_the_full_loss(tiny, batch_rows):
    batch = collate(batch_rows, tiny.template.tokenizer.pad_token_id)
    assert not batch["attention_mask"].all()  # padded rows: transformers' forward below uses the mask, ours drops it
    with torch.no_grad():
        full = tiny.model(**batch).loss  # transformers' loss over all positions (mean over labelled tokens)
        loss_sum, n, outputs = answer_loss_sum(tiny.model, batch)
    assert outputs.logits.ndim == 0  # the head returned the summed loss, not logits
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert n < batch["input_ids"].numel() / 3  # most positions never reach the LM head
    torch.testing.assert_close(loss_sum / n, full, rtol=1e-5, atol=1e-5)


def test_collate_finds_the_answer_positions_on_the_host(tiny, batch_rows):
    """collate() hands the loss its answer positions and next tokens (so the step never waits on the GPU for
    them); a batch without them (made elsewhere) has them found from its labels: the same loss either way."""
    for packing in (False, True):
        batch = collate(batch_rows, tiny.template.tokenizer.pad_token_id, packing=packing)
        labels = batch["labels"]
        rows, length = labels.shape
        expect = [(r * length + t, int(labels[r, t + 1])) for r in range(rows) for t in range(length - 1) if labels[r, t + 1] != -100]
        assert [(int(p), int(t)) for p, t in zip(batch["answer_positions"], batch["answer_targets"])] == expect
        bare = {k: v for k, v in batch.items() if not k.startswith("answer_")}
        with torch.no_grad():
            a, na, _ = answer_loss_sum(tiny.model, batch)
            b, nb, _ = answer_loss_sum(tiny.model, bare)
        assert na == nb == len(expect)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss(tiny, batch_rows, attn):
    model = tiny.model
    old = model.config._attn_implementation
    model.set_attn_implementation(attn)
    try:
        padded = collate(batch_rows, tiny.template.tokenizer.pad_token_id)
        packed = collate(batch_rows, tiny.template.tokenizer.pad_token_id, packing=True)
        assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
        assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # not one pad token
        with torch.no_grad():
            a, na, _ = answer_loss_sum(model, padded)
            b, nb, _ = answer_loss_sum(model, packed)
            # Without the position restarts, rows would attend across their boundaries: a different loss.
            leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
            c, _, _ = answer_loss_sum(model, leaky)
    finally:
        model.set_attn_implementation(old)
    assert na == nb
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert abs(float(c) - float(a)) > 1e-3


def test_hidden_state_path_gives_the_logits_loss_and_gradients(tiny, batch_rows):
    """The path that feeds Liger's fused linear cross-entropy (answer hidden states + LM head weight),
    with the plain PyTorch reference in the kernel's place, gives the logits path's loss and gradients."""
    from internvl_worker.speedups import plain_linear_cross_entropy

    model = tiny.model
    batch = collate(batch_rows, tiny.template.tokenizer.pad_token_id)
    head = model.get_output_embeddings()
    calls = []

    def reference(weight, hidden, targets):
        calls.append((weight, tuple(hidden.shape), targets.clone()))
        return plain_linear_cross_entropy(weight, hidden, targets)

    def loss_and_grads(linear_ce):
        model.zero_grad(set_to_none=True)
        loss, n, outputs = answer_loss_sum(model, batch, linear_ce)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), n, outputs, grads

    was = {p: p.requires_grad for p in model.parameters()}  # the model is shared by the session's tests
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        a, na, _, grads_a = loss_and_grads(None)
        b, nb, outputs, grads_b = loss_and_grads(reference)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in was.items():
            p.requires_grad_(flag)
    answers = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    assert len(calls) == 1 and calls[0][0] is head.weight  # the (tied) LM head weight itself: its gradient flows
    assert calls[0][1] == (na, model.config.text_config.hidden_size) and torch.equal(calls[0][2], answers)
    assert outputs.logits.ndim == 0  # no logits at all: the head returned the summed loss
    assert na == nb
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lm_head" in k or "embed_tokens" in k for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-6, msg=k)
    with torch.no_grad():
        assert model(**batch).logits.shape[-1] == model.config.text_config.vocab_size  # the head is a head again


def test_hidden_state_path_restores_the_head_and_skips_empty_batches(tiny, batch_rows):
    model = tiny.model
    batch = collate(batch_rows, tiny.template.tokenizer.pad_token_id)

    def broken(weight, hidden, targets):
        raise RuntimeError("kernel failed")

    with torch.no_grad(), pytest.raises(RuntimeError, match="kernel failed"):
        answer_loss_sum(model, batch, broken)
    assert "forward" not in model.get_output_embeddings().__dict__  # restored even after an error
    # A batch without answer tokens never reaches the fused kernel (its chunking divides by the row count).
    bare = {k: v for k, v in batch.items() if not k.startswith("answer_")}  # positions found from the labels below
    no_answers = dict(bare, labels=torch.full_like(batch["labels"], -100))
    with torch.no_grad():
        loss, n, _ = answer_loss_sum(model, no_answers, broken)
    assert n == 0 and float(loss) == 0.0


def test_uint8_tiles_give_the_float_tiles_loss(tiny, sft_dataset, tmp_path):
    """internvl sft's dataset hands out uint8 tiles (4x smaller), normalized in the loss: the same pixel values
    as the processor's float tiles, so the same loss, bit for bit."""
    from PIL import Image

    Image.new("RGB", (700, 300), (200, 30, 90)).save(tmp_path / "wide.png")
    convs = [Conversation(turns=[("What is it?", "a wide picture")], images=[str(tmp_path / "wide.png")])]
    small, floats = sft_dataset(convs, uint8=True)[0], sft_dataset(convs)[0]
    assert small["pixel_values"].dtype == torch.uint8 and floats["pixel_values"].dtype == torch.float32
    assert small["pixel_values"].shape == floats["pixel_values"].shape and small["pixel_values"].shape[0] > 1  # several tiles
    pad = tiny.template.tokenizer.pad_token_id
    with torch.no_grad():
        a, na, _ = answer_loss_sum(tiny.model, collate([small], pad))
        b, nb, _ = answer_loss_sum(tiny.model, collate([floats], pad))
    assert na == nb and torch.equal(a, b)


def test_unpacked_rows_skip_the_packed_row_search(tiny, batch_rows, monkeypatch):
    """A right-padded batch's loss runs without transformers' search for packed rows (the search ends in a wait
    for the GPU); a packed batch's loss still searches, and so does a forward outside the loss."""
    from transformers import masking_utils

    original, searched = masking_utils.find_packed_sequence_indices, []

    def spy(position_ids):
        searched.append(tuple(position_ids.shape))
        return original(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", spy)  # the loss's switch wraps the spy
    padded = collate(batch_rows, tiny.template.tokenizer.pad_token_id)
    packed = collate(batch_rows, tiny.template.tokenizer.pad_token_id, packing=True)
    with torch.no_grad():
        answer_loss_sum(tiny.model, padded)
        assert searched == []
        answer_loss_sum(tiny.model, packed)
        assert searched == [tuple(packed["input_ids"].shape)]
        tiny.model(input_ids=padded["input_ids"], pixel_values=padded["pixel_values"], use_cache=False)  # no mask: transformers searches
    assert len(searched) == 2
