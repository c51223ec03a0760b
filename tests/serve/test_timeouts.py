"""--request-timeout: a stream that passes its deadline ends with a timeout error event, a plain request
gets 504, and the server keeps serving. The engine is held at a gate so the deadline is sure to pass."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from .conftest import start_server

TIMEOUT = 1.5


@pytest.fixture(scope="module")
def slow(tiny_model_dir):
    from internvl_worker.serve.engine import load_served_model

    sm = load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", device_map={"": "cpu"})
    gate = threading.Event()
    gate.set()

    def hold(module, args, kwargs):
        if not gate.wait(60):
            raise RuntimeError("test gate never opened")

    hook = sm.model.model.language_model.register_forward_pre_hook(hold, with_kwargs=True)
    running = start_server(sm, request_timeout=TIMEOUT)
    try:
        running.wait_ready()
        yield running, gate
    finally:
        gate.set()
        hook.remove()
        running.stop()


def _stream_events(url: str, path: str, body: dict) -> list[dict]:
    r = requests.post(url + path, json=body, stream=True, timeout=30)
    assert r.status_code == 200
    return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:") and line != b"data: [DONE]"]


@pytest.mark.parametrize("route", ["/generate_stream", "/v1/chat/completions"])
def test_stream_past_its_deadline_ends_with_a_timeout_event(slow, route):
    running, gate = slow
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 4}} if route == "/generate_stream" else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    gate.clear()
    try:
        t0 = time.monotonic()
        events = _stream_events(running.url, route, body)
        took = time.monotonic() - t0
    finally:
        gate.set()
    last = events[-1]
    message = last["error"] if route == "/generate_stream" else last["error"]["message"]
    assert f"timed out after {TIMEOUT:g}s" in message, events
    assert TIMEOUT * 0.9 <= took < 25
    # the server is still healthy and serves the next request in full
    r = requests.post(running.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert r.status_code == 200 and r.json()["generated_text"] is not None


def test_plain_request_past_its_deadline_gets_504(slow):
    running, gate = slow
    gate.clear()
    try:
        r = requests.post(running.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}}, timeout=30)
    finally:
        gate.set()
    assert r.status_code == 504 and "timed out" in r.json()["error"]
