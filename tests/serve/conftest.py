"""A real `internvl serve` app on loopback with the tiny model (CPU, fp32), started once per module.

Servers run uvicorn in a thread of the test process (fast: the model is loaded once and shared); one test
also runs the real CLI in a subprocess for SIGTERM handling. Clients are the real `text-generation`
0.7.0 and `openai` packages.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest
import requests
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


class Running:
    """A Server + uvicorn in a thread; `url` is its base URL."""

    def __init__(self, server, port: int):
        import uvicorn

        from internvl_worker.serve.app import build_app

        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}"
        app = build_app(server)
        self.uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)

    def start(self, *, wait_ready: bool = True) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while requests.get(self.url + "/ready", timeout=5).status_code != 200:
            assert self.server.state != "failed", self.server.failure
            assert time.monotonic() < deadline, f"not ready: {self.server.state}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)
        self.server.shutdown()


def start_server(sm, *, loader=None, background: bool = True, **cfg) -> Running:
    from internvl_worker.serve.app import ServeConfig, Server

    config = ServeConfig(model_id_or_path=str(sm.loaded.model_dir) if sm else "unused", **cfg)
    server = Server(config, loader=loader or (lambda: sm))
    running = Running(server, free_port())
    running.start(wait_ready=False)
    server.start_background()
    return running


@pytest.fixture(scope="session")
def red_url():
    return data_url(Image.new("RGB", (120, 40), (220, 20, 20)))


@pytest.fixture(scope="session")
def green_url():
    return data_url(Image.new("RGB", (48, 64), (20, 200, 40)))


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the LLM's attention with random (non-zero) B, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import InternVLForConditionalGeneration

    base = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)$", init_lora_weights=False)
    peft = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("adapter") / "red"
    peft.save_pretrained(out)
    import json

    conf = json.loads((out / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tiny_model_dir)
    (out / "adapter_config.json").write_text(json.dumps(conf))
    return out


@pytest.fixture(scope="session")
def served_model(tiny_model_dir, adapter_dir):
    from internvl_worker.serve.engine import load_served_model

    return load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", adapters={"red": str(adapter_dir)}, device_map={"": "cpu"})


@pytest.fixture(scope="session")
def server(served_model):
    """The main test server: base model + adapter `red`, small limits so the limit tests are cheap."""
    running = start_server(served_model, max_input_tokens=512, max_image_bytes=32 * 1024, max_body_bytes=256 * 1024, max_batch_size=8)
    running.wait_ready()
    yield running
    running.stop()
