"""Overload: requests beyond what the server admits get 429 at once; the admitted ones finish; it stays healthy.

The server's language model is held at a gate (a forward pre-hook that waits on an Event), so "saturated"
is a state the test creates and observes, not a race against the clock: with the gate closed, the admitted
requests cannot finish, and every extra request must be answered 429 while they are still held.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import requests

from .conftest import start_server

CLIENT_TIMEOUT = 60  # what each client waits; the 429s must come long before


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def gated(tiny_model_dir):
    """A server with room for 2 rows + 1 waiting (limit 3) whose language model stops at `gate` when it is clear."""
    from internvl_worker.serve.engine import load_served_model

    sm = load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", device_map={"": "cpu"})
    gate, entered = threading.Event(), threading.Event()
    gate.set()

    def hold(module, args, kwargs):
        entered.set()
        if not gate.wait(120):
            raise RuntimeError("test gate never opened")

    hook = sm.model.model.language_model.register_forward_pre_hook(hold, with_kwargs=True)
    running = start_server(sm, max_batch_size=2, max_waiting_requests=1, max_concurrent_requests=128)
    try:
        running.wait_ready()
        yield running, gate, entered
    finally:
        gate.set()
        hook.remove()
        running.stop()


def _generate(url: str, i: int, n: int = 4) -> requests.Response:
    return requests.post(url + "/generate", json={"inputs": f"hello number {i}", "parameters": {"max_new_tokens": n}}, timeout=CLIENT_TIMEOUT)


def test_excess_requests_get_429_at_once_and_the_admitted_finish(gated):
    from openai import OpenAI, RateLimitError
    from text_generation import Client
    from text_generation.errors import OverloadedError

    running, gate, entered = gated
    srv, url = running.server, running.url
    limit = srv.admission_limit
    assert limit == 3 and requests.get(url + "/info", timeout=10).json()["admission_limit"] == 3
    gate.clear()
    entered.clear()
    pool = cf.ThreadPoolExecutor(limit + 8)
    try:
        admitted = [pool.submit(_generate, url, i) for i in range(limit)]
        # Saturated: all admitted, and the engine is inside a forward it cannot leave.
        wait_for(lambda: srv.in_flight == limit and entered.is_set(), what=f"{limit} requests in flight")

        t0 = time.monotonic()
        excess = [pool.submit(_generate, url, 100 + i) for i in range(8)]  # at once, on every route below too
        codes = [f.result().status_code for f in excess]
        r = _generate(url, 200)
        stream = requests.post(url + "/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}}, timeout=CLIENT_TIMEOUT)
        chat = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=CLIENT_TIMEOUT)
        chat_stream = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}, timeout=CLIENT_TIMEOUT)
        with pytest.raises(OverloadedError, match="Model is overloaded"):
            Client(url, timeout=CLIENT_TIMEOUT).generate("hi", max_new_tokens=4)
        with pytest.raises(RateLimitError):
            OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=CLIENT_TIMEOUT).chat.completions.create(model=srv.sm.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        took = time.monotonic() - t0

        # All of that was answered while the admitted requests were still held: nobody waited for room.
        assert not any(f.done() for f in admitted)
        assert srv.in_flight == limit
        assert took < CLIENT_TIMEOUT / 2, took
    finally:
        gate.set()
    assert codes == [429] * 8
    for resp in (r, stream):
        assert resp.status_code == 429 and resp.json()["error_type"] == "overloaded" and resp.json()["error"].startswith("Model is overloaded")
    for resp in (chat, chat_stream):
        assert resp.status_code == 429
        err = resp.json()["error"]
        assert err["type"] == "overloaded" and err["code"] == "rate_limit_exceeded" and err["message"].startswith("Model is overloaded")
    assert "limit is 3: 2 generating (--max-batch-size) + 1 waiting (--max-waiting-requests)" in r.json()["error"]

    done = [f.result() for f in admitted]
    pool.shutdown()
    assert [d.status_code for d in done] == [200] * limit
    assert all(d.json()["details"]["generated_tokens"] == 4 for d in done)
    # Healthy afterwards: nothing left in flight, probes green, a new request is served.
    assert srv.in_flight == 0 and srv.state == "ready"
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert requests.get(url + "/ready", timeout=10).status_code == 200
    again = _generate(url, 300)
    assert again.status_code == 200 and again.json()["details"]["generated_tokens"] == 4
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert 'internvl_requests_total{route="/generate",status="429"}' in metrics


def test_as_many_clients_as_the_limit_are_all_served(gated):
    """Closed loop at exactly the limit: a slot is free again before its client can send the next request."""
    running, gate, _ = gated
    limit = running.server.admission_limit

    def client(k: int) -> list[int]:
        return [_generate(running.url, 10 * k + j, n=3).status_code for j in range(3)]

    with cf.ThreadPoolExecutor(limit) as pool:
        codes = [c for cs in pool.map(client, range(limit)) for c in cs]
    assert codes == [200] * (3 * limit)
    assert running.server.in_flight == 0


def test_admission_limit_and_flag():
    from internvl_worker.cli import build_parser
    from internvl_worker.serve.app import ServeConfig, Server

    def limit(**kw) -> int:
        server = Server(ServeConfig(model_id_or_path="unused", **kw), loader=lambda: None)
        server.pool.shutdown()
        return server.admission_limit

    assert limit() == min(128, 32 + 32)  # defaults: one batch decoding + one batch waiting, under TGI's 128
    assert limit(max_batch_size=64) == 128 and limit(max_batch_size=100) == 128
    assert limit(max_batch_size=8, max_waiting_requests=0) == 8
    assert limit(max_batch_size=8, max_waiting_requests=4, max_concurrent_requests=10) == 10
    with pytest.raises(ValueError, match="--max-waiting-requests"):
        ServeConfig(model_id_or_path="unused", max_waiting_requests=-1).validate()
    a = build_parser().parse_args(["serve", "--model_id_or_path", "/m", "--max-waiting-requests", "5"])
    assert a.max_waiting_requests == 5
    assert build_parser().parse_args(["serve", "--model_id_or_path", "/m"]).max_waiting_requests is None


def test_admission_pooling_options():
    from internvl_worker.cli import build_parser
    from internvl_worker.serve.app import ServeConfig

    a = build_parser().parse_args(["serve", "--model_id_or_path", "/m"])
    assert (a.waiting_served_ratio, a.max_waiting_tokens) == (0.3, 20)  # TGI's defaults
    a = build_parser().parse_args(["serve", "--model_id_or_path", "/m", "--waiting-served-ratio", "1.2", "--max-waiting-tokens", "0"])
    assert (a.waiting_served_ratio, a.max_waiting_tokens) == (1.2, 0)
    with pytest.raises(ValueError, match="--waiting-served-ratio must be 0 or more, got -1"):
        ServeConfig(model_id_or_path="unused", waiting_served_ratio=-1).validate()
    with pytest.raises(ValueError, match="--max-waiting-tokens must be 0 or more, got -2"):
        ServeConfig(model_id_or_path="unused", max_waiting_tokens=-2).validate()


def test_prefill_chunk_option():
    from internvl_worker.cli import build_parser
    from internvl_worker.serve.app import ServeConfig

    assert build_parser().parse_args(["serve", "--model_id_or_path", "/m"]).prefill_chunk_tokens == 0  # off until it pays
    assert build_parser().parse_args(["serve", "--model_id_or_path", "/m", "--prefill-chunk-tokens", "512"]).prefill_chunk_tokens == 512
    with pytest.raises(ValueError, match=r"--prefill-chunk-tokens must be 0 \(off\) or more, got -5"):
        ServeConfig(model_id_or_path="unused", prefill_chunk_tokens=-5).validate()
