"""Serving benchmark: `internvl serve` against naive HF `generate`, same card, same run.

    python bench/serve_bench.py --quick --static  # ~6 min on one H100: every phase below, both baselines
    python bench/serve_bench.py --static          # more requests per level, 60 s per open-loop rate

What it does:
1. builds a random-weight InternVL3-1B-shaped model (`internvl tiny --shape internvl3-1b`) unless --model_dir;
2. starts `internvl serve` on it (a subprocess, bf16, --max-batch-size 64, the server's own admission
   limit: a full batch plus --max-waiting-requests waiting, beyond that 429) and waits for /ready;
3. drives it over HTTP with its own async load generator (aiohttp, TGI /generate_stream): one 448-px image
   (1 tile = 256 image tokens) + ~64 text tokens in, exactly --max_new_tokens out (min_new_tokens = max, so a
   random model's early EOS cannot shorten the work);
   - batch-1 latency: sequential requests -> TTFT, inter-token latency, tokens/s;
   - closed loop at each concurrency (1/8/32/64/128): C clients, each sends its next request when the last ends;
   - open loop: Poisson arrivals (seeded exponential gaps) at rising rates, by default 0.5x/1x/1.5x/2x the
     request rate the 64-client closed loop reached, each for --rate_duration seconds, every request with a
     client timeout. Per rate: offered and completed requests/s, output tokens/s in the steady part of the
     window, TTFT and end-to-end p50/p99, and the count of 200s, 429s (the server refusing excess load, as it
     should), other HTTP errors and client timeouts. saturation_tokens_per_s = the highest output tokens/s
     reached; error_rate = (errors other than 429 + timeouts) / requests;
   - per level, the server's own view from GET /metrics (deltas): its time to first token (submitted to
     the engine -> first token), its queue time when it records one, mean rows per decode step;
4. stops the server, then runs naive HF `generate` (batch 1 and 8; with --static, the static KV cache too)
   on the same prompt in this process;
5. writes bench/results/serve-<name>-<card>-<date>.json (format: shared DESIGN.md "Benchmark results format").

Random weights are fine: speed does not depend on weight values. Needs a CUDA GPU for meaningful numbers;
`--shape tiny --device cpu` runs the whole pipeline on a CPU in a minute or two (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # record.py, also when a test loads this file by path
from record import build_record, card_name, command_line, save_record  # noqa: E402
WORDS = "describe the picture please tell me what color shape and size each object in the image has and where it is left right top bottom".split()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests per level and 20 s per open-loop rate (about 6 minutes on an H100 with --static)")
    p.add_argument("--name", default="speed", help="the <what> of the result file: serve-<name>-<card>-<date>.json")
    p.add_argument("--model_dir", default=None, help="an existing model directory (default: build the random InternVL3-1B shape)")
    p.add_argument("--shape", default="internvl3-1b", choices=["internvl3-1b", "tiny"], help="model shape to build when --model_dir is not given")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="serve/baseline dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--concurrency", default="1,8,32,64,128", help="closed-loop client counts")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--prompt_words", type=int, default=64, help="text words in the prompt (~1 token each)")
    p.add_argument("--image_pool", type=int, default=2048, help="different images sent in turn (more than the server's feature cache holds, so the vision path is measured)")
    p.add_argument("--image_size", type=int, default=448, help="image side in pixels (448 = one tile)")
    p.add_argument("--bs1_requests", type=int, default=None, help="sequential requests for batch-1 latency (default 10, quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="requests per client at each concurrency (default 4, quick 2)")
    g = p.add_argument_group("open loop (Poisson arrivals)")
    g.add_argument("--rates", default=None, help="requests/s to offer, e.g. 4,8,16 (default: --rate_factors x the closed-loop request rate at --rate_reference clients)")
    g.add_argument("--rate_factors", default="0.5,1,1.5,2", help="multiples of the reference request rate (when --rates is not given)")
    g.add_argument("--rate_reference", type=int, default=64, help="the closed-loop level whose request rate is 1x (the highest level run when this one was not)")
    g.add_argument("--rate_duration", type=float, default=None, help="seconds of arrivals per rate (default 60, quick 20); the requests still running then are waited for")
    g.add_argument("--rate_warmup", type=float, default=None, help="seconds at the start of each rate left out of throughput and latency (default a quarter of --rate_duration)")
    g.add_argument("--request_timeout", type=float, default=60.0, help="client timeout per open-loop request, seconds; a request past it counts as a timeout (an error)")
    g.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    g.add_argument("--skip_open_loop", action="store_true")
    g = p.add_argument_group("server")
    g.add_argument("--max_batch_size", type=int, default=64)
    g.add_argument("--max_waiting", type=int, default=None, help="the server's --max-waiting-requests (default: --max_batch_size, or more if the largest closed-loop level needs it)")
    g.add_argument("--serve_args", default="", help="more `internvl serve` flags, e.g. \"--decode eager\"")
    g.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--static", action="store_true", help="also time HF's static KV cache baseline (compiles: +1 min)")
    p.add_argument("--skip_baseline", action="store_true")
    p.add_argument("--out_dir", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    a.concurrency_levels = [int(c) for c in a.concurrency.split(",") if c.strip()]
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.bs1_requests = a.bs1_requests or (4 if a.quick else 10)
    a.rounds = a.rounds or (2 if a.quick else 4)
    a.rate_list = _floats(a.rates) if a.rates else None
    a.rate_factor_list = _floats(a.rate_factors)
    a.rate_duration = a.rate_duration or (20.0 if a.quick else 60.0)
    a.rate_warmup = a.rate_duration / 4 if a.rate_warmup is None else a.rate_warmup
    if not 0 <= a.rate_warmup < a.rate_duration:
        p.error(f"--rate_warmup {a.rate_warmup} must be in [0, --rate_duration {a.rate_duration})")
    most = max(a.concurrency_levels, default=1)
    a.max_waiting = a.max_waiting if a.max_waiting is not None else max(a.max_batch_size, most - a.max_batch_size)
    a.max_concurrent = max(128, most)  # TGI's default, or room for the largest closed loop
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


def image_pool(size: int, n: int) -> list[str]:
    """n different images (coloured boxes on a gradient, seeded by index, JPEG like photos clients send): the
    server caches vision features by image content, so a benchmark of the vision path must not repeat one."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        base = np.stack([np.add.outer(ramp, ramp) / 2 * rng.uniform(0.3, 1.0) for _ in range(3)], -1).astype(np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
            x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def prompt_text(words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i + salt) % len(WORDS)] for i in range(words))


def tgi_body(image_url: str, text: str, max_new_tokens: int) -> dict:
    return {"inputs": f"![]({image_url}){text}", "parameters": {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}}


# ------------------------------------------------------------------------------------ load generator


async def one_stream(session, url: str, body: dict) -> dict:
    """One /generate_stream request: token arrival times -> ttft, itl, tokens, and how it ended.

    `kind`: ok | rejected (HTTP 429, the server refusing excess load) | http_error (any other status) |
    timeout (the client's) | stream_error (an error event inside the stream) | connection_error."""
    t0 = time.perf_counter()
    times, error, status, kind = [], None, None, "ok"
    try:
        async with session.post(url + "/generate_stream", json=body) as resp:
            status = resp.status
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                kind = "rejected" if resp.status == 429 else "http_error"
            else:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        ev = json.loads(line[5:])
                        if "error" in ev:
                            error, kind = ev["error"], "stream_error"
                            break
                        times.append(time.perf_counter())
    except asyncio.TimeoutError:
        error, kind = f"client timeout after {time.perf_counter() - t0:.1f}s", "timeout"
    except Exception as e:  # connection trouble counts as an error of this request, not of the run
        error, kind = f"{type(e).__name__}: {e}", "connection_error"
    end = time.perf_counter()
    if kind == "ok" and not times:
        error, kind = "stream ended without a token", "stream_error"
    ttft = (times[0] - t0) if times else None
    itl = [(b - a) for a, b in zip(times, times[1:])]
    return {"ok": kind == "ok", "kind": kind, "status": status, "error": error, "tokens": len(times), "ttft": ttft, "itl": itl, "latency": end - t0, "t0": t0, "end": end, "times": times}


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


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival times in [0, duration): exponential gaps of mean 1/rate from a seeded generator."""
    rng, out, t = random.Random(seed), [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


async def open_loop(url: str, bodies, rate: float, duration: float, *, warmup: float = 0.0, timeout: float = 60.0, seed: int = 0, first: int = 0) -> dict:
    """Requests at Poisson arrival times for `duration` seconds, each with a client timeout, whatever the
    server's state (open loop: arrivals do not wait for answers); then waits for the ones still running."""
    import aiohttp

    arrivals = poisson_arrivals(rate, duration, seed)
    conn = aiohttp.TCPConnector(limit=0)  # no client-side queue: every arrival goes out at its time
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        tasks, lag = [], []
        t0 = time.perf_counter()
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.append(time.perf_counter() - t0 - at)
            tasks.append(asyncio.create_task(one_stream(session, url, bodies(first + i))))
        results = await asyncio.gather(*tasks)
        t_end = time.perf_counter()
    out = summarize_open(results, t0=t0, duration=duration, warmup=warmup, rate=rate)
    out["drain_s"] = round(t_end - t0 - duration, 2)
    out["send_lag_p99_ms"] = round(_p(lag, 0.99) * 1000, 2) if lag else None  # the client keeping up with its schedule
    return out


def _p(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _ms(v):
    return None if v is None else round(v * 1000, 2)


def _counts(results: list[dict]) -> dict:
    kinds = [r["kind"] for r in results]
    return {
        "ok_200": kinds.count("ok"),
        "rejected_429": kinds.count("rejected"),
        "http_errors": kinds.count("http_error"),
        "timeouts": kinds.count("timeout"),
        "other_errors": kinds.count("stream_error") + kinds.count("connection_error"),
    }


def summarize(results: list[dict], wall: float) -> dict:
    """Closed-loop summary. `errors` are failures (429s are counted apart, as `rejected_429`)."""
    ok = [r for r in results if r["ok"]]
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    per_request = [r["tokens"] / r["latency"] for r in ok if r["latency"] > 0]
    counts = _counts(results)
    errors = len(results) - counts["ok_200"] - counts["rejected_429"]
    return {
        "requests": len(results),
        "errors": errors,
        "error_rate": round(errors / max(1, len(results)), 4),
        **counts,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "per_request_tokens_per_s_p50": round(statistics.median(per_request), 2) if per_request else None,
        "ttft_mean_ms": _ms(statistics.fmean(ttft)) if ttft else None,
        "ttft_p50_ms": _ms(_p(ttft, 0.5)),
        "ttft_p90_ms": _ms(_p(ttft, 0.9)),
        "itl_p50_ms": _ms(_p(itl, 0.5)),
        "itl_p90_ms": _ms(_p(itl, 0.9)),
        "first_errors": [r["error"] for r in results if not r["ok"]][:3],
    }


def summarize_open(results: list[dict], *, t0: float, duration: float, warmup: float, rate: float) -> dict:
    """One open-loop rate. Throughput counts what the server delivered inside the steady window
    [t0 + warmup, t0 + duration] (tokens streamed, requests finished); latencies are those of the requests
    sent inside it; the counts cover every request sent at this rate."""
    lo, hi = t0 + warmup, t0 + duration
    window = hi - lo
    in_window = [r for r in results if lo <= r["t0"] < hi]
    ok = [r for r in in_window if r["ok"]]
    tokens = sum(1 for r in results for t in r["times"] if lo <= t < hi)
    done = sum(1 for r in results if r["ok"] and lo <= r["end"] < hi)
    ttft = [r["ttft"] for r in ok]
    e2e = [r["latency"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    rejected = [r["latency"] for r in results if r["kind"] == "rejected"]
    counts = _counts(results)
    failed = counts["http_errors"] + counts["timeouts"] + counts["other_errors"]
    return {
        "offered_rps": round(rate, 3),
        "sent_rps": round(len(results) / duration, 3),
        "duration_s": duration,
        "warmup_s": warmup,
        "requests": len(results),
        **counts,
        "error_rate": round(failed / max(1, len(results)), 4),
        "reject_rate": round(counts["rejected_429"] / max(1, len(results)), 4),
        "completed_rps": round(done / window, 3),
        "tokens_per_s": round(tokens / window, 2),
        "ttft_p50_ms": _ms(_p(ttft, 0.5)),
        "ttft_p99_ms": _ms(_p(ttft, 0.99)),
        "e2e_p50_ms": _ms(_p(e2e, 0.5)),
        "e2e_p99_ms": _ms(_p(e2e, 0.99)),
        "itl_p50_ms": _ms(_p(itl, 0.5)),
        "reject_latency_p99_ms": _ms(_p(rejected, 0.99)),  # how fast a 429 comes back
        "first_errors": [r["error"] for r in results if not r["ok"] and r["kind"] != "rejected"][:3],
    }


# ------------------------------------------------------------------------------- the server's view


def scrape(url: str) -> dict[str, float] | None:
    """GET /metrics -> {series: value}, series as `name` or `name{labels}` (Prometheus text format)."""
    import requests

    try:
        text = requests.get(url + "/metrics", timeout=10).text
    except requests.RequestException:
        return None
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                pass
    return out


def server_view(before: dict | None, after: dict | None) -> dict:
    """What the server measured during one level (deltas of its histograms and counters)."""
    if not before or not after:
        return {}

    def delta(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    def mean_ms(name: str, labels: str = ""):
        n = delta(f"{name}_count{labels}")
        return round(delta(f"{name}_sum{labels}") / n * 1000, 2) if n > 0 else None

    steps = delta("internvl_batch_size_count")
    statuses = {}
    for series in after:
        if series.startswith("internvl_requests_total{") and 'route="/generate_stream"' in series:
            code = series.split('status="', 1)[1].split('"', 1)[0]
            if delta(series):
                statuses[code] = int(delta(series))
    return {
        "server_ttft_mean_ms": mean_ms("internvl_time_to_first_token_seconds"),  # submitted to the engine -> first token
        "server_queue_mean_ms": mean_ms("internvl_queue_seconds"),  # None until the engine records queue time
        "server_request_mean_ms": mean_ms("internvl_request_duration_seconds", '{route="/generate_stream"}'),
        "prefill_rounds": int(delta("internvl_prefill_seconds_count")),  # admission rounds: vision + prefill of the newcomers together
        "prefill_round_mean_ms": mean_ms("internvl_prefill_seconds"),
        "prefill_round_mean_requests": round(delta("internvl_prefill_requests_sum") / delta("internvl_prefill_requests_count"), 2) if delta("internvl_prefill_requests_count") > 0 else None,
        "decode_steps": int(steps),
        "mean_batch_rows": round(delta("internvl_batch_size_sum") / steps, 2) if steps > 0 else None,
        "generated_tokens": int(delta("internvl_generated_tokens_total")),
        "statuses": statuses,
    }


def with_server_view(url: str, run):
    before = scrape(url)
    out = run()
    view = server_view(before, scrape(url))
    if view:
        out["server"] = view
        if view.get("server_ttft_mean_ms") is not None and out.get("ttft_mean_ms") is not None:
            # client TTFT - server TTFT: HTTP, body, image decode and tiling, the vision tower, waiting for a worker
            view["before_engine_mean_ms"] = round(out["ttft_mean_ms"] - view["server_ttft_mean_ms"], 2)
    return out


# ------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The environment for `python -m internvl_worker` subprocesses: this checkout's worker/ importable."""
    path = os.pathsep.join(p for p in (str(ROOT / "worker"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def serve_command(args, model_dir: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "internvl_worker", "serve", "--model_id_or_path", model_dir, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size), "--max-concurrent-requests", str(args.max_concurrent),
        "--max-waiting-requests", str(args.max_waiting), *shlex.split(args.serve_args),
    ]  # fmt: skip


def start_server(args, model_dir: str, port: int, log_path: Path) -> subprocess.Popen:
    env = worker_env()
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.Popen(serve_command(args, model_dir, port), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)


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


def server_info(url: str) -> dict:
    import requests

    try:
        info = requests.get(url + "/info", timeout=10).json()
    except (requests.RequestException, ValueError):
        return {}
    keys = ("max_batch_size", "max_concurrent_requests", "max_waiting_requests", "admission_limit", "decode", "model_dtype", "max_total_tokens")
    return {k: info[k] for k in keys if k in info}


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def open_loop_rates(args, levels: dict) -> tuple[list[float], dict]:
    """The rates to offer: --rates, or --rate_factors x the reference level's measured request rate."""
    if args.rate_list:
        return args.rate_list, {"rates": "given (--rates)"}
    measured = {int(c): v for c, v in levels.items() if v.get("requests_per_s")}
    if not measured:
        return [], {"rates": "none: no closed-loop level finished a request"}
    ref = args.rate_reference if args.rate_reference in measured else max(measured)
    base = measured[ref]["requests_per_s"]
    return [round(f * base, 3) for f in args.rate_factor_list], {"rates": f"{args.rate_factors} x {base} requests/s (closed loop at {ref} clients)", "reference_rps": base, "reference_clients": ref}


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


def ratios(ours: dict, baselines: dict) -> dict:
    r = {}
    bs1 = baselines.get("hf_naive_bs1", {}).get("bs1_tokens_per_s")
    if bs1 and ours.get("bs1_tokens_per_s"):
        r["bs1_tokens_per_s_vs_hf_naive_bs1"] = round(ours["bs1_tokens_per_s"] / bs1, 3)
    sbs1 = baselines.get("hf_static_bs1", {}).get("bs1_tokens_per_s")
    if sbs1 and ours.get("bs1_tokens_per_s"):
        r["bs1_tokens_per_s_vs_hf_static_bs1"] = round(ours["bs1_tokens_per_s"] / sbs1, 3)
    best = max([v.get("tokens_per_s", 0) or 0 for v in baselines.values()] + [v.get("bs1_tokens_per_s", 0) or 0 for v in baselines.values()] + [0])
    if best and ours.get("saturation_tokens_per_s"):
        r["saturation_vs_best_baseline"] = round(ours["saturation_tokens_per_s"] / best, 3)
    b8 = baselines.get("hf_naive_bs8", {}).get("tokens_per_s")
    if b8 and ours.get("tokens_per_s_at_8"):
        r["at_8_vs_hf_naive_bs8"] = round(ours["tokens_per_s_at_8"] / b8, 3)
    s8 = baselines.get("hf_static_bs8", {}).get("tokens_per_s")
    if s8 and ours.get("tokens_per_s_at_8"):
        r["at_8_vs_hf_static_bs8"] = round(ours["tokens_per_s_at_8"] / s8, 3)
    return r


def build_result(*, card: str, config: dict, baselines: dict, ours: dict, levels: dict, argv: list[str], bs1: dict | None = None, open_loop: list | None = None) -> dict:
    """record.py's record (DESIGN.md's fields) plus this benchmark's phases."""
    return build_record(
        card=card, config=config, baselines=baselines, ours=ours, ratios=ratios(ours, baselines), command=command_line(["bench/serve_bench.py", *argv]),
        ours_bs1=bs1 or {}, ours_by_concurrency=levels, ours_open_loop=open_loop or [],
    )  # fmt: skip


def summarize_ours(bs1: dict, levels: dict, rates: list[dict], startup: float) -> dict:
    """The headline metrics (DESIGN.md names). Saturation comes from the open loop when it ran."""
    phases = [bs1, *levels.values(), *rates]
    failed = sum(p.get("requests", 0) - p.get("ok_200", 0) - p.get("rejected_429", 0) for p in phases)
    total = sum(p.get("requests", 0) for p in phases)
    ours = {
        "bs1_tokens_per_s": bs1["per_request_tokens_per_s_p50"],
        "ttft_p50_ms": bs1["ttft_p50_ms"],
        "itl_p50_ms": bs1["itl_p50_ms"],
        "startup_to_ready_s": round(startup, 1),
        "error_rate": round(failed / max(1, total), 4),  # (errors other than 429 + client timeouts) / requests, every phase
        "requests": total,
        "rejected_429": sum(p.get("rejected_429", 0) for p in phases),
    }
    for c, v in levels.items():
        ours[f"tokens_per_s_at_{c}"] = v["tokens_per_s"]
    closed_best = max((v["tokens_per_s"] or 0 for v in levels.values()), default=None)
    ours["closed_loop_max_tokens_per_s"] = closed_best
    if rates:
        top = max(rates, key=lambda r: r["tokens_per_s"] or 0)
        ours.update({
            "saturation_tokens_per_s": top["tokens_per_s"], "saturation_source": "open loop", "saturation_offered_rps": top["offered_rps"],
            "saturation_completed_rps": top["completed_rps"], "saturation_ttft_p50_ms": top["ttft_p50_ms"], "saturation_ttft_p99_ms": top["ttft_p99_ms"],
            "saturation_e2e_p50_ms": top["e2e_p50_ms"], "saturation_e2e_p99_ms": top["e2e_p99_ms"],
            "open_loop_error_rate": round(sum(r["requests"] * r["error_rate"] for r in rates) / max(1, sum(r["requests"] for r in rates)), 4),
        })  # fmt: skip
    else:
        ours.update({"saturation_tokens_per_s": closed_best, "saturation_source": "closed loop"})
    return ours


def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else str(v)


def print_tables(bs1: dict, levels: dict, rates: list[dict]) -> None:
    rows = [("batch 1", bs1), *((f"{c} clients", v) for c, v in levels.items())]
    print("\nclosed loop")
    print(f"{'load':>11} {'reqs':>5} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'errors':>6} {'429':>4} {'srv TTFT':>9} {'rows/step':>9}")
    for name, v in rows:
        srv = v.get("server", {})
        print(f"{name:>11} {v['requests']:>5} {_fmt(v['tokens_per_s'], 1):>9} {_fmt(v['ttft_p50_ms']):>9} {_fmt(v['ttft_p90_ms']):>9} {_fmt(v['itl_p50_ms'], 1):>8} "
              f"{v['errors']:>6} {v['rejected_429']:>4} {_fmt(srv.get('server_ttft_mean_ms')):>9} {_fmt(srv.get('mean_batch_rows'), 1):>9}")  # fmt: skip
    if rates:
        print("\nopen loop (Poisson arrivals; latencies in ms; tokens/s and done/s over the steady window)")
        print(f"{'offered/s':>9} {'sent/s':>7} {'done/s':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p50':>8} {'e2e p99':>8} {'200':>5} {'429':>5} {'HTTP err':>8} {'timeout':>7} {'other':>5}")
        for r in rates:
            print(f"{r['offered_rps']:>9.2f} {r['sent_rps']:>7.2f} {r['completed_rps']:>7.2f} {_fmt(r['tokens_per_s'], 1):>9} {_fmt(r['ttft_p50_ms']):>9} {_fmt(r['ttft_p99_ms']):>9} "
                  f"{_fmt(r['e2e_p50_ms']):>8} {_fmt(r['e2e_p99_ms']):>8} {r['ok_200']:>5} {r['rejected_429']:>5} {r['http_errors']:>8} {r['timeouts']:>7} {r['other_errors']:>5}")  # fmt: skip
    print(flush=True)


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
    side = args.image_size if args.shape != "tiny" or args.model_dir else 32
    image = image_data_url(side)
    # A different image for every request (the pool outlasts the server's feature cache), so every request
    # pays for decoding, tiling and the vision tower; the repeated-image phase measures the cache apart.
    pool = image_pool(side, args.image_pool)
    bodies = lambda i: tgi_body(pool[i % len(pool)], prompt_text(args.prompt_words, salt=i), args.max_new_tokens)  # noqa: E731
    same_image = lambda i: tgi_body(image, prompt_text(args.prompt_words, salt=i), args.max_new_tokens)  # noqa: E731

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "serve.log"
    proc = start_server(args, model_dir, port, log_path)
    levels: dict = {}
    rates: list[dict] = []
    rate_note: dict = {}
    try:
        startup = wait_ready(url, proc, log_path)
        info = server_info(url)
        print(f"server ready in {startup:.1f}s (log: {log_path}): {json.dumps(info)}", flush=True)
        asyncio.run(closed_loop(url, bodies, 1, 1))  # one unmeasured request: this image size's first pass
        bs1 = with_server_view(url, lambda: asyncio.run(closed_loop(url, bodies, 1, args.bs1_requests)))
        print("batch 1:", json.dumps(bs1), flush=True)
        asyncio.run(closed_loop(url, same_image, 1, 1))  # puts the image in the server's feature cache
        bs1_cached = with_server_view(url, lambda: asyncio.run(closed_loop(url, same_image, 1, args.bs1_requests)))
        print("batch 1, the same image again (feature cache):", json.dumps(bs1_cached), flush=True)
        for c in args.concurrency_levels:
            levels[str(c)] = with_server_view(url, lambda c=c: asyncio.run(closed_loop(url, bodies, c, args.rounds)))
            print(f"concurrency {c}:", json.dumps(levels[str(c)]), flush=True)
        if not args.skip_open_loop:
            rate_list, rate_note = open_loop_rates(args, levels)
            print("open loop:", json.dumps(rate_note), flush=True)
            first = 1_000_000  # prompts not used by the closed loop
            for k, rate in enumerate(rate_list):
                run = lambda rate=rate, k=k: asyncio.run(  # noqa: E731
                    open_loop(url, bodies, rate, args.rate_duration, warmup=args.rate_warmup, timeout=args.request_timeout, seed=args.seed + k, first=first + 100_000 * k)
                )
                rates.append(with_server_view(url, run))
                print(f"rate {rate}/s:", json.dumps(rates[-1]), flush=True)
    finally:
        stop_server(proc)

    ours = summarize_ours(bs1, levels, rates, startup)
    ours["ttft_p50_ms_repeated_image"] = bs1_cached["ttft_p50_ms"]
    print_tables(bs1, levels, rates)
    baselines = {} if args.skip_baseline else hf_baseline(args, model_dir, image, prompt_text(args.prompt_words))
    print("baselines:", json.dumps(baselines), flush=True)
    config = {
        "model": args.model_dir or f"random {args.shape} (internvl tiny --shape {args.shape})",
        "dtype": args.dtype,
        "attention": "sdpa",
        "request": f"one {args.image_size}px image + {args.prompt_words} words in, {args.max_new_tokens} tokens out (min_new_tokens = max)",
        "images": f"a different image per request ({args.image_pool} in turn), except ours_bs1_repeated_image (one image, served from the feature cache)",
        "concurrency": args.concurrency_levels,
        "bs1_requests": args.bs1_requests,
        "rounds_per_client": args.rounds,
        "open_loop": {
            "rates_rps": [r["offered_rps"] for r in rates], **rate_note, "duration_s": args.rate_duration, "warmup_s": args.rate_warmup,
            "client_timeout_s": args.request_timeout, "seed": args.seed, "arrivals": "Poisson (seeded exponential gaps)",
        } if not args.skip_open_loop else None,  # fmt: skip
        "max_batch_size": args.max_batch_size,
        "server_command": " ".join(serve_command(args, "<model>", 0)[1:]),
        "server_info": info,
        "client": "aiohttp over TGI /generate_stream: closed loop (C clients back to back) and open loop (Poisson arrivals)",
    }
    card = card_name() if args.device == "cuda" else "cpu"
    result = build_result(card=card, config=config, baselines=baselines, ours=ours, levels=levels, argv=argv, bs1=bs1, open_loop=rates)
    result["ours_bs1_repeated_image"] = bs1_cached
    path = save_record(args.out_dir, "serve", args.name, result)
    print(json.dumps(result["ratios"]), f"\nwritten to {path}", flush=True)
    return 0 if ours["error_rate"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
