"""What the HTTP side of `internvl serve` costs per streamed token, with the model taken out.

The server runs in this process exactly as `internvl serve` builds it (routes, admission, preprocessing
pool, collector, SSE), but its engine is the real Engine with the model steps replaced: each "step" sleeps
`--step_ms` (the GPU time of a decode step, GIL released as the real wait is) and emits one fixed token per
running request. An aiohttp client in a separate process drives /generate_stream. So the tokens/s it
reaches is the ceiling the HTTP layer and the engine's own bookkeeping put on serving, and the profile of
the event-loop thread shows where each token's time goes.

    python bench/serve_overhead.py --streams 1,64 --step_ms 0,2.4 --profile

CPU only, a few seconds a setting; no model weights beyond the tiny test model (built in a temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT / "bench"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="1,64", help="concurrent streams (comma-separated)")
    p.add_argument("--step_ms", default="0,2.4", help="emulated GPU time of one decode step (comma-separated)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="requests per client")
    p.add_argument("--profile", action="store_true", help="print the event-loop thread's profile (top functions)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def scripted_engine_class():
    from internvl_worker.serve.engine import Engine, _Row

    class ScriptedEngine(Engine):
        """The real engine loop, admission and delivery; the model's work replaced by a sleep."""

        step_s = 0.0
        token = 0

        def _make_slots(self):
            self.decode_info = {"decode": "scripted", "step_ms": self.step_s * 1e3}
            return None

        def _new_batch(self):
            return _Rows()

        def _admit(self, handles):
            import torch

            rows = [_Row(h) for h in handles if not h.cancelled.is_set()]
            if rows:
                self._accept(rows, self._logits(len(rows)))
                self._batch.rows += [r for r in rows if not r.done]

        def _step(self):
            import torch

            batch = self._batch
            for r in batch.rows:
                if r.handle.cancelled.is_set():
                    self._emit(r.handle, ("done", "cancelled"))
            batch.rows = [r for r in batch.rows if not r.handle.cancelled.is_set()]
            if not batch.rows:
                return

            def wait():  # what the real step does during its GPU wait: hand out the last step's events
                self._flush()
                time.sleep(self.step_s)

            rows = batch.rows
            self._accept(rows, self._logits(len(rows)), while_waiting=wait)
            self.steps += 1
            batch.rows = [r for r in rows if not r.done]

        def _logits(self, n):
            import torch

            vocab = self.sm.model.config.text_config.vocab_size
            logits = torch.zeros(n, vocab)
            logits[:, self.token] = 10.0
            return logits

    class _Rows:
        def __init__(self):
            self.rows = []

        def __len__(self):
            return len(self.rows)

    return ScriptedEngine


def run_server(model_dir: str, step_s: float, port_box: dict, stop: threading.Event, prof: cProfile.Profile | None):
    import uvicorn

    from internvl_worker.serve import app as app_mod
    from serve_bench import free_port

    engine_cls = scripted_engine_class()
    engine_cls.step_s = step_s
    app_mod.Engine = engine_cls  # Server.load_and_warm builds app.Engine
    cfg = app_mod.ServeConfig(model_id_or_path=model_dir, host="127.0.0.1", port=free_port(), max_batch_size=64, max_concurrent_requests=256, max_waiting_requests=256, dtype="fp32")
    server = app_mod.Server(cfg)
    app = app_mod.build_app(server)
    sys.setswitchinterval(0.0005)  # as app.run sets it
    server.load_and_warm()
    engine_cls.token = server.sm.template.tokenizer.convert_tokens_to_ids("the") if "the" in server.sm.template.tokenizer.get_vocab() else 100
    port_box["port"] = cfg.port
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, lifespan="off")
    userver = uvicorn.Server(ucfg)

    async def main():
        if prof is not None:
            prof.enable()  # profiles this thread (the event loop) only
        task = asyncio.create_task(userver.serve())
        while not stop.is_set():
            await asyncio.sleep(0.05)
        if prof is not None:
            prof.disable()
        userver.should_exit = True
        await task

    port_box["ready"] = True
    asyncio.run(main())
    server.shutdown()


CLIENT = """
import asyncio, json, sys
sys.path.insert(0, {bench!r})
from serve_bench import closed_loop, tgi_body, image_data_url, prompt_text
image = image_data_url(32)
bodies = lambda i: tgi_body(image, prompt_text(16, salt=i), {n})
out = asyncio.run(closed_loop("http://127.0.0.1:{port}", bodies, {c}, {rounds}))
print(json.dumps(out))
"""


def measure(model_dir: str, streams: int, step_s: float, args) -> dict:
    stop, box = threading.Event(), {}
    prof = cProfile.Profile() if args.profile else None
    t = threading.Thread(target=run_server, args=(model_dir, step_s, box, stop, prof), daemon=True)
    t.start()
    while "ready" not in box:
        time.sleep(0.05)
    time.sleep(0.3)
    code = CLIENT.format(bench=str(ROOT / "bench"), n=args.max_new_tokens, port=box["port"], c=streams, rounds=args.rounds)
    cpu0 = time.process_time()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    server_cpu = time.process_time() - cpu0
    stop.set()
    t.join(30)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    row = {
        "streams": streams, "step_ms": step_s * 1e3, "tokens_per_s": out["tokens_per_s"], "ttft_p50_ms": out["ttft_p50_ms"], "itl_p50_ms": out["itl_p50_ms"],
        "errors": out["errors"], "server_cpu_us_per_token": round(server_cpu / max(1, out["tokens"]) * 1e6, 1),
    }  # fmt: skip
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        row["profile"] = s.getvalue()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    from internvl_worker.tiny import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = str(build_tiny_model(Path(d) / "tiny"))
        for step_ms in [float(x) for x in args.step_ms.split(",")]:
            for streams in [int(x) for x in args.streams.split(",")]:
                row = measure(model_dir, streams, step_ms / 1e3, args)
                prof = row.pop("profile", None)
                print(json.dumps(row), flush=True)
                if prof:
                    print(prof)
                rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
