"""Serving benchmark: `internvl serve` against naive HF `generate`, same card, same run.

    python bench/serve_bench.py --quick          # ~5 min on one H100: bs1 latency, concurrency 1/8/32/64, baselines
    python bench/serve_bench.py                  # more requests per level, plus the static-cache HF baseline

What it does:
1. builds a random-weight InternVL3-1B-shaped model (`internvl tiny --shape internvl3-1b`) unless --model_dir;
2. starts `internvl serve` on it (a subprocess, bf16, --max-batch-size 64) and waits for /ready;
3. drives it over HTTP with its own async load generator (aiohttp, TGI /generate_stream): one 448-px image
   (1 tile = 256 image tokens) + ~64 text tokens in, exactly --max_new_tokens out (min_new_tokens = max, so a
   random model's early EOS cannot shorten the work);
   - batch-1 latency: sequential requests -> TTFT, inter-token latency, tokens/s;
   - closed loop at each concurrency: C clients, each sends its next request when the last one ends;
4. stops the server, then runs naive HF `generate` (batch 1 and 8; with --static, the static KV cache too)
   on the same prompt in this process;
5. writes bench/results/serve-first-<card>-<date>.json (format: shared DESIGN.md "Benchmark results format").

Random weights are fine: speed does not depend on weight values. Needs a CUDA GPU for meaningful numbers;
`--shape tiny --device cpu` runs the whole pipeline on a CPU in a minute (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "describe the picture please tell me what color shape and size each object in the image has and where it is left right top bottom".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests per level (about 5 minutes on an H100)")
    p.add_argument("--model_dir", default=None, help="an existing model directory (default: build the random InternVL3-1B shape)")
    p.add_argument("--shape", default="internvl3-1b", choices=["internvl3-1b", "tiny"], help="model shape to build when --model_dir is not given")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="serve/baseline dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop client counts")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--prompt_words", type=int, default=64, help="text words in the prompt (~1 token each)")
    p.add_argument("--image_size", type=int, default=448, help="image side in pixels (448 = one tile)")
    p.add_argument("--bs1_requests", type=int, default=None, help="sequential requests for batch-1 latency (default 10, quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="requests per client at each concurrency (default 4, quick 2)")
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--static", action="store_true", help="also time HF's static KV cache baseline (compiles: +30 s)")
    p.add_argument("--skip_baseline", action="store_true")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    a.concurrency_levels = [int(c) for c in a.concurrency.split(",") if c.strip()]
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.bs1_requests = a.bs1_requests or (4 if a.quick else 10)
    a.rounds = a.rounds or (2 if a.quick else 4)
    return a


# ------------------------------------------------------------------------------------------- inputs


def image_data_url(size: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def prompt_text(words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i + salt) % len(WORDS)] for i in range(words))


def tgi_body(image_url: str, text: str, max_new_tokens: int) -> dict:
    return {"inputs": f"![]({image_url}){text}", "parameters": {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}}


# ------------------------------------------------------------------------------------ load generator


async def one_stream(session, url: str, body: dict) -> dict:
    """One /generate_stream request: token arrival times -> ttft, itl, tokens, ok."""
    t0 = time.perf_counter()
    times, error = [], None
    try:
        async with session.post(url + "/generate_stream", json=body) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        ev = json.loads(line[5:])
                        if "error" in ev:
                            error = ev["error"]
                            break
                        times.append(time.perf_counter())
    except Exception as e:  # connection trouble counts as an error of this request, not of the run
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    ttft = (times[0] - t0) if times else None
    itl = [(b - a) for a, b in zip(times, times[1:])]
    return {"ok": error is None and bool(times), "error": error, "tokens": len(times), "ttft": ttft, "itl": itl, "latency": end - t0}


async def closed_loop(url: str, bodies, concurrency: int, rounds: int, timeout: float = 1800) -> dict:
    """`concurrency` clients, each sending `rounds` requests back to back; aggregate throughput."""
    import aiohttp

    results = []
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def client(k: int):
            for r in range(rounds):
                results.append(await one_stream(session, url, bodies(k * rounds + r)))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def _p(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    per_request = [r["tokens"] / r["latency"] for r in ok if r["latency"] > 0]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_rate": round((len(results) - len(ok)) / max(1, len(results)), 4),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "per_request_tokens_per_s_p50": round(statistics.median(per_request), 2) if per_request else None,
        "ttft_p50_ms": ms(_p(ttft, 0.5)),
        "ttft_p90_ms": ms(_p(ttft, 0.9)),
        "itl_p50_ms": ms(_p(itl, 0.5)),
        "itl_p90_ms": ms(_p(itl, 0.9)),
        "first_errors": [r["error"] for r in results if not r["ok"]][:3],
    }


# ------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The environment for `python -m internvl_worker` subprocesses: this checkout's worker/ importable."""
    path = os.pathsep.join(p for p in (str(ROOT / "worker"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_server(args, model_dir: str, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "internvl_worker", "serve", "--model_id_or_path", model_dir, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size), "--max-concurrent-requests", str(max(256, 4 * max(args.concurrency_levels))),
    ]  # fmt: skip
    env = worker_env()
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 900) -> float:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------------------- baseline


def hf_baseline(args, model_dir: str, image_url: str, text: str) -> dict:
    """Naive `model.generate` on the same prompt: batch 1 (TTFT = a 1-token generate) and batch 8."""
    import torch

    from internvl_worker.infer import build_conversation, generation_config_for, prepare_inputs
    from internvl_worker.modeling import load_model

    loaded = load_model(model_dir, dtype=args.dtype, device_map={"": args.device} if args.device == "cuda" else None)
    model, template = loaded.model, loaded.template
    inputs = prepare_inputs(model, template, build_conversation(text, None, [image_url], None))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    n = args.max_new_tokens
    out: dict = {}

    def timed(batch: int, new: int, **extra) -> float:
        batched = {k: (v.repeat(batch, *([1] * (v.dim() - 1))) if k != "pixel_values" else v.repeat(batch, 1, 1, 1)) for k, v in inputs.items()}
        config = generation_config_for(model, template, max_new_tokens=new, min_new_tokens=new, **extra)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batched, generation_config=config)
        sync()
        return time.perf_counter() - t0

    timed(1, 4)  # warm-up: kernels, allocator
    ttft = statistics.median(timed(1, 1) for _ in range(3))
    t1 = timed(1, n)
    out["hf_naive_bs1"] = {"bs1_tokens_per_s": round(n / t1, 2), "ttft_p50_ms": round(ttft * 1000, 2), "itl_p50_ms": round((t1 - ttft) / max(1, n - 1) * 1000, 2)}
    t8 = timed(8, n)
    out["hf_naive_bs8"] = {"tokens_per_s": round(8 * n / t8, 2)}
    if args.static:
        timed(1, 8, cache_implementation="static")  # compiles the decode step
        ts1 = timed(1, n, cache_implementation="static")
        timed(8, 8, cache_implementation="static")
        ts8 = timed(8, n, cache_implementation="static")
        out["hf_static_bs1"] = {"bs1_tokens_per_s": round(n / ts1, 2)}
        out["hf_static_bs8"] = {"tokens_per_s": round(8 * n / ts8, 2)}
    del loaded, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------- reporting


def card_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown-gpu"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ratios(ours: dict, baselines: dict) -> dict:
    r = {}
    bs1 = baselines.get("hf_naive_bs1", {}).get("bs1_tokens_per_s")
    if bs1 and ours.get("bs1_tokens_per_s"):
        r["bs1_tokens_per_s_vs_hf_naive_bs1"] = round(ours["bs1_tokens_per_s"] / bs1, 3)
    best = max([v.get("tokens_per_s", 0) or 0 for v in baselines.values()] + [v.get("bs1_tokens_per_s", 0) or 0 for v in baselines.values()] + [0])
    if best and ours.get("saturation_tokens_per_s"):
        r["saturation_vs_best_baseline"] = round(ours["saturation_tokens_per_s"] / best, 3)
    b8 = baselines.get("hf_naive_bs8", {}).get("tokens_per_s")
    if b8 and ours.get("tokens_per_s_at_8"):
        r["at_8_vs_hf_naive_bs8"] = round(ours["tokens_per_s_at_8"] / b8, 3)
    return r


def result_path(out_dir: str | Path, card: str, day: date | None = None) -> Path:
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in card.lower()).strip("-")
    return Path(out_dir) / f"serve-first-{slug}-{(day or date.today()).isoformat()}.json"


def write_result(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def build_result(args, *, card: str, config: dict, baselines: dict, ours: dict, levels: dict, argv: list[str]) -> dict:
    return {
        "card": card,
        "command": "python bench/serve_bench.py " + " ".join(argv),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "baselines": baselines,
        "ours": ours,
        "ours_by_concurrency": levels,
        "ratios": ratios(ours, baselines),
    }


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "worker"))
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = str(work / f"model-{args.shape}")
        subprocess.run([sys.executable, "-m", "internvl_worker", "tiny", "--shape", args.shape, "--output_dir", model_dir], check=True, env=worker_env())
    image = image_data_url(args.image_size if args.shape != "tiny" or args.model_dir else 32)
    bodies = lambda i: tgi_body(image, prompt_text(args.prompt_words, salt=i), args.max_new_tokens)  # noqa: E731

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "serve.log"
    proc = start_server(args, model_dir, port, log_path)
    levels: dict = {}
    try:
        startup = wait_ready(url, proc, log_path)
        print(f"server ready in {startup:.1f}s (log: {log_path})", flush=True)
        bs1 = asyncio.run(closed_loop(url, bodies, 1, args.bs1_requests))
        print("batch 1:", json.dumps(bs1), flush=True)
        for c in args.concurrency_levels:
            levels[str(c)] = asyncio.run(closed_loop(url, bodies, c, args.rounds))
            print(f"concurrency {c}:", json.dumps(levels[str(c)]), flush=True)
    finally:
        stop_server(proc)

    ours = {
        "bs1_tokens_per_s": bs1["per_request_tokens_per_s_p50"],
        "ttft_p50_ms": bs1["ttft_p50_ms"],
        "itl_p50_ms": bs1["itl_p50_ms"],
        "startup_to_ready_s": round(startup, 1),
        "error_rate": round(sum(v["errors"] for v in [bs1, *levels.values()]) / max(1, sum(v["requests"] for v in [bs1, *levels.values()])), 4),
    }
    for c, v in levels.items():
        ours[f"tokens_per_s_at_{c}"] = v["tokens_per_s"]
    ours["saturation_tokens_per_s"] = max((v["tokens_per_s"] or 0 for v in levels.values()), default=None)

    baselines = {} if args.skip_baseline else hf_baseline(args, model_dir, image, prompt_text(args.prompt_words))
    print("baselines:", json.dumps(baselines), flush=True)
    config = {
        "model": args.model_dir or f"random {args.shape} (internvl tiny --shape {args.shape})",
        "dtype": args.dtype,
        "attention": "sdpa",
        "request": f"one {args.image_size}px image + {args.prompt_words} words in, {args.max_new_tokens} tokens out (min_new_tokens = max)",
        "concurrency": args.concurrency_levels,
        "bs1_requests": args.bs1_requests,
        "rounds_per_client": args.rounds,
        "max_batch_size": args.max_batch_size,
        "client": "aiohttp closed loop over TGI /generate_stream",
    }
    card = card_name(args.device)
    result = build_result(args, card=card, config=config, baselines=baselines, ours=ours, levels=levels, argv=argv)
    path = write_result(result_path(args.out_dir, card), result)
    print(json.dumps(result["ratios"]), f"\nwritten to {path}", flush=True)
    return 0 if ours["error_rate"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
