"""Where a batch-1 token's time goes in the engine, in-process (no HTTP): the decode step's GPU time against
the engine loop's host time.

    python bench/engine_timing.py [--new_tokens 256]

InternVL3-1B shape, random weights, bf16, one GPU. Measures (1) the decoder alone: chained greedy steps
back to back, as the engine queues them (GPU-bound: the step's own time); (2) the engine on one request of
one 448-px image + ~64 words: time between tokens, and inside the engine thread the time spent waiting for
the GPU (a wait near zero means the host, not the GPU, sets the pace), in launching the graph, and in the
rest of the loop; (3) with `--stall`: 16 requests decoding when a 13-tile prompt (~3,400 tokens) arrives,
with chunked prefill (--prefill-chunk-tokens 1024) and without: the longest gap in the running streams and
the long request's time to first token. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT / "tests"))


def _timed(obj, name: str, bucket: list):
    """Wrap obj.name to append each call's duration (s) to bucket."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            bucket.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def _us(xs: list) -> float | None:
    return round(statistics.median(xs) * 1e6, 1) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--stall", action="store_true", help="also phase (3): running streams while a long prompt is prefilled")
    args = ap.parse_args()
    import torch
    from PIL import Image

    from gpu.test_serve_graphs import _served_1b
    from internvl_worker.serve import sampling
    from internvl_worker.serve.engine import Engine, Handle
    from internvl_worker.serve.sampling import SamplingParams
    from serve.test_slots import _prepared

    sm = _served_1b()
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    def request():  # pixels left for the engine's vision tower, as the server's preprocessing leaves them
        return _prepared(sm, "describe the picture please " * 16, img, features=False)

    engine = Engine(sm, max_batch_size=64, decode="graphs", max_total_tokens=2048)
    engine.start()
    try:
        dec = engine._slots
        # (1) the decoder alone: chained steps as the engine queues them, one read per step
        with torch.inference_mode():
            pos = [400]
            dec.step([1], pos, [True])
            read = dec.start_read(1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 200
            for i in range(n):
                dec.step_chained(1, [pos[0] + 1 + i], [True])
                nxt = dec.start_read(1)
                dec.finish_read(read)
                read = nxt
            dec.finish_read(read)
            chained_ms = (time.perf_counter() - t0) / n * 1e3
        print(json.dumps({"card": torch.cuda.get_device_name(), "decoder_chained_step_ms": round(chained_ms, 3), "decode": engine.decode_info}))
        # (2) the engine, one request at a time, with its host parts timed
        waits, replays, steps = [], [], []
        orig_wait = sampling.wait_for

        def timed_wait(done, while_waiting=None):
            if while_waiting is not None:
                while_waiting()
            t0 = time.perf_counter()
            orig_wait(done)
            waits.append(time.perf_counter() - t0)

        sampling.wait_for = timed_wait  # SlotDecoder.finish_read looks it up at each call
        _timed(dec, "_launch", replays)
        _timed(engine, "_step", steps)
        admit: dict[str, list] = {name: [] for name in ("_admit", "_encode_images_together", "_embeds", "_prefill_group")}
        for name, bucket in admit.items():
            _timed(engine, name, bucket)
        for rep in range(3):
            for bucket in (waits, replays, steps, *admit.values()):
                bucket.clear()
            h = engine.submit(Handle(SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens), None, request()))
            times = []
            t0 = time.perf_counter()
            for ev in h.events_sync(timeout=120):
                if ev[0] == "token":
                    times.append(time.perf_counter())
            gaps = [b - a for a, b in zip(times, times[1:])]
            print(json.dumps({
                "run": rep, "tokens": len(times), "ttft_ms": round((times[0] - t0) * 1e3, 2), "itl_p50_ms": round(statistics.median(gaps) * 1e3, 3),
                "decode_tokens_per_s": round(1 / statistics.median(gaps), 1), "request_tokens_per_s": round(len(times) / (times[-1] - t0), 1),
                "engine_step_us_p50": _us(steps), "gpu_wait_us_p50": _us(waits), "launch_us_p50": _us(replays), "chained_steps": engine.chained_steps,
                "admit_ms": {k.strip("_"): round(sum(v) * 1e3, 2) for k, v in admit.items()},
            }))  # fmt: skip
    finally:
        engine.shutdown(30)
    if args.stall:
        big = Image.new("RGB", (448 * 4, 448 * 3), (200, 120, 30))  # 4 x 3 tiles + the thumbnail
        for chunk in (1024, 0):
            print(json.dumps(stall(sm, chunk, request, lambda: _prepared(sm, "describe the picture please", big, features=False))))
    return 0


def stall(sm, chunk: int, short_request, long_request) -> dict:
    """16 greedy streams decoding; a long prompt arrives: their longest gap between tokens, and its TTFT."""
    from internvl_worker.serve.engine import Engine

    engine = Engine(sm, max_batch_size=32, decode="graphs", max_total_tokens=4608, prefill_chunk_tokens=chunk)
    engine.start()
    try:
        # The first time through pays one-time costs (Triton specializations of the eager prefill's kernels
        # for new shapes, cuBLAS heuristics): measured, then measured again warm.
        cold = one_stall(engine, short_request, long_request)
        warm = one_stall(engine, short_request, long_request)
        return {"prefill_chunk_tokens": chunk, **warm, "cold": cold}
    finally:
        engine.shutdown(30)


def one_stall(engine, short_request, long_request) -> dict:
    import threading

    from internvl_worker.serve.engine import Handle
    from internvl_worker.serve.sampling import SamplingParams

    chunks_before = engine.prefill_chunks
    times: list[list[float]] = [[] for _ in range(16)]

    def consume(h, out):
        for ev in h.events_sync(timeout=120):
            if ev[0] == "token":
                out.append(time.perf_counter())

    threads = []
    for i in range(16):
        h = engine.submit(Handle(SamplingParams(max_new_tokens=400, min_new_tokens=400), None, short_request()))
        threads.append(threading.Thread(target=consume, args=(h, times[i]), daemon=True))
        threads[-1].start()
    while min(len(t) for t in times) < 50:
        time.sleep(0.01)
    long_prep = long_request()
    t0 = time.perf_counter()
    h = engine.submit(Handle(SamplingParams(max_new_tokens=16, min_new_tokens=16), None, long_prep))
    first = next(ev for ev in h.events_sync(timeout=120) if ev[0] == "token")
    ttft = time.perf_counter() - t0
    for t in threads:
        t.join(120)
    window = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b >= t0 and a <= t0 + ttft + 0.05]
    return {
        "long_prompt_tokens": len(long_prep.input_ids), "long_ttft_ms": round(ttft * 1e3, 1),
        "streams_max_gap_ms": round(max(window) * 1e3, 2), "streams_gap_p50_ms": round(statistics.median(window) * 1e3, 3),
        "chunks": engine.prefill_chunks - chunks_before, "first_token": first[1],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
