"""Where a request's time goes inside the engine (no HTTP): vision tower, prefill, decode steps.

    python bench/decode_profile.py            # InternVL3-1B shape, random weights, bf16, one GPU, ~2 min

Measures, on the same card in one run:
- vision tower + projector for one 448-px tile, and the prefill of one image + 64 words (~330 tokens);
- one decode step at batch 1/8/64 (context ~400 tokens): eager (KVBatch, a Python call per layer) and
  replayed CUDA graphs (fixed slots), with the step's tokens/s;
- the engine in-process: batch-1 tokens/s and time to first token, and 64 concurrent requests' output
  tokens/s, for --decode eager and --decode graphs.
Writes bench/results/serve-profile-<card>-<date>.json. serve_bench.py measures the same over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT / "tests"))


def cuda_ms(fn, repeat: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def step_times(model, kv, n: int, *, eager: bool, fused: bool = True, compile: bool = False, liger: bool = False) -> dict:
    """Median ms of one decode step at batch 1/8/64 (context n): replayed graph (with the greedy pick's host
    sync), the replay alone, and (eager=True) the eager KVBatch step. fused: serve/fused.py's layers, else
    transformers' own."""
    import torch

    from internvl_worker.serve.kvbatch import KVBatch
    from internvl_worker.serve.slots import SlotDecoder, length_bucket

    dec = SlotDecoder(model, slots=64, max_len=1024, fused=fused, compile=compile, liger=liger)
    for s in range(64):
        dec.write_prompt(s, kv)
    out = {}
    for b in (1, 8, 64):
        row = {"graph_ms": cuda_ms(lambda: (dec.step([0] * b, [n] * b), dec.greedy(b)))}
        row["graph_replay_only_ms"] = cuda_ms(lambda: dec.graphs[(b, length_bucket(n + 1, 1024))].replay())
        if eager:
            batch = KVBatch(torch.device("cuda"))
            batch.add([object()] * b, [kv] * b)
            tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
            pos = torch.full((b, 1), n, device="cuda")

            def eager_step():
                model(input_ids=tok, attention_mask=batch.attention_mask(1), position_ids=pos, use_cache=True, logits_to_keep=1, cache=batch.cache())
                for layer in batch.layers:  # rewind: every timing writes the same column
                    layer.length -= 1

            row["eager_ms"] = cuda_ms(eager_step)
        row.update({k.replace("_ms", "_tokens_per_s"): round(b * 1000 / v) for k, v in list(row.items()) if "replay" not in k})
        out[b] = row
        print(f"decode step batch {b} ({'fused' if dec.fused is not None else 'transformers'} layers):", json.dumps(row), flush=True)
    del dec
    torch.cuda.empty_cache()
    return out


def new_length_prefill(model, lengths=(301, 317, 333, 349, 365)) -> dict:
    """The first prefill at a prompt length not seen before, with cuDNN's attention allowed (PyTorch's default
    on H100/H200) and without it: cuDNN builds an execution plan per new shape, which a server meets on
    every request of a new length. Text-only prompts through the language model, ms per first call."""
    import torch

    out = {}
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        times = []
        for n in lengths:
            ids = torch.randint(100, 1000, (1, n + (0 if cudnn else 7)), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.model.language_model(input_ids=ids)
            torch.cuda.synchronize()
            times.append(round((time.perf_counter() - t0) * 1000, 2))
        again = cuda_ms(lambda: model.model.language_model(input_ids=ids), 5)
        out["cudnn_on" if cudnn else "cudnn_off"] = {"first_call_ms": times, "repeat_ms": again}
    torch.backends.cuda.enable_cudnn_sdp(True)
    print("prefill at new lengths:", json.dumps(out), flush=True)
    return out


def engine_run(sm, prep, *, new_tokens: int, concurrent: int, **engine_kw) -> dict:
    """The engine in-process: one request alone (tokens/s, time to first token), then `concurrent` at once."""
    import time

    from internvl_worker.serve.engine import Engine, Handle
    from internvl_worker.serve.sampling import SamplingParams

    engine = Engine(sm, max_batch_size=concurrent, max_total_tokens=1024, **engine_kw)
    engine.start()
    try:

        def go(k: int):
            hs = [engine.submit(Handle(SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens), None, prep)) for _ in range(k)]
            total = sum(sum(1 for ev in h.events_sync(timeout=600) if ev[0] == "token") for h in hs)
            return total, hs[0].t_first - hs[0].t_submit

        go(1)
        t0 = time.perf_counter()
        total, first = go(1)
        bs1 = total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        total, _ = go(concurrent)
        conc = total / (time.perf_counter() - t0)
        return {"bs1_tokens_per_s": round(bs1, 1), "ttft_ms_engine": round(first * 1000, 1), f"tokens_per_s_at_{concurrent}": round(conc), "decode_info": engine.decode_info}
    finally:
        engine.shutdown(120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also the engine with --compile (adds ~2 min of compilation)")
    ap.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch
    from PIL import Image
    from transformers.cache_utils import DynamicCache

    from gpu.test_serve_graphs import _served_1b
    from internvl_worker import speedups
    from internvl_worker.serve.engine import encode_images
    from serve.test_slots import _prepared

    sm = _served_1b()
    model = sm.model
    card = torch.cuda.get_device_name()
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    words = " ".join(["describe the picture please tell me what color shape and size each object has"] * 5)
    prep = _prepared(sm, words, img)
    pixel_values, _ = sm.template.tiler([img])
    rec: dict = {"card": card, "date": date.today().isoformat(), "prompt_tokens": len(prep.input_ids)}
    run = dict(new_tokens=args.new_tokens, concurrent=args.concurrent)
    # Order matters: Liger patches the model's modules for good, so everything without it runs first.
    with torch.inference_mode():
        rec["vision_ms"] = cuda_ms(lambda: encode_images(sm, pixel_values))
        ids = torch.tensor([prep.input_ids], device="cuda")

        def prefill():
            cache = DynamicCache()
            model(input_ids=ids, pixel_values=pixel_values.to("cuda", torch.bfloat16), use_cache=True, cache=cache, logits_to_keep=1)
            return cache

        rec["prefill_with_vision_ms"] = cuda_ms(prefill, 10)
        kv = [(layer.keys, layer.values) for layer in prefill().layers]
        n = ids.shape[1]
        rec["decode_step"] = {"torch": step_times(model, kv, n, eager=True, fused=False), "torch+fused": step_times(model, kv, n, eager=False)}
        rec["prefill_new_length_ms"] = new_length_prefill(model)
    rec["engine"] = {
        "eager": engine_run(sm, prep, decode="eager", **run),
        "graphs": engine_run(sm, prep, decode="graphs", liger=False, fused_layers=False, **run),
        "graphs+fused": engine_run(sm, prep, decode="graphs", liger=False, **run),
    }
    print(json.dumps(rec["engine"]), flush=True)
    if args.compile:
        with torch.inference_mode():
            rec["decode_step"]["compiled+fused"] = step_times(model, kv, n, eager=False, compile=True)
        rec["engine"]["graphs+fused+compile"] = engine_run(sm, prep, decode="graphs", liger=False, compile=True, **run)
        print(json.dumps(rec["engine"]["graphs+fused+compile"]), flush=True)
    why = speedups.liger_unavailable()
    if why:
        rec["liger"] = why
    else:
        rec["engine"]["graphs+liger"] = engine_run(sm, prep, decode="graphs", liger=True, fused_layers=False, **run)
        rec["engine"]["graphs+liger+fused"] = engine_run(sm, prep, decode="graphs", liger=True, **run)
        with torch.inference_mode():
            rec["prefill_with_vision_liger_ms"] = cuda_ms(prefill, 10)
            rec["decode_step"]["liger"] = step_times(model, kv, n, eager=False, fused=False)
            rec["decode_step"]["liger+fused"] = step_times(model, kv, n, eager=False, liger=True)
    rec["git_commit"] = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec["command"] = "python bench/decode_profile.py " + " ".join(sys.argv[1:])
    out = Path(args.out_dir) / f"serve-profile-{card.replace(' ', '-')}-{rec['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
