"""The server end to end: real clients, greedy output equal to `inference()`, batching, every bad request."""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest
import requests
from PIL import Image

from internvl_worker.infer import inference

from .conftest import data_url, start_server

N = 12  # new tokens per request: enough to tell answers apart, cheap on 2 cores


def expect(tiny, query, images=(), history=None, system=None, n=N):
    return inference(tiny.model, tiny.template, query, history, images=list(images), system=system, max_new_tokens=n)[0]


# ----------------------------------------------------------------------------------------------- TGI


def test_tgi_client_generate_equals_inference(server, tiny, red_url):
    from text_generation import Client

    client = Client(server.url, timeout=60)
    resp = client.generate(f"![]({red_url})What color is it?", max_new_tokens=N)  # POSTs to `/`, reads a list
    assert resp.generated_text == expect(tiny, "What color is it?", [red_url])
    d = resp.details
    assert d.generated_tokens == len(d.tokens) == N and d.finish_reason.value == "length" and d.prefill == []
    assert all(t.logprob <= 0 for t in d.tokens)
    text_only = client.generate("hello there", max_new_tokens=N)
    assert text_only.generated_text == expect(tiny, "hello there")


def test_tgi_client_stream_and_generate_routes(server, tiny, green_url):
    from text_generation import Client

    client = Client(server.url, timeout=60)
    events = list(client.generate_stream(f"![]({green_url})\nDescribe the picture", max_new_tokens=N))
    expected = expect(tiny, "Describe the picture", [green_url])
    assert len(events) == N  # one event per token; the last one carries the text and details
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == expected and events[-1].details.generated_tokens == N
    assert "".join(e.token.text for e in events if not e.token.special) == expected
    # /generate answers an object, / a list; return_full_text puts the inputs in front
    body = {"inputs": "hello there", "parameters": {"max_new_tokens": N, "return_full_text": True}}
    obj = requests.post(server.url + "/generate", json=body, timeout=60).json()
    assert obj["generated_text"] == "hello there" + expect(tiny, "hello there")
    lst = requests.post(server.url + "/", json={**body, "parameters": {"max_new_tokens": N}}, timeout=60).json()
    assert isinstance(lst, list) and lst[0]["generated_text"] == expect(tiny, "hello there")
    raw = requests.post(server.url + "/generate_stream", json=body, timeout=60, stream=True)
    lines = [json.loads(line[5:]) for line in raw.iter_lines() if line.startswith(b"data:")]
    assert lines[-1]["details"]["finish_reason"] == "length" and lines[-1]["details"]["input_length"] > 0


def test_tgi_stop_sequence_and_seeded_sampling(server, tiny):
    full = expect(tiny, "one two three", n=20)
    stop = full[6:9]
    assert stop and full.find(stop) == 6
    r = requests.post(server.url + "/generate", json={"inputs": "one two three", "parameters": {"max_new_tokens": 20, "stop": [stop]}}, timeout=60).json()
    assert r["details"]["finish_reason"] == "stop_sequence" and r["generated_text"].startswith(full[:9])
    params = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7, "repetition_penalty": 1.2}
    a, b = (requests.post(server.url + "/generate", json={"inputs": "hello", "parameters": params}, timeout=60).json() for _ in range(2))
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 7


def test_adapter_per_request(server, tiny, tiny_model_dir, adapter_dir, red_url):
    from internvl_worker.modeling import load_model

    with_adapter = load_model(tiny_model_dir, ckpt_dir=adapter_dir, dtype="fp32", device_map={"": "cpu"})
    want = inference(with_adapter.model, with_adapter.template, "What color is it?", images=[red_url], max_new_tokens=N)[0]
    base = expect(tiny, "What color is it?", [red_url])
    assert want != base  # the adapter matters
    tgi = requests.post(server.url + "/generate", json={"inputs": f"![]({red_url})What color is it?", "parameters": {"max_new_tokens": N, "adapter_id": "red"}}, timeout=60).json()
    assert tgi["generated_text"] == want
    from openai import OpenAI

    oa = OpenAI(base_url=server.url + "/v1", api_key="unused")
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red_url}}, {"type": "text", "text": "What color is it?"}]}]
    assert oa.chat.completions.create(model="red", messages=msg, max_tokens=N, temperature=0).choices[0].message.content == want
    ids = [m.id for m in oa.models.list().data]
    assert ids == [server.server.sm.name, "red"]


# -------------------------------------------------------------------------------------------- OpenAI


def test_openai_chat_multiturn_system_image(server, tiny, red_url, green_url):
    from openai import OpenAI

    oa = OpenAI(base_url=server.url + "/v1", api_key="unused")
    history = [["<image>\nWhat is this?", "a red thing"]]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": red_url}}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "a red thing"},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image_url", "image_url": {"url": green_url}}]},
    ]
    want = expect(tiny, "And this one?<image>\n", [red_url, green_url], history=history, system="You are terse.")
    r = oa.chat.completions.create(model=server.server.sm.name, messages=messages, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == N and r.usage.total_tokens == r.usage.prompt_tokens + N
    assert r.usage.prompt_tokens > 2 * 16  # two images' worth of image tokens (16 per tiny tile)
    chunks = list(oa.chat.completions.create(model="tgi", messages=messages, max_tokens=N, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == N


def test_openai_stop_is_cut_and_tgi_client_chat(server, tiny):
    from openai import OpenAI
    from text_generation import Client

    full = expect(tiny, "one two three", n=20)
    oa = OpenAI(base_url=server.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "one two three"}]
    r = oa.chat.completions.create(model="tgi", messages=msgs, max_tokens=20, temperature=0, stop=[full[6:9]])
    assert r.choices[0].message.content == full[:6] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(model="tgi", messages=msgs, max_tokens=20, temperature=0, stop=[full[6:9]], stream=True) if c.choices)
    assert streamed == full[:6]
    # The text-generation client's chat: no `[DONE]` for it (it json-decodes every data line)
    client = Client(server.url, timeout=60)
    done = client.chat(messages=[{"role": "user", "content": "one two three"}], max_tokens=20, temperature=None)
    assert done.choices[0].message.content == full
    chunks = list(client.chat(messages=[{"role": "user", "content": "one two three"}], max_tokens=20, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full


# ------------------------------------------------------------------------------------------ batching


def test_16_concurrent_streams_each_equal_its_greedy_answer(server, tiny, red_url, green_url):
    from text_generation import Client

    words = "red green blue cat dog road city poem left right top bottom one two three four".split()
    jobs = []
    for i, w in enumerate(words):
        img = [red_url, green_url, None][i % 3]
        n = 6 + i % 7  # different lengths: rows leave the batch at different steps
        jobs.append((f"What is the {w}?", img, n))
    want = [expect(tiny, q, [img] if img else [], n=n) for q, img, n in jobs]
    steps_before = server.server.engine.steps

    def run(job):
        q, img, n = job
        prompt = (f"![]({img})" if img else "") + q
        events = list(Client(server.url, timeout=120).generate_stream(prompt, max_new_tokens=n))
        return events[-1].generated_text, "".join(e.token.text for e in events if not e.token.special)

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs))
    assert [g[0] for g in got] == want
    assert [g[1] for g in got] == want
    steps = server.server.engine.steps - steps_before
    assert steps < sum(n for _, _, n in jobs) - len(jobs)  # decode steps were shared between requests
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert "internvl_batch_size_bucket" in metrics and "internvl_time_to_first_token_seconds_count" in metrics
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    # every request waited in the queue once and was admitted in some admission round; rounds admit several
    assert values["internvl_queue_seconds_count"] >= len(jobs)
    assert values["internvl_prefill_requests_sum"] >= len(jobs)
    assert 1 <= values["internvl_prefill_seconds_count"] <= values["internvl_prefill_requests_sum"]


# ---------------------------------------------------------------------------------------- bad requests


def _noise_png(side: int) -> str:
    import os

    return data_url(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))


BAD = [
    # (name, route, body or raw bytes, status, error_type, words in the message)
    ("bad json", "/generate", b"{not json", 400, "validation", "not valid JSON"),
    ("no inputs", "/generate", {"parameters": {}}, 422, "validation", "inputs"),
    ("top_p out of range", "/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "validation", "top_p"),
    ("bad image", "/generate", {"inputs": "![](data:image/png;base64,aGVsbG8=)hi"}, 422, "validation", "not a readable image"),
    ("bad base64", "/generate", {"inputs": "![](data:image/png;base64,@@@)hi"}, 422, "validation", "base64"),
    ("server file path", "/generate", {"inputs": "![](/etc/passwd)hi"}, 422, "validation", "only http(s) and data"),
    ("private url", "/generate", {"inputs": "![](http://127.0.0.1:9/x.png)hi"}, 422, "validation", "private, loopback"),
    ("link-local url", "/generate", {"inputs": "![](http://169.254.169.254/latest/meta-data)hi"}, 422, "validation", "private, loopback"),
    ("too many tokens", "/generate", {"inputs": "hello " * 600}, 422, "validation", "--max-input-tokens"),
    ("too many new tokens", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, 422, "validation", "max_new_tokens"),
    ("unknown adapter", "/generate", {"inputs": "hi", "parameters": {"adapter_id": "blue"}}, 422, "validation", "'blue' is not served"),
    ("unknown model", "/v1/chat/completions", {"model": "blue", "messages": [{"role": "user", "content": "hi"}]}, 404, "validation", "'blue' is not served"),
    ("last message not user", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 422, "validation", "last message"),
    ("image in assistant", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}, {"role": "user", "content": "hi"}]}, 422, "validation", "only allowed in user"),
    ("n > 1", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "validation", "n:"),
    ("stream bad image", "/generate_stream", {"inputs": "![](data:image/png;base64,aGVsbG8=)hi"}, 422, "validation", "not a readable image"),
]


@pytest.mark.parametrize("name,route,body,status,etype,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, route, body, status, etype, words):
    kw = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = requests.post(server.url + route, timeout=30, **kw)
    assert r.status_code == status, r.text
    payload = r.json()
    if route.startswith("/v1/"):
        assert payload["error"]["type"] == etype and words in payload["error"]["message"]
    else:
        assert payload["error_type"] == etype and words in payload["error"]


def test_too_large_image_and_body_then_still_serving(server, tiny):
    big_image = _noise_png(128)  # ~49 KB of PNG, over the 32 KiB --max-image-bytes
    r = requests.post(server.url + "/generate", json={"inputs": f"![]({big_image})hi"}, timeout=30)
    assert r.status_code == 413 and "byte limit" in r.json()["error"]
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big_image}}]}]}, timeout=30)
    assert r.status_code == 413 and "byte limit" in r.json()["error"]["message"]
    r = requests.post(server.url + "/generate", json={"inputs": "x" * 300_000}, timeout=30)
    assert r.status_code == 413 and r.json()["error_type"] == "validation"
    # The TGI client turns these into its exception types
    from text_generation import Client
    from text_generation.errors import ValidationError

    with pytest.raises(ValidationError, match="--max-input-tokens"):
        Client(server.url, timeout=30).generate("hello " * 600, max_new_tokens=2)
    ok = requests.post(server.url + "/generate", json={"inputs": "hello there", "parameters": {"max_new_tokens": N}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["generated_text"] == expect(tiny, "hello there")


def test_overloaded_answers_429(server):
    srv = server.server
    limit = srv.cfg.max_concurrent_requests
    srv.cfg.max_concurrent_requests = srv.in_flight  # full now
    try:
        r = requests.post(server.url + "/generate", json={"inputs": "hi"}, timeout=30)
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
    finally:
        srv.cfg.max_concurrent_requests = limit
    assert requests.post(server.url + "/generate", json={"inputs": "hi"}, timeout=30).status_code == 200


def test_info_health_models(server):
    info = requests.get(server.url + "/info", timeout=10).json()
    assert info["max_input_tokens"] == 512 and info["max_total_tokens"] == 512 + 2048 and info["adapters"] == ["red"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.get(server.url + "/ready", timeout=10).json() == {"status": "ready"}


# --------------------------------------------------------------------------------- readiness and auth


def test_not_ready_until_warmup_answered(served_model):
    import threading

    gate = threading.Event()
    running = start_server(None, loader=lambda: (gate.wait(30), served_model)[1])
    try:
        assert requests.get(running.url + "/health", timeout=10).status_code == 200
        r = requests.get(running.url + "/ready", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        g = requests.post(running.url + "/generate", json={"inputs": "hi"}, timeout=10)
        assert g.status_code == 503 and g.json()["error_type"] == "overloaded"
        gate.set()
        running.wait_ready(30)
        assert running.server.metrics.ready._value.get() == 1
        assert requests.post(running.url + "/generate", json={"inputs": "hi"}, timeout=30).status_code == 200
    finally:
        gate.set()
        running.stop()


def test_bearer_auth(served_model, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# serving keys\nsecret-one\nsecret-two\n")
    running = start_server(served_model, api_key_file=str(keyfile))
    try:
        running.wait_ready()
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        assert requests.post(running.url + "/generate", json=body, timeout=30).status_code == 401
        wrong = requests.post(running.url + "/generate", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error_type"] == "authentication" and wrong.headers["www-authenticate"] == "Bearer"
        assert requests.post(running.url + "/generate", json=body, headers={"Authorization": "Bearer secret-two"}, timeout=30).status_code == 200
        from openai import AuthenticationError, OpenAI

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=running.url + "/v1", api_key="nope").models.list()
        assert OpenAI(base_url=running.url + "/v1", api_key="secret-one").models.list().data
        assert requests.get(running.url + "/health", timeout=10).status_code == 200  # probes stay open
        assert requests.get(running.url + "/metrics", timeout=10).status_code == 200
    finally:
        running.stop()
