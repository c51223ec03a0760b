"""The training loss: answer-only logits give HF's loss, and packed rows give the padded batch's loss."""

import pytest
import torch

from internvl_worker.templates import Conversation
from internvl_worker.train import SftDataset, answer_loss_sum, collate


@pytest.fixture(scope="module")
def batch_rows(tiny, tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("rows")
    Image.new("RGB", (60, 20), (10, 200, 10)).save(folder / "g.png")
    Image.new("RGB", (30, 30), (10, 10, 200)).save(folder / "b.png")

    class Row:
        def __init__(self, conv):
            self.conversation = conv

    convs = [
        Conversation(turns=[("What color?", "green")], images=[str(folder / "g.png")]),
        Conversation(turns=[("Say something longer, please.", "one two three four five six")]),  # text only
        Conversation(turns=[("<image> vs <image>", "blue then green"), ("again?", "yes")], images=[str(folder / "b.png"), str(folder / "g.png")]),
    ]
    ds = SftDataset([Row(c) for c in convs], tiny.template, lengths=[0, 0, 0])
    return [ds[i] for i in range(len(ds))]


def test_answer_only_logits_give_the_full_loss(tiny, batch_rows):
    batch = collate(batch_rows, tiny.template.tokenizer.pad_token_id)
    with torch.no_grad():
        full = tiny.model(**batch).loss  # transformers' loss over all positions (mean over labelled tokens)
        loss_sum, n, outputs = answer_loss_sum(tiny.model, batch)
    assert outputs.logits.shape[0] == n == int((batch["labels"][:, 1:] != -100).sum())
    assert outputs.logits.shape[0] < batch["input_ids"].numel() / 3  # most positions never reach the LM head
    torch.testing.assert_close(loss_sum / n, full, rtol=1e-5, atol=1e-5)


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
