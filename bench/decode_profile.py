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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch
    from PIL import Image
    from transformers.cache_utils import DynamicCache

    from gpu.test_serve_graphs import _served_1b
    from internvl_worker.serve.engine import Engine, Handle, encode_images
    from internvl_worker.serve.kvbatch import KVBatch
    from internvl_worker.serve.sampling import SamplingParams
    from internvl_worker.serve.slots import SlotDecoder, length_bucket
    from serve.test_slots import _prepared

    sm = _served_1b()
    model = sm.model
    card = torch.cuda.get_device_name()
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    words = " ".join(["describe the picture please tell me what color shape and size each object has"] * 5)
    prep = _prepared(sm, words, img)
    pixel_values, _ = sm.template.tiler([img])
    rec: dict = {"card": card, "date": date.today().isoformat(), "prompt_tokens": len(prep.input_ids)}
    with torch.inference_mode():
        rec["vision_ms"] = cuda_ms(lambda: encode_images(sm, pixel_values))
        ids = torch.tensor([prep.input_ids], device="cuda")

        def prefill():
            cache = DynamicCache()
            model(input_ids=ids, pixel_values=pixel_values.to("cuda", torch.bfloat16), use_cache=True, cache=cache, logits_to_keep=1)
            return cache

        rec["prefill_with_vision_ms"] = cuda_ms(prefill, 10)
        cache = prefill()
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        n = ids.shape[1]
        steps = {}
        decoders = {}
        for name, comp in (("graph", False), ("compiled_graph", True)):
            t0 = time.perf_counter()
            dec = SlotDecoder(model, slots=64, max_len=1024, compile=comp)
            for s in range(64):
                dec.write_prompt(s, kv)
            dec.step([0], [n])  # compiles (batch 1 apart), captures
            dec.step([0] * 8, [n] * 8)
            torch.cuda.synchronize()
            decoders[name] = dec
            rec[f"{name}_first_steps_s"] = round(time.perf_counter() - t0, 1)
        for b in (1, 8, 64):
            batch = KVBatch(torch.device("cuda"))
            batch.add([object()] * b, [kv] * b)
            tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
            pos = torch.full((b, 1), n, device="cuda")

            def eager_step():
                mask = batch.attention_mask(1)
                model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, cache=batch.cache())
                for layer in batch.layers:  # rewind: every timing writes the same column
                    layer.length -= 1

            row = {"eager_ms": cuda_ms(eager_step)}
            for name, dec in decoders.items():
                row[f"{name}_ms"] = cuda_ms(lambda: dec.step([0] * b, [n] * b).float().argmax(-1).tolist())
                row[f"{name}_replay_only_ms"] = cuda_ms(lambda: dec.graphs[(b, length_bucket(n + 1, 1024))].replay())
            row.update({k.replace("_ms", "_tokens_per_s"): round(b * 1000 / v) for k, v in list(row.items()) if "replay" not in k})
            steps[b] = row
            print(f"decode step batch {b}:", json.dumps(row), flush=True)
            del batch
        del decoders
        torch.cuda.empty_cache()
        rec["decode_step"] = steps
    engines = {}
    for mode, comp in (("eager", False), ("graphs", False), ("graphs", True)):
        engine = Engine(sm, max_batch_size=args.concurrent, decode=mode, max_total_tokens=1024, compile=comp)
        mode = mode + ("+compile" if comp else "")
        engine.start()
        try:
            def go(k: int):
                hs = [engine.submit(Handle(SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens), None, prep)) for _ in range(k)]
                firsts, total = [], 0
                for h in hs:
                    toks = [ev for ev in h.events_sync(timeout=600) if ev[0] == "token"]
                    total += len(toks)
                    firsts.append(h.t_first - h.t_submit)
                return total, firsts

            go(1)
            t0 = time.perf_counter()
            total, firsts = go(1)
            bs1 = total / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            total, _ = go(args.concurrent)
            conc = total / (time.perf_counter() - t0)
            engines[mode] = {"bs1_tokens_per_s": round(bs1, 1), "ttft_ms_engine": round(firsts[0] * 1000, 1), f"tokens_per_s_at_{args.concurrent}": round(conc), "decode_info": engine.decode_info}
            print(mode, json.dumps(engines[mode]), flush=True)
        finally:
            engine.shutdown(120)
    rec["engine"] = engines
    rec["git_commit"] = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec["command"] = "python bench/decode_profile.py " + " ".join(sys.argv[1:])
    out = Path(args.out_dir) / f"serve-profile-{card.replace(' ', '-')}-{rec['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
