"""The real `internvl serve` command in a subprocess: the operator's exact flags, readiness, SIGTERM.

SIGTERM while a stream is running: the stream still completes, then the process exits (what a
Deployment rollout needs: in-flight requests finish before the pod goes away).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import requests

from .conftest import free_port


def test_serve_command_sigterm_finishes_in_flight_stream(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_worker", "serve", "--model_id_or_path", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "fp32"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "not ready in 90 s"
            try:
                r = requests.get(url + "/ready", timeout=2)
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        result = {}

        def stream():
            body = {"inputs": "hello", "parameters": {"max_new_tokens": 150, "min_new_tokens": 150}}
            with requests.post(url + "/generate_stream", json=body, stream=True, timeout=120) as r:
                events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
            result["events"] = events

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)  # the stream is running
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        # uvicorn re-raises the signal once drained, so the exit status says "terminated by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
        events = result["events"]
        assert len(events) == 150 and events[-1]["details"]["finish_reason"] == "length"
        lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
        access = [x for x in lines if x.get("path") == "/generate_stream"]
        assert access and access[-1]["status"] == 200 and access[-1]["generated_tokens"] == 150  # JSON access log
        assert any(x.get("event") == "ready" for x in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
