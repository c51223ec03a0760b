"""Layer: HTTP requests to `internvl serve`. Every case of corpus/http.json (malformed and oversized bodies,
invalid parameters, hostile image URLs: private, loopback, link-local, redirects into them, slow and
dripping servers) is answered with its own status and message as JSON; nothing reaches a private address,
nothing is logged as an error with a traceback, and the server keeps answering with nothing left in flight.
Then overload (429) and a crashing engine: the server stays up."""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import threading
import time

import pytest
import requests
from PIL import Image

from internvl_worker import images as images_mod

from .corpus import http_cases, png_bomb

# ------------------------------------------------------------------------------------ upstream servers


class Upstream:
    """Two image servers on loopback: `public` (treated as the internet) and `private` (inside the cluster)."""

    def __init__(self):
        self.private_hits = 0
        good = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 0, 0)).save(good, format="PNG")
        self.png = good.getvalue()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def send(self, status, body=b"", ctype="image/png", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for k, v in headers:
                    self.send_header(k, v)
                if not any(k == "Content-Length" for k, _ in headers) and body is not None:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                path = self.path
                if self.server is outer.private_server:
                    outer.private_hits += 1
                    return self.send(200, outer.png)
                try:
                    return self.route(path)
                except OSError:  # the client gave up (it was told to): not the test's concern
                    pass

            def route(self, path):
                if path == "/redirect-private":
                    return self.send(302, b"", headers=[("Location", f"{outer.private}/img.png")])
                if path == "/redirect-loop":
                    return self.send(302, b"", headers=[("Location", "/redirect-loop")])
                if path == "/slow":
                    time.sleep(3)
                    return self.send(200, outer.png)
                if path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "20000")  # under the byte cap: only time can stop it
                    self.end_headers()
                    try:
                        for _ in range(60):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
                    return
                if path == "/html":
                    return self.send(200, b"<html>hello</html>", ctype="text/html")
                if path == "/big":
                    return self.send(200, b"\0" * 40_000)
                if path == "/big-chunked":  # no Content-Length: the cap must hold while reading
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for _ in range(20):
                            self.wfile.write(b"\0" * 8192)
                    except OSError:
                        pass
                    return
                if path == "/garbage.png":
                    return self.send(200, b"GIF89a but not really" * 10)
                if path == "/img.png":
                    return self.send(200, outer.png)
                return self.send(404, b"no", ctype="text/plain")

        self.public_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.private_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for s in (self.public_server, self.private_server):
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.public = f"http://localhost:{self.public_server.server_port}"  # "public": see fake_public_localhost
        self.private = f"http://127.0.0.1:{self.private_server.server_port}"

    def stop(self):
        for s in (self.public_server, self.private_server):
            s.shutdown()
            s.server_close()


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def fake_public_localhost():
    """The name `localhost` plays a public host (the internet); every other loopback address stays private."""
    real = images_mod._is_private_host
    images_mod._is_private_host = lambda host: False if host == "localhost" else real(host)
    yield
    images_mod._is_private_host = real


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from internvl_worker.serve.engine import load_served_model

    return load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", device_map={"": "cpu"})


@pytest.fixture(scope="module")
def server(served, fake_public_localhost):
    from tests.serve.conftest import start_server

    running = start_server(served, max_input_tokens=512, max_image_bytes=32 * 1024, max_body_bytes=256 * 1024, max_images=2,
                           image_timeout=1.0, allow_private_image_urls=False, max_concurrent_requests=4)
    running.wait_ready()
    yield running
    running.stop()


def _data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _fill(obj, subs: dict):
    text = json.dumps(obj)
    for key, value in subs.items():
        text = text.replace("{" + key + "}", value)
    return json.loads(text)


def _send(url: str, case: dict) -> requests.Response:
    if "raw" in case:
        return requests.post(url, data=case["raw"].encode(), headers={"content-type": "application/json"}, timeout=30)
    if "raw_hex" in case:
        return requests.post(url, data=bytes.fromhex(case["raw_hex"]), headers={"content-type": "application/json"}, timeout=30)
    if "raw_size" in case:
        body = b'{"inputs": "' + b"x" * case["raw_size"] + b'"}'
        if case.get("chunked"):
            return requests.post(url, data=(body[i : i + 8192] for i in range(0, len(body), 8192)), timeout=30)
        return requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=30)
    return requests.post(url, json=case["body"], timeout=30)


CASES = http_cases()


def test_every_bad_request_is_refused_cleanly(server, upstream, caplog):
    red = io.BytesIO()
    Image.new("RGB", (20, 20), (220, 20, 20)).save(red, format="PNG")
    subs = {"public": upstream.public, "private": upstream.private, "red": _data_url(red.getvalue()),
            "bomb": _data_url(png_bomb(30_000, 30_000)), "truncated": _data_url(red.getvalue()[: len(red.getvalue()) * 2 // 3])}
    failures = []
    caplog.set_level(logging.ERROR)
    t0 = time.monotonic()
    for case in CASES:
        case = _fill(case, subs)
        started = time.monotonic()
        r = _send(server.url + case["route"], case)
        took = time.monotonic() - started
        try:
            body = r.json()
        except ValueError:
            failures.append((case["name"], r.status_code, r.text[:200]))
            continue
        openai = case["route"].startswith("/v1/")
        message = body["error"]["message"] if openai else body.get("error")
        etype = body["error"]["type"] if openai else body.get("error_type")
        ok = r.status_code == case["status"] and etype == case["error_type"] and case["words"] in (message or "")
        if not ok or took > 10 or "Traceback" in (message or ""):
            failures.append((case["name"], r.status_code, message, round(took, 1)))
    assert not failures, "requests not refused as expected:\n" + "\n".join(map(str, failures))
    assert upstream.private_hits == 0, "a request reached the private server"
    # Nothing logged an error with a traceback, nothing is left in flight, and the server still answers.
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert server.server.in_flight == 0 and server.server.state == "ready"
    ok = requests.post(server.url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["details"]["generated_tokens"] == 2
    print(f"\n[reliability] http: {len(CASES)} bad requests refused cleanly in {time.monotonic() - t0:.1f}s")


def test_a_public_image_url_still_works(server, upstream):
    """The policy refuses private hops, not URLs: the same upstream through its "public" name is served."""
    r = requests.post(server.url + "/generate", json={"inputs": f"![]({upstream.public}/img.png)What?", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
    assert upstream.private_hits == 0


def test_overload_answers_429_and_the_server_stays_up(server):
    """More requests than --max-concurrent-requests at once: the excess get 429 at once, the rest finish."""
    import concurrent.futures as cf

    srv = server.server
    gate = threading.Event()
    real_prepare = srv.pool.submit

    # Hold the admitted requests in preparation so that the next ones find the server full.
    import internvl_worker.serve.app as app_mod

    original = app_mod.prepare

    def slow_prepare(*a, **kw):
        gate.wait(20)
        return original(*a, **kw)

    app_mod.prepare = slow_prepare
    try:
        with cf.ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(requests.post, server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60) for _ in range(10)]
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < 10 - srv.cfg.max_concurrent_requests and time.monotonic() < deadline:
                time.sleep(0.05)
            gate.set()
            codes = sorted(f.result().status_code for f in futures)
    finally:
        gate.set()
        app_mod.prepare = original
    assert codes.count(200) == srv.cfg.max_concurrent_requests and codes.count(429) == 10 - srv.cfg.max_concurrent_requests, codes
    assert srv.in_flight == 0
    assert requests.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60).status_code == 200
    del real_prepare


def test_a_crash_inside_generation_fails_that_request_only(server, monkeypatch):
    """The engine raising mid-request (a CUDA error, a bug) answers 500 as JSON; the next request is served."""
    engine = server.server.engine
    real = engine.submit

    def broken(handle):
        raise RuntimeError("simulated engine crash")

    monkeypatch.setattr(engine, "submit", broken)
    r = requests.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    monkeypatch.setattr(engine, "submit", real)
    assert r.status_code == 500
    assert server.server.in_flight == 0
    assert requests.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60).status_code == 200
