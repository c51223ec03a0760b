"""Inference: the Python API (batch and streaming agree), the one-shot CLI, and the interactive chat."""

import sys

import pytest
from PIL import Image

from internvl_worker.infer import build_conversation, inference, inference_stream


@pytest.fixture(scope="module")
def red_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (120, 40), (220, 20, 20)).save(path)
    return str(path)


def test_stream_and_batch_agree_with_greedy(tiny, red_image):
    model, template = tiny.model, tiny.template
    response, history = inference(model, template, "What color is it?", images=[red_image], max_new_tokens=16)
    assert response and history == [["<image>\nWhat color is it?", response]]
    steps = list(inference_stream(model, template, "What color is it?", images=[red_image], max_new_tokens=16))
    assert len(steps) > 1  # it really streamed
    assert [len(s[0]) for s in steps] == sorted(len(s[0]) for s in steps)  # a growing response
    assert steps[-1] == (response, history)


def test_history_and_images_change_the_answer(tiny, red_image):
    model, template = tiny.model, tiny.template
    first, history = inference(model, template, "Describe it", images=[red_image], max_new_tokens=12)
    follow, history2 = inference(model, template, "And then?", history, images=[red_image], max_new_tokens=12)
    fresh, _ = inference(model, template, "And then?", max_new_tokens=12)
    assert history2[0] == history[0] and len(history2) == 2
    assert follow != fresh  # the earlier turn and its image are part of the prompt
    # The same history and images reproduce the same prompt: one image block, in the first turn.
    conv = build_conversation("And then?", history, [red_image], None)
    assert conv.turns[0][0].startswith("<image>\n") and conv.turns[1][0] == "And then?"


def test_text_only_and_stop_tokens(tiny):
    response, _ = inference(tiny.model, tiny.template, "hello", max_new_tokens=40)
    assert "<|im_end|>" not in response and "<IMG_CONTEXT>" not in response


def test_one_shot_cli(tiny_model_dir, red_image, capsys):
    from internvl_worker.cli import main

    rc = main(["infer", "--model_id_or_path", str(tiny_model_dir), "--query", "What color is it?", "--images", red_image, "--max_new_tokens", "16", "--dtype", "fp32"])
    assert rc == 0
    printed = capsys.readouterr().out
    from internvl_worker.modeling import load_model

    loaded = load_model(tiny_model_dir, dtype="fp32")
    expected, _ = inference(loaded.model, loaded.template, "What color is it?", images=[red_image], max_new_tokens=16)
    assert printed == expected + "\n"
    assert main(["infer", "--model_id_or_path", str(tiny_model_dir), "--query", "x", "--images", "/no/such.png"]) == 2
    assert "image '/no/such.png' not found" in capsys.readouterr().err


def test_interactive_chat_in_a_terminal(tiny_model_dir, red_image):
    """Driven through a pseudo-terminal: seed prompts, streaming, a bad image, `clear`, `exit`."""
    pexpect = pytest.importorskip("pexpect")
    cmd = [sys.executable, "-m", "internvl_worker", "infer", "--model_id_or_path", str(tiny_model_dir), "--max_new_tokens", "10", "--dtype", "fp32"]
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=120, env={"TERM": "dumb", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})

    def ask(query, media=""):
        child.expect_exact("<<< ")
        child.sendline(query)
        child.expect_exact("Input a media path or URL <<< ")
        child.sendline(media)
        child.expect_exact("-" * 50)
        return child.before.strip()

    first = ask("What color?", red_image)
    second = ask("What color?")  # same words, but now with the first turn (and its image) in the prompt
    error = ask("Again", "/no/such/image.png")
    assert "error: image '/no/such/image.png' not found" in error
    child.expect_exact("<<< ")
    child.sendline("clear")
    after_clear = ask("What color?", red_image)
    assert after_clear == first  # clear forgot the conversation: same prompt, same greedy answer
    assert second != first
    child.expect_exact("<<< ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
